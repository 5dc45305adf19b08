"""FP4 recipes (docs/spec.md §6, "FP4 All the Way"), named ``nvfp4`` and ``mxfp4`` in registry.py.

Every block linear (fused QKV, attention out, FFN in/out) runs its three GEMMs in emulated FP4
(fp4_dot.Fp4DotGeneral); the embedding and LM head stay in the compute dtype. Attention's QK^T and
PV stay in the compute dtype unless ``precision.attention='fp8'``, which gives them FP8DPA's FP8
path (delayed scaling from the same ``precision`` fields, FP8 state in the ``fp8`` collection).

Options (off by default), from NVIDIA's NVFP4 pretraining recipe (arXiv 2509.25149):
``precision.fp4_weight_2d`` (16x16 block scales for weights), ``precision.fp4_hadamard_wgrad``
(16x16 random Hadamard transform on the weight-gradient inputs), ``precision.fp4_sr_gradients_only``
(RtN instead of SR on the activation of the weight-gradient GEMM),
``precision.high_precision_layers = (first, last)``: those first and last blocks run entirely in
the compute dtype (linears and attention, as under ``bf16``), the blocks between in FP4
(:meth:`Fp4Recipe.layer_recipes`; the model scans each run of blocks separately).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fogjax.precision import fp8_recipes
from fogjax.precision.fp4_dot import BACKWARDS, Fp4DotGeneral
from fogjax.precision.fp4_quant import FORMATS
from fogjax.precision.recipe import DotGeneral, Recipe, dtype_from_name

ATTENTION_PRECISIONS = ("bf16", "fp8")


@dataclasses.dataclass(frozen=True)
class Fp4Recipe(Recipe):
    """FP4 block linears; attention in the compute dtype or, via ``fp8_attention``, in FP8.

    Attributes:
      fmt_name: 'nvfp4' | 'mxfp4' (fp4_quant.FORMATS).
      backward: 'fp4' (training) or 'bf16' (QAF: FP4 forward, plain backward).
      sr_activations: SR on X^T in the weight gradient (the paper) or RtN (NVIDIA).
      weight_2d: 16x16 (NVFP4) / 32x32 (MXFP4) block scales for weights.
      hadamard_wgrad: random Hadamard transform on the weight-gradient inputs.
      fp8_attention: an FP8DPA recipe whose attention path QK^T and PV use, or None.
      high_precision_layers: (first, last): that many leading and trailing blocks in the
        compute dtype (plain Recipe), the others in FP4.
    """

    name: str = "nvfp4"
    fmt_name: str = "nvfp4"
    backward: str = "fp4"
    sr_activations: bool = True
    weight_2d: bool = False
    hadamard_wgrad: bool = False
    fp8_attention: fp8_recipes.Fp8Recipe | None = None
    high_precision_layers: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        if self.fmt_name not in FORMATS:
            raise ValueError(f"Unknown FP4 format {self.fmt_name!r}; use one of {sorted(FORMATS)}.")
        if self.backward not in BACKWARDS:
            raise ValueError(f"FP4 backward {self.backward!r}; use one of {BACKWARDS}.")
        first_last = self.high_precision_layers
        if len(first_last) != 2 or min(first_last) < 0:
            raise ValueError(
                f"precision.high_precision_layers={first_last!r} must be a pair (first, last) of "
                "block counts >= 0, e.g. --config.precision.high_precision_layers='(1, 2)'."
            )

    def layer_recipes(self, num_layers: int) -> tuple[tuple[Recipe, int], ...]:
        """(plain recipe, first), (self, the rest), (plain recipe, last), empty runs dropped."""
        first, last = self.high_precision_layers
        if first + last >= num_layers:
            raise ValueError(
                f"precision.high_precision_layers=({first}, {last}) keeps {first + last} of "
                f"model.num_layers={num_layers} blocks in BF16, leaving no FP4 block; lower it "
                f"(e.g. --config.precision.high_precision_layers='(0, {max(num_layers // 8, 1)})') "
                "or use --config.precision.recipe=bf16."
            )
        plain = Recipe(name="bf16", compute_dtype=self.compute_dtype)
        runs = ((plain, first), (self, num_layers - first - last), (plain, last))
        return tuple(run for run in runs if run[1])

    @property
    def quantizes_rows_locally(self) -> bool:
        # Stochastic rounding draws numbers of the batch's shape; NVFP4's tensor scale is a
        # current amax.
        return False

    @property
    def quantizes_linears(self) -> bool:
        return True

    @property
    def quantizes_attention(self) -> bool:
        return self.fp8_attention is not None

    @property
    def amax_update_rule(self) -> tuple[str, float] | None:
        return None if self.fp8_attention is None else self.fp8_attention.amax_update_rule

    @property
    def runs_fp8_linear_gemms(self) -> bool:
        return False  # Emulated: every linear GEMM is BF16 x BF16 with FP32 accumulation.

    def linear_dot_general(self, name: str) -> DotGeneral:
        return Fp4DotGeneral(
            fmt_name=self.fmt_name,
            backward=self.backward,
            sr_activations=self.sr_activations,
            weight_2d=self.weight_2d,
            hadamard_wgrad=self.hadamard_wgrad,
            name=name,
        )

    def attention_dot_general(self, name: str) -> DotGeneral:
        if self.fp8_attention is not None:
            return self.fp8_attention.attention_dot_general(name)
        return super().attention_dot_general(name)

    def fused_fp8_attention(self, name: str) -> Any:
        if self.fp8_attention is not None:
            return self.fp8_attention.fused_fp8_attention(name)
        return super().fused_fp8_attention(name)


def qaf_recipe(recipe: Fp4Recipe) -> Fp4Recipe:
    """The same recipe in its quantisation-aware-finetuning phase: FP4 forward, BF16 backward."""
    return dataclasses.replace(recipe, backward="bf16")


def high_precision_layers(precision: Any) -> tuple[int, ...]:
    """``precision.high_precision_layers`` as a tuple of ints ((0, 0) in configs older than it)."""
    return tuple(int(n) for n in getattr(precision, "high_precision_layers", (0, 0)))


def recipe_from_config(precision: Any, name: str) -> Fp4Recipe:
    """Builds the ``nvfp4`` / ``mxfp4`` recipe from the config's ``precision`` section."""
    if precision.attention not in ATTENTION_PRECISIONS:
        raise ValueError(
            f"precision.attention={precision.attention!r} is not supported under {name}; use one "
            f"of {ATTENTION_PRECISIONS} (e.g. --config.precision.attention=fp8 for FP8 QK^T/PV)."
        )
    fp8_attention = None
    if precision.attention == "fp8":
        # FP8DPA's attention path with the config's delayed-scaling fields; its linears are unused.
        fp8_attention = fp8_recipes.recipe_from_config(precision, "fp8dpa", fp8_attention=True)
    return Fp4Recipe(
        name=name,
        compute_dtype=dtype_from_name(precision.compute_dtype),
        fmt_name=name,
        sr_activations=not precision.fp4_sr_gradients_only,
        weight_2d=precision.fp4_weight_2d,
        hadamard_wgrad=precision.fp4_hadamard_wgrad,
        fp8_attention=fp8_attention,
        high_precision_layers=high_precision_layers(precision),
    )
