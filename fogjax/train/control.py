"""How the training loop is steered: signals, the compile thread, the profiler, the cadence, and
the compiled step variants it runs.

- :class:`StopRequest`: SIGTERM / SIGINT ask the loop to save and stop at the next step
  boundary; a second Ctrl-C aborts at once.
- :func:`interruptible`: XLA's compile blocks the thread that calls it, so compiles run in a
  worker thread while the main thread stays free for signals (a Ctrl-C during the first compile
  aborts, :class:`Interrupted`).
- :class:`CompiledSteps`: the step the loop runs at step ``t``: the plain or the statistics
  variant, compiled ahead of time when first needed, or under FP4 quantisation-aware finetuning
  the QAF step (:mod:`fogjax.train.qaf`), so the loop itself has no FP4 branch.
- :class:`Cadence`: when each periodic action (statistics, checkpoints, eval, stop checks)
  happens; :class:`Profiler`: a jax.profiler trace of a range of steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import jax

from fogjax import distributed, sharding
from fogjax.train import host_memory
from fogjax.train.qaf import QafHooks
from fogjax.train.run import Run


class Interrupted(RuntimeError):
    """A signal arrived before the first step ran: there is nothing to save."""


SECOND_CTRL_C = (
    "Interrupted by a second Ctrl-C: stopped at once, without saving the steps since the last "
    "checkpoint. Run the same command again to resume from the latest checkpoint."
)


class StopRequest:
    """Set by SIGTERM/SIGINT; the loop checks it at step boundaries. A second Ctrl-C aborts."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            # signal.signal raises ValueError off the main thread (e.g. a test's thread).
            with contextlib.suppress(ValueError):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            # The second Ctrl-C: the user does not want to wait. An asynchronous save in flight
            # is left as orbax's tmp folder, which the next start removes.
            raise KeyboardInterrupt(SECOND_CTRL_C)
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

    @classmethod
    def from_config(cls, train_cfg: Any) -> Cadence:
        t = train_cfg
        return cls(t.steps, t.log_every, t.stats_every, t.ckpt_every, t.eval_every)

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


class Profiler:
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


def interruptible(fn: Callable[[], Any], mesh: Any, stop: StopRequest) -> Any:
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


Step = Callable[[Any, jax.Array], tuple[Any, dict[str, Any]]]


class CompiledSteps:
    """The train step the loop runs at each step: ``steps.at(step, with_stats, state, batch)``.

    The plain and statistics variants of ``run.train_steps`` are each compiled ahead of time
    when first needed, in a worker thread so that a signal aborts a long compile. With ``qaf``
    (FP4 quantisation-aware finetuning), the QAF step replaces them once its switch is on, and
    on statistics steps before it the rho statistic is measured and reported (``report(step,
    scalars)``) first, since the step donates the state.
    """

    def __init__(
        self,
        run: Run,
        stop: StopRequest,
        print_fn: Callable[[str], None] | None,
        qaf: QafHooks | None = None,
        report: Callable[[int, dict[str, float]], None] | None = None,
    ):
        self._run, self._stop, self._print = run, stop, print_fn or print
        self._qaf, self._report = qaf, report
        self._compiled: dict[bool, Any] = {}

    def at(self, step: int, with_stats: bool, state: Any, batch: jax.Array) -> Step:
        """The step function for 0-based ``step`` (run it as ``fn(state, batch)``)."""
        fn = self._get(with_stats, state, batch)
        if self._qaf is None:
            return fn
        if with_stats and self._report is not None:
            rho = self._qaf.before_stats_step(step, state, batch)
            self._report(step + 1, {**rho, **self._qaf.phase_scalars()})
        return self._qaf.pick_step(step, with_stats, fn)

    def _get(self, with_stats: bool, state: Any, batch: jax.Array) -> Step:
        if with_stats not in self._compiled:
            start = time.time()
            what = " with statistics" if with_stats else ""
            self._print(f"Compiling the train step{what} (Ctrl-C aborts)...")
            jitted = self._run.train_steps[with_stats]
            compiled = self._compile(lambda: jitted.lower(state, batch).compile())
            self._print(f"Compiled in {time.time() - start:.1f}s")
            # On CPU nothing else refuses a step too large for the host: it would be killed.
            host_memory.check_step_fits(compiled, self._run)
            self._compiled[with_stats] = compiled
        return self._compiled[with_stats]

    def _compile(self, fn: Callable[[], Any]) -> Any:
        try:
            return interruptible(fn, self._run.mesh, self._stop)
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
