"""train_and_evaluate(config, workdir): restore-or-init, the training loop, eval, checkpoints.

The workdir is the unit of a run: config, TensorBoard events and checkpoints live there, and a run
started on a workdir that holds a checkpoint resumes from it, batches included. One trainer holds
a workdir at a time (``trainer.lock``). Everything that can be checked is checked before anything
is written (:mod:`fogjax.train.preflight`). SIGTERM / SIGINT save a checkpoint at the next step boundary
and exit cleanly; a second Ctrl-C aborts at once, and so does the first during the first compile.
Metrics of step k are fetched after step k+1 is dispatched, so logging never stalls the device.
A run that ends (completed, stopped by a signal, diverged) leaves ``<workdir>/summary.json``
(:data:`SUMMARY_FILE`): its status, the divergence found (step, tokens, reason), the first kurtosis
warning, the final losses and the largest QKV kurtosis; ``fogjax.study`` builds its report from it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import jax

from fogjax import checkpoint, data, distributed, sharding
from fogjax.accounting import model_info
from fogjax.evaluate.loss import validation_loss
from fogjax.monitoring.reporter import Reporter, TrainingDiverged
from fogjax.precision import stats as fp8_stats
from fogjax.train import preflight, provenance
from fogjax.train import run as state_lib
from fogjax.train import workdir as run_config
from fogjax.train.preflight import validate_train_config
from fogjax.train.qaf import QafHooks
from fogjax.train.workdir import hold_workdir

__all__ = ["SUMMARY_FILE", "TrainingDiverged", "train_and_evaluate", "validate_train_config"]

SUMMARY_FILE = "summary.json"


class Interrupted(RuntimeError):
    """A signal arrived before the first step ran: there is nothing to save."""


class _StopRequest:
    """Set by SIGTERM/SIGINT; the loop checks it at step boundaries. A second Ctrl-C aborts."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            # signal.signal raises ValueError off the main thread (e.g. a test's thread).
            with contextlib.suppress(ValueError):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            raise KeyboardInterrupt  # The second Ctrl-C: the user does not want to wait.
        self.signal = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self) -> bool:
        """True if any process was signalled (all must stop together, or a save deadlocks)."""
        return distributed.any_process(self.signal is not None)


@dataclasses.dataclass(frozen=True)
class Cadence:
    """When each periodic action happens; ``done`` counts the optimizer steps finished."""

    steps: int
    log_every: int
    stats_every: int
    ckpt_every: int
    eval_every: int

    def stats(self, step: int) -> bool:
        # The very first step too; not a resumed run's first step, so it runs the same compiled
        # step as a straight run does.
        return (step + 1) % self.stats_every == 0 or step == 0

    def checkpoint(self, done: int) -> bool:
        return done % self.ckpt_every == 0 or done == self.steps

    def evaluate(self, done: int) -> bool:
        return bool(self.eval_every) and (done % self.eval_every == 0 or done == self.steps)

    def stop_check(self, done: int) -> bool:
        # Multi-process, agreeing costs a host collective: only at the log cadence.
        return done < self.steps and (jax.process_count() == 1 or done % self.log_every == 0)


class _Profiler:
    """A jax.profiler trace of steps FIRST..LAST (1-based) into ``<workdir>/profile``."""

    def __init__(self, workdir: str, steps: tuple[int, int] | None):
        self.dir, self.steps, self.active = os.path.join(workdir, "profile"), steps, False

    def before(self, done: int) -> None:
        if self.steps and done == self.steps[0]:
            jax.profiler.start_trace(self.dir)
            self.active = True

    def after(self, done: int, raw: Any) -> None:
        if self.active and done >= self.steps[1]:
            jax.block_until_ready(raw)
            self.close()

    def close(self) -> None:
        if self.active:
            self.active = False
            jax.profiler.stop_trace()


def _interruptible(fn: Callable[[], Any], mesh: Any, stop: _StopRequest) -> Any:
    """``fn()`` in a worker thread, inside the mesh context (thread-local, like flax's logical
    rules), while the main thread, which XLA's compile would block, stays free for signals."""
    out: dict[str, Any] = {}

    def work() -> None:
        try:
            with sharding.sharding_context(mesh):
                out["value"] = fn()
        except BaseException as e:  # Re-raised in the main thread.
            out["error"] = e

    worker = threading.Thread(target=work, name="fogjax-compile", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.2)
        if stop.signal is not None:
            raise Interrupted(
                "Interrupted during the first compilation: no step ran, nothing saved."
            )
    if "error" in out:
        raise out["error"]
    return out["value"]


