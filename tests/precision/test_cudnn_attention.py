"""cuDNN fused FP8 attention (``model.attention_impl='cudnn'`` under ``fp8dpa``).

CPU cannot run cuDNN, so the tests here check, without a GPU:
- the wrapper's arithmetic and delayed-scaling state with cuDNN's kernels swapped for a float32
  emulation of their FP8 graph (tests/helpers/cudnn_fp8_emulation.py), against a float32 reference;
- the sharded path (shard_map + pmax of the amaxes) against the unsharded one;
- that the real train step lowers for CUDA to one cuDNN FP8 forward and one backward call per layer
  body, with E4M3 operands and no FP8 einsum attention left;
- the start-up refusals.
The GPU-marked tests compare the real kernels with the emulation and train with them.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import cudnn_fp8_emulation as emulation
from helpers.steps import batch, fp8_dot_counts, jit_grads, setup, tiny_config
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fogjax import sharding
from fogjax.precision import cudnn_attention, scaling
from fogjax.precision.cudnn_attention import TENSORS, CudnnAttentionUnavailable
from fogjax.precision.formats import E4M3_MAX
from fogjax.precision.stats import fp8_state_metrics
from fogjax.train.run import build_run

SCALE = 0.25
EMULATED = cudnn_attention.Kernel(emulation.forward, emulation.backward)


@pytest.fixture
def emulated_kernel(monkeypatch):
    monkeypatch.setattr(cudnn_attention, "KERNEL", EMULATED)


def _inputs(b=2, t=16, n=4, g=2, h=16, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, t, n, h), jnp.float32)
    k = jax.random.normal(ks[1], (b, t, g, h), jnp.float32)
    v = jax.random.normal(ks[2], (b, t, g, h), jnp.float32)
    cotangent = jax.random.normal(ks[3], (b, t, n, h), jnp.float32)
    return q, k, v, cotangent


def _reference(q, k, v):
    """Causal GQA attention in float32, no quantisation."""
    n, g, t = q.shape[2], k.shape[2], q.shape[1]
    kr, vr = jnp.repeat(k, n // g, axis=2), jnp.repeat(v, n // g, axis=2)
    logits = jnp.einsum("btnh,bsnh->bnts", q, kr) * SCALE
    logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -1e30)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1), vr)


def _fp8_step(q, k, v, cotangent, states):
    """Output, input gradients and new states of one forward/backward pass."""

    def loss(q, k, v, states):
        out, _ = cudnn_attention.cudnn_fp8_attention(q, k, v, states, SCALE)
        return jnp.sum(out * cotangent), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, states)
    # Each state's "gradient" is the amax its tensor had; the train step applies it (bulk_scaling).
    new = {
        n: scaling.apply_observation(states[n], seen.scale_inv, E4M3_MAX)
        for n, seen in grads[3].items()
    }
    return out, grads[:3], new


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.slow
def test_fp8_attention_tracks_float32_and_keeps_every_state(emulated_kernel):
    q, k, v, cotangent = _inputs()
    ref_out, vjp = jax.vjp(_reference, q, k, v)
    ref_grads = vjp(cotangent)
    states = {n: scaling.init_state(8) for n in TENSORS}
    step = jax.jit(_fp8_step)
    for i in range(3):
        out, grads, new = step(q, k, v, cotangent, states)
        # E4M3 on every operand and result: a few per cent, never more.
        assert _rel(out, ref_out) < 0.08
        for grad, ref in zip(grads, ref_grads, strict=True):
            assert _rel(grad, ref) < 0.12
        # Every state was written (a zero history would mean its amax never arrived) ...
        seen = {n: float(new[n].amax_history[0]) for n in TENSORS}
        assert all(a > 0 for a in seen.values()), seen
        # ... with the amax of the tensor it names ...
        assert seen["q"] == float(jnp.max(jnp.abs(q)))
        assert seen["do"] == float(jnp.max(jnp.abs(cotangent)))
        assert seen["p"] == pytest.approx(1.0)  # causal row 0 attends to itself only
        assert seen["o"] == pytest.approx(float(jnp.max(jnp.abs(ref_out))), rel=0.08)
        for name, ref in zip(("dq", "dk", "dv"), ref_grads, strict=True):
            assert seen[name] == pytest.approx(float(jnp.max(jnp.abs(ref))), rel=0.12)
        # ... the window rolled once per step, and the scale follows the window's max.
        for name in TENSORS:
            history = np.asarray(new[name].amax_history)
            assert np.count_nonzero(history) == i + 1
            np.testing.assert_allclose(
                1.0 / np.asarray(new[name].scale_inv), E4M3_MAX / history.max(), rtol=1e-6
            )
        states = new


def test_fp8_attention_uses_the_stored_scales(emulated_kernel):
    """Quantising with a scale far too small saturates: the output must change (the states are
    inputs of the kernels, not decoration)."""
    q, k, v, cotangent = _inputs()
    states = {n: scaling.init_state(8) for n in TENSORS}
    out, _, _ = jax.jit(_fp8_step)(q, k, v, cotangent, states)
    tiny = dict(states, v=scaling.ScalingState(states["v"].amax_history, jnp.full((1,), 1e-3)))
    saturated, _, _ = jax.jit(_fp8_step)(q, k, v, cotangent, tiny)
    assert _rel(saturated, out) > 0.5


@pytest.mark.slow
def test_sharded_attention_reduces_amaxes_over_the_mesh(emulated_kernel):
    """Under a (data=2, fsdp=2, tensor=2) mesh the kernels run per shard; the amaxes (and so every
    state, output and gradient) must equal the single-device ones."""
    q, k, v, cotangent = _inputs(b=4, n=4, g=2)
    states = {n: scaling.init_state(8) for n in TENSORS}
    plain = jax.jit(_fp8_step)(q, k, v, cotangent, states)

    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    spec = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    with sharding.sharding_context(mesh):
        args = [jax.device_put(x, spec) for x in (q, k, v, cotangent)]
        lowered = jax.jit(_fp8_step).lower(*args, states)
        assert "shard_map" in lowered.as_text() or "sdy.manual_computation" in lowered.as_text()
        sharded = lowered.compile()(*args, states)

    # Per-shard amaxes differ from the global ones, so without the reduction the states would too.
    for name in TENSORS:
        np.testing.assert_array_equal(
            sharded[2][name].amax_history, plain[2][name].amax_history, err_msg=name
        )
        np.testing.assert_array_equal(sharded[2][name].scale_inv, plain[2][name].scale_inv)
    np.testing.assert_allclose(sharded[0], plain[0], rtol=1e-6, atol=1e-6)
    for a, b in zip(sharded[1], plain[1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def _cudnn_config(recipe="fp8dpa"):
    cfg = tiny_config(recipe)  # head dim 256 / 2 = 128, as cuDNN's FP8 kernels require.
    with cfg.unlocked():
        cfg.model.attention_impl = "cudnn"
    return cfg


@pytest.fixture(scope="module")
def emulated_training():
    """The cuDNN-attention model trained 6 steps (statistics steps) with the emulated kernel,
    once per module: (model, initial state, [state after step 1, ..., after step 6], losses)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cudnn_attention, "KERNEL", EMULATED)
        model, state, step = setup(_cudnn_config())
        step = jax.jit(functools.partial(step, with_stats=True))
        states, losses = [], []
        for i in range(6):
            new, metrics = step(states[-1] if states else state, batch(i % 2, t=128))
            states.append(new)
            losses.append(float(metrics["loss"]))
    return model, state, states, losses


