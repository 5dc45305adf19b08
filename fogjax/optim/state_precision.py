"""Optimizer-state precision: the four per-state dtypes, their presets, and their validation.

``optim.state_precision`` names a preset that sets the master weights, both moments and the
gradients at once (the FOG release's per-state dtype flags on Megatron's precision-aware
optimizer); ``custom`` takes the four ``optim.*_dtype`` fields one by one. See
docs/optimizer_state.md for which paper run each preset matches.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fogjax.optim.adam_lowp import MASTER_ROUNDINGS
from fogjax.optim.moment_formats import moment_format, nearest_min_shrink, stored_shrink

MASTER_DTYPES = ("float32", "bfloat16", "float16")
GRAD_DTYPES = ("float32", "bfloat16")
MOMENT_ROUNDINGS = ("auto", "nearest", "stochastic")


@dataclasses.dataclass(frozen=True)
class StatePrecision:
    """The resolved dtypes of the optimizer's states (config spellings)."""

    master: str = "float32"
    mu: str = "float32"
    nu: str = "float32"
    grad: str = "float32"

    @property
    def is_float32(self) -> bool:
        return self == StatePrecision()


PRESETS: dict[str, StatePrecision] = {
    "fp32": StatePrecision(),
    # The long FOG run after 130B tokens: FP16 master weights and moments, BF16 gradients.
    "fog_fp16": StatePrecision("float16", "float16", "float16", "bfloat16"),
    # The release's preset keeping the first moment in FP8 (E4M3), the rest as fog_fp16.
    "fog_fp8_m1": StatePrecision("float16", "float8_e4m3fn", "float16", "bfloat16"),
    # FOG-flash 390M with 8-bit moments (loss 2.645 vs 2.649); master and gradients float32.
    "fog_fp8": StatePrecision("float32", "float8_e4m3fn", "float8_e4m3fn", "float32"),
    # Not from the paper: bfloat16 everywhere, the master exact through a 16-bit remainder.
    "bf16": StatePrecision("bfloat16", "bfloat16", "bfloat16", "bfloat16"),
}
CUSTOM = "custom"

# The optim.* precision fields and their defaults (fogjax/config_lib.py): an optim section
# without them (one built by hand) means today's float32 optimizer.
FIELD_DEFAULTS = {
    "state_precision": CUSTOM,
    "master_dtype": "float32",
    "mu_dtype": "float32",
    "nu_dtype": "float32",
    "grad_dtype": "float32",
    "master_rounding": "auto",
    "state_block_size": 128,
    "moment_rounding": "auto",
}
# The fields that decide the layout of params and opt_state (a checkpoint written with other
# values cannot be restored; fogjax.checkpoint names them in its error). Rounding is not layout.
LAYOUT_FIELDS = tuple(name for name in FIELD_DEFAULTS if name != "moment_rounding")


def field(optim_cfg: Any, name: str) -> Any:
    """``optim_cfg.<name>``, or its default when the section lacks it."""
    return getattr(optim_cfg, name, FIELD_DEFAULTS[name])


def _check(value: str, allowed: Any, name: str) -> None:
    if value not in allowed:
        raise ValueError(
            f"Unknown optim.{name}={value!r}; choose one of {list(allowed)} "
            f"(e.g. --config.optim.{name}={list(allowed)[0]})."
        )


def resolve(optim_cfg: Any) -> StatePrecision:
    """The :class:`StatePrecision` of the ``optim`` config section (fields state_precision,
    master_dtype, mu_dtype, nu_dtype, grad_dtype, master_rounding, state_block_size,
    moment_rounding).

    Raises ValueError naming the field and the fix: unknown names, a preset contradicted by a
    dtype field set to something else, 'remainder' without a bfloat16 master, 'stochastic' on a
    float32 master, moment_rounding=nearest on a moment whose decay it would stall
    (:func:`moment_rounding`), int8 moments without blocks.
    """
    name = field(optim_cfg, "state_precision")
    fields = {
        "master": field(optim_cfg, "master_dtype"),
        "mu": field(optim_cfg, "mu_dtype"),
        "nu": field(optim_cfg, "nu_dtype"),
        "grad": field(optim_cfg, "grad_dtype"),
    }
    _check(field(optim_cfg, "master_dtype"), MASTER_DTYPES, "master_dtype")
    moment_format(field(optim_cfg, "mu_dtype"), "optim.mu_dtype")
    moment_format(field(optim_cfg, "nu_dtype"), "optim.nu_dtype")
    _check(field(optim_cfg, "grad_dtype"), GRAD_DTYPES, "grad_dtype")
    if name == CUSTOM:
        precision = StatePrecision(**fields)
    elif name in PRESETS:
        precision = PRESETS[name]
        for state, value in fields.items():
            preset_value = getattr(precision, state)
            if value not in ("float32", preset_value):
                raise ValueError(
                    f"optim.{state}_dtype={value} contradicts optim.state_precision={name}, "
                    f"which sets {state}_dtype={preset_value}. Use "
                    f"--config.optim.state_precision=custom to choose the dtypes one by one."
                )
    else:
        raise ValueError(
            f"Unknown optim.state_precision={name!r}; choose one of "
            f"{[*PRESETS, CUSTOM]} (e.g. --config.optim.state_precision=fog_fp16)."
        )
    rounding = master_rounding(optim_cfg)
    if rounding == "remainder" and precision.master != "bfloat16":
        raise ValueError(
            f"optim.master_rounding=remainder needs a bfloat16 master (got master_dtype="
            f"{precision.master}): a 16-bit remainder completes only bfloat16 to float32. Use "
            "--config.optim.master_rounding=stochastic (or nearest) for a float16 master."
        )
    if rounding == "stochastic" and precision.master == "float32":
        raise ValueError(
            "optim.master_rounding=stochastic needs a 16-bit master (optim.master_dtype="
            "bfloat16 or float16); a float32 master is not rounded."
        )
    _moment_rounding(optim_cfg, precision)
    block = int(field(optim_cfg, "state_block_size"))
    if block < 0:
        raise ValueError(f"optim.state_block_size={block} must be >= 0 (0 = one scale per tensor).")
    if block == 0 and "int8" in (precision.mu, precision.nu):
        raise ValueError(
            "int8 moments are blockwise: set --config.optim.state_block_size to a block length "
            "(e.g. 128), or use float8_e4m3fn for one scale per tensor."
        )
    return precision