class _CompiledSteps:
    """The train step variants (plain, statistics), each compiled ahead of time when first
    needed, in a worker thread so that a signal aborts a long compile."""

    def __init__(self, run: state_lib.Run, stop: _StopRequest, reporter: Reporter):
        self._run, self._stop, self._reporter = run, stop, reporter
        self._compiled: dict[bool, Any] = {}

    def get(self, with_stats: bool, state: Any, batch: Any) -> Any:
        if with_stats not in self._compiled:
            start = time.time()
            what = " with statistics" if with_stats else ""
            self._reporter.print(f"Compiling the train step{what} (Ctrl-C aborts)...")
            jitted = self._run.train_steps[with_stats]
            self._compiled[with_stats] = self._compile(lambda: jitted.lower(state, batch).compile())
            self._reporter.print(f"Compiled in {time.time() - start:.1f}s")
        return self._compiled[with_stats]

    def _compile(self, fn: Callable[[], Any]) -> Any:
        try:
            return _interruptible(fn, self._run.mesh, self._stop)
        except Exception as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            t = self._run.config.train
            raise ValueError(
                "The train step does not fit in device memory (RESOURCE_EXHAUSTED at compile, "
                f"batch_size={t.batch_size}, seq_len={t.seq_len}, micro_batches={t.micro_batches}"
                "): raise train.micro_batches, lower train.batch_size or train.seq_len, set "
                "--config.model.remat=full, or shard parameters with --config.mesh.fsdp=N."
            ) from None


def _restore_or_init(
    run: state_lib.Run, ckpt: checkpoint.Checkpointer, train_iter: Any, workdir: str
) -> tuple[Any, float, dict[str, Any] | None]:
    """(state, seconds trained before, checkpoint metadata): the latest checkpoint, or a fresh
    state (metadata None)."""
    config = run.config
    if ckpt.latest_step() is None:
        return state_lib.create_state(run.init, run.shardings, config.seed), 0.0, None
    # Shapes first (a different model is refused whatever the flags), then the fields that
    # keep every shape; restoring reads only, so a refusal still leaves the workdir untouched.
    state, data_state, meta = ckpt.restore(run.abstract)
    saved = run_config.load_saved(workdir)
    changes = run_config.config_changes(saved, config) if saved is not None else []
    if changes and not config.train.allow_config_change:
        run_config.refuse_changes(changes, workdir)
    if data_state is None:
        # Written by another process layout: one batch per step, and global batch n is the
        # same windows on any layout, so the step gives the exact position.
        data_state = {"batches_consumed": int(state["step"])}
    train_iter.set_state(data_state)
    if changes:
        print(f"Resuming with a changed model config (allowed): {'; '.join(changes)}")
    return state, float(meta.get("elapsed_s", 0.0)), meta


def _train_iterator(config: Any, info: data.DatasetInfo, mesh: Any) -> Any:
    index, count = sharding.process_batch_shard(mesh)
    t = config.train
    return data.make_train_iterator(
        info,
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
        "tokens_seen": step * config.train.batch_size * config.train.seq_len,
        "elapsed_s": elapsed_s,
        "model": dict(config.model.items()),
        "recipe": config.precision.recipe,
        "config": json.loads(config.to_json_best_effort()),
    }


def _announce(reporter: Reporter, run: state_lib.Run, ckpt: Any, workdir: str, start: int) -> None:
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


