"""train_and_evaluate(config, workdir): restore-or-init, the training loop, eval, checkpoints.

The workdir is the unit of a run: config, TensorBoard events and checkpoints live there, and a run
started on a workdir that holds a checkpoint resumes from it, batches included. SIGTERM / SIGINT
save a checkpoint at the next step boundary and exit cleanly. Metrics of step k are fetched after
step k+1 is dispatched, so logging never stalls the device.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from fogjax import checkpoint, data, metrics, optim, provenance, sharding
from fogjax import state as state_lib
from fogjax.evaluate import validation_loss
from fogjax.fp4_training import QafHooks
from fogjax.info import model_info
from fogjax.monitor import KurtosisMonitor
from fogjax.precision import stats as fp8_stats
from fogjax.step import ACTIVATION_GROUPS, make_eval_step, make_train_step


class TrainingDiverged(RuntimeError):
    """The loss or the gradients became NaN or inf."""


def validate_train_config(config: Any, num_devices: int | None = None) -> None:
    """Raises ValueError naming the field and the fix for train settings that cannot work.
    ``num_devices``: the devices the run will use (default all of ``jax.devices()``)."""
    t = config.train
    for field in ("steps", "batch_size", "micro_batches", "log_every", "stats_every", "ckpt_every"):
        if getattr(t, field) < 1:
            raise ValueError(f"train.{field}={getattr(t, field)} must be >= 1.")
    if t.seq_len < 2:
        raise ValueError(f"train.seq_len={t.seq_len} must be >= 2.")
    if t.batch_size % t.micro_batches:
        raise ValueError(
            f"train.batch_size={t.batch_size} is not divisible by train.micro_batches="
            f"{t.micro_batches}; choose micro_batches that divides the batch."
        )
    n = jax.device_count() if num_devices is None else num_devices
    mesh_batch = sharding.resolve_mesh_shape(config.mesh, n)
    shards = mesh_batch[0] * mesh_batch[1]
    if (t.batch_size // t.micro_batches) % shards:
        raise ValueError(
            f"train.batch_size / train.micro_batches = {t.batch_size // t.micro_batches} "
            f"sequences cannot be split over mesh data x fsdp = {shards} devices; make the batch a "
            f"multiple of {shards * t.micro_batches}."
        )


class _StopRequest:
    """Set by SIGTERM/SIGINT; the loop checks it at step boundaries."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            # signal.signal raises ValueError off the main thread (e.g. a test's thread).
            with contextlib.suppress(ValueError):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signal = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self) -> bool:
        flag = self.signal is not None
        if jax.process_count() > 1:  # all processes must agree, or a save would deadlock
            flag = bool(multihost_utils.process_allgather(np.array(flag)).any())
        return flag


TRAIN_METRICS = ("loss", "lr", "grad_norm", "param_norm", "update_norm", "finite")


