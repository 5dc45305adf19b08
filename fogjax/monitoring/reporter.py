"""Everything the loop reports per step, owned by one object: events, speed, kurtosis, console.

    reporter = Reporter(config, workdir, flops_per_token, start_step, checkpointer)
    reporter.step_done(step, raw_metrics)    # queues this step, reports the one before it
    reporter.flush()                         # reports the queued step now
    reporter.before_checkpoint()             # flush(), and the events onto the disk
    reporter.on_eval(step, {"loss": ..., "perplexity": ...})
    reporter.close()

Metrics are reported one step late: :meth:`Reporter.step_done` is called right after step k+1
was dispatched, and only then fetches step k's metrics (one device-to-host transfer), so
logging never stalls the device.

:func:`check_finite` is the NaN check, kept apart so it reads (and is tested) on its own; loss and
grad-norm spikes are found by :mod:`fogjax.monitoring.divergence`. The reporter's state (kurtosis
monitor, divergence detector, the numbers of the run summary) is saved in every checkpoint
(:meth:`Reporter.state_dict`), so a resumed run reports what an uninterrupted one does.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax

from fogjax import config_lib
from fogjax.checkpoint import Checkpointer
from fogjax.model.probes import ACTIVATION_GROUPS
from fogjax.monitoring import recovery
from fogjax.monitoring.divergence import Divergence, detector_from_config
from fogjax.monitoring.kurtosis import KurtosisMonitor
from fogjax.monitoring.throughput import Throughput
from fogjax.monitoring.writer import Console, MetricWriter, console_line, metrics_to_host

TRAIN_METRICS = ("loss", "lr", "grad_norm", "param_norm", "update_norm", "finite")


class TrainingDiverged(RuntimeError):
    """The loss or the gradients became NaN or inf, or the loss or grad norm spiked (and
    ``log.on_divergence='stop'``)."""


def host_metrics(raw: dict[str, Any]) -> dict[str, float]:
    """One step's device metrics -> flat TensorBoard tags (one device-to-host transfer)."""
    host = jax.device_get(raw)
    tree = {"train": {k: host[k] for k in TRAIN_METRICS}}
    tree.update({k: host[k] for k in ACTIVATION_GROUPS if k in host})
    tree.update(host.get("fp8", {}))  # already 'fp8/...' tags
    tree.update(host.get("fp4", {}))  # already 'fp4/...' tags
    return metrics_to_host(tree)


