"""Low-precision AdamW against float32: bit-exact float32 paths, 200-step tracking within a
derived bound, no flushed moments, stochastic rounding unbiased and reproducible, exact remainder.

The tracking bound (:func:`error_bound`, float64 NumPy). The gradient stream g_t is fixed (it
does not depend on the parameters), so with learning rate lr_t and decoupled decay lam the
low-precision parameters p' and the float32 ones p obey
    e_{t+1} = (1 - lr_t lam) e_t - lr_t (u'_t - u_t) + r_t,    e = p' - p,
with r_t the master's rounding error; since 0 < 1 - lr lam <= 1,
    |e_T| <= sum_t lr_t |u'_t - u_t| + |sum_t r_t|.
Moments: the step uses mu'_t = b1 Q(mu'_{t-1}) + (1-b1) g'_t (nu' alike), so D_t >= |mu'_t - mu_t|
follows D_t = b1 (D_{t-1} + q_{t-1}) + (1-b1) |g'_t - g_t| with q the storage error bound of
fogjax.optim.moment_formats: u |x| + 2 (min_positive / max) A for a float format with unit roundoff
u and block amax A (the power-of-two scale puts A in (max/2, max]; the zero guard costs at most one
min_positive), A / 127 (A / 255 for sqrt(nu)) for int8, u |x| for bfloat16, all doubled when the
moments are requantised stochastically (either neighbour); the second moment is stored as
r = sqrt(nu), so |nu' error| <= (2 r + dr) dr. Then with a = D_mu / bc1, b = D_nu / bc2,
    |u' - u| <= a / (sqrt(v - b)_+ + eps) + |m| (1 / (sqrt(v - b)_+ + eps) - 1 / (sqrt(v) + eps))
(m, v the bias-corrected float32 moments; 1 / (sqrt(.) + eps) is convex and decreasing). Master:
round to nearest |r_t| <= spacing(p'_t) / 2; stochastic rounding: r_t are zero-mean,
|r_t| <= spacing(p'_t), so by Azuma |sum r_t| <= sqrt(2 ln(2 / delta) sum spacing^2) with
probability 1 - delta (delta = 1e-9 per coordinate); remainder: r_t = 0. Both runs compute in
float32, which the bound treats as exact: a slack of 2% + 1e-6 sum lr_t covers that.

For 8-bit moments this worst case is vacuous: with unit roundoff rho = 2^-4 (E4M3, on sqrt(nu)
so 2 rho on nu) the recurrence D = b2 (D + q) grows to ~ 2 rho b2 / (1 - b2) = 2.4 nu, so
sqrt(v - b) hits 0 and the bound reads lr / eps. It is still asserted (it holds), and the
tracking of those cases is checked against measured ceilings instead (EIGHT_BIT_REL_L2).
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
import optax
import pytest

from fogjax import optim
from fogjax.optim import adam_lowp as optim_lowp
from fogjax.optim import moment_formats as fmts
from fogjax.optim import state_precision as optim_precision

T, PEAK, WD, B1, B2, EPS = 200, 1e-3, 0.1, 0.9, 0.95, 1e-8
SHAPES = {"kernel": (4, 256), "gain": (2, 64)}
MASK = {"kernel": True, "gain": False}


def _cfg(**overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(
        dict(
            schedule="wsd",
            peak_lr=PEAK,
            min_lr=1e-8,
            warmup_steps=10,
            cooldown_steps=50,
            b1=B1,
            b2=B2,
            eps=EPS,
            weight_decay=WD,
            grad_clip=0.0,
            state_precision="custom",
            master_dtype="float32",
            mu_dtype="float32",
            nu_dtype="float32",
            grad_dtype="float32",
            master_rounding="auto",
            state_block_size=128,
            moment_rounding="auto",
        )
    )
    c.update(overrides)
    return c


def _stream(seed: int = 0) -> dict[str, np.ndarray]:
    """[T, *shape] per leaf: Student-t(3) noise plus a drift, per-column scales from 1e-3 to 1,
    and 8 columns of each kernel row at 1e-6 (tiny coordinates sharing blocks with large ones)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in SHAPES.items():
        scale = 10.0 ** rng.uniform(-3, 0, shape)
        scale[..., :8] = 1e-6
        drift = rng.standard_normal(shape)
        out[name] = ((rng.standard_t(3, (T, *shape)) + drift) * scale).astype(np.float32)
    return out


