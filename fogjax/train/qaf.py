"""The trainer's FP4 hooks: the QAF phase switch and the rho statistic of ``precision.qaf_*``.

:class:`QafHooks` owns what the loop needs beyond the ordinary step: the QAF twin of the model
(same parameters, FP4 forward, BF16 backward; fp4_recipes.qaf_recipe) with its compiled steps
(which take the switch step, for ``precision.qaf_lr_reset`` / ``qaf_warmup_steps``),
the jitted rho of ``qaf_auto`` and the host-side :class:`fp4_qaf.QafSwitch`.
:class:`fogjax.train.control.CompiledSteps` calls :meth:`pick_step` before every step and
:meth:`before_stats_step` before statistics steps (the state is donated by the step); the loop
saves :meth:`metadata` with each checkpoint.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fogjax import optim
from fogjax.model import build_model, weight_decay_mask
from fogjax.model.transformer import layer_segments
from fogjax.precision import fp4_qaf
from fogjax.precision.fp4_recipes import Fp4Recipe, qaf_recipe
from fogjax.train.run import Run
from fogjax.train.step import compute_grads

METADATA_KEY = "fp4_qaf"


def make_rho_fn(
    fp4_model: Any, qaf_model: Any, micro_batches: int, rng_seed: int
) -> Callable[[dict[str, Any], jax.Array], dict[str, jax.Array]]:
    """``rho(state, batch) -> {'<kernel path>': rho}`` (jit it): the weight gradients of the FP4
    model and of its QAF twin on the same batch with the train step's SR keys (same forward)."""
    scanned = bool(fp4_model.cfg.scan_layers)
    fp4_layers = [
        s.name
        for s in layer_segments(fp4_model.cfg, fp4_model.recipe)
        if isinstance(s.recipe, Fp4Recipe)
    ]

    def rho(state: dict[str, Any], batch: jax.Array) -> dict[str, jax.Array]:
        rng = jax.random.fold_in(jax.random.key(rng_seed), state["step"])
        args = (state["params"], state["fp8"], batch, micro_batches, False)
        _, g_fp4, _, _ = compute_grads(fp4_model, *args, rng=rng)
        _, g_ref, _, _ = compute_grads(qaf_model, *args, rng=rng)
        return fp4_qaf.block_kernel_rho(g_fp4, g_ref, scanned, fp4_layers)

    return rho


class QafHooks:
    """QAF for one run (only built when the recipe is FP4 and ``qaf_start`` or ``qaf_auto`` is on).

    Args:
      run: the :class:`fogjax.train.run.Run` of the config.
      meta: restored checkpoint metadata (its ``fp4_qaf`` entry restores the phase), or None.
    """

    def __init__(self, run: Run, meta: dict[str, Any] | None) -> None:
        config = run.config
        self.switch = fp4_qaf.QafSwitch.from_config(config.precision, config.train.steps)
        self.switch.restore((meta or {}).get(METADATA_KEY))
        self.lr = fp4_qaf.QafLr.from_config(config.precision)
        micro, seed = config.train.micro_batches, config.seed
        qaf_model = build_model(config, qaf_recipe(run.recipe))

        def qaf_step(state: Any, batch: jax.Array, with_stats: bool, switch_step: Any) -> Any:
            schedule, tx = run.schedule, run.tx
            if self.lr.active:  # the LR of the QAF phase depends on the (traced) switch step
                o = config.optim
                schedule = fp4_qaf.qaf_schedule(
                    run.schedule, switch_step, self.lr, o.peak_lr, o.min_lr, config.train.steps
                )
                tx = optim.make_optimizer(o, config.train.steps, weight_decay_mask, schedule)
            return run.make_train_step(qaf_model, tx, schedule)(state, batch, with_stats)

        self._steps = {
            flag: run.jit(functools.partial(_with_stats_last, qaf_step, flag), extra_args=1)
            for flag in (False, True)
        }
        self._rho = jax.jit(make_rho_fn(run.model, qaf_model, micro, seed))

    @staticmethod
    def maybe(run: Run, meta: dict[str, Any] | None) -> QafHooks | None:
        """The hooks, or None when the run has no QAF (not FP4, or both triggers off)."""
        if not isinstance(run.recipe, Fp4Recipe):
            return None
        if not fp4_qaf.QafSwitch.from_config(run.config.precision, run.config.train.steps).enabled:
            return None
        return QafHooks(run, meta)

    def pick_step(self, step: int, with_stats: bool, fp4_step: Callable[..., Any]) -> Any:
        """The step ``(state, batch) -> (state, metrics)`` to run at ``step``: the compiled QAF
        one (given the switch step) once the switch is on, else ``fp4_step``."""
        if not self.switch.in_qaf(step):
            return fp4_step
        compiled, switch_step = self._steps[with_stats], jnp.int32(self.switch.switch_step)
        return lambda state, batch: compiled(state, batch, switch_step)

    def before_stats_step(self, step: int, state: Any, batch: jax.Array) -> dict[str, float]:
        """On a statistics step still in FP4 with ``qaf_auto``: rho tags (``fp4/<layer>/rho``,
        ``fp4/rho/avg``) of this state and batch, fed to the switch; else {}."""
        if not self.switch.auto or self.switch.in_qaf(step):
            return {}
        scalars = fp4_qaf.rho_scalars(jax.device_get(self._rho(state, batch)))
        self.switch.observe(step, scalars["fp4/rho/avg"])
        return scalars

    def phase_scalars(self) -> dict[str, float]:
        """``fp4/qaf_phase``: 0 in FP4, 1 in QAF."""
        return {"fp4/qaf_phase": float(self.switch.phase == "qaf")}

    def metadata(self) -> dict[str, Any]:
        return {METADATA_KEY: self.switch.to_metadata()}


def _with_stats_last(
    qaf_step: Callable[..., Any], with_stats: bool, state: Any, batch: jax.Array, switch: Any
) -> Any:
    return qaf_step(state, batch, with_stats, switch)
