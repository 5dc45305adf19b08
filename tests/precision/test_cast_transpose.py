"""The Pallas cast-transpose kernel (fogjax/precision/cast_transpose.py) against XLA's path: in
Pallas's interpret mode on CPU, the FP8 copy, its transpose and the amax equal scaling.quantize,
its transpose and scaling.amax bit for bit, clipping and subnormals included."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from fogjax.precision import cast_transpose
from fogjax.precision.formats import E4M3, E5M2


def _gradient_like(shape, seed=0):
    """bf16 values over many binades, a few far beyond the FP8 range, zeros, both signs."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * np.exp2(rng.integers(-20, 12, shape))
    x[rng.random(shape) < 0.01] = 0.0
    x[0, :3] = [1e9, -1e9, 3e5]  # clipped by both formats
    return jnp.asarray(x, jnp.bfloat16)


@pytest.mark.parametrize("dtype", [E5M2, E4M3])
@pytest.mark.parametrize("scale_inv", [1.0, 0.37, 2.0**-9])
def test_the_kernel_equals_xlas_cast_transpose_and_amax(dtype, scale_inv):
    x = _gradient_like((128, 192))
    s = jnp.asarray([scale_inv], jnp.float32)
    q, q_t, amax = jax.jit(
        lambda x, s: cast_transpose.pallas_cast_transpose(x, s, dtype, interpret=True)
    )(x, s)
    ref_q, ref_t, ref_amax = cast_transpose.xla_cast_transpose(x, s, dtype)
    assert q.dtype == dtype and q.shape == (128, 192) and q_t.shape == (192, 128)
    as_bits = lambda a: np.asarray(a).view(np.uint8)  # noqa: E731 (NaN-safe equality)
    np.testing.assert_array_equal(as_bits(q), as_bits(ref_q))
    np.testing.assert_array_equal(as_bits(q_t), as_bits(ref_t))
    np.testing.assert_array_equal(as_bits(q_t), as_bits(q).T)
    np.testing.assert_array_equal(amax, ref_amax)
    # And against an independent float64 re-derivation of the cast (ml_dtypes rounds to nearest).
    scaled = np.asarray(x, np.float64) / np.float64(
        np.float32(scale_inv).astype(ml_dtypes.bfloat16)
    )
    scaled = scaled.astype(ml_dtypes.bfloat16).astype(np.float64)  # the bf16 division's result
    bound = float(ml_dtypes.finfo(dtype).max)
    expect = np.clip(scaled, -bound, bound).astype(dtype)
    np.testing.assert_array_equal(as_bits(q), expect.view(np.uint8))
    assert float(amax[0]) == float(np.max(np.abs(np.asarray(x, np.float32))))


def test_shapes_that_do_not_tile_take_xlas_path_and_the_kernel_refuses_them():
    x = _gradient_like((96, 64))
    s = jnp.ones((1,), jnp.float32)
    assert not cast_transpose.tiles(x.shape) and cast_transpose.tiles((128, 64))
    q, q_t, amax = cast_transpose.cast_transpose_or_xla(x, s, E5M2)
    ref = cast_transpose.xla_cast_transpose(x, s, E5M2)
    for a, b in zip((q, q_t, amax), ref, strict=True):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
    with pytest.raises(ValueError, match="multiples of 64"):
        cast_transpose.pallas_cast_transpose(x, s, E5M2, interpret=True)


def test_the_kernel_compiles_for_an_h100_without_a_gpu_and_cpu_keeps_xlas_path():
    """Deviceless: lowered for CUDA, cast_transpose_or_xla is the Triton kernel (sm_90, compiled
    by XLA's GPU compiler here); lowered for CPU it is XLA's path, with no kernel at all."""
    from jax.sharding import SingleDeviceSharding

    from fogjax.bench import aot, targets

    target = targets.get_target("h100")
    (device,) = targets.target_devices(target, 1)
    sharding = SingleDeviceSharding(device)
    x = jax.ShapeDtypeStruct((4096, 2048), jnp.bfloat16, sharding=sharding)
    s = jax.ShapeDtypeStruct((1,), jnp.float32, sharding=sharding)
    program = jax.jit(lambda x, s: cast_transpose.cast_transpose_or_xla(x, s, E5M2))
    with aot.target_cudnn(target), aot.no_persistent_cache_writes():
        text = program.trace(x, s).lower().compile().as_text()
    assert text.count('custom_call_target="__gpu$xla.gpu.triton"') == 1, text[-3000:]
    assert "fp8_cast_transpose" in text and "transpose(" not in text.split("ENTRY")[1]
    cpu_text = jax.jit(program).lower(jnp.zeros((128, 64), jnp.bfloat16), jnp.ones((1,))).as_text()
    assert "triton" not in cpu_text and "pallas" not in cpu_text


def test_the_step_with_the_kernel_gets_the_same_bits_as_without_it(monkeypatch):
    """fp8dpa, 2 layers, one sequence of 64 tokens (one [64, 64] tile row): the train step's
    loss, gradients and amaxes are the same bits whether the out-projections' output gradients
    go through the Pallas kernel (interpreted), through XLA's cast and transpose, or through the
    plain path (no grad_cast_transpose: flax's transposes of the E5M2 gradient)."""
    from helpers.steps import batch, setup, tiny_config

    from fogjax.model import attention, mlp
    from fogjax.train.step import compute_grads

    model, state, _ = setup(tiny_config("fp8dpa"))
    fp8 = jax.tree.map(lambda x: x * 0.5 + 0.01, state["fp8"])
    tokens = batch(b=1, t=64)
    calls = []

    def run():
        jax.clear_caches()
        f = lambda p, f, t: compute_grads(model, p, f, t, 1, False)  # noqa: E731
        return jax.jit(f)(state["params"], fp8, tokens)

    def kernel(x, s, dtype):
        calls.append(x.shape)
        return cast_transpose.pallas_cast_transpose(x, s, dtype, interpret=True)

    xla = run()
    monkeypatch.setattr(cast_transpose, "cast_transpose_or_xla", kernel)
    pallas = run()
    assert calls == [(64, 256)] * 2  # the two out-projections (the layers are scanned)
    for module in (attention, mlp):
        monkeypatch.setattr(module, "grad_arrives_whole", lambda cfg: False)
    plain = run()
    jax.tree.map(np.testing.assert_array_equal, pallas, xla)
    jax.tree.map(np.testing.assert_array_equal, plain, xla)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [E5M2, E4M3])
def test_on_a_gpu_the_compiled_kernel_equals_xlas_path(dtype):
    """On a GPU: the Triton kernel (not interpreted) equals XLA's cast, transpose and amax bit for
    bit, over many binades and both clips (the inline IEEE division, RTNE conversion)."""
    x = _gradient_like((1024, 512), seed=3)
    for scale_inv in (1.0, 0.37, 2.0**-9, 3.0e4):
        s = jnp.asarray([scale_inv], jnp.float32)
        got = jax.jit(lambda x, s: cast_transpose.pallas_cast_transpose(x, s, dtype))(x, s)
        want = jax.jit(lambda x, s: cast_transpose.xla_cast_transpose(x, s, dtype))(x, s)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(
                np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8)
            )