STREAM = _stream()
P0 = {
    name: (np.random.default_rng(1).standard_normal(shape) * 0.02).astype(np.float32)
    for name, shape in SHAPES.items()
}


def _run(cfg, stream=STREAM, steps=T):
    """(params after each step [steps, ...] as float32, final optimizer state)."""
    tx = optim.make_optimizer(cfg, T, MASK)
    grad_dtype = optim.grad_dtype(cfg)

    @jax.jit
    def go(p0, stream):
        params = optim.master_cast(cfg)(p0)

        def body(carry, g):
            p, st = carry
            u, st = tx.update(jax.tree.map(lambda x: x.astype(grad_dtype), g), st, p)
            p = optax.apply_updates(p, u)
            return (p, st), jax.tree.map(lambda x: x.astype(jnp.float32), p)

        (_, st), ps = jax.lax.scan(body, (params, tx.init(p0)), stream)
        return ps, st

    ps, st = go(P0, jax.tree.map(lambda x: x[:steps], stream))
    return jax.device_get(ps), st


def _moments(state, cfg):
    """The stored moments of ``state``, decoded to float32 NumPy."""
    block = cfg.state_block_size
    mu = optax.tree_utils.tree_get(state, "mu")
    nu = optax.tree_utils.tree_get(state, "nu")
    dec = lambda tree, second: {  # noqa: E731
        k: np.asarray(fmts.decode(tree[k], block, second)) for k in SHAPES
    }
    return dec(mu, False), dec(nu, True)


# --- float32 is optax ------------------------------------------------------------------------


