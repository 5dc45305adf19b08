"""The bulk delayed-scaling update (fogjax/precision/bulk_scaling.py) and the once-per-step E4M3
kernels (weight_quantization.py): the train step equals the per-op, per-micro-batch path they
replaced, bit for bit; the bookkeeping is complete (every state an op declares has a format) and
refuses what it cannot place."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from helpers import fp8_state
from helpers.steps import batch, setup, tiny_config

from fogjax import config_lib
from fogjax.precision import bulk_scaling, scaling, weight_quantization
from fogjax.precision.cudnn_attention import TENSORS
from fogjax.precision.formats import E4M3_MAX, E5M2_MAX
from fogjax.precision.fp8_dot import Fp8DotGeneral
from fogjax.precision.recipe import FP8_WEIGHTS_COLLECTION
from fogjax.train.step import _loss_fn, compute_grads


@pytest.mark.parametrize("reduction", ["max", "most_recent"])
def test_stacked_update_equals_one_update_per_row(reduction):
    """[L, H] at once == L separate scaling.update calls (the flax-identical per-tensor rule)."""
    rng = np.random.default_rng(0)
    history = jnp.asarray(rng.uniform(0, 3, (5, 6)), jnp.float32).at[1].set(0.0)
    scale_inv = jnp.asarray(rng.uniform(0.001, 0.01, (5, 1)), jnp.float32)
    # Row 1 saw nothing ever, row 2 sees inf, row 3 sees 0: the scale must survive all three.
    amaxes = jnp.asarray([[2.5], [0.0], [np.inf], [0.0], [7.0]], jnp.float32)
    bulk = scaling.apply_observation(
        scaling.ScalingState(history, scale_inv), amaxes, E5M2_MAX, reduction, margin=1
    )
    for row in range(5):
        one = scaling.update(
            scaling.ScalingState(history[row], scale_inv[row]),
            jnp.full((3,), amaxes[row, 0]),
            E5M2_MAX,
            reduction,
            margin=1,
        )
        np.testing.assert_array_equal(bulk.amax_history[row], one.amax_history)
        np.testing.assert_array_equal(bulk.scale_inv[row], one.scale_inv)
    np.testing.assert_array_equal(bulk.scale_inv[1], scale_inv[1])  # nothing seen: unchanged


@pytest.mark.parametrize("reduction", ["max", "most_recent"])
def test_grouped_apply_equals_one_update_per_tensor(reduction):
    """apply() updates every state of one window length in one concatenated call: each tensor's
    history and scale equal its own apply_observation, bit for bit, across E4M3 and E5M2 tensors,
    stacked [L, ...] and unstacked states and two window lengths; TE states are replaced."""
    rng = np.random.default_rng(1)

    def state(lead, window):
        history = jnp.asarray(rng.uniform(0, 3, (*lead, window)), jnp.float32)
        return history, jnp.asarray(rng.uniform(0.001, 0.01, (*lead, 1)), jnp.float32)

    shapes = {
        ("layers", "wi", "lhs"): ((3,), 8),
        ("layers", "wi", "grad"): ((3,), 8),
        ("layers", "attn", "dq"): ((3,), 8),
        ("head", "rhs"): ((), 8),
        ("other", "grad"): ((2,), 5),
    }
    fp8, seen = {}, {}
    for (*where, t), (lead, window) in shapes.items():
        history, scale_inv = state(lead, window)
        fp8[(*where, f"{t}_amax_history")] = history
        fp8[(*where, f"{t}_scale_inv")] = scale_inv
        amax = rng.uniform(0, 5, (*lead, 1)).astype(np.float32)
        amax.flat[0] = {"lhs": np.inf, "grad": 0.0}.get(t, amax.flat[0])  # keep-the-scale rows
        seen[(*where, f"{t}_scale_inv")] = jnp.asarray(amax)
    fp8[("te", "state", "kernel_scale")] = jnp.ones(1)
    seen[("te", "state", "kernel_scale")] = jnp.full((1,), 3.0)
    observed, fixed = bulk_scaling.split(traverse_util.unflatten_dict(fp8))
    new = traverse_util.flatten_dict(
        jax.jit(bulk_scaling.apply, static_argnums=(3, 4))(observed, fixed, seen, reduction, 1.0)
    )
    for *where, t in shapes:
        scale_path = (*where, f"{t}_scale_inv")
        history_path = (*where, f"{t}_amax_history")
        one = scaling.apply_observation(
            scaling.ScalingState(fp8[history_path], fp8[scale_path]),
            seen[scale_path],
            bulk_scaling.FP8_MAX[t],
            reduction,
            1.0,
        )
        np.testing.assert_array_equal(new[history_path], one.amax_history)
        np.testing.assert_array_equal(new[scale_path], one.scale_inv)
    np.testing.assert_array_equal(new[("te", "state", "kernel_scale")], [3.0])


def test_every_declared_state_has_a_format():
    """FP8_MAX names exactly the tensors the ops declare, with the format each is cast to."""
    dot = Fp8DotGeneral(amax_history_len=4)
    fp8 = dot.init(jax.random.key(0), jnp.ones((2, 8)), jnp.ones((8, 4)), (((1,), (0,)), ((), ())))
    prefixes = {k.removesuffix("_scale_inv") for k in fp8["fp8"] if k.endswith("_scale_inv")}
    assert prefixes | set(TENSORS) == set(bulk_scaling.FP8_MAX)
    assert bulk_scaling.FP8_MAX["grad"] == E5M2_MAX  # the only E5M2 tensor
    assert {bulk_scaling.FP8_MAX[t] for t in (*TENSORS, "lhs", "rhs")} == {E4M3_MAX}


def test_split_refuses_an_unknown_state_and_keeps_te_states_whole():
    bad = {"layer": {"x_amax_history": jnp.zeros(4), "x_scale_inv": jnp.ones(1)}}
    with pytest.raises(ValueError, match="FP8_MAX"):
        bulk_scaling.split(bad)
    te = {"dot": {"state": {"kernel_scale": jnp.ones(1), "kernel_amax_history": jnp.zeros(4)}}}
    observed, fixed = bulk_scaling.split(te)
    assert not fixed and len(observed) == 2  # TE's state: gradient = new value, replaced whole
    new = bulk_scaling.apply(observed, fixed, {p: v + 5 for p, v in observed.items()}, "max", 0)
    np.testing.assert_array_equal(new["dot"]["state"]["kernel_scale"], [6.0])


def _per_op_reference(model, params, fp8, tokens, micro_batches):
    """The old path: each micro-batch updates every state itself (scaling.update inside the op,
    here the helper's apply of one micro-batch's amaxes); the k states then combine by max."""
    loss_fn = _loss_fn(model, with_stats=False)
    step = jax.jit(
        fp8_state.value_and_grad(
            lambda p, f, t: loss_fn(p, f, t, None)[0] / micro_batches, (0, 1), 1
        )
    )
    b = tokens.shape[0]
    chunks = tokens.reshape(b // micro_batches, micro_batches, -1).swapaxes(0, 1)
    results = [step(params, fp8, chunk) for chunk in chunks]
    grads = results[0][1][0]
    for _, (g, _) in results[1:]:
        grads = jax.tree.map(jnp.add, grads, g)
    new_fp8 = jax.tree.map(lambda *s: jnp.max(jnp.stack(s), axis=0), *(r[1][1] for r in results))
    return grads, new_fp8


@pytest.mark.slow
def test_train_step_bulk_update_equals_per_op_updates_over_steps():
    """A tiny model, 2 micro-batches, 3 steps: the step's once-per-step update of every state
    (histories, scales) and the parameter gradients equal the per-op path bit for bit. Under
    fp8dpa: every kind of state fp8 has (the Linears' lhs, rhs, grad), and the attention's."""
    model, state, _ = setup(tiny_config("fp8dpa"))
    bulk = jax.jit(lambda p, f, t: compute_grads(model, p, f, t, 2, False)[1:3])
    params, fp8 = state["params"], state["fp8"]
    for step in range(3):
        tokens = batch(seed=step, b=4, t=16) * (step + 1) % 4096
        grads, new_fp8 = bulk(params, fp8, tokens)
        ref_grads, ref_fp8 = _per_op_reference(model, params, fp8, tokens, 2)
        jax.tree.map(np.testing.assert_array_equal, new_fp8, ref_fp8)
        # The LM head's weight gradient is a float32 GEMM over the tokens outside the blocks and
        # their FP8 bookkeeping; XLA:CPU may split its sum differently in the two programs (seen:
        # 4.8e-7 on entries of ~2e-5 at one step), so it is held to float32 rounding only.
        lm_head, ref_lm_head = grads.pop("lm_head", None), ref_grads.pop("lm_head", None)
        np.testing.assert_allclose(lm_head, ref_lm_head, rtol=0, atol=1e-6)
        jax.tree.map(np.testing.assert_array_equal, grads, ref_grads)
        grads["lm_head"] = lm_head
        fp8 = new_fp8
        params = jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)  # move: new amaxes
    # Three steps, three amaxes in every window (flax's ring: newest at 0, then H-1, H-2).
    for path, h in jax.tree_util.tree_leaves_with_path(fp8):
        if "history" in jax.tree_util.keystr(path):
            assert (np.count_nonzero(np.asarray(h), axis=-1) == 3).all(), path


def test_dots_read_the_once_per_step_kernels_when_given():
    """The fp8_weights collection is what the FP8 linears multiply (a wrong one changes the
    output), and quantize_kernels gives every block kernel with an rhs state, stacked [L, ...]."""
    model, state, _ = setup(tiny_config("fp8"))
    params, fp8 = state["params"], state["fp8"]
    fp8 = jax.tree.map(lambda x: x * 0.5 + 0.01, fp8)  # scales other than 1: a real cast
    weights, amaxes = weight_quantization.quantize_kernels(params, fp8, jnp.bfloat16)
    linears = {p[:-2] for p in amaxes}
    assert linears == {
        ("layers", "attn", "wqkv"),
        ("layers", "attn", "wo"),
        ("layers", "mlp", "wi"),
        ("layers", "mlp", "wo"),
    }
    q = weights["layers"]["mlp"]["wi"]["dot"]["rhs"]
    assert q.dtype == jnp.float8_e4m3fn and q.shape == params["layers"]["mlp"]["wi"]["kernel"].shape
    tokens = batch(b=2, t=16)[:, :-1]
    variables = {"params": params, "fp8": fp8}
    plain = model.apply(variables, tokens)
    given = model.apply({**variables, FP8_WEIGHTS_COLLECTION: weights}, tokens)
    np.testing.assert_array_equal(plain, given)  # the same cast, made once
    zeroed = jax.tree.map(jnp.zeros_like, weights)
    assert not np.array_equal(
        plain, model.apply({**variables, FP8_WEIGHTS_COLLECTION: zeroed}, tokens)
    )


def test_the_forward_reads_a_transposed_copy_of_each_kernel_bit_for_bit():
    """With the model's contracting axes, quantize_kernels gives every E4M3 kernel in two layouts,
    as matrices: rhs [L, in, out] (the kernel's own bytes) and rhs_t [L, out, in] (the forward
    GEMM's layout: contracted axes innermost). The dots read them and the model's output is
    unchanged to the bit."""
    model, state, _ = setup(tiny_config("fp8"))
    params, fp8 = state["params"], state["fp8"]
    fp8 = jax.tree.map(lambda x: x * 0.5 + 0.01, fp8)
    plain_weights, _ = weight_quantization.quantize_kernels(params, fp8, jnp.bfloat16)
    weights, _ = weight_quantization.quantize_kernels(
        params, fp8, jnp.bfloat16, contracting_axes=model.kernel_contracting_axes
    )
    for linear in (("attn", "wqkv"), ("attn", "wo"), ("mlp", "wi"), ("mlp", "wo")):
        dot = weights["layers"][linear[0]][linear[1]]["dot"]
        q = np.asarray(plain_weights["layers"][linear[0]][linear[1]]["dot"]["rhs"])
        n_in = 1 + model.kernel_contracting_axes(("layers", *linear))  # after the stacked [L]
        matrix = (q.shape[0], int(np.prod(q.shape[1:n_in])), int(np.prod(q.shape[n_in:])))
        np.testing.assert_array_equal(dot["rhs"], q.reshape(matrix))
        np.testing.assert_array_equal(dot["rhs_t"], q.reshape(matrix).swapaxes(1, 2))
    tokens = batch(b=2, t=16)[:, :-1]
    variables = {"params": params, "fp8": fp8}
    plain = model.apply(variables, tokens)
    np.testing.assert_array_equal(
        plain, model.apply({**variables, FP8_WEIGHTS_COLLECTION: weights}, tokens)
    )
    # The forward reads rhs_t, not rhs: a zeroed rhs_t changes the output.
    zeroed = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if "rhs_t" in jax.tree_util.keystr(path) else x, weights
    )
    assert not np.array_equal(
        plain, model.apply({**variables, FP8_WEIGHTS_COLLECTION: zeroed}, tokens)
    )


def test_a_transposed_kernel_that_disagrees_with_the_dot_is_refused():
    """A model whose kernel_contracting_axes is wrong for one of its Linears gets an error that
    names the hook, not a silently different product."""
    model, state, _ = setup(tiny_config("fp8"))
    params, fp8 = state["params"], state["fp8"]
    weights, _ = weight_quantization.quantize_kernels(
        params, fp8, jnp.bfloat16, contracting_axes=lambda path: 2
    )
    tokens = batch(b=2, t=16)[:, :-1]
    with pytest.raises(ValueError, match="kernel_contracting_axes"):
        model.apply({"params": params, "fp8": fp8, FP8_WEIGHTS_COLLECTION: weights}, tokens)


@pytest.mark.slow
def test_a_kernel_scaled_before_its_gemm_is_not_prequantised():
    """Per-channel SmoothSwiGLU scales the FFN out-projection's rows per batch: that kernel keeps
    its own cast, and the step still equals the per-op path bit for bit."""
    cfg = config_lib.get_config("llama3_smooth_swiglu", "tiny")
    with cfg.unlocked():
        cfg.precision.recipe = "fp8"
        cfg.model.num_layers, cfg.model.d_model, cfg.model.ffn_dim = 2, 128, 256
        cfg.model.num_heads, cfg.model.num_kv_heads = 2, 1
        cfg.model.smooth_swiglu_per_channel = True
    model, state, _ = setup(cfg)
    assert not model.kernel_is_gemm_operand(("layers", "mlp", "wo"))
    assert model.kernel_is_gemm_operand(("layers", "mlp", "wi"))
    tokens = batch(seed=3, b=4, t=16)
    grads, new_fp8 = jax.jit(lambda p, f, t: compute_grads(model, p, f, t, 2, False)[1:3])(
        state["params"], state["fp8"], tokens
    )
    ref_grads, ref_fp8 = _per_op_reference(model, state["params"], state["fp8"], tokens, 2)
    jax.tree.map(np.testing.assert_array_equal, new_fp8, ref_fp8)
    jax.tree.map(np.testing.assert_array_equal, grads, ref_grads)
