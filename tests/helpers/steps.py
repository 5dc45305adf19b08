"""A tiny config, a hand-built train state and step, and FP8 GEMM counting, for step tests."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
from jax.extend import core as jex_core

from fogjax import config_lib, optim
from fogjax.model import build_model, weight_decay_mask
from fogjax.train.step import compute_grads, make_train_step

E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2
E4M3_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)


def tiny_config(recipe: str, **train):
    cfg = config_lib.get_config("fog_flash", "tiny")
    with cfg.unlocked():
        cfg.precision.recipe = recipe
        cfg.model.num_layers = 2
        cfg.model.d_model, cfg.model.num_heads, cfg.model.num_kv_heads = 256, 2, 1
        cfg.model.ffn_dim = 384
        cfg.train.steps = 60
        cfg.optim.warmup_steps, cfg.optim.cooldown_steps = 5, 5
        for k, v in train.items():
            setattr(cfg.train, k, v)
    return cfg


def setup(cfg, micro_batches=1, **optim_overrides):
    with cfg.unlocked():
        for k, v in optim_overrides.items():
            setattr(cfg.optim, k, v)
    model = build_model(cfg)
    schedule = optim.make_schedule(cfg.optim, cfg.train.steps)
    tx = optim.make_optimizer(cfg.optim, cfg.train.steps, weight_decay_mask)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))
    params = jax.tree.map(lambda x: x, jax.tree.map(jnp.asarray, _unbox(variables["params"])))
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "fp8": variables.get("fp8", {}),
        "opt_state": tx.init(params),
    }
    step = make_train_step(model, tx, schedule, micro_batches)
    return model, state, step


def _unbox(tree):
    return nn.unbox(tree)


def batch(seed=0, b=8, t=32, vocab=4096):
    return jax.random.randint(jax.random.key(seed), (b, t + 1), 0, vocab)


def all_eqns(jaxpr):
    """Every equation of a ClosedJaxpr and, recursively, of the jaxprs in its equations' params
    (scan and while bodies, custom VJPs, pjit, remat), in order."""

    def walk(jp):
        for eqn in jp.eqns:
            yield eqn
            for param in eqn.params.values():
                for sub in param if isinstance(param, (list, tuple)) else [param]:
                    if isinstance(sub, jex_core.ClosedJaxpr):
                        yield from walk(sub.jaxpr)
                    elif isinstance(sub, jex_core.Jaxpr):
                        yield from walk(sub)

    return walk(jaxpr.jaxpr)


def fp8_dot_counts(jaxpr) -> dict[tuple[str, str], int]:
    """Counts dot_general equations by (lhs dtype, rhs dtype) with an FP8 operand, recursively."""
    counts: dict[tuple[str, str], int] = {}
    for eqn in all_eqns(jaxpr):
        if eqn.primitive.name == "dot_general":
            dts = tuple(str(v.aval.dtype) for v in eqn.invars[:2])
            if any("float8" in d for d in dts):
                counts[dts] = counts.get(dts, 0) + 1
    return counts


def jit_grads(model, micro_batches, with_stats):
    """compute_grads compiled (eager execution of the scanned model is several times slower)."""
    return jax.jit(
        lambda state, tokens: compute_grads(
            model, state["params"], state["fp8"], tokens, micro_batches, with_stats
        )
    )