def _bitwise(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(
            np.asarray(x).reshape(-1).view(np.uint8), np.asarray(y).reshape(-1).view(np.uint8)
        )


def test_float32_everywhere_is_optax_adamw_bit_for_bit():
    """The default config, and scale_by_adam_lowp with float32 moments plugged into adamw's
    chain, both equal clip + optax.adamw (same mask, WSD schedule) over 30 steps, bit for bit."""
    cfg = _cfg(grad_clip=0.05)  # Small enough that the clip acts on most steps.
    schedule = optim.make_schedule(cfg, T)
    reference = optax.chain(
        optax.clip_by_global_norm(0.05),
        optax.adamw(schedule, b1=B1, b2=B2, eps=EPS, weight_decay=WD, mask=MASK),
    )
    f32 = fmts.MOMENT_FORMATS["float32"]
    lowp = optax.chain(
        optax.clip_by_global_norm(0.05),
        optim_lowp.scale_by_adam_lowp(B1, B2, EPS, f32, f32, 128),
        optax.masked(optax.add_decayed_weights(WD), MASK),
        optax.scale_by_learning_rate(schedule),
    )
    results = []
    for tx in (reference, optim.make_optimizer(cfg, T, MASK), lowp):

        @jax.jit
        def go(p0, stream, tx=tx):
            def body(carry, g):
                p, st = carry
                u, st = tx.update(g, st, p)
                return (optax.apply_updates(p, u), st), None

            return jax.lax.scan(body, (p0, tx.init(p0)), stream)[0]

        results.append(go(P0, jax.tree.map(lambda x: x[:30], STREAM)))
    (p_ref, s_ref), (p_cfg, s_cfg), (p_low, s_low) = results
    _bitwise(p_cfg, p_ref)
    _bitwise(s_cfg, s_ref)
    _bitwise(p_low, p_ref)
    for field in ("mu", "nu"):
        _bitwise(optax.tree_utils.tree_get(s_low, field), optax.tree_utils.tree_get(s_ref, field))


# --- tracking the float32 optimizer ------------------------------------------------------------

_UNIT_ROUNDOFF = {"float32": 0.0, "bfloat16": 2.0**-8, "float16": 2.0**-11}
_UNIT_ROUNDOFF["float8_e4m3fn"] = 2.0**-4


def _block_amax(x: np.ndarray, block: int) -> np.ndarray:
    """Per element, the amax of its storage block (fogjax.optim.moment_formats' layout)."""
    n = fmts.block_count(x.shape, block)
    if not n:
        return np.full_like(x, np.abs(x).max())
    b = np.abs(x).reshape(*x.shape[:-1], n, -1)
    return np.broadcast_to(b.max(-1, keepdims=True), b.shape).reshape(x.shape)


def _storage_error(x: np.ndarray, name: str, block: int, second: bool) -> np.ndarray:
    """Bound on |stored - x| for x >= 0 magnitudes in format ``name`` (module docstring)."""
    fmt = fmts.MOMENT_FORMATS[name]
    if not fmt.scaled:
        return _UNIT_ROUNDOFF[name] * x
    amax = _block_amax(x, block)
    if fmt.integer:
        return amax / (255.0 if second else 127.0)
    return _UNIT_ROUNDOFF[name] * x + 2.0 * fmt.min_positive / fmt.max_value * amax


def _spacing(x: np.ndarray, dtype) -> np.ndarray:
    info = ml_dtypes.finfo(dtype)
    _, e = np.frexp(np.abs(x))
    return np.maximum(np.ldexp(1.0, e - 1 - info.nmant), float(info.smallest_subnormal))


def error_bound(cfg, lowp_params) -> tuple[dict, dict, dict]:
    """(per-coordinate bound on |p' - p| after T steps, bound on |stored mu' - mu| at T,
    float64 mu at T) for ``cfg`` against float32 (module docstring)."""
    lr = np.asarray(jax.jit(jax.vmap(optim.make_schedule(cfg, T)))(jnp.arange(T)), np.float64)
    bounds, mu_err, mu_ref = {}, {}, {}
    block, ug = cfg.state_block_size, _UNIT_ROUNDOFF[cfg.grad_dtype]
    for name in SHAPES:
        g_all = STREAM[name].astype(np.float64)
        mu = nu = dm = dv = qm = qv = np.zeros(SHAPES[name])
        det, sr2 = np.zeros(SHAPES[name]), np.zeros(SHAPES[name])
        for t in range(T):
            g = g_all[t]
            mu, nu = B1 * mu + (1 - B1) * g, B2 * nu + (1 - B2) * g * g
            dm = B1 * (dm + qm) + (1 - B1) * ug * np.abs(g)
            dv = B2 * (dv + qv) + (1 - B2) * (2 * ug + ug * ug) * g * g
            bc1, bc2 = 1 - B1 ** (t + 1), 1 - B2 ** (t + 1)
            m, v, a, b = mu / bc1, nu / bc2, dm / bc1, dv / bc2
            low = 1.0 / (np.sqrt(np.maximum(v - b, 0.0)) + EPS)
            det += lr[t] * (a * low + np.abs(m) * (low - 1.0 / (np.sqrt(v) + EPS)))
            # Stochastic requantisation may go to either neighbour: twice the nearest bound.
            sr = 2.0 if optim_precision.moment_rounding(cfg) == "stochastic" else 1.0
            qm = sr * _storage_error(np.abs(mu) + dm, cfg.mu_dtype, block, False)
            if fmts.MOMENT_FORMATS[cfg.nu_dtype].scaled:
                r = np.sqrt(nu + dv)
                dr = sr * _storage_error(r, cfg.nu_dtype, block, True)
                qv = (2 * r + dr) * dr
            else:
                qv = sr * _storage_error(nu + dv, cfg.nu_dtype, block, True)
            if cfg.master_dtype != "float32":
                spacing = _spacing(lowp_params[name][t], jnp.dtype(cfg.master_dtype))
                rounding = optim_precision.master_rounding(cfg)
                if rounding == "nearest":
                    det += spacing / 2
                elif rounding == "stochastic":
                    sr2 += spacing**2
        azuma = np.sqrt(2 * math.log(2 / 1e-9) * sr2)
        bounds[name] = 1.02 * (det + azuma) + 1e-6 * lr.sum()
        mu_err[name], mu_ref[name] = qm + dm, mu
    return bounds, mu_err, mu_ref


CASES = {
    "mu_nu_bfloat16": dict(mu_dtype="bfloat16", nu_dtype="bfloat16"),
    "mu_nu_float16": dict(mu_dtype="float16", nu_dtype="float16"),
    "mu_nu_fp8_block128": dict(mu_dtype="float8_e4m3fn", nu_dtype="float8_e4m3fn"),
    "mu_nu_fp8_per_tensor": dict(
        mu_dtype="float8_e4m3fn", nu_dtype="float8_e4m3fn", state_block_size=0
    ),
    "mu_nu_int8_block128": dict(mu_dtype="int8", nu_dtype="int8"),
    # int8 codes follow their block's amax, so rounding them to nearest is allowed.
    "mu_nu_int8_nearest": dict(mu_dtype="int8", nu_dtype="int8", moment_rounding="nearest"),
    "master_bf16_nearest": dict(master_dtype="bfloat16", master_rounding="nearest"),
    "master_fp16_stochastic": dict(master_dtype="float16", master_rounding="stochastic"),
    "master_bf16_stochastic": dict(master_dtype="bfloat16", master_rounding="stochastic"),
    "preset_fog_fp16": dict(
        master_dtype="float16", mu_dtype="float16", nu_dtype="float16", grad_dtype="bfloat16"
    ),
    "preset_fog_fp8_m1": dict(
        master_dtype="float16", mu_dtype="float8_e4m3fn", nu_dtype="float16", grad_dtype="bfloat16"
    ),
}


EIGHT_BIT = {"float8_e4m3fn", "int8"}
# Not derived: regression ceilings at ~1.2x the worst relative L2 error measured on this stream
# over the two tensors (0.28, 0.31, 0.50, 0.74, 0.34). The FP8 and int8 cases round
# stochastically (optim.moment_rounding=auto); int8 rounded to nearest tracks worse (0.74 vs
# 0.50), and an FP8 nu rounded to nearest (now refused) never decayed: 0.44 here, a ceiling of
# 0.55 that accepted it (test_fp8_nu_decays_like_float32 checks the decay itself). 3 mantissa
# bits (or linear 8-bit codes) on moments that are EMAs of heavy-tailed noise move the
# trajectory visibly; the loss test (test_optim_training.py) is the check that matters for them.
EIGHT_BIT_REL_L2 = {
    "mu_nu_fp8_block128": 0.35,
    "mu_nu_fp8_per_tensor": 0.38,
    "mu_nu_int8_block128": 0.6,
    "mu_nu_int8_nearest": 0.9,
    "preset_fog_fp8_m1": 0.42,
}


@pytest.fixture(scope="module")
def float32_run():
    return _run(_cfg())


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_low_precision_tracks_float32_within_the_derived_bound(case, float32_run):
    cfg = _cfg(**CASES[case])
    p32, s32 = float32_run
    plow, slow = _run(cfg)
    bounds, mu_err, mu_ref = error_bound(cfg, plow)
    for name in SHAPES:
        err = np.abs(plow[name][-1].astype(np.float64) - p32[name][-1])
        worst = np.argmax(err - bounds[name])
        assert np.all(err <= bounds[name]), (
            f"{name}: |p' - p| = {err.flat[worst]:.3g} > bound {bounds[name].flat[worst]:.3g}"
        )
        moved = p32[name][-1] - P0[name]
        if EIGHT_BIT & {cfg.mu_dtype, cfg.nu_dtype}:
            # The worst case is vacuous here (module docstring); the measured tracking error of
            # the parameters' motion, relative L2, is bounded instead.
            rel = np.linalg.norm(plow[name][-1] - p32[name][-1]) / np.linalg.norm(moved)
            assert rel < EIGHT_BIT_REL_L2[case], rel
        else:  # The bound says something: on the typical coordinate, a small part of the motion.
            assert np.median(bounds[name] / np.abs(moved)) < 0.5
    mu_low, nu_low = _moments(slow, cfg)
    mu32, nu32 = _moments(s32, _cfg())
    for name in SHAPES:
        assert np.all(nu_low[name][nu32[name] > 0] > 0), "a second moment flushed to zero"
        flushed = (mu_low[name] == 0) & (mu32[name] != 0)
        assert np.all(np.abs(mu_ref[name][flushed]) <= mu_err[name][flushed] * 1.02 + 1e-12)


def test_fp8_moments_keep_tiny_coordinates_alive(float32_run):
    """The 1e-6 columns share blocks with O(1) coordinates: their nu survives as a positive
    value and their parameters still move (a flushed nu would move them by lr * mu / eps)."""
    cfg = _cfg(**CASES["mu_nu_fp8_block128"])
    plow, slow = _run(cfg)
    _, nu_low = _moments(slow, cfg)
    assert np.all(nu_low["kernel"][:, :8] > 0)
    step = np.abs(plow["kernel"][-1][:, :8] - plow["kernel"][-2][:, :8])
    assert np.all(step < 10 * PEAK)


# --- the FP8 second moment decays --------------------------------------------------------------

DECAY_SHAPE, RANDOM_STEPS, ZERO_STEPS = (16, 256), 20, 100


def test_fp8_nu_decays_like_float32():
    """fog_fp8 with the default moment_rounding (auto: stochastic here), 20 random-gradient steps
    then 100 zero-gradient ones: nu against its float64 re-derivation (an EMA of g^2 at b2).

    Round to nearest left every coordinate where it was after step 20 (nu ~190x float32's at the
    end; test_optim_formats.py shows why). Stochastic rounding is unbiased for nu, so each
    coordinate's ratio has mean 1; 100 random roundings make it roughly log-normal (median ~0.7,
    sd ~1), so over 4096 coordinates the mean ratio is within 10% (~6 standard errors), the
    median within [0.5, 2], and every coordinate has moved down since step 20. Gradients
    N(0, s^2) with s from 0.01 to 1 per coordinate: every sqrt(nu) is a normal E4M3 value of its
    block (far smaller ones stall at the subnormals or the zero guard whatever the rounding)."""
    cfg = _cfg(state_precision="fog_fp8")
    assert optim_precision.moment_rounding(cfg) == "stochastic"
    rng = np.random.default_rng(3)
    scale = 10.0 ** rng.uniform(-2, 0, DECAY_SHAPE)
    random = rng.standard_normal((RANDOM_STEPS, *DECAY_SHAPE)) * scale
    grads = np.concatenate([random, np.zeros((ZERO_STEPS, *DECAY_SHAPE))]).astype(np.float32)
    tx = optim.make_optimizer(cfg, T, {"w": True})

    @jax.jit
    def go(grads):
        def body(carry, g):
            p, st = carry
            u, st = tx.update({"w": g}, st, p)
            return (optax.apply_updates(p, u), st), optax.tree_utils.tree_get(st, "nu")["w"]

        p0 = {"w": jnp.zeros(DECAY_SHAPE)}
        return jax.lax.scan(body, (p0, tx.init(p0)), grads)[1]

    stored = go(grads)

    def nu_after(step):
        at = jax.tree.map(lambda x: x[step - 1], stored)
        return np.asarray(fmts.decode(at, cfg.state_block_size, True), np.float64)

    reference = np.zeros(DECAY_SHAPE)
    for g in grads.astype(np.float64):
        reference = B2 * reference + (1 - B2) * g * g
    before, after = nu_after(RANDOM_STEPS), nu_after(RANDOM_STEPS + ZERO_STEPS)
    ratio = after / reference
    assert np.all(after < before), f"{np.mean(after >= before):.1%} of nu did not decay"
    assert 0.5 < np.median(ratio) < 2.0, np.median(ratio)
    assert abs(ratio.mean() - 1) < 0.1, ratio.mean()
    assert abs(after.mean() / reference.mean() - 1) < 0.1


# --- stochastic rounding and the remainder ------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float8_e4m3fn])
def test_stochastic_rounding_is_unbiased(dtype):
    """x a quarter ulp above a grid point: round-to-nearest is off by 0.25 ulp every time; the
    mean of N = 4096 stochastic roundings is within 6 sigma = 6 * 0.5 / sqrt(N) ulp of x."""
    base = np.asarray([0.0213, -1.37, 3.0e-3, 77.0], np.float32).astype(dtype).astype(np.float32)
    base[-1] = -float(ml_dtypes.finfo(dtype).max) / 2  # Near the top of E4M3: no NaN.
    ulp = _spacing(base, dtype)
    x = jnp.asarray(base + 0.25 * ulp, jnp.float32)
    n = 4096
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(n))
    draws = jax.vmap(lambda k: fmts.stochastic_round(x, dtype, k))(keys)
    assert draws.dtype == dtype
    mean = np.asarray(draws.astype(jnp.float32)).astype(np.float64).mean(0)
    np.testing.assert_array_less(np.abs(mean - np.asarray(x)) / ulp, 6 * 0.5 / math.sqrt(n))
    nearest = np.asarray(x.astype(dtype).astype(jnp.float32))
    np.testing.assert_allclose(np.abs(nearest - np.asarray(x)) / ulp, 0.25)
    assert set(np.unique(np.asarray(draws.astype(jnp.float32)) - base)) <= {0.0, *ulp}