@pytest.mark.slow
def test_model_trains_with_emulated_kernel_and_reports_its_state(emulated_training):
    _, state, states, losses = emulated_training
    attn_state = state["fp8"]["layers"]["attn"]["fp8_attention"]
    assert set(attn_state) == {f"{n}_{v}" for n in TENSORS for v in ("amax_history", "scale_inv")}
    _, xla_state, xla_step = setup(tiny_config("fp8dpa"))
    xla_step = jax.jit(functools.partial(xla_step, with_stats=False))
    _, xla_metrics = xla_step(xla_state, batch(0, t=128))
    # Same model, same data: the two FP8 attentions start within a few per cent.
    assert losses[0] == pytest.approx(float(xla_metrics["loss"]), rel=0.03)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    state = states[-1]  # after the 6 steps
    fp8 = state["fp8"]["layers"]["attn"]["fp8_attention"]
    for name in TENSORS:  # Both layers, every tensor: one entry per step, in flax's ring ...
        history = np.asarray(fp8[f"{name}_amax_history"])  # newest at 0, then H-1, H-2, ...
        by_step = history[:, [-5, -4, -3, -2, -1, 0]]  # steps 0..5
        assert np.all(history[:, 1:-5] == 0), name
        # ... all non-zero, except that the first steps quantise gradients with scale 1, which
        # E4M3 (smallest subnormal 2^-9) flushes to zero: dO on step 0 (so amax_dP = 0 there), dP
        # on step 1 (scale from step 0's zero amax), so dQ/dK/dV may read 0 until step 2.
        first_known = 0 if name in cudnn_attention.FORWARD_TENSORS + ("do",) else 2
        assert np.all(by_step[:, first_known:] > 0), (name, by_step)
    tags = fp8_state_metrics(state["fp8"])
    assert {f"fp8/layers_1/attn/fp8_attention/{n}_scale" for n in TENSORS} <= set(tags)
    # FP8 across the attention boundary: the out-projection reads cuDNN's E4M3 output with the
    # 'o' scale, so its own lhs state quantises nothing and observes nothing (its scale stays 1);
    # its weight and gradient states work as everywhere.
    wo = state["fp8"]["layers"]["attn"]["wo"]["dot"]
    assert not np.any(np.asarray(wo["lhs_amax_history"]))
    np.testing.assert_array_equal(wo["lhs_scale_inv"], 1.0)
    assert np.all(np.asarray(wo["grad_amax_history"])[:, 0] > 0)
    assert np.all(np.asarray(fp8["o_amax_history"])[:, 0] > 0)


