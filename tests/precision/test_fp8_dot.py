"""Fp8DotGeneral: numerics against a numpy/ml_dtypes re-derivation and against flax, bit for bit;
the FP8 GEMMs in the jaxpr; the state update; micro-batch combination; nn.scan; statistics."""

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax.linen import fp8_ops
from helpers import fp8_state

from fogjax.precision import fp8_dot, stats
from fogjax.precision.fp8_dot import FP8_STATS_COLLECTION, Fp8DotGeneral, operand_stats
from fogjax.precision.recipe import FP8_COLLECTION

LINEAR_DIMS = (((2,), (0,)), ((), ()))  # x [B, T, D] . w [D, F] -> [B, T, F]
QK_DIMS = (((2,), (2,)), ((0,), (0,)))  # q [B, T, d] . k [B, S, d] -> [B, T, S]
H = 4


def make_step(module, dims, out_dtype=None):
    """One step of AD: (out, dlhs, drhs, new fp8 state) for loss = sum(out * ct)."""

    @jax.jit
    def step(fp8, lhs, rhs, ct):
        def loss(lhs, rhs, fp8):
            out = module.apply(
                {FP8_COLLECTION: fp8}, lhs, rhs, dims, preferred_element_type=out_dtype
            )
            return jnp.sum(out.astype(jnp.float32) * ct), out

        (_, out), grads = fp8_state.value_and_grad(loss, (0, 1, 2), 2, has_aux=True)(lhs, rhs, fp8)
        return out, grads[0], grads[1], grads[2]

    return step


def init_fp8(module, lhs, rhs, dims):
    return module.init(jax.random.PRNGKey(0), lhs, rhs, dims)[FP8_COLLECTION]