def test_stochastic_rounding_is_reproducible_from_the_step():
    """The same state and gradients give the same bits (a resumed run redraws them); the next
    step draws different ones."""
    cfg = _cfg(master_dtype="bfloat16", master_rounding="stochastic", warmup_steps=0)
    tx = optim.make_optimizer(cfg, T, MASK)
    p = optim.master_cast(cfg)(P0)
    st = tx.init(P0)
    g = jax.tree.map(lambda x: x[0], STREAM)
    update = jax.jit(tx.update)
    u1, st1 = update(g, st, p)
    u2, _ = update(g, st, p)
    _bitwise(u1, u2)
    u3, _ = update(g, st1, p)  # Same inputs but the step count: other random bits.
    assert any(
        np.any(np.asarray(a) != np.asarray(b))
        for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u3), strict=True)
    )


def test_moment_rounding_draws_new_bits_every_step():
    """Stochastically rounded moments: the same state and step count give the same stored bits
    (a resumed run redraws them); the same moments at the next step count are rounded with other
    bits (a fixed key would round each coordinate up or down by the same uniform every step)."""
    fp8 = fmts.MOMENT_FORMATS["float8_e4m3fn"]
    tx = optim_lowp.scale_by_adam_lowp(B1, B2, EPS, fp8, fp8, 128, stochastic=True)
    update = jax.jit(tx.update)
    _, st = update(jax.tree.map(lambda x: x[0], STREAM), tx.init(P0))
    zero = jax.tree.map(np.zeros_like, P0)
    at = lambda count: update(zero, st._replace(count=jnp.asarray(count, jnp.int32)))[1]  # noqa: E731
    _bitwise(at(5), at(5))
    five, six = at(5).nu, at(6).nu
    for name in SHAPES:  # The scales follow the amax, the same; the rounded values differ.
        np.testing.assert_array_equal(five[name].scale, six[name].scale)
        assert np.any(np.asarray(five[name].values) != np.asarray(six[name].values))