@pytest.mark.slow
def test_micro_batches_leave_the_same_attention_state_as_one_batch(
    emulated_training, emulated_kernel
):
    model, _, states, _ = emulated_training
    state = states[2]  # after 3 steps: past the first steps' scale-1 gradients (test above)
    tokens = batch(7, b=8, t=128)
    results = [jit_grads(model, k, False)(state, tokens) for k in (1, 4)]
    one, four = (r[2]["layers"]["attn"]["fp8_attention"] for r in results)
    for name in TENSORS:
        a, b = one[f"{name}_amax_history"], four[f"{name}_amax_history"]
        assert np.all(np.asarray(a)[:, 0] > 0), name
        if name in cudnn_attention.FORWARD_TENSORS + ("do",):  # max over the batch: exact
            np.testing.assert_array_equal(b, a, err_msg=name)
        else:  # per-example gradients, up to the rounding of the layers above
            np.testing.assert_allclose(b, a, rtol=1e-2, err_msg=name)


def _lower_for_cuda(cfg, monkeypatch):
    with monkeypatch.context() as patch:  # model.init runs the forward pass on this CPU
        patch.setattr(cudnn_attention, "KERNEL", EMULATED)
        _, state, step = setup(cfg)
    assert cudnn_attention.KERNEL is cudnn_attention.CUDNN_KERNEL
    traced = jax.jit(functools.partial(step, with_stats=False)).trace(state, batch(t=128))
    jaxpr = jax.make_jaxpr(functools.partial(step, with_stats=False))(state, batch(t=128))
    return traced.lower(lowering_platforms=("cuda",)).as_text(), jaxpr


