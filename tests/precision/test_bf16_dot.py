"""bf16_dot_general: float32 product of BF16 operands whose backward GEMMs are BF16."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from fogjax.precision.bf16_dot import bf16_dot_general

DIMS = (((2,), (0,)), ((), ()))


def _operands():
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (2, 8, 32), jnp.float32).astype(jnp.bfloat16)
    w = jax.random.normal(kw, (32, 48), jnp.float32).astype(jnp.bfloat16)
    g = jax.random.normal(kg, (2, 8, 48), jnp.float32) * 1e-3
    return x, w, g


def test_forward_is_the_float32_product_of_the_bf16_operands():
    x, w, _ = _operands()
    out = bf16_dot_general(x, w, DIMS)
    assert out.dtype == jnp.float32
    ref = np.einsum("btd,dv->btv", np.asarray(x, np.float64), np.asarray(w, np.float64))
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


def test_backward_rounds_the_cotangent_to_bf16_once_then_bf16_gemms():
    x, w, g = _operands()
    _, vjp = jax.vjp(lambda a, b: bf16_dot_general(a, b, DIMS), x, w)
    dx, dw = vjp(g)
    assert dx.dtype == dw.dtype == jnp.bfloat16
    # float64 re-derivation: g rounded to bf16 (ml_dtypes), exact products, rounded to bf16.
    g16 = np.asarray(g).astype(ml_dtypes.bfloat16).astype(np.float64)
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    dx_ref = np.einsum("btv,dv->btd", g16, w64).astype(ml_dtypes.bfloat16).astype(np.float64)
    dw_ref = np.einsum("btd,btv->dv", x64, g16).astype(ml_dtypes.bfloat16).astype(np.float64)
    # One bf16 rounding of results accumulated in float32: within one bf16 ulp of the reference.
    np.testing.assert_allclose(np.asarray(dx, np.float64), dx_ref, rtol=2**-7, atol=1e-9)
    np.testing.assert_allclose(np.asarray(dw, np.float64), dw_ref, rtol=2**-7, atol=1e-9)
    # And close to the float32 gradients autodiff gives a float32-output einsum.
    _, vjp32 = jax.vjp(
        lambda a, b: jnp.einsum("btd,dv->btv", a, b, preferred_element_type=jnp.float32), x, w
    )
    dx32, _ = vjp32(g)
    np.testing.assert_allclose(
        np.asarray(dx, np.float32), np.asarray(dx32, np.float32), rtol=2e-2, atol=1e-4
    )


def test_backward_gemms_have_bf16_operands_in_the_jaxpr():
    x, w, g = _operands()
    f = lambda a, b: jnp.sum(bf16_dot_general(a, b, DIMS) * g)  # noqa: E731
    jaxpr = jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(x, w)
    dots = []

    def visit(j):
        for eqn in j.eqns:
            if eqn.primitive.name == "dot_general":
                dots.append(tuple(str(v.aval.dtype) for v in eqn.invars[:2]))
            for p in eqn.params.values():
                for sub in p if isinstance(p, list | tuple) else [p]:
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        visit(inner)

    visit(jaxpr.jaxpr)
    # The forward (also inside the custom_vjp record) and both backward GEMMs: all BF16.
    assert len(dots) >= 3 and set(dots) == {("bfloat16", "bfloat16")}


def test_low_precision_dot_general_routes_only_bf16_products_with_float32_output():
    from fogjax.precision.bf16_dot import low_precision_dot_general

    x, w, g = _operands()
    # bf16 x bf16 -> f32: the custom rule, whose backward rounds the cotangent to bf16.
    _, vjp = jax.vjp(
        lambda a, b: low_precision_dot_general(a, b, DIMS, preferred_element_type=jnp.float32), x, w
    )
    _, vjp_ref = jax.vjp(lambda a, b: bf16_dot_general(a, b, DIMS), x, w)
    for got, ref in zip(vjp(g), vjp_ref(g), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    # Anything else is lax.dot_general itself.
    x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
    out = low_precision_dot_general(x32, w32, DIMS, preferred_element_type=jnp.float32)
    np.testing.assert_array_equal(out, jax.lax.dot_general(x32, w32, DIMS))
    out16 = low_precision_dot_general(x, w, DIMS, preferred_element_type=jnp.bfloat16)
    assert out16.dtype == jnp.bfloat16
