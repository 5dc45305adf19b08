"""``precision.high_precision_layers`` (NVIDIA's NVFP4 recipe, arXiv 2509.25149: first / last blocks
in BF16): the scanned runs of blocks, the count of FP4 and BF16 GEMMs in each run of the traced
train step, BF16 blocks equal to a ``bf16`` model's on the same parameters, training, refusals."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fogjax import config_lib, data, optim
from fogjax.model import build_model, weight_decay_mask
from fogjax.model.blocks import Block
from fogjax.model.transformer import layer_segments
from fogjax.precision import fp4_qaf
from fogjax.precision.fp4_dot import FP4_GEMM_SCOPE
from fogjax.precision.recipe import Recipe
from fogjax.precision.registry import make_recipe
from fogjax.train.step import activation_metrics, make_train_step

LAYERS, FIRST, LAST = 4, 1, 2
SEQ, BATCH = 32, 8
# Block linears of FOG-flash: fused QKV, attention out, FFN in, FFN out.
LINEARS = 4


def tiny_config(recipe="nvfp4", scan=True, first_last=(FIRST, LAST), layers=LAYERS):
    cfg = config_lib.get_config("fog_flash", "tiny")
    cfg.precision.recipe = recipe
    cfg.precision.high_precision_layers = first_last
    cfg.model.num_layers, cfg.model.d_model, cfg.model.ffn_dim = layers, 64, 192
    cfg.model.num_heads, cfg.model.num_kv_heads, cfg.model.vocab_size = 2, 1, 320
    cfg.model.scan_layers = scan
    cfg.train.steps, cfg.train.batch_size, cfg.train.seq_len = 30, BATCH, SEQ
    cfg.optim.warmup_steps, cfg.optim.cooldown_steps = 5, 5
    return cfg


@functools.cache
def init_params():
    model = build_model(tiny_config())
    tokens = jnp.zeros((1, SEQ), jnp.int32)
    return nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens)["params"])


def tokens():
    it = data.make_train_iterator("embedded:bytes", seq_len=SEQ, global_batch_size=BATCH, seed=0)
    return jnp.asarray(next(it))


def unrolled_from_segments(params):
    """The scanned segments' stacked parameters as an unrolled model's ``layers_<i>`` tree."""
    cfg = tiny_config()
    out = {k: v for k, v in params.items() if not k.startswith("layers")}
    for seg in layer_segments(cfg.model, make_recipe(cfg.precision)):
        for j in range(seg.length):
            out[f"layers_{seg.start + j}"] = jax.tree.map(lambda x, j=j: x[j], params[seg.name])
    return out


@pytest.mark.slow
def test_scanned_runs_are_named_and_stacked_and_unrolled_names_are_unchanged():
    params = init_params()
    stacked = {k: jax.tree.leaves(v)[0].shape[0] for k, v in params.items() if "layers" in k}
    assert stacked == {
        "layers_bf16_first": FIRST,
        "layers_fp4": LAYERS - FIRST - LAST,
        "layers_bf16_last": LAST,
    }
    unrolled = build_model(tiny_config(scan=False))
    shapes = jax.eval_shape(unrolled.init, jax.random.key(0), jnp.zeros((1, SEQ), jnp.int32))
    assert sorted(k for k in shapes["params"] if k.startswith("layers")) == [
        f"layers_{i}" for i in range(LAYERS)
    ]
    assert [k for k in init_params() if k == "layers"] == []
    plain = build_model(tiny_config(first_last=(0, 0)))
    assert plain.layer_names == ("layers",)  # no split: the checkpoint layout of before


def test_high_precision_layers_refuse_what_cannot_work():
    with pytest.raises(ValueError, match="leaving no FP4 block"):
        build_model(tiny_config(first_last=(2, 2)))
    with pytest.raises(ValueError, match="FP4 recipe only, not under 'fp8dpa'"):
        make_recipe(tiny_config(recipe="fp8dpa").precision)
    with pytest.raises(ValueError, match="must be a pair"):
        make_recipe(tiny_config(first_last=(1, -1)).precision)


def _sub_jaxprs(eqn):
    for p in eqn.params.values():
        for q in p if isinstance(p, (tuple, list)) else (p,):
            if hasattr(q, "jaxpr") and hasattr(q, "consts"):
                yield q.jaxpr
            elif hasattr(q, "eqns"):
                yield q


def _count_dots(jaxpr):
    """(FP4 GEMMs, other GEMMs) in a jaxpr and everything it calls."""
    fp4 = other = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            if FP4_GEMM_SCOPE in str(eqn.source_info.name_stack):
                fp4 += 1
            else:
                other += 1
        for sub in _sub_jaxprs(eqn):
            f, o = _count_dots(sub)
            fp4, other = fp4 + f, other + o
    return fp4, other


def _scans(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            yield eqn
        else:
            for sub in _sub_jaxprs(eqn):
                yield from _scans(sub)


@functools.cache
def train_step_and_state():
    cfg = tiny_config()
    model = build_model(cfg)
    tx = optim.make_optimizer(cfg.optim, cfg.train.steps, weight_decay_mask)
    params = init_params()
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "fp8": {},
        "opt_state": tx.init(params),
    }
    schedule = optim.make_schedule(cfg.optim, cfg.train.steps)
    return make_train_step(model, tx, schedule, rng_seed=cfg.seed), state


def test_traced_step_has_fp4_gemms_only_in_the_fp4_run():
    step, state = train_step_and_state()
    jaxpr = jax.make_jaxpr(step)(state, tokens()).jaxpr
    scans = list(_scans(jaxpr))
    forward = [e for e in scans if "transpose" not in str(e.source_info.name_stack)]
    backward = [e for e in scans if "transpose" in str(e.source_info.name_stack)]
    lengths = [FIRST, LAYERS - FIRST - LAST, LAST]
    assert [e.params["length"] for e in forward] == lengths
    assert [e.params["length"] for e in backward] == lengths[::-1]
    counts_fwd = [_count_dots(e.params["jaxpr"].jaxpr) for e in forward]
    counts_bwd = [_count_dots(e.params["jaxpr"].jaxpr) for e in backward][::-1]
    # Per block (one scan iteration): FP4 only in the middle run, LINEARS forward GEMMs and
    # 2 * LINEARS backward (data and weight gradient); the BF16 runs do the same GEMMs in BF16.
    assert [f for f, _ in counts_fwd] == [0, LINEARS, 0]
    assert [f for f, _ in counts_bwd] == [0, 2 * LINEARS, 0]
    for counts in (counts_fwd, counts_bwd):
        totals = [f + o for f, o in counts]
        assert totals[0] == totals[1] == totals[2], counts  # same block, only the format differs


@pytest.mark.slow
def test_bf16_blocks_equal_a_bf16_model_on_the_same_parameters():
    x = tokens()[:, :SEQ]
    params = unrolled_from_segments(init_params())
    # Unrolled (nn.scan does not return intermediates); the split is the same per block.
    hp = build_model(tiny_config(scan=False))
    _, inter = hp.apply({"params": params}, x, capture_intermediates=True)
    inter = inter["intermediates"]
    bf16 = build_model(tiny_config(recipe="bf16", scan=False, first_last=(0, 0)))
    _, ref = bf16.apply({"params": params}, x, capture_intermediates=True)
    ref = ref["intermediates"]

    def out(tree, i):
        return np.asarray(tree[f"layers_{i}"]["__call__"][0][0], np.float32)

    for i in range(FIRST):  # the first blocks: same input, same BF16 block
        np.testing.assert_array_equal(out(inter, i), out(ref, i))
    # The FP4 blocks differ from BF16 on the same parameters...
    assert not np.array_equal(out(inter, FIRST), out(ref, FIRST))
    # ...and the last blocks, fed the FP4 blocks' output, are exactly BF16 Blocks.
    cfg = tiny_config()
    h = inter[f"layers_{LAYERS - LAST - 1}"]["__call__"][0][0]
    positions = jnp.broadcast_to(jnp.arange(SEQ), (BATCH, SEQ))
    plain = Recipe(compute_dtype=jnp.bfloat16)
    for i in range(LAYERS - LAST, LAYERS):
        h, _ = Block(cfg.model, plain).apply({"params": params[f"layers_{i}"]}, h, positions)
        np.testing.assert_array_equal(np.asarray(h, np.float32), out(inter, i))


def test_kurtosis_of_split_runs_is_in_layer_order():
    def probe(*kurtosis):
        return {"block_out": {"kurtosis": jnp.array(kurtosis), "mean_square": 1.0, "amax": 1.0}}

    # Keys in the sorted order a jitted step returns them, which is not the layer order.
    probes = {
        "layers_bf16_first": probe(1.0),
        "layers_bf16_last": probe(3.0, 4.0),
        "layers_fp4": probe(2.0),
    }
    order = build_model(tiny_config()).layer_names
    assert order == ("layers_bf16_first", "layers_fp4", "layers_bf16_last")
    kurt = activation_metrics(probes, order)["kurtosis"]["block_out"]
    np.testing.assert_array_equal(kurt, [1.0, 2.0, 3.0, 4.0])


def test_rho_leaves_out_the_bf16_blocks():
    grads = {name: {"mlp": {"w_in": {"kernel": jnp.ones((1, 4, 4))}}} for name in init_params()}
    noisy = jax.tree.map(lambda g: g + 0.5 * jnp.arange(16.0).reshape(g.shape[1:]), grads)
    rho = fp4_qaf.block_kernel_rho(noisy, grads, True, ["layers_fp4"])
    assert list(rho) == ["layers_fp4/mlp/w_in"]


@pytest.mark.slow
def test_split_model_trains():
    step, state = train_step_and_state()
    step = jax.jit(step)
    it = data.make_train_iterator("embedded:bytes", seq_len=SEQ, global_batch_size=BATCH, seed=0)
    losses = []
    for _ in range(30):
        state, metrics = step(state, jnp.asarray(next(it)))
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses))
    # ln(320) = 5.77 at init; measured 2.8 after 30 steps.
    assert np.mean(losses[-5:]) < losses[0] - 1.5, losses
