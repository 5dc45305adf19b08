"""FP8 recipes (docs/spec.md §3, paper Table 9), named in registry.py.

- ``fp8``: every block linear (fused QKV, attention out, FFN in/out) runs its three GEMMs in FP8;
  attention's QK^T and PV stay in the compute dtype.
- ``fp8dpa``: the linears and QK^T and PV all run in FP8.
- ``fp8_current`` / ``fp8dpa_current``: the same GEMMs with current scaling (fp8_current.py).

Formats are "hybrid" (E4M3 forward, E5M2 gradients). ``scaling='delayed'`` (``fp8``, ``fp8dpa``):
delayed per-tensor scaling whose window, reduction and margin come from the config's ``precision``
section. ``scaling='current'``: each tensor scaled by its own amax when it is quantised; only
``precision.margin`` applies (``amax_history_len`` and ``amax_reduction`` are ignored) and no state
is kept. ``precision.backend`` picks the implementation of the linears: ``xla`` (fp8_dot.py /
fp8_current.py, runs everywhere, CPU included) or ``te`` (Transformer Engine, NVIDIA GPUs only,
delayed scaling only; te.py). FP8 attention is ours under either backend, since Transformer Engine
has no FP8 QK^T/PV: FP8 einsums (``model.attention_impl='xla'``) or cuDNN's fused FP8 kernel
(``'cudnn'``, cudnn_attention.py, delayed scaling only: see :data:`CUDNN_CURRENT_REFUSAL`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fogjax.precision.cudnn_attention import CudnnAttentionUnavailable, CudnnFp8Attention
from fogjax.precision.fp8_current import Fp8CurrentDotGeneral
from fogjax.precision.fp8_dot import Fp8DotGeneral
from fogjax.precision.recipe import DotGeneral, Recipe, dtype_from_name
from fogjax.precision.scaling import AMAX_REDUCTIONS

BACKENDS = ("xla", "te")
SCALINGS = ("delayed", "current")

# Why model.attention_impl='cudnn' is refused under current scaling (docs/precision.md).
CUDNN_CURRENT_REFUSAL = (
    "model.attention_impl='cudnn' cannot run {name!r}: cuDNN's fused FP8 attention quantises the "
    "softmax P, the output O and, backward, dP, dQ, dK and dV inside the kernel, with scales it "
    "must be given before it runs, so they cannot be current-scaled (JAX's binding returns O, dQ, "
    "dK and dV in FP8 only, so they cannot be scaled after the kernel either, as Transformer "
    "Engine does on newer cuDNN). Use --config.model.attention_impl=xla (FP8 QK^T and PV as "
    "einsums, current-scaled, any backend) or --config.precision.recipe=fp8dpa (delayed scaling, "
    "which the cuDNN kernel supports)."
)


@dataclasses.dataclass(frozen=True)
class Fp8Recipe(Recipe):
    """FP8 linears (and FP8 attention when ``fp8_attention``), per-tensor scaling.

    Attributes:
      fp8_attention: QK^T and PV in FP8 too (``fp8dpa``, ``fp8dpa_current``).
      amax_history_len: delayed-scaling window H (>= 1; the paper uses 1024); unused by 'current'.
      amax_reduction: 'max' over the window or 'most_recent'; unused by 'current'.
      margin: scale = fp8_max / amax / 2**margin (>= 0; the paper uses 0).
      backend: 'xla' or 'te' (linears only; 'te' with delayed scaling only).
      scaling: 'delayed' (amax history, the paper's) or 'current' (each tensor's own amax).
    """

    name: str = "fp8"
    fp8_attention: bool = False
    amax_history_len: int = 1024
    amax_reduction: str = "max"
    margin: float = 0
    backend: str = "xla"
    scaling: str = "delayed"

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
        if self.scaling not in SCALINGS:
            raise ValueError(f"FP8 scaling {self.scaling!r} is not one of {SCALINGS}.")
        if self.current and self.backend == "te":
            # TE-JAX has Float8CurrentScaling, but it has no margin, and no TE/GPU here to check
            # its stateless module through te.DetachedDotGeneral: refused rather than wired blind.
            raise ValueError(
                f"precision.backend='te' runs delayed scaling only, not {self.name!r} (current "
                "scaling). Use --config.precision.backend=xla (the same current-scaled FP8 GEMMs "
                f"through XLA, CPU included), or --config.precision.recipe="
                f"{'fp8dpa' if self.fp8_attention else 'fp8'} for Transformer Engine's delayed "
                "scaling."
            )

    @property
    def quantizes_linears(self) -> bool:
        return True

    @property
    def quantizes_attention(self) -> bool:
        return self.fp8_attention

    @property
    def amax_update_rule(self) -> tuple[str, float] | None:
        # Current scaling keeps no state in the fp8 collection: nothing to update.
        return None if self.current else (self.amax_reduction, self.margin)

    @property
    def packs_block_residuals(self) -> bool:
        # Our ops save a float32 [5] (a Linear) or [15] (cuDNN FP8 attention) each. Transformer
        # Engine's layers keep their own residuals (not tried there).
        return self.backend == "xla"

    @property
    def takes_lhs_amax(self) -> bool:
        # Our delayed-scaling Fp8DotGeneral; not Transformer Engine's GEMMs nor current scaling.
        return self.backend == "xla" and not self.current

    @property
    def quantizes_rows_locally(self) -> bool:
        # Delayed scaling on XLA: every cast takes its scale from the state and amaxes are only
        # observed (a max over replicas is exact). Current scaling scales by the tensor's own
        # amax (it would become the replica's); Transformer Engine updates its states inside its
        # backward, from its own amaxes.
        return self.backend == "xla" and not self.current

    @property
    def current(self) -> bool:
        """Current scaling (``*_current`` recipes): each tensor scaled by its own amax."""
        return self.scaling == "current"

    def check_attention_impl(self, attention_impl: str) -> None:
        if attention_impl == "cudnn" and self.fp8_attention and self.current:
            raise CudnnAttentionUnavailable(CUDNN_CURRENT_REFUSAL.format(name=self.name))

    def _fp8_dot_general(self, name: str) -> Fp8DotGeneral | Fp8CurrentDotGeneral:
        if self.current:
            return Fp8CurrentDotGeneral(margin=self.margin, name=name)
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
        self.check_attention_impl("cudnn")  # Start-up checks this too (run.build_run).
        return CudnnFp8Attention(
            amax_history_len=self.amax_history_len,
            amax_reduction=self.amax_reduction,
            margin=self.margin,
            name=name,
        )


def recipe_from_config(
    precision: Any, name: str, fp8_attention: bool, scaling: str = "delayed"
) -> Fp8Recipe:
    """Builds an Fp8Recipe from the config's ``precision`` section; with backend 'te' it fails
    here, at start-up, if Transformer Engine or a CUDA GPU is missing (or under current
    scaling, which it does not run)."""
    recipe = Fp8Recipe(
        name=name,
        compute_dtype=dtype_from_name(precision.compute_dtype),
        fp8_attention=fp8_attention,
        amax_history_len=precision.amax_history_len,
        amax_reduction=precision.amax_reduction,
        margin=precision.margin,
        backend=precision.backend,
        scaling=scaling,
    )
    if recipe.backend == "te":
        from fogjax.precision import te

        te.require_transformer_engine()
    return recipe