def test_train_step_lowers_to_cudnn_fp8_attention_for_cuda(monkeypatch):
    text, jaxpr = _lower_for_cuda(_cudnn_config(), monkeypatch)
    calls = re.findall(r"custom_call @(__cudnn\$\w+)\((.*?)\).*?: \((.*?)\) ->", text)
    targets = [target for target, _, _ in calls]
    # The scanned layer body appears once: one fused forward and one fused backward per layer.
    assert sorted(targets) == ["__cudnn$fmhaSoftmaxBackwardF8", "__cudnn$fmhaSoftmaxF8"]
    for _, _, operand_types in calls:
        tensors = operand_types.split(", ")
        assert all("f8E4M3FN" in t for t in tensors[:3]), operand_types  # Q, K, V in E4M3
    # QK^T and PV left the einsum path: only the 4 linears' 12 FP8 GEMMs remain per layer.
    counts = fp8_dot_counts(jaxpr)
    assert sum(counts.values()) == 12


@pytest.mark.parametrize(
    "fp8, head_dim, seq_len, expected",
    [
        (True, 64, 128, "head dim d_model/num_heads is 64"),
        (True, 128, 200, "train.seq_len=200 is not a multiple of 128"),
        (True, 128, 256, "JAX sees no GPU"),
        (False, 64, 100, "JAX sees no GPU"),
    ],
)
def test_cudnn_attention_refuses_what_it_cannot_run(fp8, head_dim, seq_len, expected):
    with pytest.raises(CudnnAttentionUnavailable) as info:
        cudnn_attention.require_cudnn_attention(fp8, head_dim, seq_len)
    assert expected in str(info.value)
    assert "--config.model.attention_impl=xla" in str(info.value)


def test_build_run_refuses_cudnn_attention_at_start_up():
    cfg = _cudnn_config()
    with cfg.unlocked():
        cfg.train.seq_len = 100
    with pytest.raises(ValueError, match="train.seq_len=100 is not a multiple of 128"):
        build_run(cfg)


# ----------------------------------------------------------------------------------------------
# On a Hopper GPU: the real kernels.


@pytest.mark.gpu
def test_cudnn_kernels_match_their_emulation_on_gpu(monkeypatch):
    """Same inputs, same states, three steps: cuDNN's kernels against the float32 emulation of
    the arithmetic this module assumes (scale/descale convention, amaxes of unscaled tensors)."""
    q, k, v, cotangent = _inputs(b=2, t=256, n=8, g=2, h=128)
    q, k, v, cotangent = (x.astype(jnp.bfloat16) for x in (q, k, v, cotangent))
    states = {n: scaling.init_state(16) for n in TENSORS}
    real_step = jax.jit(_fp8_step)
    monkeypatch.setattr(cudnn_attention, "KERNEL", EMULATED)
    emulated_step = jax.jit(_fp8_step)
    for _ in range(3):
        monkeypatch.setattr(cudnn_attention, "KERNEL", cudnn_attention.CUDNN_KERNEL)
        real = real_step(q, k, v, cotangent, states)
        monkeypatch.setattr(cudnn_attention, "KERNEL", EMULATED)
        emulated = emulated_step(q, k, v, cotangent, states)
        assert _rel(real[0].astype(jnp.float32), emulated[0].astype(jnp.float32)) < 0.05
        for a, b in zip(real[1], emulated[1], strict=True):
            assert _rel(a.astype(jnp.float32), b.astype(jnp.float32)) < 0.1
        for name in TENSORS:
            np.testing.assert_allclose(
                real[2][name].amax_history, emulated[2][name].amax_history, rtol=0.1, err_msg=name
            )
        states = real[2]


@pytest.mark.gpu
def test_train_step_runs_cudnn_fp8_attention_on_gpu():
    from fogjax.bench import hlo_stats

    _, state, step = setup(_cudnn_config())
    compiled = jax.jit(functools.partial(step, with_stats=False)).lower(state, batch(t=128))
    compiled = compiled.compile()
    assert hlo_stats.count_cudnn_fp8_attention_calls(compiled.as_text()) == 2
    losses = []
    for i in range(10):
        state, metrics = compiled(state, batch(i % 2, t=128))
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