def check_finite(
    step: int,
    scalars: dict[str, float],
    resume_advice: str,
    last_kurtosis: dict[str, float],
) -> None:
    """Raises :class:`TrainingDiverged` (saying what to do) if the loss or grads are not finite.
    ``resume_advice``: :func:`fogjax.monitoring.recovery.advice`, the checkpoint to resume from."""
    if scalars["train/finite"]:
        return
    raise TrainingDiverged(
        f"Loss or gradients became NaN/inf at step {step} "
        f"(loss={scalars['train/loss']}, grad_norm={scalars['train/grad_norm']}). "
        f"{resume_advice} Latest kurtosis (layer average): "
        f"{json.dumps(last_kurtosis) if last_kurtosis else 'not yet measured'}; compare the "
        "kurtosis trend in TensorBoard to find the layer that diverged."
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
        self._stop_on_divergence = config.log.on_divergence == "stop"
        self._steps, self._log_every = t.steps, t.log_every
        self.console = Console(t.steps, start_step)
        self.writer = MetricWriter(os.path.join(workdir, "tb"), warn=self.console.print)
        tokens_per_step = self.tokens_per_step = config_lib.tokens_per_step(config)
        self.throughput = Throughput(
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
        self.divergence = detector_from_config(config)
        self.last_step = start_step  # The last step reported with a finite loss.
        self._queued: tuple[int, dict[str, Any]] | None = None  # step_done's, not yet reported
        self.last: dict[str, float] = {}
        self.last_kurtosis: dict[str, float] = {}
        # Numbers of the run summary that outlive a restart (saved with the checkpoint).
        self.record: dict[str, float | None] = {
            "final_train_loss": None,
            "final_eval_loss": None,
            "max_qkv_kurtosis": None,
        }
        # Divergences of trajectories this run left (resumed from a checkpoint before their
        # onset): kept in every checkpoint and summary (fogjax/train/divergence_history.py).
        self.earlier_divergences: list[dict[str, Any]] = []

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state of everything that looks back over the run (saved per checkpoint)."""
        return {
            "kurtosis": self.kurtosis.state_dict(),
            "divergence": self.divergence.state_dict(),
            "record": dict(self.record),
            "earlier_divergences": list(self.earlier_divergences),
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restores :meth:`state_dict`'s output; None (a fresh run or an older checkpoint) keeps
        the fresh state."""
        if not state:
            return
        self.kurtosis.load_state_dict(state["kurtosis"])
        self.divergence.load_state_dict(state["divergence"])
        self.record.update(state["record"])
        self.earlier_divergences = list(state.get("earlier_divergences", []))

    def summary(self) -> dict[str, Any]:
        """The run's divergence, kurtosis-warning and loss numbers (tokens = steps x batch x
        seq_len), for ``<workdir>/summary.json``."""
        found, tps = self.divergence.found, self.tokens_per_step
        warnings = self.kurtosis.warnings
        qkv = [w for w in warnings if any(str(p).startswith("qkv/") for p in w["where"])]

        def first(ws: list[dict[str, Any]]) -> tuple[int | None, int | None]:
            step = int(ws[0]["step"]) if ws else None
            return step, None if step is None else step * tps

        warn_step, warn_tokens = first(warnings)
        qkv_step, qkv_tokens = first(qkv)
        return {
            "tokens_per_step": tps,
            "diverged": found is not None,
            "divergence": None
            if found is None
            else {**found.to_dict(), "tokens": found.step * tps},
            "first_kurtosis_warning_step": warn_step,
            "first_kurtosis_warning_tokens": warn_tokens,
            "first_qkv_warning_step": qkv_step,
            "first_qkv_warning_tokens": qkv_tokens,
            "kurtosis_warnings": [{"step": w["step"], "where": w["where"]} for w in warnings],
            "earlier_divergences": list(self.earlier_divergences),
            **self.record,
        }

    def step_done(self, step: int, raw: dict[str, Any]) -> None:
        """Queues the device metrics of the just-dispatched ``step`` (optimizer steps done) and
        reports the step queued before it, whose values are ready by now."""
        self.flush()
        self._queued = (step, raw)

    def flush(self) -> None:
        """Reports the queued step now (before a checkpoint is saved, so a NaN is caught before
        it is written, and at the end of the run)."""
        if self._queued is not None:
            queued, self._queued = self._queued, None
            self.on_step(*queued)

    def before_checkpoint(self) -> None:
        """Reports the queued step (a NaN is caught before its state is written) and flushes the
        TensorBoard events to disk: a run killed later (SIGKILL, OOM) resumes from this
        checkpoint, so its events must already hold every step up to it."""
        self.flush()
        self.writer.flush()

    def on_step(self, step: int, raw: dict[str, Any]) -> None:
        """Reports the finished ``step`` (the optimizer steps done) from its device metrics."""
        scalars = host_metrics(raw)
        loss = scalars["train/loss"] if scalars["train/finite"] else math.nan
        found = self.divergence.update(step, loss, scalars["train/grad_norm"])
        if not scalars["train/finite"]:
            # The onset is the first divergence found, if training went on through it.
            check_finite(step, scalars, self.resume_advice(), self.last_kurtosis)
        self.last_step = step
        self.record["final_train_loss"] = scalars["train/loss"]
        scalars.update(self.throughput.tick(step))
        trend, warnings = self.kurtosis.update(step, scalars)
        scalars.update(trend)
        qkv = [v for k, v in scalars.items() if k.startswith("kurtosis/qkv/layer_")]
        if qkv:
            self.record["max_qkv_kurtosis"] = max(qkv + [self.record["max_qkv_kurtosis"] or 0.0])
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
                console_line(
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
        if found is not None:
            self._diverged(found)

    def resume_advice(self) -> str:
        """The checkpoint from before the divergence onset (the first one found, else the step
        being reported) and how to resume from it (:mod:`fogjax.monitoring.recovery`)."""
        found = self.divergence.found
        onset = found.step if found is not None else self.last_step + 1
        return recovery.advice(str(self._ckpt.directory), self._ckpt.all_steps(), onset)

    def _diverged(self, found: Divergence) -> None:
        """Prints a detected loss or grad-norm spike; raises if the run stops on it."""
        message = (
            f"Training diverged ({found.reason}) at step {found.step} (confirmed at step "
            f"{found.detected_at}): {found.detail}."
        )
        if not self._stop_on_divergence:
            self.console.print(f"WARNING: {message} Training on (log.on_divergence=continue).")
            return
        raise TrainingDiverged(
            f"{message} {self.resume_advice()} Or train through it with "
            "--config.log.on_divergence=continue (log.loss_blowup_ratio, log.loss_spike_* and "
            "log.grad_spike_* tune the detection)."
        )

    def on_eval(self, step: int, result: dict[str, float]) -> None:
        ev = {f"eval/{k}": v for k, v in result.items()}
        self.record["final_eval_loss"] = float(result["loss"])
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