def _inputs(key, lhs_shape, rhs_shape, out_shape, scales, dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(key, 3)
    lhs = (jax.random.normal(k1, lhs_shape) * scales[0]).astype(dtype)
    rhs = (jax.random.normal(k2, rhs_shape) * scales[1]).astype(dtype)
    ct = jax.random.normal(k3, out_shape) * scales[2]
    return lhs, rhs, ct


# Magnitudes per step (lhs, rhs, cotangent): they move, so that later steps saturate some values
# with the delayed scale and flush others to zero.
STEP_SCALES = [(1.0, 0.05, 1e-3), (40.0, 0.02, 10.0), (0.5, 0.5, 1e4)]


class NumpyFp8:
    """Independent re-derivation: ml_dtypes casts, float64 GEMMs, numpy state update."""

    def __init__(self, dims):
        self.dims = dims
        self.scale_inv = {"lhs": np.float32(1), "rhs": np.float32(1), "grad": np.float32(1)}
        self.history = {k: np.zeros(H, np.float32) for k in self.scale_inv}

    def q(self, x, name, dtype):
        bound = np.float32(ml_dtypes.finfo(dtype).max)
        scaled = np.asarray(x, np.float32) / self.scale_inv[name]
        return np.clip(scaled, -bound, bound).astype(dtype).astype(np.float64)

    def record(self, x, name, fp8_max):
        h = np.roll(self.history[name], -1)
        h[0] = np.max(np.abs(np.asarray(x, np.float32)))
        self.history[name] = h
        if h.max() > 0:
            self.scale_inv[name] = np.float32(1) / (np.float32(fp8_max) / h.max())

    def step(self, lhs, rhs, ct):
        e4, e5 = ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2
        ql, qr, qg = self.q(lhs, "lhs", e4), self.q(rhs, "rhs", e4), self.q(ct, "grad", e5)
        sl, sr, sg = (np.float64(self.scale_inv[k]) for k in ("lhs", "rhs", "grad"))
        if self.dims == LINEAR_DIMS:
            out = np.einsum("btd,df->btf", ql, qr)
            dl = np.einsum("btf,df->btd", qg, qr)
            dr = np.einsum("btd,btf->df", ql, qg)
        else:
            out = np.einsum("btd,bsd->bts", ql, qr)
            dl = np.einsum("bts,bsd->btd", qg, qr)
            dr = np.einsum("btd,bts->bsd", ql, qg)
        result = out * sl * sr, dl * sr * sg, dr * sl * sg
        self.record(lhs, "lhs", 448.0)
        self.record(rhs, "rhs", 448.0)
        self.record(ct, "grad", 57344.0)
        return result


@pytest.mark.slow
@pytest.mark.parametrize("dims", [LINEAR_DIMS, QK_DIMS], ids=["linear", "qk"])
def test_matches_float_rederivation_over_steps(dims):
    if dims == LINEAR_DIMS:
        shapes = ((2, 8, 32), (32, 16), (2, 8, 16))
    else:
        shapes = ((2, 8, 32), (2, 6, 32), (2, 8, 6))
    module = Fp8DotGeneral(amax_history_len=H)
    step = make_step(module, dims)
    ref = NumpyFp8(dims)
    keys = jax.random.split(jax.random.PRNGKey(1), len(STEP_SCALES))
    fp8 = None
    for key, scales in zip(keys, STEP_SCALES, strict=True):
        lhs, rhs, ct = _inputs(key, *shapes, scales)
        fp8 = init_fp8(module, lhs, rhs, dims) if fp8 is None else fp8
        out, dl, dr, fp8 = step(fp8, lhs, rhs, ct)
        want_out, want_dl, want_dr = ref.step(np.asarray(lhs), np.asarray(rhs), np.asarray(ct))
        for got, want in ((out, want_out), (dl, want_dl), (dr, want_dr)):
            assert np.abs(want).max() > 0
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
        for name in ("lhs", "rhs", "grad"):
            np.testing.assert_array_equal(fp8[f"{name}_amax_history"], ref.history[name])
            np.testing.assert_array_equal(fp8[f"{name}_scale_inv"], [ref.scale_inv[name]])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_bit_identical_to_flax_direct_op_over_steps(dtype):
    ours = Fp8DotGeneral(amax_history_len=H)
    theirs = fp8_ops.Fp8DirectDotGeneralOp(amax_history_length=H)
    shapes = ((2, 8, 32), (32, 16), (2, 8, 16))
    lhs, rhs, ct = _inputs(jax.random.PRNGKey(2), *shapes, STEP_SCALES[0], dtype)
    fp8 = init_fp8(ours, lhs, rhs, LINEAR_DIMS)
    flax_state = theirs.init(jax.random.PRNGKey(0), lhs, rhs, LINEAR_DIMS)
    flax_state = flax_state[fp8_ops.OVERWRITE_WITH_GRADIENT]
    step = make_step(ours, LINEAR_DIMS)

    @jax.jit
    def flax_step(state, lhs, rhs, ct):
        def loss(lhs, rhs, state):
            out = theirs.apply({fp8_ops.OVERWRITE_WITH_GRADIENT: state}, lhs, rhs, LINEAR_DIMS)
            return jnp.sum(out.astype(jnp.float32) * ct), out

        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(lhs, rhs, state)
        return out, *grads

    names = {"lhs": "input", "rhs": "kernel", "grad": "output_grad"}
    ours_scales = []
    keys = jax.random.split(jax.random.PRNGKey(3), len(STEP_SCALES))
    for t, (key, scales) in enumerate(zip(keys, STEP_SCALES, strict=True)):
        lhs, rhs, ct = _inputs(key, *shapes, scales, dtype)
        got = step(fp8, lhs, rhs, ct)
        want = flax_step(flax_state, lhs, rhs, ct)
        for g, w in zip(got[:3], want[:3], strict=True):  # output, dlhs, drhs
            assert g.dtype == w.dtype == dtype
            np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
        fp8, flax_state = got[3], want[3]
        for ours_name, flax_name in names.items():
            np.testing.assert_array_equal(
                fp8[f"{ours_name}_amax_history"], flax_state[f"{flax_name}_amax_history"]
            )
            if t > 0:  # flax's scale after step t == ours after step t - 1
                np.testing.assert_array_equal(
                    ours_scales[t - 1][ours_name], flax_state[f"{flax_name}_scale"]
                )
        ours_scales.append({k: fp8[f"{k}_scale_inv"] for k in names})


def _dot_operand_dtypes(jaxpr) -> list[tuple[str, str]]:
    """Operand dtypes of every dot_general in a jaxpr, nested jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
        for param in eqn.params.values():
            for p in param if isinstance(param, tuple | list) else (param,):
                if isinstance(p, jax.extend.core.ClosedJaxpr):
                    found += _dot_operand_dtypes(p.jaxpr)
                elif isinstance(p, jax.extend.core.Jaxpr):
                    found += _dot_operand_dtypes(p)
    return found


def test_jaxpr_has_three_fp8_gemms_and_no_other_dot():
    module = Fp8DotGeneral(amax_history_len=H)
    lhs, rhs, ct = _inputs(jax.random.PRNGKey(4), (2, 8, 32), (32, 16), (2, 8, 16), (1, 1, 1))
    lhs, rhs = lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16)
    fp8 = init_fp8(module, lhs, rhs, LINEAR_DIMS)

    def loss(lhs, rhs, fp8):
        out = module.apply({FP8_COLLECTION: fp8}, lhs, rhs, LINEAR_DIMS)
        return jnp.sum(out.astype(jnp.float32) * ct)

    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1, 2)))(lhs, rhs, fp8)
    dots = sorted(_dot_operand_dtypes(jaxpr.jaxpr))
    assert dots == sorted(
        [
            ("float8_e4m3fn", "float8_e4m3fn"),  # forward
            ("float8_e5m2", "float8_e4m3fn"),  # data gradient: q5(g) x q4(rhs)
            ("float8_e5m2", "float8_e4m3fn"),  # weight gradient: q5(g) x q4(lhs)
        ]
    ), dots


def test_state_after_one_step_is_amax_over_fp8_max():
    module = Fp8DotGeneral(amax_history_len=H)
    lhs, rhs, ct = _inputs(jax.random.PRNGKey(5), (2, 8, 32), (32, 16), (2, 8, 16), (3.0, 0.1, 7.0))
    fp8 = init_fp8(module, lhs, rhs, LINEAR_DIMS)
    _, _, _, new = make_step(module, LINEAR_DIMS)(fp8, lhs, rhs, ct)
    for name, x, fp8_max in (("lhs", lhs, 448.0), ("rhs", rhs, 448.0), ("grad", ct, 57344.0)):
        amax = float(np.max(np.abs(np.asarray(x, np.float64))))
        assert float(new[f"{name}_amax_history"][0]) == pytest.approx(amax, rel=1e-7)
        np.testing.assert_array_equal(new[f"{name}_amax_history"][1:], np.zeros(H - 1))
        # scale_inv = amax / fp8_max, i.e. SPEC's scale = fp8_max / amax (to a float32 ulp).
        assert float(new[f"{name}_scale_inv"][0]) == pytest.approx(amax / fp8_max, rel=2e-7)
        assert 1.0 / float(new[f"{name}_scale_inv"][0]) == pytest.approx(fp8_max / amax, rel=2e-7)


def test_microbatch_states_combine_by_max():
    module = Fp8DotGeneral(amax_history_len=H)
    step = make_step(module, LINEAR_DIMS)
    key0, *keys = jax.random.split(jax.random.PRNGKey(6), 4)
    lhs, rhs, ct = _inputs(key0, (2, 8, 32), (32, 16), (2, 8, 16), (2.0, 0.1, 1.0))
    fp8 = init_fp8(module, lhs, rhs, LINEAR_DIMS)
    fp8 = step(fp8, lhs, rhs, ct)[3]  # a non-trivial starting state
    micro = []
    for key, scale in zip(keys, (0.5, 9.0, 3.0), strict=True):
        k1, k2 = jax.random.split(key)
        micro.append(
            (jax.random.normal(k1, (2, 8, 32)) * scale, jax.random.normal(k2, (2, 8, 16)) / scale)
        )
    rhs = rhs * 3.0  # the shared weight; new amax so the rhs state changes too
    states = [step(fp8, x, rhs, g)[3] for x, g in micro]
    combined = jax.tree.map(lambda *s: jnp.max(jnp.stack(s), axis=0), *states)
    whole = step(
        fp8,
        jnp.concatenate([x for x, _ in micro]),
        rhs,
        jnp.concatenate([g for _, g in micro]),
    )[3]
    jax.tree.map(np.testing.assert_array_equal, combined, whole)
    assert not np.array_equal(states[0]["lhs_scale_inv"], whole["lhs_scale_inv"])


class _Body(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        w = self.param("kernel", nn.initializers.normal(0.2), (x.shape[-1], x.shape[-1]))
        # As in fogjax's Linear: float32 parameters, cast to the activations' dtype.
        y = Fp8DotGeneral(amax_history_len=H, name="dot")(x, w.astype(x.dtype), LINEAR_DIMS)
        return jnp.tanh(y), None


class _Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        layers = nn.scan(
            _Body,
            variable_axes={"params": 0, FP8_COLLECTION: 0, FP8_STATS_COLLECTION: 0},
            split_rngs={"params": True},
            length=3,
        )
        return layers(name="layers")(x, None)[0]


class _Unrolled(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(3):
            x = _Body(name=f"layers_{i}")(x, None)[0]
        return x


def _unstack(tree):
    return {f"layers_{i}": jax.tree.map(lambda a, i=i: a[i], tree["layers"]) for i in range(3)}


@pytest.mark.slow
def test_nn_scan_stacks_state_and_matches_unrolled_layers():
    x = jax.random.normal(jax.random.PRNGKey(7), (2, 8, 16)).astype(jnp.bfloat16)
    scanned, unrolled = _Scanned(), _Unrolled()
    variables = scanned.init(jax.random.PRNGKey(8), x)
    assert variables[FP8_COLLECTION]["layers"]["dot"]["lhs_amax_history"].shape == (3, H)
    assert variables[FP8_COLLECTION]["layers"]["dot"]["grad_scale_inv"].shape == (3, 1)

    def grads(model, params, fp8):
        def loss(params, fp8):
            out, sown = model.apply(
                {"params": params, FP8_COLLECTION: fp8}, x, mutable=[FP8_STATS_COLLECTION]
            )
            return jnp.sum(jnp.square(out.astype(jnp.float32))), sown[FP8_STATS_COLLECTION]

        return jax.jit(fp8_state.grad(loss, (0, 1), 1, has_aux=True))(params, fp8)

    params, fp8 = variables["params"], variables[FP8_COLLECTION]
    for _ in range(2):  # the second step quantises with scales learnt in the first
        (g_params, new_fp8), sown = grads(scanned, params, fp8)
        (u_params, u_fp8), u_sown = grads(unrolled, _unstack(params), _unstack(fp8))
        jax.tree.map(np.testing.assert_array_equal, _unstack(g_params), u_params)
        jax.tree.map(np.testing.assert_array_equal, _unstack(new_fp8), u_fp8)
        # stats names per layer the same way for the scanned and the unrolled model.
        metrics, u_metrics = stats.fp8_metrics(new_fp8, sown), stats.fp8_metrics(u_fp8, u_sown)
        assert metrics.keys() == u_metrics.keys()
        jax.tree.map(np.testing.assert_array_equal, metrics, u_metrics)
        fp8 = new_fp8
    assert "fp8/layers_2/dot/lhs_saturation" in metrics
    h = fp8["layers"]["dot"]["grad_amax_history"]
    assert float(metrics["fp8/layers_1/dot/grad_amax"]) == float(h[1, 0])
    want = 1.0 / float(fp8["layers"]["dot"]["rhs_scale_inv"][2, 0])
    assert float(metrics["fp8/layers_2/dot/rhs_scale"]) == pytest.approx(want, rel=1e-7)


def test_output_dtype_follows_preferred_element_type():
    # QK^T in fogjax: bf16 operands, float32 logits; the gradients come back in bf16.
    module = Fp8DotGeneral(amax_history_len=H)
    q, k, ct = _inputs(
        jax.random.PRNGKey(9), (2, 8, 32), (2, 6, 32), (2, 8, 6), (1, 1, 1), jnp.bfloat16
    )
    fp8 = init_fp8(module, q, k, QK_DIMS)
    out, dq, dk, _ = make_step(module, QK_DIMS, out_dtype=jnp.float32)(fp8, q, k, ct)
    assert out.dtype == jnp.float32 and dq.dtype == dk.dtype == jnp.bfloat16
    assert out.shape == (2, 8, 6) and dq.shape == q.shape and dk.shape == k.shape


def test_operand_stats_count_saturation_and_underflow():
    x = jnp.array([500.0, -1000.0, 1e-6, 0.0, 1.0, -448.0, 3e-4, 1.2e-3], jnp.float32)
    got = operand_stats(x, jnp.ones((1,), jnp.float32), jnp.float8_e4m3fn)
    # 500 and -1000 clip (448 itself does not); 1e-6 and 3e-4 (< 2**-10, half the smallest
    # subnormal) flush to zero, 1.2e-3 rounds up to 2**-9, and an exact 0 is no underflow.
    assert float(got["saturation"]) == 2 / 8
    assert float(got["underflow"]) == 2 / 8
    got = operand_stats(x, jnp.array([2.0], jnp.float32), jnp.float8_e4m3fn)
    assert float(got["saturation"]) == 1 / 8  # only |-1000 / 2| > 448
    assert float(got["underflow"]) == 3 / 8  # 1.2e-3 / 2 now flushes too


def test_stats_are_sown_only_when_collection_is_mutable():
    module = Fp8DotGeneral(amax_history_len=H)
    lhs, rhs, _ = _inputs(jax.random.PRNGKey(10), (2, 8, 32), (32, 16), (2, 8, 16), (1, 1, 1))
    fp8 = init_fp8(module, lhs, rhs, LINEAR_DIMS)
    out = module.apply({FP8_COLLECTION: fp8}, lhs, rhs, LINEAR_DIMS)
    assert isinstance(out, jax.Array)  # nothing returned besides the output
    _, sown = module.apply(
        {FP8_COLLECTION: fp8}, lhs, rhs, LINEAR_DIMS, mutable=[FP8_STATS_COLLECTION]
    )
    assert set(sown[FP8_STATS_COLLECTION]) == {"lhs", "rhs"}
    assert set(sown[FP8_STATS_COLLECTION]["lhs"]) == {"saturation", "underflow"}
    # A bare module's state has no path: its per-tensor metrics sit right under the prefix.
    metrics = stats.fp8_metrics(fp8, sown[FP8_STATS_COLLECTION])
    assert set(metrics) == {
        f"fp8/{op}_{m}" for op in ("lhs", "rhs", "grad") for m in ("amax", "scale")
    } | {f"fp8/{op}_{m}" for op in ("lhs", "rhs") for m in ("saturation", "underflow")}


@pytest.mark.gpu
def test_gpu_lowers_all_three_gemms_to_cublaslt_fp8():
    """On an NVIDIA GPU, XLA turns the forward and both backward GEMMs into cuBLASLt FP8 calls."""
    module = Fp8DotGeneral(amax_history_len=H)
    lhs, rhs, ct = _inputs(
        jax.random.PRNGKey(11), (2, 64, 128), (128, 256), (2, 64, 256), (1, 1, 1), jnp.bfloat16
    )
    fp8 = init_fp8(module, lhs, rhs, LINEAR_DIMS)

    def loss(lhs, rhs, fp8):
        out = module.apply({FP8_COLLECTION: fp8}, lhs, rhs, LINEAR_DIMS)
        return jnp.sum(out.astype(jnp.float32) * ct)

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(lhs, rhs, fp8).compile()
    assert compiled.as_text().count("__cublas$lt$matmul$f8") == 3


@pytest.mark.parametrize("quantized_rhs", [False, True], ids=["rhs-cast-here", "rhs-once-per-step"])
def test_a_given_fp8_lhs_is_read_as_is(quantized_rhs):
    """lhs_fp8 = (q, s): the GEMMs read q with scale s (cuDNN attention's E4M3 output for the
    out-projection), never lhs itself, and the lhs state observes nothing. With a power-of-two s
    that is exactly the path that casts lhs = q * s with scale s: output and both gradients equal
    it bit for bit."""
    lhs, rhs, ct = _inputs(jax.random.PRNGKey(3), (2, 8, 16), (16, 12), (2, 8, 12), (3.0, 0.1, 1.0))
    s = jnp.full((1,), 2.0**-4, jnp.float32)
    q = fp8_dot.scaling.quantize(lhs.astype(jnp.bfloat16), s, fp8_dot.E4M3)
    exact_lhs = (q.astype(jnp.float32) * s).astype(jnp.bfloat16)  # casts back to q with scale s
    rhs = rhs.astype(jnp.bfloat16)
    states = [fp8_dot.scaling.init_state(H) for _ in range(3)]
    cast_state = fp8_dot.scaling.ScalingState(states[0].amax_history, s)

    def run(lhs_in, lhs_state, lhs_fp8):
        def loss(lhs_in, rhs, lhs_state, grad_state):
            if quantized_rhs:
                q_rhs = fp8_dot.scaling.quantize(rhs, states[1].scale_inv, fp8_dot.E4M3)
                out = fp8_dot.fp8_dot_general_quantized_rhs(
                    lhs_in,
                    rhs,
                    q_rhs,
                    lhs_state,
                    states[1],
                    grad_state,
                    LINEAR_DIMS,
                    lhs_fp8=lhs_fp8,
                )
            else:
                out = fp8_dot.fp8_dot_general(
                    lhs_in, rhs, lhs_state, states[1], grad_state, LINEAR_DIMS, lhs_fp8=lhs_fp8
                )
            return jnp.sum(out.astype(jnp.float32) * ct), out

        grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
        return jax.jit(grad)(lhs_in, rhs, lhs_state, states[2])

    (_, out), (dlhs, drhs, seen_lhs, seen_grad) = run(jnp.zeros_like(exact_lhs), states[0], (q, s))
    (_, ref), (ref_dlhs, ref_drhs, ref_seen_lhs, ref_seen_grad) = run(exact_lhs, cast_state, None)
    assert float(jnp.max(jnp.abs(out.astype(jnp.float32)))) > 0  # not the zeros passed as lhs
    for got, want in ((out, ref), (dlhs, ref_dlhs), (drhs, ref_drhs)):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    np.testing.assert_array_equal(seen_grad.scale_inv, ref_seen_grad.scale_inv)
    assert float(ref_seen_lhs.scale_inv[0]) > 0
    assert float(seen_lhs.scale_inv[0]) == 0.0  # the GEMMs never read the lhs state


def test_a_malformed_fp8_lhs_is_refused():
    lhs = jnp.ones((4, 16), jnp.bfloat16)
    with pytest.raises(ValueError, match="E4M3 copy of lhs"):
        fp8_dot.check_lhs_fp8((lhs, jnp.ones((1,))), lhs)  # bf16, not E4M3
    with pytest.raises(ValueError, match="E4M3 copy of lhs"):
        fp8_dot.check_lhs_fp8((jnp.ones((4, 8), fp8_dot.E4M3), jnp.ones((1,))), lhs)


@pytest.mark.parametrize("recipe", ["bf16", "fp8_current"])
def test_a_linear_whose_recipe_cannot_read_fp8_refuses_an_fp8_input(recipe):
    """Linear(x_fp8=...) is for the delayed-scaling dots; any other recipe says so, not silently
    casting x itself."""
    from helpers.recipes import precision_config

    from fogjax.model.layers import Linear
    from fogjax.precision.registry import make_recipe

    linear = Linear((4,), ("embed", "mlp"), 0.02, make_recipe(precision_config(recipe=recipe)))
    x = jnp.ones((2, 8), jnp.bfloat16)
    x_fp8 = (x.astype(fp8_dot.E4M3), jnp.ones((1,), jnp.float32))
    with pytest.raises(ValueError, match="cannot read an FP8 input"):
        linear.init(jax.random.PRNGKey(0), x, x_fp8=x_fp8)