def master_rounding(optim_cfg: Any) -> str:
    """``optim.master_rounding``, where 'auto' means remainder for the bf16 preset, else nearest."""
    rounding = field(optim_cfg, "master_rounding")
    if rounding == "auto":
        return "remainder" if field(optim_cfg, "state_precision") == "bf16" else "nearest"
    _check(rounding, ("auto", *MASTER_ROUNDINGS), "master_rounding")
    return rounding


def moment_rounding(optim_cfg: Any) -> str:
    """``optim.moment_rounding`` resolved to 'nearest' or 'stochastic'.

    'auto' (the default) is stochastic wherever rounding to nearest would freeze a moment's decay
    (below) and for int8 moments, else nearest. An explicit 'nearest' that would freeze the decay
    of a float-format moment is refused (ValueError naming the numbers and the fix).

    The rule: with a zero gradient a moment shrinks by a fixed fraction per step (mu by 1 - b1;
    nu by 1 - b2, or by 1 - sqrt(b2) where sqrt(nu) is stored: float16, FP8, int8). Round to
    nearest puts a value back on its grid point when the shrink is under half the grid step
    below it; :func:`fogjax.optim.moment_formats.nearest_min_shrink` is a format's exact
    threshold (1/18 = 5.56% for E4M3), under which some grid points never decay. An FP8 nu at
    b2 = 0.95 shrinks by 1 - sqrt(0.95) = 2.53%, under half of every E4M3 step, so it never
    decays (an FP8 nu is refused nearest for b2 > (17/18)^2 = 0.892; an FP8 mu for
    b1 > 17/18 = 0.944, so fog_fp8_m1's mu at b1 = 0.9 keeps nearest; a bfloat16 nu for
    b2 > 0.99612, a float16 nu for b2 > 0.999025). int8 codes are relative to a scale that
    follows the block's amax, so a block decaying as a whole decays exactly and nearest is not
    refused; but next to a coordinate that keeps the amax up, codes under 1 / (2 shrink) stall
    (mu: under 5 of 127 at b1 = 0.9), hence stochastic under 'auto'.
    """
    return _moment_rounding(optim_cfg, resolve(optim_cfg))


def _moment_rounding(optim_cfg: Any, precision: StatePrecision) -> str:
    rounding = field(optim_cfg, "moment_rounding")
    _check(rounding, MOMENT_ROUNDINGS, "moment_rounding")
    if rounding == "stochastic":
        return rounding
    stalls = _nearest_stalls(optim_cfg, precision)
    if rounding == "auto":
        return "stochastic" if stalls or "int8" in (precision.mu, precision.nu) else "nearest"
    if stalls:
        raise ValueError(stalls[0])
    return rounding


def _nearest_stalls(optim_cfg: Any, precision: StatePrecision) -> list[str]:
    """One refusal message per moment (nu first) whose zero-gradient decay round to nearest
    would stall (:func:`moment_rounding`)."""
    problems = []
    for state, beta in (("nu", "b2"), ("mu", "b1")):
        fmt = moment_format(getattr(precision, state), f"optim.{state}_dtype")
        threshold = nearest_min_shrink(fmt)
        if not threshold:
            continue
        factor = float(getattr(optim_cfg, beta))
        shrink = stored_shrink(fmt, factor, state == "nu")
        if shrink < threshold:
            stored = "sqrt(nu)" if state == "nu" and fmt.scaled else state
            problems.append(
                f"optim.moment_rounding=nearest cannot represent {state}'s per-step decay in "
                f"{fmt.name}: {beta}={factor:g} shrinks the stored {stored} by "
                f"{100 * shrink:.3g}% a step, less than the {100 * threshold:.3g}% round to "
                f"nearest needs to move every value off its grid point, so {state} stops "
                "decaying; use --config.optim.moment_rounding=stochastic (what the default, auto, "
                'picks here; in a saved run\'s config.json: "moment_rounding": "auto").'
            )
    return problems