def test_remainder_master_is_the_float32_master_exactly(float32_run):
    """bfloat16 params + int16 remainder join to the float32 run's parameters, bit for bit, at
    every step; the bfloat16 params are them rounded to nearest (ties away)."""
    cfg = _cfg(master_dtype="bfloat16", master_rounding="remainder")
    p32, _ = float32_run
    tx = optim.make_optimizer(cfg, T, MASK)

    @jax.jit
    def go(p0, stream):
        def body(carry, g):
            p, st = carry
            u, st = tx.update(g, st, p)
            p = optax.apply_updates(p, u)
            joined = jax.tree.map(optim_lowp.join_bfloat16, p, st[-1].remainder)
            return (p, st), (joined, p)

        return jax.lax.scan(body, (optim.master_cast(cfg)(p0), tx.init(p0)), stream)[1]

    joined, stored = go(P0, STREAM)
    for name in SHAPES:
        np.testing.assert_array_equal(
            np.asarray(joined[name]).view(np.uint32), p32[name].view(np.uint32)
        )
        assert stored[name].dtype == jnp.bfloat16
        np.testing.assert_allclose(
            np.asarray(stored[name].astype(jnp.float32)), p32[name], rtol=2.0**-8, atol=0
        )


def test_split_and_join_bfloat16_round_trip_every_pattern_class():
    x = np.asarray([0.0, -0.0, 1.0, -1.0, 1.00390625, 3.0e-39, -2.5e38, 1e-45, 0.1], np.float32)
    hi, rem = optim_lowp.split_bfloat16(jnp.asarray(x))
    back = np.asarray(optim_lowp.join_bfloat16(hi, rem))
    np.testing.assert_array_equal(back.view(np.uint32), x.view(np.uint32))
    assert rem.dtype == jnp.int16 and hi.dtype == jnp.bfloat16
    assert np.all(np.abs(np.asarray(hi.astype(jnp.float32)) - x) <= _spacing(x, jnp.bfloat16) / 2)