def _host_metrics(raw: dict[str, Any]) -> dict[str, float]:
    """One step's device metrics -> flat TensorBoard tags (one device-to-host transfer)."""
    host = jax.device_get(raw)
    tree = {"train": {k: host[k] for k in TRAIN_METRICS}}
    tree.update({k: host[k] for k in ACTIVATION_GROUPS if k in host})
    tree.update(host.get("fp8", {}))  # already 'fp8/...' tags
    tree.update(host.get("fp4", {}))  # already 'fp4/...' tags
    return metrics.metrics_to_host(tree)


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint); returns a summary."""
    t0 = time.time()
    validate_train_config(config)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    info = data.load_dataset_info(config.data.path)
    if info.vocab_size > config.model.vocab_size:
        raise ValueError(
            f"The data's tokenizer has {info.vocab_size} tokens but model.vocab_size="
            f"{config.model.vocab_size}; set --config.model.vocab_size={info.vocab_size} (or more)."
        )
    t = config.train
    if t.eval_every and info.val_tokens <= t.seq_len:
        raise ValueError(
            f"{info.dir} has no usable validation split ({info.val_tokens} tokens) but "
            f"train.eval_every={t.eval_every}; prepare it with --val-fraction > 0, or set "
            "--config.train.eval_every=0."
        )
    run = state_lib.build_run(config)
    mesh, recipe, model, shardings = run.mesh, run.recipe, run.model, run.shardings
    n_params = run.num_params
    flops_per_token = model_info(config, run.abstract["params"])["flops_per_token"]

    ckpt = checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints"), keep=t.keep_checkpoints, save_every=t.ckpt_every
    )
    batch_index, batch_count = sharding.process_batch_shard(mesh)
    train_iter = data.make_train_iterator(
        info,
        seq_len=t.seq_len,
        global_batch_size=t.batch_size,
        seed=config.seed,
        process_index=batch_index,
        process_count=batch_count,
        num_workers=config.data.num_workers,
    )
    elapsed_before = 0.0
    meta = None
    with sharding.sharding_context(mesh):
        if ckpt.latest_step() is not None:
            state, data_state, meta = ckpt.restore(run.abstract)
            if data_state is None:
                # Written by another process layout: one batch per step, and global batch n is
                # the same windows on any layout, so the step gives the exact position.
                data_state = {"batches_consumed": int(state["step"])}
            train_iter.set_state(data_state)
            elapsed_before = float(meta.get("elapsed_s", 0.0))
        else:
            state = state_lib.create_state(run.init, shardings, config.seed)
    start_step = int(state["step"])

    writer = metrics.MetricWriter(os.path.join(workdir, "tb"))
    record = provenance.provenance(config, n_params)
    if jax.process_index() == 0:
        # Atomic: a crash mid-write must not leave a truncated config.json behind.
        tmp = os.path.join(workdir, "config.json.tmp")
        with open(tmp, "w") as f:
            f.write(config.to_json_best_effort(indent=2))
        os.replace(tmp, os.path.join(workdir, "config.json"))
        writer.write_text(start_step, "run/provenance", provenance.to_markdown(record))
        writer.write_text(start_step, "run/config", "```\n" + str(config) + "\n```")

    stats_fn = fp8_stats.fp8_metrics if recipe.quantizes_linears else None
    train_step = make_train_step(
        model,
        run.tx,
        run.schedule,
        t.micro_batches,
        stats_fn,
        grad_dtype=optim.grad_dtype(config.optim),
        rng_seed=config.seed,
    )
    qaf_hooks = QafHooks.maybe(run, stats_fn, meta)  # FP4 QAF phase switch, None without QAF
    step_fn = state_lib.jit_train_step(run, train_step, with_stats=False)
    stats_step_fn = state_lib.jit_train_step(run, train_step, with_stats=True)
    eval_fn = jax.jit(
        make_eval_step(model), in_shardings=(shardings, sharding.batch_sharding(mesh))
    )

    tokens_per_step = t.batch_size * t.seq_len
    throughput = metrics.Throughput(
        t.steps,
        tokens_per_step,
        flops_per_token * tokens_per_step,
        jax.device_count(),
        jax.devices()[0].device_kind,
        "bf16",
        peak_override=config.log.peak_tflops * 1e12 or None,
    )
    console = metrics.Console(t.steps, start_step)
    console.print(
        f"fogjax: {config.model.arch} {n_params / 1e6:.1f}M params, recipe "
        f"{config.precision.recipe}, {jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"mesh {dict(mesh.shape)}, process {jax.process_index()}/{jax.process_count()}, "
        f"steps {start_step}->{t.steps}, workdir {workdir}"
    )
    if start_step:
        console.print(f"Resumed from {ckpt.directory} at step {start_step}.")
    if start_step >= t.steps:
        console.print(
            f"Nothing to do: the run already reached train.steps={t.steps}. To train further, "
            f"raise it (e.g. --config.train.steps={2 * t.steps}) or use another --workdir."
        )
    kurtosis_monitor = KurtosisMonitor(
        config.log.kurtosis_alarm_ratio,
        config.log.kurtosis_alarm_patience,
        start_step=config.optim.warmup_steps,
    )
    stop = _StopRequest()
    stop.install()
    pending: tuple[int, Any] | None = None
    last: dict[str, float] = {}
    last_kurtosis: dict[str, float] = {}
    summary: dict[str, Any] = {"start_step": start_step}

    def metadata(step: int) -> dict[str, Any]:
        return {
            "step": step,
            "tokens_seen": step * tokens_per_step,
            "elapsed_s": elapsed_before + time.time() - t0,
            "model": {k: v for k, v in config.model.items()},
            "recipe": config.precision.recipe,
            "config": json.loads(config.to_json_best_effort()),
            **(qaf_hooks.metadata() if qaf_hooks else {}),
        }

    def save(step: int, force: bool = False) -> None:
        ckpt.save(step, state, train_iter.get_state(), metadata(step), force=force)

    def flush(entry: tuple[int, Any]) -> None:
        nonlocal last, last_kurtosis
        step, raw = entry
        scalars = _host_metrics(raw)
        if not scalars["train/finite"]:
            good = ckpt.latest_step()
            raise TrainingDiverged(
                f"Loss or gradients became NaN/inf at step {step} "
                f"(loss={scalars['train/loss']}, grad_norm={scalars['train/grad_norm']}). "
                f"Last good checkpoint: {'step ' + str(good) if good is not None else 'none'} in "
                f"{ckpt.directory}. Latest kurtosis (layer average): "
                f"{json.dumps(last_kurtosis) if last_kurtosis else 'not yet measured'}. "
                "Rerun on this workdir to resume from that checkpoint with a lower optim.peak_lr, "
                "or compare the kurtosis trend in TensorBoard to find the layer that diverged."
            )
        scalars.update(throughput.tick(step))
        trend, warnings = kurtosis_monitor.update(step, scalars)
        scalars.update(trend)
        for line in warnings:
            console.print(line)
        writer.write_scalars(step, scalars)
        kurt = {
            k: round(v, 3)
            for k, v in scalars.items()
            if k.startswith("kurtosis/") and k.endswith("/avg")
        }
        if kurt:
            last_kurtosis = kurt
        last = scalars
        if step % config.train.log_every == 0 or step == t.steps:
            console.print(
                metrics.console_line(
                    step,
                    t.steps,
                    scalars["train/loss"],
                    scalars["train/lr"],
                    scalars.get("perf/tokens_per_sec"),
                    scalars.get("perf/mfu"),
                    scalars.get("perf/eta_s"),
                )
            )
        console.update(step)

    try:
        compile_start = time.time()
        with sharding.sharding_context(mesh):
            for step in range(start_step, t.steps):
                local = next(train_iter)
                batch = sharding.global_batch_from_local(local, mesh)
                # Statistics at the very first step and every stats_every steps; not forced on a
                # resumed run's first step, so it runs the same compiled step a straight run does.
                with_stats = (step + 1) % config.train.stats_every == 0 or step == 0
                fn = stats_step_fn if with_stats else step_fn
                if qaf_hooks:
                    if with_stats:
                        rho = qaf_hooks.before_stats_step(step, state, batch)
                        writer.write_scalars(step + 1, {**rho, **qaf_hooks.phase_scalars()})
                    fn = qaf_hooks.pick_step(step, with_stats, fn)
                state, raw = fn(state, batch)
                if step == start_step:
                    jax.block_until_ready(raw)
                    console.print(
                        f"First step compiled and ran in {time.time() - compile_start:.1f}s"
                    )
                if pending is not None:
                    flush(pending)
                pending = (step + 1, raw)
                done = step + 1
                if done % t.ckpt_every == 0 or done == t.steps:
                    flush(pending)
                    pending = None
                    save(done, force=done == t.steps)
                    throughput.reset()
                if t.eval_every and (done % t.eval_every == 0 or done == t.steps):
                    result = validation_loss(eval_fn, state, info, config, mesh, t.eval_batches)
                    ev = {f"eval/{k}": v for k, v in result.items()}
                    writer.write_scalars(done, ev)
                    console.print(
                        f"eval step {done}: loss {ev['eval/loss']:.4f} "
                        f"perplexity {ev['eval/perplexity']:.2f}"
                    )
                    summary["eval_loss"] = ev["eval/loss"]
                    throughput.reset()
                if stop.requested() and done < t.steps:
                    if pending is not None:
                        flush(pending)
                        pending = None
                    save(done, force=True)
                    ckpt.wait()
                    console.print(
                        f"Stopped by signal at step {done}: checkpoint saved in {ckpt.directory}. "
                        "Run the same command again to resume."
                    )
                    summary["stopped_at"] = done
                    break
            if pending is not None:
                flush(pending)
    finally:
        stop.restore()
        ckpt.wait()
        ckpt.close()
        writer.flush()
        writer.close()
        console.close()
    summary.update({"final_step": int(jax.device_get(state["step"])), "last_metrics": last})
    return summary
