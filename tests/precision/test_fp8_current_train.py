"""A tiny FOG-flash trains under ``fp8_current`` and ``fp8dpa_current`` (CPU): finite, falling
loss, no FP8 state in the train state, FP8 statistics on statistics steps, and a checkpoint round
trip of the state with its empty ``fp8`` entry. Slow: each recipe compiles a train step (~30 s on
2 cores); the traced GEMM counts are checked fast in test_fp8_current_recipes.py."""

import jax
import numpy as np
import pytest
from helpers.steps import batch, setup, tiny_config

from fogjax import optim
from fogjax.checkpoint import Checkpointer
from fogjax.model import weight_decay_mask
from fogjax.precision import stats
from fogjax.train.step import make_train_step

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("recipe", ["fp8_current", "fp8dpa_current"])
def test_tiny_model_trains_and_checkpoints_without_fp8_state(recipe, tmp_path):
    cfg = tiny_config(recipe)
    model, state, _ = setup(cfg)
    assert state["fp8"] == {}
    # Committed to its device, as the restored state below will be: the restored state then
    # reuses the compiled step (an uncommitted state's step would compile again for it).
    state = jax.device_put(state, jax.devices()[0])
    # The step as the trainer builds it (fogjax.train.run), FP8 statistics included; statistics
    # steps throughout: one compilation.
    tx = optim.make_optimizer(cfg.optim, cfg.train.steps, weight_decay_mask)
    schedule = optim.make_schedule(cfg.optim, cfg.train.steps)
    step = make_train_step(model, tx, schedule, fp8_stats_fn=stats.fp8_metrics)
    step = jax.jit(step, static_argnames="with_stats")
    tokens = [batch(seed=s) for s in range(2)]
    losses = []
    for i in range(6):
        state, metrics = step(state, tokens[i % 2], with_stats=True)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses)), losses
    assert np.mean(losses[-2:]) < losses[0] - 1.0, losses
    assert state["fp8"] == {}
    fp8 = {k: float(v) for k, v in metrics["fp8"].items()}
    # Per layer, per operand: amaxes are seen; nothing saturates but elements AT the amax, which
    # bf16's rounding of the scale may lift just past 448 (clipped to 448, where rounding puts
    # them anyway; fp8_current.sow_current_stats): 1 to 4 per linear operand, and under
    # fp8dpa_current the softmax P's exact 1.0 in each sequence's first row, 16 of 16384.
    amax = {k: v for k, v in fp8.items() if k.endswith("/wqkv/dot/lhs_amax")}
    assert len(amax) == 2 and all(v > 0 for v in amax.values()), amax
    saturation = {k: v for k, v in fp8.items() if k.endswith("_saturation")}
    assert len(saturation) >= 16, saturation
    assert max(v for k, v in saturation.items() if "/attn/pv/" not in k) < 1e-4, saturation
    assert max(saturation.values()) <= 16 / 16384, saturation
    attention = any("/attn/qk/" in k for k in fp8)
    assert attention is (recipe == "fp8dpa_current")
    # An empty fp8 entry (as under bf16) saves and restores like any other state.
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    with Checkpointer(str(tmp_path), keep=1) as ckpt:
        assert ckpt.save(6, state, {}, {})
    with Checkpointer(str(tmp_path), keep=1) as ckpt:
        restored, _, _ = ckpt.restore(abstract)
    assert restored["fp8"] == {}
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    jax.tree.map(np.testing.assert_array_equal, restored, state)
    # The restored state trains on, in the step compiled above (~15 s less than a compilation
    # of the step without statistics, which would check nothing more about the restored state).
    _, metrics = step(restored, tokens[0], with_stats=True)
    assert np.isfinite(float(metrics["loss"]))
