"""train_and_evaluate(config, workdir): restore-or-init, the training loop, eval, checkpoints.

The workdir is the unit of a run: config, TensorBoard events and checkpoints live there, and a run
started on a workdir that holds a checkpoint resumes from it, batches included. One trainer holds
a workdir at a time (``trainer.lock``). Everything that can be checked is checked before anything
is written (:mod:`fogjax.train.preflight`). SIGTERM / SIGINT save a checkpoint at the next step
boundary and exit cleanly; a second Ctrl-C aborts at once, and so does the first during the first
compile. Metrics of step k are fetched after step k+1 is dispatched, so logging never stalls the
device. A run that ends (completed, stopped by a signal, diverged, out of disk space) leaves
``<workdir>/summary.json`` (:data:`SUMMARY_FILE`): its status, the divergence found (step, tokens,
reason), the first kurtosis warning, the final losses and the largest QKV kurtosis;
``fogjax.study`` builds its report from it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

import jax

from fogjax import checkpoint, config_lib, data, sharding
from fogjax.accounting import model_info
from fogjax.checkpoint import disk_space
from fogjax.checkpoint.disk_space import DiskFullError
from fogjax.evaluate.loss import validation_loss
from fogjax.monitoring.reporter import Reporter, TrainingDiverged
from fogjax.train import divergence_history, host_memory, init_from, preflight, provenance
from fogjax.train import workdir as workdir_lib
from fogjax.train.control import Cadence, CompiledSteps, Profiler, StopRequest
from fogjax.train.preflight import validate_train_config
from fogjax.train.qaf import QafHooks
from fogjax.train.run import Run, build_run, create_state
from fogjax.train.workdir import SUMMARY_FILE

__all__ = ["train_and_evaluate"]


def _restore_or_init(
    run: Run,
    ckpt: checkpoint.Checkpointer,
    train_iter: Any,
    workdir: str,
    init_params: dict | None = None,
) -> tuple[Any, float, dict[str, Any] | None]:
    """(state, seconds trained before, checkpoint metadata): the latest checkpoint, or a fresh
    state (metadata None), with ``init_params`` (train.init_from, already read) as its params."""
    config = run.config
    if ckpt.latest_step() is None:
        state = create_state(run.init, run.shardings, config.seed)
        if init_params is not None:
            state = init_from.state_with_params(run, state, init_params)
            print(f"Initialised the parameters from {config.train.init_from} (train.init_from).")
        return state, 0.0, None
    if config.train.init_from:
        print(f"Resuming from {ckpt.directory}; train.init_from is ignored.")
    # Shapes first (a different model is refused whatever the flags), then the fields that
    # keep every shape; restoring reads only, so a refusal still leaves the workdir untouched.
    state, data_state, meta = ckpt.restore(run.abstract)
    saved = workdir_lib.load_saved(workdir)
    changes = workdir_lib.config_changes(saved, config) if saved is not None else []
    if changes and not config.train.allow_config_change:
        workdir_lib.refuse_changes(changes, workdir)
    if data_state is None:
        # Written by another process layout: one batch per step, and global batch n is the
        # same windows on any layout, so the step gives the exact position.
        data_state = {"batches_consumed": int(state["step"])}
    train_iter.set_state(data_state)
    if changes:
        print(f"Resuming with a changed model config (allowed): {'; '.join(changes)}")
    return state, float(meta.get("elapsed_s", 0.0)), meta


def _train_iterator(config: Any, mixture: data.Mixture, mesh: Any) -> Any:
    index, count = sharding.process_batch_shard(mesh)
    t = config.train
    return data.make_train_iterator(
        mixture,
        seq_len=t.seq_len,
        global_batch_size=t.batch_size,
        seed=config.seed,
        process_index=index,
        process_count=count,
        num_workers=config.data.num_workers,
    )


def _metadata(
    config: Any, step: int, elapsed_s: float, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        **(extra or {}),
        "step": step,
        "tokens_seen": step * config_lib.tokens_per_step(config),
        "elapsed_s": elapsed_s,
        "model": dict(config.model.items()),
        "recipe": config.precision.recipe,
        "config": json.loads(config.to_json_best_effort()),
    }


def _announce(
    reporter: Reporter, run: Run, ckpt: Any, workdir: str, start: int, mixture: data.Mixture
) -> None:
    c, steps = run.config, run.config.train.steps
    reporter.print(
        f"fogjax: {c.model.arch} {run.num_params / 1e6:.1f}M params, recipe "
        f"{c.precision.recipe}, {jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"mesh {dict(run.mesh.shape)}, process {jax.process_index()}/{jax.process_count()}, "
        f"steps {start}->{steps}, workdir {workdir}"
    )
    if start:
        reporter.print(f"Resumed from {ckpt.directory} at step {start}.")
    if start >= steps:
        reporter.print(
            f"Nothing to do: the run already reached train.steps={steps}. To train further, "
            f"raise it (e.g. --config.train.steps={2 * steps}) or use another --workdir."
        )
    record = provenance.provenance(c, run.num_params)
    reporter.writer.write_text(start, "run/provenance", provenance.to_markdown(record))
    reporter.writer.write_text(start, "run/config", "```\n" + str(c) + "\n```")
    reporter.writer.write_text(start, "run/data", mixture.describe())


def _write_summary(
    workdir: str, status: str, config: Any, reporter: Reporter, step: int, **extra: Any
) -> dict:
    """Writes ``<workdir>/summary.json`` (process 0); returns its contents."""
    record = {
        # 'completed' | 'stopped' (by a signal; resumable) | 'diverged' | 'disk_full' (resumable
        # from `last_checkpoint` once there is room)
        "status": status,
        "step": step,
        "steps": config.train.steps,
        "tokens_seen": step * config_lib.tokens_per_step(config),
        "arch": config.model.arch,
        "recipe": config.precision.recipe,
        **extra,
        **reporter.summary(),
    }
    if jax.process_index() == 0:
        workdir_lib.write_json(os.path.join(workdir, SUMMARY_FILE), record)
    return record


@contextlib.contextmanager
def _summary_on_divergence(workdir: str, config: Any, reporter: Reporter) -> Any:
    """A run stopped by a divergence leaves its summary too (status 'diverged')."""
    try:
        yield
    except TrainingDiverged:
        _write_summary(workdir, "diverged", config, reporter, reporter.last_step)
        raise


@contextlib.contextmanager
def _summary_on_disk_full(
    workdir: str, config: Any, reporter: Reporter, ckpt: checkpoint.Checkpointer
) -> Any:
    """A full disk is a :class:`DiskFullError` naming the disk (whatever wrote: orbax, the
    config, the events), and leaves a summary (status 'disk_full') if there is room for it."""
    try:
        yield
    except Exception as e:
        if not disk_space.is_disk_full(e):
            raise
        saved = ckpt.saved_steps()
        error = e if isinstance(e, DiskFullError) else disk_space.full_error(workdir, e, saved)
        try:
            _write_summary(
                workdir,
                "disk_full",
                config,
                reporter,
                reporter.last_step,
                last_checkpoint=saved[-1] if saved else None,
            )
        except OSError as summary_error:  # No room for it either: the error says it all.
            reporter.print(f"(summary.json not written: {summary_error})")
        raise error from None


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint); returns a summary."""
    t0, t = time.time(), config.train
    validate_train_config(config)
    mixture = data.load_mixture(config.data)
    info = mixture.eval_info  # Validation reads the first dataset.
    preflight.check_data(mixture, config)
    run = build_run(config)
    host_memory.check_state_fits(run)  # On CPU: before the lock, before anything is written.
    workdir = os.path.abspath(workdir)
    # A fresh run's train.init_from is read and checked before the workdir is written.
    init_params = init_from.read_init_params(run, workdir)
    preflight.check_workdir(workdir)
    cadence = Cadence.from_config(t)
    with workdir_lib.hold_workdir(workdir), contextlib.ExitStack() as stack:
        ckpt = stack.enter_context(
            checkpoint.Checkpointer(
                os.path.join(workdir, "checkpoints"),
                keep=t.keep_checkpoints,
                save_every=t.ckpt_every,
            )
        )
        train_iter = _train_iterator(config, mixture, run.mesh)
        with sharding.sharding_context(run.mesh):
            state, elapsed_before, meta = _restore_or_init(
                run, ckpt, train_iter, workdir, init_params
            )
        start = int(state["step"])
        monitor = (meta or {}).get("monitor")
        # A recorded divergence outlives resumes; resuming its diverged model may be refused.
        after, earlier = divergence_history.classify(workdir, start, monitor)
        divergence_history.refuse_diverged_resume(
            after, start, config, str(ckpt.directory), ckpt.all_steps(), workdir
        )
        if jax.process_index() == 0:
            workdir_lib.record(workdir, config, start)
        flops = model_info(config, run.abstract["params"])["flops_per_token"]
        reporter = Reporter(config, workdir, flops, start, ckpt)
        stack.callback(reporter.close)
        reporter.load_state_dict(monitor)
        divergence_history.carry(after, earlier, reporter)
        stack.enter_context(_summary_on_divergence(workdir, config, reporter))
        stack.enter_context(_summary_on_disk_full(workdir, config, reporter, ckpt))
        _announce(reporter, run, ckpt, workdir, start, mixture)
        stop = stack.enter_context(StopRequest())
        profiler = Profiler(workdir, preflight.parse_profile_steps(t.profile_steps))
        stack.callback(profiler.close)
        # FP4 quantisation-aware finetuning (None without it) switches the compiled step.
        qaf = QafHooks.maybe(run, meta)
        steps = CompiledSteps(run, stop, reporter.print, qaf, reporter.writer.write_scalars)

        def save(done: int, force: bool) -> None:
            reporter.before_checkpoint()  # A NaN is caught first; events reach the disk.
            extra = {**(qaf.metadata() if qaf else {}), "monitor": reporter.state_dict()}
            meta = _metadata(config, done, elapsed_before + time.time() - t0, extra)
            ckpt.save(done, state, train_iter.get_state(), meta, force=force)
            reporter.throughput.reset()

        summary: dict[str, Any] = {"start_step": start}
        with sharding.sharding_context(run.mesh):
            for step in range(start, t.steps):
                batch = sharding.global_batch_from_local(next(train_iter), run.mesh)
                done = step + 1
                step_fn = steps.at(step, cadence.stats(step), state, batch)
                profiler.before(done)
                state, raw = step_fn(state, batch)
                profiler.after(done, raw)
                reporter.step_done(done, raw)
                if cadence.checkpoint(done):
                    save(done, force=done == t.steps)
                if cadence.evaluate(done):
                    result = validation_loss(
                        run.eval_step, state, info, config, run.mesh, t.eval_batches
                    )
                    reporter.on_eval(done, result)
                    summary["eval_loss"] = result["loss"]
                if cadence.stop_check(done) and stop.agreed():
                    save(done, force=True)
                    ckpt.wait()
                    reporter.print(
                        f"Stopped by signal at step {done}: checkpoint saved in {ckpt.directory}. "
                        "Run the same command again to resume."
                    )
                    summary["stopped_at"] = done
                    break
            reporter.flush()
            ckpt.wait()  # The last save's failure (a full disk) surfaces before 'completed'.
        status = "stopped" if "stopped_at" in summary else "completed"
        final_step = int(jax.device_get(state["step"]))
        summary.update(_write_summary(workdir, status, config, reporter, final_step))
    summary.update({"final_step": final_step, "last_metrics": reporter.last})
    return summary
