"""XLA options of the train step, in one place: the trainer and the bench compile with these.

``xla_allow_excess_precision=False`` (GPU): XLA's default lets it drop a float32 -> bf16 -> float32
round trip. In an FP8 step that round trip is the bf16 gradient entering an FP8 cast: with it
dropped, the backward materialises the gradient of every block GEMM in float32 ([tokens, 12288]
for FOG-flash's FFN), written once and read by the amax and the cast-transpose, twice the bytes of
bf16. Keeping bf16 bf16 cut the estimated memory-bound time of the paper's 1.5B FOG-flash FP8DPA
step on a GH200 from 1.83 s to 1.70 s (Llama3 BF16 unchanged), and makes the GPU quantise exactly
the bf16 values that CPU and flax do. CPU compiles keep XLA's defaults.
"""

from __future__ import annotations

from typing import Any

GPU_OPTIONS: dict[str, Any] = {"xla_allow_excess_precision": False}


def for_platform(platform: str) -> dict[str, Any]:
    """The compiler options of a train step compiled for ``platform`` ('gpu', 'cpu', ...)."""
    return dict(GPU_OPTIONS) if platform == "gpu" else {}
