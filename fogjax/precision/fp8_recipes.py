"""FP8 recipes (docs/spec.md §3, paper Table 9), named ``fp8`` and ``fp8dpa`` in registry.py.

- ``fp8``: every block linear (fused QKV, attention out, FFN in/out) runs its three GEMMs in FP8;
  attention's QK^T and PV stay in the compute dtype.
- ``fp8dpa``: the linears and QK^T and PV all run in FP8.

Formats are "hybrid" (E4M3 forward, E5M2 gradients) with delayed per-tensor scaling whose window,
reduction and margin come from the config's ``precision`` section. ``precision.backend`` picks the
implementation of the linears: ``xla`` (fp8_dot.Fp8DotGeneral, runs everywhere, CPU included) or
``te`` (Transformer Engine, NVIDIA GPUs only; te.py). FP8 attention is ours under either backend,
since Transformer Engine has no FP8 QK^T/PV: Fp8DotGeneral einsums (``model.attention_impl='xla'``)
or cuDNN's fused FP8 kernel (``'cudnn'``, cudnn_attention.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fogjax.precision.cudnn_attention import CudnnFp8Attention
from fogjax.precision.fp8_dot import Fp8DotGeneral
from fogjax.precision.recipe import DotGeneral, Recipe, dtype_from_name
from fogjax.precision.scaling import AMAX_REDUCTIONS

BACKENDS = ("xla", "te")


@dataclasses.dataclass(frozen=True)
class Fp8Recipe(Recipe):
    """FP8 linears (and FP8 attention when ``fp8_attention``), delayed per-tensor scaling.

    Attributes:
      fp8_attention: QK^T and PV in FP8 too (``fp8dpa``).
      amax_history_len: delayed-scaling window H (>= 1; the paper uses 1024).
      amax_reduction: 'max' over the window or 'most_recent'.
      margin: scale = fp8_max / amax / 2**margin (>= 0; the paper uses 0).
      backend: 'xla' or 'te' (linears only).
    """

    name: str = "fp8"
    fp8_attention: bool = False
    amax_history_len: int = 1024
    amax_reduction: str = "max"
    margin: float = 0
    backend: str = "xla"

    def __post_init__(self) -> None:
        if isinstance(self.amax_history_len, bool) or not isinstance(self.amax_history_len, int):
            raise ValueError(
                f"precision.amax_history_len={self.amax_history_len!r} must be an integer >= 1 "
                "(e.g. --config.precision.amax_history_len=1024, the paper's value)."
            )
        if self.amax_history_len < 1:
            raise ValueError(
                f"precision.amax_history_len={self.amax_history_len} must be >= 1; use 1024 "
                "(the paper's value) or 1 to scale from the previous step only."
            )
        if self.amax_reduction not in AMAX_REDUCTIONS:
            raise ValueError(
                f"precision.amax_reduction={self.amax_reduction!r} is not supported; use one of "
                f"{AMAX_REDUCTIONS} (e.g. --config.precision.amax_reduction=max)."
            )
        if isinstance(self.margin, bool) or not isinstance(self.margin, int | float):
            raise ValueError(f"precision.margin={self.margin!r} must be a number >= 0 (e.g. 0).")
        if not self.margin >= 0:
            raise ValueError(
                f"precision.margin={self.margin} must be >= 0 (scale = fp8_max / amax / "
                "2**margin; a negative margin would saturate on purpose); use 0, the paper's value."
            )
        if self.backend not in BACKENDS:
            raise ValueError(
                f"precision.backend={self.backend!r} is not supported; use one of {BACKENDS} "
                "(e.g. --config.precision.backend=xla, which runs everywhere)."
            )

    @property
    def quantizes_linears(self) -> bool:
        return True

    @property
    def quantizes_attention(self) -> bool:
        return self.fp8_attention

    @property
    def amax_update_rule(self) -> tuple[str, float] | None:
        return (self.amax_reduction, self.margin)

    def _fp8_dot_general(self, name: str) -> Fp8DotGeneral:
        return Fp8DotGeneral(
            amax_history_len=self.amax_history_len,
            amax_reduction=self.amax_reduction,
            margin=self.margin,
            name=name,
        )

    def linear_dot_general(self, name: str) -> DotGeneral:
        if self.backend == "te":
            from fogjax.precision import te  # Imported only here: it needs a GPU build.

            return te.te_dot_general(name, self.amax_history_len, self.amax_reduction, self.margin)
        return self._fp8_dot_general(name)

    def attention_dot_general(self, name: str) -> DotGeneral:
        if self.fp8_attention:
            return self._fp8_dot_general(name)
        return super().attention_dot_general(name)

    def fused_fp8_attention(self, name: str) -> CudnnFp8Attention:
        if not self.fp8_attention:
            return super().fused_fp8_attention(name)
        return CudnnFp8Attention(
            amax_history_len=self.amax_history_len,
            amax_reduction=self.amax_reduction,
            margin=self.margin,
            name=name,
        )


def recipe_from_config(precision: Any, name: str, fp8_attention: bool) -> Fp8Recipe:
    """Builds an Fp8Recipe from the config's ``precision`` section; with backend 'te' it fails
    here, at start-up, if Transformer Engine or a CUDA GPU is missing."""
    recipe = Fp8Recipe(
        name=name,
        compute_dtype=dtype_from_name(precision.compute_dtype),
        fp8_attention=fp8_attention,
        amax_history_len=precision.amax_history_len,
        amax_reduction=precision.amax_reduction,
        margin=precision.margin,
        backend=precision.backend,
    )
    if recipe.backend == "te":
        from fogjax.precision import te

        te.require_transformer_engine()
    return recipe
