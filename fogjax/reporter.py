"""Everything the loop reports per step, owned by one object: events, speed, kurtosis, console.

    reporter = Reporter(config, workdir, flops_per_token, start_step, checkpointer)
    reporter.on_step(step, raw_metrics)      # after step+1 was dispatched: one host transfer
    reporter.on_eval(step, {"loss": ..., "perplexity": ...})
    reporter.close()

:func:`check_finite` is the divergence check, kept apart so it reads (and is tested) on its own.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax

from fogjax import metrics
from fogjax.checkpoint import Checkpointer
from fogjax.monitor import KurtosisMonitor
from fogjax.step import ACTIVATION_GROUPS

TRAIN_METRICS = ("loss", "lr", "grad_norm", "param_norm", "update_norm", "finite")


class TrainingDiverged(RuntimeError):
    """The loss or the gradients became NaN or inf."""


def host_metrics(raw: dict[str, Any]) -> dict[str, float]:
    """One step's device metrics -> flat TensorBoard tags (one device-to-host transfer)."""
    host = jax.device_get(raw)
    tree = {"train": {k: host[k] for k in TRAIN_METRICS}}
    tree.update({k: host[k] for k in ACTIVATION_GROUPS if k in host})
    tree.update(host.get("fp8", {}))  # already 'fp8/...' tags
    tree.update(host.get("fp4", {}))  # already 'fp4/...' tags
    return metrics.metrics_to_host(tree)


def check_finite(
    step: int,
    scalars: dict[str, float],
    last_good_step: int | None,
    checkpoint_dir: str,
    last_kurtosis: dict[str, float],
) -> None:
    """Raises :class:`TrainingDiverged` (saying what to do) if the loss or grads are not finite."""
    if scalars["train/finite"]:
        return
    good = f"step {last_good_step}" if last_good_step is not None else "none"
    raise TrainingDiverged(
        f"Loss or gradients became NaN/inf at step {step} "
        f"(loss={scalars['train/loss']}, grad_norm={scalars['train/grad_norm']}). "
        f"Last good checkpoint: {good} in {checkpoint_dir}. Latest kurtosis (layer average): "
        f"{json.dumps(last_kurtosis) if last_kurtosis else 'not yet measured'}. "
        "Rerun on this workdir to resume from that checkpoint with a lower optim.peak_lr, "
        "or compare the kurtosis trend in TensorBoard to find the layer that diverged."
    )


class Reporter:
    """The TensorBoard writer, throughput meter, kurtosis monitor and console of one run."""

    def __init__(
        self,
        config: Any,
        workdir: str,
        flops_per_token: float,
        start_step: int,
        checkpointer: Checkpointer,
    ):
        t = config.train
        self._ckpt = checkpointer  # Named in the divergence message (its last good step).
        self._steps, self._log_every = t.steps, t.log_every
        self.console = metrics.Console(t.steps, start_step)
        self.writer = metrics.MetricWriter(os.path.join(workdir, "tb"), warn=self.console.print)
        tokens_per_step = t.batch_size * t.seq_len
        self.throughput = metrics.Throughput(
            t.steps,
            tokens_per_step,
            flops_per_token * tokens_per_step,
            jax.device_count(),
            jax.devices()[0].device_kind,
            "bf16",
            peak_override=config.log.peak_tflops * 1e12 or None,
        )
        self.kurtosis = KurtosisMonitor(
            config.log.kurtosis_alarm_ratio,
            config.log.kurtosis_alarm_patience,
            start_step=config.optim.warmup_steps,
        )
        self.last: dict[str, float] = {}
        self.last_kurtosis: dict[str, float] = {}

    def on_step(self, step: int, raw: dict[str, Any]) -> None:
        """Reports the finished ``step`` (the optimizer steps done) from its device metrics."""
        scalars = host_metrics(raw)
        check_finite(
            step, scalars, self._ckpt.latest_step(), str(self._ckpt.directory), self.last_kurtosis
        )
        scalars.update(self.throughput.tick(step))
        trend, warnings = self.kurtosis.update(step, scalars)
        scalars.update(trend)
        for line in warnings:
            self.console.print(line)
        self.writer.write_scalars(step, scalars)
        kurt = {
            k: round(v, 3)
            for k, v in scalars.items()
            if k.startswith("kurtosis/") and k.endswith("/avg")
        }
        self.last_kurtosis = kurt or self.last_kurtosis
        self.last = scalars
        if step % self._log_every == 0 or step == self._steps:
            self.console.print(
                metrics.console_line(
                    step,
                    self._steps,
                    scalars["train/loss"],
                    scalars["train/lr"],
                    scalars.get("perf/tokens_per_sec"),
                    scalars.get("perf/mfu"),
                    scalars.get("perf/eta_s"),
                )
            )
        self.console.update(step)

    def on_eval(self, step: int, result: dict[str, float]) -> None:
        ev = {f"eval/{k}": v for k, v in result.items()}
        self.writer.write_scalars(step, ev)
        self.console.print(
            f"eval step {step}: loss {ev['eval/loss']:.4f} perplexity {ev['eval/perplexity']:.2f}"
        )
        self.throughput.reset()  # Evaluation time is not training time.

    def print(self, line: str) -> None:
        self.console.print(line)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
        self.console.close()
