"""Mesh construction, logical-axis shardings and global batches on 8 fake CPU devices."""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from fogjax import config_lib, sharding
from fogjax.model.transformer import Transformer
from fogjax.precision.registry import make_recipe


def mesh_cfg(data: int, fsdp: int, tensor: int) -> dict[str, int]:
    return {"data": data, "fsdp": fsdp, "tensor": tensor}


def test_eight_devices():
    assert len(jax.devices()) == 8, "tests/conftest.py should give 8 CPU devices"


@pytest.mark.parametrize(
    "cfg, shape",
    [
        (mesh_cfg(-1, 1, 1), (8, 1, 1)),
        (mesh_cfg(8, 1, 1), (8, 1, 1)),
        (mesh_cfg(1, 8, 1), (1, 8, 1)),
        (mesh_cfg(1, -1, 1), (1, 8, 1)),
        (mesh_cfg(2, 2, 2), (2, 2, 2)),
        (mesh_cfg(2, -1, 2), (2, 2, 2)),
        (mesh_cfg(1, 2, -1), (1, 2, 4)),
    ],
)
def test_make_mesh_shapes(cfg, shape):
    mesh = sharding.make_mesh(cfg)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert tuple(mesh.shape.values()) == shape
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_make_mesh_on_a_device_subset():
    mesh = sharding.make_mesh(mesh_cfg(-1, 1, 1), devices=jax.devices()[:1])
    assert tuple(mesh.shape.values()) == (1, 1, 1)
    assert mesh.devices.flat[0] == jax.devices()[0]


def test_make_mesh_accepts_the_config_section():
    cfg = config_lib.get_config("fog_flash", "tiny")
    assert tuple(sharding.make_mesh(cfg.mesh).shape.values()) == (8, 1, 1)


@pytest.mark.parametrize(
    "cfg, words",
    [
        (mesh_cfg(3, 1, 1), ["mesh.data=3", "multiply to 3", "8 devices", "-1"]),
        (mesh_cfg(2, 2, 1), ["mesh.fsdp=2", "8 devices", "-1"]),
        (mesh_cfg(-1, -1, 1), ["only one axis may be -1", "mesh.data", "mesh.fsdp"]),
        (mesh_cfg(-1, 3, 1), ["mesh.data=-1", "mesh.fsdp=3", "8 devices", "whole size"]),
        (mesh_cfg(0, 1, 1), ["mesh.data=0", "positive integer or -1"]),
        (mesh_cfg(1, 1, -2), ["mesh.tensor=-2", "positive integer or -1"]),
    ],
)
def test_bad_meshes_say_what_to_fix(cfg, words):
    with pytest.raises(ValueError) as err:
        sharding.make_mesh(cfg)
    for word in words:
        assert word in str(err.value)


