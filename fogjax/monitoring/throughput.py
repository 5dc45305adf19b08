"""Speed of a run: step time, tokens/s, TFLOP/s per device, MFU and ETA.

:func:`peak_flops` / :func:`mfu` use an explicit peak table keyed by ``jax.Device.device_kind``;
an unknown device (CPU) has no peak and no MFU rather than a made-up one.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# Dense (no 2:4 sparsity) peak tensor-core FLOP/s per device, from NVIDIA's datasheets.
# Matched as substrings of device_kind in this order: the specific H100 variants come before
# "H100" since their clocks and peaks are lower than the SXM part's.
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bf16": 756e12, "fp8": 1513e12}),
    ("H100 NVL", {"bf16": 835e12, "fp8": 1670e12}),
    ("GH200", {"bf16": 989e12, "fp8": 1979e12}),
    ("H200", {"bf16": 989e12, "fp8": 1979e12}),
    ("H100", {"bf16": 989e12, "fp8": 1979e12}),
    ("A100", {"bf16": 312e12}),  # Ampere has no FP8 tensor cores.
)


def peak_flops(device_kind: str, dtype: str = "bf16") -> float | None:
    """Peak FLOP/s of one ``device_kind`` device for ``dtype`` ('bf16' | 'fp8'); None if unknown."""
    for key, peaks in PEAK_FLOPS:
        if key.lower() in device_kind.lower():
            return peaks.get(dtype)
    return None


def mfu(
    flops_per_step_per_device: float,
    step_seconds: float,
    device_kind: str,
    dtype: str = "bf16",
    peak_override: float | None = None,
) -> float | None:
    """Model FLOPs utilisation in [0, 1]: achieved FLOP/s over the peak; None without a peak.

    ``peak_override`` (FLOP/s) is a user-declared peak for a device the table does not know.
    """
    peak = peak_override or peak_flops(device_kind, dtype)
    if peak is None or step_seconds <= 0:
        return None
    return flops_per_step_per_device / step_seconds / peak


class Throughput:
    """Speed between host ticks. Call :meth:`tick` when step ``step`` is known to be finished.

    The first tick only starts the clock, so compilation never counts as a step. Returned tags:
    perf/step_time, perf/tokens_per_sec, perf/tokens_per_sec_per_device,
    perf/tflops_per_device, perf/mfu (only with a known peak), perf/eta_s.
    """

    def __init__(
        self,
        total_steps: int,
        tokens_per_step: int,
        flops_per_step: float,
        num_devices: int,
        device_kind: str,
        peak_dtype: str = "bf16",
        clock: Callable[[], float] = time.perf_counter,
        peak_override: float | None = None,
    ):
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self.flops_per_step = flops_per_step
        self.num_devices = num_devices
        self.device_kind = device_kind
        self.peak_dtype = peak_dtype
        self.peak_override = peak_override
        self._clock = clock
        self._last: tuple[int, float] | None = None

    def reset(self) -> None:
        """Forget the last tick: the next tick restarts the clock (after eval or a checkpoint,
        whose time is not training time)."""
        self._last = None

    def tick(self, step: int) -> dict[str, float]:
        """Perf metrics averaged since the previous tick; {} on the first tick or no progress."""
        now = self._clock()
        last, self._last = self._last, (step, now)
        if last is None or step <= last[0]:
            return {}
        step_time = (now - last[1]) / (step - last[0])
        flops_per_device = self.flops_per_step / self.num_devices
        out = {
            "perf/step_time": step_time,
            "perf/tokens_per_sec": self.tokens_per_step / step_time,
            "perf/tokens_per_sec_per_device": self.tokens_per_step / step_time / self.num_devices,
            "perf/tflops_per_device": flops_per_device / step_time / 1e12,
            "perf/eta_s": max(self.total_steps - step, 0) * step_time,
        }
        u = mfu(flops_per_device, step_time, self.device_kind, self.peak_dtype, self.peak_override)
        if u is not None:
            out["perf/mfu"] = u
        return out
