"""Once per optimizer step: every delayed-scaling state of the model updated from the amaxes seen.

The FP8 ops (fp8_dot.py, cudnn_attention.py) read only ``scale_inv`` and report each tensor's amax
as the "gradient" of its ``scale_inv`` (scaling.observation). The train step therefore
differentiates the loss with respect to the ``scale_inv`` leaves (not the [H] histories), takes the
elementwise max of the observed amaxes over its micro-batches, and calls :func:`apply` once: one
vectorised history roll and scale update per kind of tensor over the stacked [L, ...] states,
instead of one per layer, per tensor and per micro-batch inside the layer scan. That is
Transformer Engine's bulk amax update (``update_fp8_metas``), for the same reason: the per-tensor
bookkeeping is many tiny kernels and [L, H] stacks written in every layer of every micro-batch.

Exactness: with one micro-batch the result is bit-identical to updating each state inside its op
(scaling.update), which is bit-identical to flax. With k micro-batches the old per-op path
max-combined k updated states; here the k amaxes are max-combined before one update. Both give the
history ``roll(h)`` with index 0 = max of the amaxes, and the same scale, because the scale is a
non-decreasing function of the reduced amax; they differ only when some micro-batch saw a
non-finite amax (the per-op path then kept that micro-batch's old scale and took another's; here
the non-finite max keeps the old scale for the whole step).

Transformer Engine's own states (``precision.backend='te'``, one ``state`` variable per GEMM in TE's
layout) keep their overwrite-with-gradient rule: their gradient IS their new value, replaced as is.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fogjax.precision import scaling
from fogjax.precision.formats import E4M3_MAX, E5M2_MAX

Path = tuple[str, ...]

HISTORY_SUFFIX = "_amax_history"
SCALE_INV_SUFFIX = "_scale_inv"
# The variable fogjax/precision/te.py keeps Transformer Engine's state in (replaced, not updated).
TE_STATE = "state"

# The format each delayed-scaled tensor is cast to, by the prefix its op gives
# ``scaling.declare_state``: Fp8DotGeneral's lhs / rhs (E4M3) and output gradient (E5M2);
# CudnnFp8Attention's ten tensors, all E4M3 (JAX's cuDNN binding gives backward tensors Q's dtype).
FP8_MAX: dict[str, float] = {
    "lhs": E4M3_MAX,
    "rhs": E4M3_MAX,
    "grad": E5M2_MAX,
    **{t: E4M3_MAX for t in ("q", "k", "v", "p", "o", "do", "dp", "dq", "dk", "dv")},
}


def _prefix(path: Path, suffix: str) -> str | None:
    name = path[-1]
    return name[: -len(suffix)] if name.endswith(suffix) else None


def _is_te(path: Path) -> bool:
    return TE_STATE in path


def split(fp8: Any) -> tuple[dict[Path, Any], dict[Path, Any]]:
    """``(observed, fixed)``: the ``fp8`` collection as two flat ``{path: leaf}`` dicts.

    ``observed`` holds what the step differentiates: every ``<t>_scale_inv`` of ours (its gradient
    is ``<t>``'s amax) and every leaf of Transformer Engine's states (its gradient is its new
    value). ``fixed`` holds our ``<t>_amax_history`` leaves, which no op reads or differentiates.
    Raises ValueError on a ``<t>_scale_inv`` whose ``t`` has no format in :data:`FP8_MAX`.
    """
    flat = traverse_util.flatten_dict(dict(fp8)) if fp8 else {}
    observed, fixed = {}, {}
    for path, leaf in flat.items():
        if _is_te(path):
            observed[path] = leaf
        elif _prefix(path, HISTORY_SUFFIX) is not None:
            fixed[path] = leaf
        else:
            prefix = _prefix(path, SCALE_INV_SUFFIX)
            if prefix not in FP8_MAX:
                raise ValueError(
                    f"fp8 state {'/'.join(path)!r} is not a known delayed-scaling tensor; add its "
                    "name and FP8 format to fogjax.precision.bulk_scaling.FP8_MAX."
                )
            observed[path] = leaf
    return observed, fixed


def merge(observed: dict[Path, Any], fixed: dict[Path, Any]) -> Any:
    """The nested ``fp8`` collection back from :func:`split`'s two halves."""
    return traverse_util.unflatten_dict({**fixed, **observed}) if observed or fixed else {}


def apply(
    observed: dict[Path, Any],
    fixed: dict[Path, Any],
    seen: dict[Path, Any],
    reduction: str,
    margin: float,
) -> Any:
    """The new ``fp8`` collection after one optimizer step.

    Args:
      observed, fixed: the step's starting state, as :func:`split` returned it.
      seen: the gradient of ``observed``, max-combined over micro-batches: per ``<t>_scale_inv``
        the amax float32 [..., 1] (leading [L] under nn.scan), per TE leaf its new value.
      reduction, margin: the update rule (scaling.py; the recipe's precision section).
    Returns:
      The nested collection: every history rolled with its amax, every scale recomputed (one
      vectorised call per window length), TE's states replaced by their new values.
    """
    new = dict(fixed)
    # Every state with one window length is updated in one call, on the states concatenated as
    # rows (their FP8 maxima a column): the rule is per row, so this equals one call per tensor
    # bit for bit, and XLA compiles one concatenation, one fused roll + reduction + scale and the
    # slices back, instead of ~4 tiny kernels (copy, roll, index-0 write, reduction) per tensor.
    groups: dict[int, list[tuple[Path, Path, float]]] = {}
    for path in observed:
        if _is_te(path):
            new[path] = seen[path]
            continue
        prefix = _prefix(path, SCALE_INV_SUFFIX)
        history_path = path[:-1] + (prefix + HISTORY_SUFFIX,)
        window = fixed[history_path].shape[-1]
        groups.setdefault(window, []).append((path, history_path, FP8_MAX[prefix]))
    for window, members in groups.items():
        rows = [observed[path].size for path, _, _ in members]
        columns = jnp.concatenate(
            [
                jnp.concatenate(
                    [
                        fixed[history_path].reshape(-1, window),
                        observed[path].reshape(-1, 1),
                        seen[path].reshape(-1, 1).astype(jnp.float32),
                    ],
                    axis=1,
                )
                for path, history_path, _ in members
            ]
        )
        # Made first, in a buffer of its own: the outputs reuse the donated input buffers, and a
        # fusion that read the inputs while writing them would make XLA copy every input first.
        columns = jax.lax.optimization_barrier(columns)
        fp8_max = np.concatenate(
            [np.full((n, 1), m, np.float32) for n, (_, _, m) in zip(rows, members, strict=True)]
        )
        state = scaling.ScalingState(columns[:, :window], columns[:, window : window + 1])
        state = scaling.apply_observation(
            state, columns[:, window + 1 :], jnp.asarray(fp8_max), reduction, margin
        )
        starts = np.cumsum([0, *rows])
        for (path, history_path, _), start, stop in zip(
            members, starts[:-1], starts[1:], strict=True
        ):
            new[history_path] = state.amax_history[start:stop].reshape(fixed[history_path].shape)
            new[path] = state.scale_inv[start:stop].reshape(observed[path].shape)
    return traverse_util.unflatten_dict(new) if new else {}