def _write_summary(workdir: str, status: str, config: Any, reporter: Reporter, step: int) -> dict:
    """Writes ``<workdir>/summary.json`` atomically (process 0); returns its contents."""
    t = config.train
    record = {
        "status": status,  # 'completed' | 'stopped' (by a signal; resumable) | 'diverged'
        "step": step,
        "steps": t.steps,
        "tokens_seen": step * t.batch_size * t.seq_len,
        "arch": config.model.arch,
        "recipe": config.precision.recipe,
        **reporter.summary(),
    }
    if jax.process_index() == 0:
        path = os.path.join(workdir, SUMMARY_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump(record, f, indent=1)
        os.replace(path + ".tmp", path)
    return record


@contextlib.contextmanager
def _summary_on_divergence(workdir: str, config: Any, reporter: Reporter) -> Any:
    """A run stopped by a divergence leaves its summary too (status 'diverged')."""
    try:
        yield
    except TrainingDiverged:
        _write_summary(workdir, "diverged", config, reporter, reporter.last_step)
        raise


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint); returns a summary."""
    t0, t = time.time(), config.train
    validate_train_config(config)
    info = data.load_dataset_info(config.data.path)
    preflight.check_dataset(info, config)
    run = state_lib.build_run(config)
    workdir = os.path.abspath(workdir)
    preflight.check_workdir(workdir)
    cadence = Cadence(t.steps, t.log_every, t.stats_every, t.ckpt_every, t.eval_every)
    with hold_workdir(workdir), contextlib.ExitStack() as stack:
        ckpt = stack.enter_context(
            checkpoint.Checkpointer(
                os.path.join(workdir, "checkpoints"),
                keep=t.keep_checkpoints,
                save_every=t.ckpt_every,
            )
        )
        train_iter = _train_iterator(config, info, run.mesh)
        with sharding.sharding_context(run.mesh):
            state, elapsed_before, meta = _restore_or_init(run, ckpt, train_iter, workdir)
        start = int(state["step"])
        if jax.process_index() == 0:
            run_config.record(workdir, config, start)
        flops = model_info(config, run.abstract["params"])["flops_per_token"]
        reporter = Reporter(config, workdir, flops, start, ckpt)
        stack.callback(reporter.close)
        reporter.load_state_dict((meta or {}).get("monitor"))
        stack.enter_context(_summary_on_divergence(workdir, config, reporter))
        _announce(reporter, run, ckpt, workdir, start)
        stop = stack.enter_context(_StopRequest())
        profiler = _Profiler(workdir, preflight.parse_profile_steps(t.profile_steps))
        stack.callback(profiler.close)

        # FP4 quantisation-aware finetuning: its own compiled steps and phase (None without QAF).
        stats_fn = fp8_stats.fp8_metrics if run.recipe.quantizes_linears else None
        qaf = QafHooks.maybe(run, stats_fn, meta)

        def save(done: int, force: bool) -> None:
            extra = {**(qaf.metadata() if qaf else {}), "monitor": reporter.state_dict()}
            meta = _metadata(config, done, elapsed_before + time.time() - t0, extra)
            ckpt.save(done, state, train_iter.get_state(), meta, force=force)

        summary: dict[str, Any] = {"start_step": start}
        steps, pending = _CompiledSteps(run, stop, reporter), None
        with sharding.sharding_context(run.mesh):
            for step in range(start, t.steps):
                batch = sharding.global_batch_from_local(next(train_iter), run.mesh)
                with_stats, done = cadence.stats(step), step + 1
                step_fn = steps.get(with_stats, state, batch)
                if qaf:
                    if with_stats:
                        rho = qaf.before_stats_step(step, state, batch)
                        reporter.writer.write_scalars(done, {**rho, **qaf.phase_scalars()})
                    step_fn = qaf.pick_step(step, with_stats, step_fn)
                profiler.before(done)
                state, raw = step_fn(state, batch)
                profiler.after(done, raw)
                if pending is not None:
                    reporter.on_step(*pending)
                pending = (done, raw)
                if cadence.checkpoint(done):
                    reporter.on_step(*pending)
                    pending = None
                    save(done, force=done == t.steps)
                    reporter.throughput.reset()
                if cadence.evaluate(done):
                    result = validation_loss(
                        run.eval_step, state, info, config, run.mesh, t.eval_batches
                    )
                    reporter.on_eval(done, result)
                    summary["eval_loss"] = result["loss"]
                if cadence.stop_check(done) and stop.agreed():
                    if pending is not None:
                        reporter.on_step(*pending)
                        pending = None
                    save(done, force=True)
                    ckpt.wait()
                    reporter.print(
                        f"Stopped by signal at step {done}: checkpoint saved in {ckpt.directory}. "
                        "Run the same command again to resume."
                    )
                    summary["stopped_at"] = done
                    break
            if pending is not None:
                reporter.on_step(*pending)
        status = "stopped" if "stopped_at" in summary else "completed"
        final_step = int(jax.device_get(state["step"]))
        summary.update(_write_summary(workdir, status, config, reporter, final_step))
    summary.update({"final_step": final_step, "last_metrics": reporter.last})
    return summary
