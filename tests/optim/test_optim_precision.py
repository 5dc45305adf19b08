"""optim.* precision fields: presets, refusals that name the fix, and bfloat16 gradients
accumulated over micro-batches by fogjax.train.step.compute_grads."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fogjax import config_lib, optim
from fogjax.optim import state_precision as optim_precision
from fogjax.train.step import compute_grads


def _optim(**fields):
    c = config_lib.get_config("fog_flash", "tiny").optim
    for k, v in fields.items():
        setattr(c, k, v)
    return c


def test_defaults_are_float32_and_presets_set_all_four():
    assert optim_precision.resolve(_optim()).is_float32
    assert optim_precision.resolve(_optim(state_precision="fog_fp8_m1")) == (
        optim_precision.StatePrecision("float16", "float8_e4m3fn", "float16", "bfloat16")
    )
    # A field equal to the preset's own value is no contradiction.
    optim_precision.resolve(_optim(state_precision="fog_fp16", mu_dtype="float16"))
    assert optim.master_cast(_optim())({"w": 1.0}) == {"w": 1.0}


def test_the_config_declares_every_precision_field_with_its_one_default():
    """optim.state_precision.FIELD_DEFAULTS is the one list of precision fields: the config sets
    each with that default, and the checkpoint names the layout fields among them."""
    config = config_lib.get_config("fog_flash", "tiny").optim
    assert {k: config[k] for k in optim_precision.FIELD_DEFAULTS} == optim_precision.FIELD_DEFAULTS
    assert set(optim_precision.LAYOUT_FIELDS) < set(optim_precision.FIELD_DEFAULTS)
    assert "moment_rounding" not in optim_precision.LAYOUT_FIELDS


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(state_precision="fog_fp32"), r"state_precision='fog_fp32'.*fog_fp16"),
        (
            dict(state_precision="fog_fp16", mu_dtype="bfloat16"),
            r"mu_dtype=bfloat16 contradicts optim.state_precision=fog_fp16.*=custom",
        ),
        (dict(master_dtype="float8_e4m3fn"), r"master_dtype='float8_e4m3fn'.*bfloat16"),
        (dict(grad_dtype="float16"), r"grad_dtype='float16'.*bfloat16"),
        (dict(nu_dtype="fp8"), r"nu_dtype='fp8'.*float8_e4m3fn"),
        (
            dict(master_dtype="float16", master_rounding="remainder"),
            r"remainder needs a bfloat16 master.*stochastic",
        ),
        (dict(master_rounding="stochastic"), r"stochastic needs a 16-bit master"),
        (dict(mu_dtype="int8", state_block_size=0), r"int8 moments are blockwise.*block_size"),
        (dict(state_block_size=-1), r"state_block_size=-1 must be >= 0"),
        (dict(moment_rounding="up"), r"moment_rounding='up'.*auto"),
        (
            dict(state_precision="fog_fp8", moment_rounding="nearest"),
            r"moment_rounding=nearest cannot represent nu's per-step decay in float8_e4m3fn",
        ),
    ],
)
def test_bad_precision_fields_are_refused_with_the_fix(fields, message):
    with pytest.raises(ValueError, match=message):
        optim.make_optimizer(_optim(**fields), 200, {})


def test_nearest_fp8_nu_is_refused_in_one_line_naming_the_numbers_and_the_fix():
    with pytest.raises(ValueError) as refused:
        optim.make_optimizer(_optim(state_precision="fog_fp8", moment_rounding="nearest"), 200, {})
    message = str(refused.value)
    assert "\n" not in message
    shrink, threshold = 100 * (1 - math.sqrt(0.95)), 100 / 18  # E4M3: 1 / (2^4 + 2).
    assert f"b2=0.95 shrinks the stored sqrt(nu) by {shrink:.3g}% a step" in message
    assert f"less than the {threshold:.3g}% round to nearest needs" in message
    assert "--config.optim.moment_rounding=stochastic" in message


# (fields, whether an explicit moment_rounding=nearest stalls a decay). The thresholds: E4M3
# sqrt(nu) stalls for b2 > (17/18)^2 = 0.8920, E4M3 mu for b1 > 17/18 = 0.9444, bfloat16 nu
# (stored as nu) for b2 > 257/258 = 0.99612, float16 sqrt(nu) for b2 > (2049/2050)^2 = 0.999025.
NEAREST_STALLS = [
    (dict(state_precision="fog_fp8"), True),
    (dict(state_precision="fog_fp8", b2=0.999), True),
    (dict(state_precision="fog_fp8", b2=0.8925), True),
    (dict(state_precision="fog_fp8", b2=0.8915), False),
    (dict(mu_dtype="float8_e4m3fn"), False),  # b1 = 0.9: mu shrinks 10% > 5.56%.
    (dict(mu_dtype="float8_e4m3fn", b1=0.945), True),
    (dict(mu_dtype="float8_e4m3fn", b1=0.944), False),
    (dict(state_precision="fog_fp8_m1"), False),
    (dict(state_precision="bf16"), False),
    (dict(state_precision="bf16", b2=0.9962), True),
    (dict(state_precision="bf16", b2=0.9961), False),
    (dict(state_precision="fog_fp16", b2=0.999), False),
    (dict(state_precision="fog_fp16", b2=0.99903), True),
    (dict(mu_dtype="int8", nu_dtype="int8", b2=0.999), False),  # Codes follow the block amax.
    (dict(), False),  # float32: never rounded.
]


@pytest.mark.parametrize("fields, stalls", NEAREST_STALLS)
def test_explicit_nearest_is_refused_exactly_where_it_stalls_a_decay(fields, stalls):
    cfg = _optim(moment_rounding="nearest", **fields)
    if stalls:
        with pytest.raises(ValueError, match=r"moment_rounding=nearest cannot represent"):
            optim_precision.resolve(cfg)
    else:
        assert optim_precision.moment_rounding(cfg) == "nearest"


@pytest.mark.parametrize("fields, stalls", NEAREST_STALLS)
def test_auto_is_stochastic_where_nearest_stalls_a_decay_and_for_int8(fields, stalls):
    """'auto' (the default) is stochastic wherever nearest would stall a decay and for int8
    moments, else nearest (so fog_fp8_m1's FP8 mu at b1 = 0.9 keeps nearest); an explicit
    value is kept."""
    cfg = _optim(**fields)
    assert cfg.moment_rounding == "auto"
    precision = optim_precision.resolve(cfg)
    expected = "stochastic" if stalls or "int8" in {precision.mu, precision.nu} else "nearest"
    assert optim_precision.moment_rounding(cfg) == expected
    cfg.moment_rounding = "stochastic"
    assert optim_precision.moment_rounding(cfg) == "stochastic"


class _Bigram(nn.Module):
    """Embedding + untied head: a model fogjax.train.step can differentiate, compiled in a
    second."""

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(64, 16)(tokens)
        return nn.Dense(64, use_bias=False)(x)


@pytest.mark.slow
def test_bfloat16_gradients_are_accumulated_in_bfloat16_from_the_float32_master_view():
    """Micro-batches k = 2, grad_dtype bfloat16, a bfloat16 master: each chunk is differentiated
    at the float32 view of the master, its gradient (of loss / k) cast to bfloat16, and the two
    summed in bfloat16, exactly."""
    model = _Bigram()
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (4, 9)), jnp.int32)
    params32 = model.init(jax.random.key(0), tokens[:, :-1])["params"]
    master = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params32)
    run = jax.jit(
        lambda p, t, k, dt: compute_grads(model, p, {}, t, k, False, dt)[1], static_argnums=(2, 3)
    )
    grads = run(master, tokens, 2, jnp.dtype(jnp.bfloat16))
    view = jax.tree.map(lambda p: p.astype(jnp.float32), master)
    # Chunk j holds rows j, j + k, ...; halving a float32 gradient is exact.
    chunks = [run(view, tokens[i::2], 1, jnp.dtype(jnp.float32)) for i in range(2)]
    expected = jax.tree.map(
        lambda a, b: (a / 2).astype(jnp.bfloat16) + (b / 2).astype(jnp.bfloat16), *chunks
    )
    for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(e, np.float32))
    # float32 gradients of a bfloat16 master: the float32 view is differentiated.
    g32 = run(master, tokens, 2, jnp.dtype(jnp.float32))
    assert {x.dtype for x in jax.tree.leaves(g32)} == {jnp.dtype(jnp.float32)}


def test_readers_load_a_run_saved_with_a_now_refused_rounding():
    """A run saved before 'auto' (fog_fp8 with moment_rounding=nearest) still builds for readers."""
    from fogjax.inference.load import reader_config

    cfg = config_lib.get_config("fog_flash", "tiny")
    with cfg.unlocked():
        cfg.optim.state_precision = "fog_fp8"
        cfg.optim.moment_rounding = "nearest"
    with pytest.raises(ValueError, match="moment_rounding"):
        optim_precision.moment_rounding(cfg.optim)
    read = reader_config(cfg)
    assert read.optim.moment_rounding == "auto" and cfg.optim.moment_rounding == "nearest"
    assert optim_precision.moment_rounding(read.optim) == "stochastic"