class TinyMlp(nn.Module):
    """A Dense with logically named kernel and bias, plus unnamed FP8-like state."""

    features: int

    @nn.compact
    def __call__(self, x):
        self.variable("fp8", "scale", jnp.ones, (2,))
        y = nn.Dense(
            self.features,
            kernel_init=nn.with_logical_partitioning(nn.initializers.normal(), ("embed", "mlp")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
        )(x)
        return nn.with_logical_constraint(y, ("batch", "mlp"))


def test_create_sharded_places_every_array_in_its_shards():
    mesh = sharding.make_mesh(mesh_cfg(2, 2, 2))
    model = TinyMlp(features=16)
    x = jnp.ones((4, 8))
    variables = sharding.create_sharded(
        model.init, mesh, sharding.LOGICAL_AXIS_RULES, jax.random.key(0), x
    )
    variables = nn.meta.unbox(variables)
    kernel = variables["params"]["Dense_0"]["kernel"]
    assert kernel.sharding == NamedSharding(mesh, P("fsdp", "tensor"))
    assert {s.data.shape for s in kernel.addressable_shards} == {(4, 8)}  # [8, 16] / (2, 2)
    assert variables["params"]["Dense_0"]["bias"].sharding.spec == P("tensor")
    assert variables["fp8"]["scale"].sharding.is_fully_replicated
    # The values are those of an unsharded init (up to the last bit: jit fuses the scaling).
    reference = nn.meta.unbox(model.init(jax.random.key(0), x))
    np.testing.assert_allclose(kernel, reference["params"]["Dense_0"]["kernel"], rtol=1e-6)


def test_logical_shardings_of_abstract_variables():
    mesh = sharding.make_mesh(mesh_cfg(2, 2, 2))
    abstract = jax.eval_shape(TinyMlp(16).init, jax.random.key(0), jnp.ones((4, 8)))
    shardings = sharding.logical_shardings(abstract, mesh)
    assert shardings["params"]["Dense_0"]["kernel"].spec == P("fsdp", "tensor")
    assert shardings["fp8"]["scale"].spec == P()


def test_indivisible_dimension_is_replicated_with_a_warning(caplog):
    mesh = sharding.make_mesh(mesh_cfg(2, 2, 2))
    abstract = jax.eval_shape(TinyMlp(3).init, jax.random.key(0), jnp.ones((4, 8)))
    with caplog.at_level(logging.WARNING, logger="fogjax.sharding"):
        shardings = sharding.logical_shardings(abstract, mesh)
    assert shardings["params"]["Dense_0"]["kernel"].spec == P("fsdp", None)
    assert shardings["params"]["Dense_0"]["bias"].spec == P(None)
    assert "['params']['Dense_0']['kernel'] dim of size 3 on tensor" in caplog.text


def test_unknown_logical_name_is_an_error():
    class Typo(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.with_logical_partitioning(nn.initializers.ones, ("emebd",))
            return x * self.param("w", init, (x.shape[-1],))

    abstract = jax.eval_shape(Typo().init, jax.random.key(0), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="'emebd' has no rule"):
        sharding.logical_shardings(abstract, sharding.make_mesh(mesh_cfg(-1, 1, 1)))


def test_activation_constraints_follow_the_rules_inside_the_context():
    mesh = sharding.make_mesh(mesh_cfg(2, 2, 2))
    constrain = jax.jit(lambda x: nn.with_logical_constraint(2 * x, ("batch", "length", "embed")))
    x = jnp.ones((8, 4, 16))
    with sharding.sharding_context(mesh):
        y = constrain(x)
    # 'embed' would take fsdp, but 'batch' already holds it: one mesh axis per array.
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"))), 3)


def test_transformer_parameters_follow_the_rules():
    cfg = config_lib.get_config("llama3", "tiny")
    model = Transformer(cfg.model, make_recipe(cfg.precision))
    mesh = sharding.make_mesh(mesh_cfg(2, 2, 2))
    with sharding.sharding_context(mesh):
        abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((8, 16), jnp.int32))
    shardings = sharding.logical_shardings(abstract, mesh)
    params = shardings["params"]
    assert params["embedding"].spec == P("tensor", "fsdp")  # (vocab, embed)
    assert params["lm_head"].spec == P("fsdp", "tensor")  # (embed, vocab)
    assert params["layers"]["mlp"]["wi"]["kernel"].spec[:2] == (None, "fsdp")  # (layers, embed..)
    for path, s in jax.tree_util.tree_flatten_with_path(shardings)[0]:
        assert s.mesh == mesh, jax.tree_util.keystr(path)
        if jax.tree_util.keystr(path).startswith("['params']"):
            continue
        assert s.spec == P(), jax.tree_util.keystr(path)  # probes, fp8 state: replicated


def test_batch_sharding_and_global_batch():
    mesh = sharding.make_mesh(mesh_cfg(2, 2, 2))
    local = np.arange(8 * 17, dtype=np.int32).reshape(8, 17)
    assert sharding.process_batch_shard(mesh) == (0, 1)  # one process holds every row
    batch = sharding.global_batch_from_local(local, mesh)
    assert batch.shape == (8, 17) and batch.dtype == jnp.int32
    assert batch.sharding == sharding.batch_sharding(mesh)
    assert batch.sharding.spec == P(("data", "fsdp"))
    assert {s.data.shape for s in batch.addressable_shards} == {(2, 17)}
    np.testing.assert_array_equal(np.asarray(batch), local)


def test_global_batch_that_does_not_split_is_an_error():
    mesh = sharding.make_mesh(mesh_cfg(2, 2, 2))
    with pytest.raises(ValueError, match="train.batch_size to a multiple of 4"):
        sharding.global_batch_from_local(np.zeros((6, 9), np.int32), mesh)


@pytest.mark.parametrize(
    "mesh, shape, axis, outer, spec",
    [
        (mesh_cfg(1, 8, 1), (2, 24, 16), 1, None, P(None, "fsdp", None)),
        (mesh_cfg(2, 4, 1), (12, 8), 0, None, P("fsdp", None)),
        (mesh_cfg(1, 8, 1), (2, 256, 16), 1, 8, P(None, "fsdp", None)),  # merged [8, 32] rows
        (mesh_cfg(1, 8, 1), (2, 256, 16), 1, 2, None),  # merged [2, 128]: would re-tile 2 axes
        (mesh_cfg(1, 8, 1), (2, 6, 16), 1, None, None),  # 6 does not split
        (mesh_cfg(1, 4, 2), (2, 24, 16), 1, None, None),  # tensor parallel: left to the partitioner
        (mesh_cfg(8, 1, 1), (2, 24, 16), 1, None, None),  # no FSDP: nothing is gathered
    ],
)
def test_gathered_axis_major_shards_the_rows_when_fsdp_divides_them(mesh, shape, axis, outer, spec):
    """The layout an FSDP all-gather returns ready for a GEMM that contracts the last axis: 'fsdp'
    on ``axis`` (so the gather is outermost), only where the split falls on one source axis."""
    m = sharding.make_mesh(mesh)
    x = jnp.zeros(shape)
    with sharding.sharding_context(m):
        out = jax.jit(lambda x: sharding.gathered_axis_major(x, axis, outer) + 1)(x)
    if spec is None:
        assert out.sharding.is_fully_replicated
    else:
        assert out.sharding.is_equivalent_to(NamedSharding(m, spec), len(shape))
