"""The scanned layers read their delayed-scaling scales packed, one [L, K] array
(fogjax/model/packed_scales.py): the same bits as per-tensor leaves, the stored collection
unchanged, and one scanned fp8 input (one cotangent write per layer) instead of one per tensor."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.steps import all_eqns, batch, setup, tiny_config

from fogjax.model import packed_scales
from fogjax.train.step import compute_grads

L, H = 3, 4


def _collection():
    rng = np.random.default_rng(0)

    def state(prefix):
        return {
            f"{prefix}_amax_history": jnp.asarray(rng.uniform(0, 1, (L, H)), jnp.float32),
            f"{prefix}_scale_inv": jnp.asarray(rng.uniform(0, 1, (L, 1)), jnp.float32),
        }

    return {
        "attn": {"wqkv": {"dot": {**state("lhs"), **state("grad")}}, "fp8_attention": state("q")},
        "mlp": {"wi": {"dot": state("rhs")}, "te": {"state": {"kernel_scale": jnp.ones((L, 1))}}},
    }


def test_pack_puts_every_scale_in_one_array_and_unpack_restores_each_layer():
    fp8 = _collection()
    view = packed_scales.pack({"fp8": fp8, "params": {"w": jnp.ones(2)}})
    packed = view["fp8"][packed_scales.PACKED]
    assert packed.shape == (L, 4) and packed.dtype == jnp.float32
    # Columns in path order; histories and Transformer Engine's state pass through; no scale left.
    order = [
        fp8["attn"]["fp8_attention"]["q_scale_inv"],
        fp8["attn"]["wqkv"]["dot"]["grad_scale_inv"],
        fp8["attn"]["wqkv"]["dot"]["lhs_scale_inv"],
        fp8["mlp"]["wi"]["dot"]["rhs_scale_inv"],
    ]
    np.testing.assert_array_equal(packed, jnp.concatenate(order, axis=-1))
    assert "lhs_scale_inv" not in view["fp8"]["attn"]["wqkv"]["dot"]
    assert view["fp8"]["mlp"]["te"] is not None and view["params"]["w"].shape == (2,)
    for layer in range(L):  # what nn.scan hands one layer, then the module's view of it
        row = jax.tree.map(lambda x, i=layer: x[i], view)
        ops = packed_scales.unpack(row)
        rows = jax.tree.map(lambda x, i=layer: x[i], fp8)
        jax.tree.map(np.testing.assert_array_equal, ops["fp8"], rows)


def test_pack_leaves_a_collection_without_pairs_alone_and_unpack_refuses_a_mismatch():
    te_only = {"fp8": {"dot": {"state": {"kernel_scale": jnp.ones((L, 1))}}}}
    assert packed_scales.pack(te_only) is te_only
    assert packed_scales.pack({"params": {}}) == {"params": {}}
    view = packed_scales.pack({"fp8": _collection()})
    row = jax.tree.map(lambda x: x[0], view)
    del row["fp8"]["attn"]["fp8_attention"]["q_amax_history"]
    with pytest.raises(ValueError, match="packed fp8 scales have 4 columns"):
        packed_scales.unpack(row)


def _layer_scan_shapes(jaxpr, layers: int) -> list[tuple[int, ...]]:
    """Shapes of the float32 [layers, n] arrays (n < 64: scales, not histories) that the layer
    scans of ``jaxpr`` (recursively; scans of length ``layers``) read or write."""
    found = []
    for eqn in all_eqns(jaxpr):
        if eqn.primitive.name == "scan" and eqn.params["length"] == layers:
            for v in (*eqn.invars, *eqn.outvars):
                aval = getattr(v, "aval", None)
                if (
                    aval is not None
                    and aval.dtype == jnp.float32
                    and aval.ndim == 2
                    and aval.shape[0] == layers
                    and aval.shape[1] < 64
                ):
                    found.append(aval.shape)
    return found


def test_the_step_scans_packed_scales_and_gets_the_same_bits(monkeypatch):
    """fp8dpa with FP8 attention einsums (6 dots, 18 delayed-scaled tensors per layer), 2 layers,
    one micro-batch (so every scan of length 2 is a layer scan): the layer scans take the scales
    as one [2, 18] array, never as [2, 1] leaves, and the step's gradients and amaxes equal those
    of the unpacked scan bit for bit."""
    model, state, _ = setup(tiny_config("fp8dpa"))
    assert model.cfg.num_layers == 2 and model.cfg.attention_impl == "xla"
    params = state["params"]
    fp8 = jax.tree.map(lambda x: x * 0.5 + 0.01, state["fp8"])  # scales other than 1
    tokens = batch(b=2, t=16)

    def program():
        """A fresh function each time: JAX caches traces by function."""
        return lambda p, f, t: compute_grads(model, p, f, t, 1, False)[1:3]

    def trace_and_run():
        jax.clear_caches()
        shapes = _layer_scan_shapes(jax.make_jaxpr(program())(params, fp8, tokens), 2)
        return shapes, jax.jit(program())(params, fp8, tokens)

    shapes, packed = trace_and_run()
    assert (2, 18) in shapes and (2, 1) not in shapes, shapes
    identity = lambda variables: variables  # noqa: E731
    monkeypatch.setattr(packed_scales, "pack", identity)
    monkeypatch.setattr(packed_scales, "unpack", identity)
    shapes, unpacked = trace_and_run()
    assert shapes.count((2, 1)) >= 2 * 18, shapes  # what the packing removes: in and cotangent
    jax.tree.map(np.testing.assert_array_equal, packed, unpacked)
