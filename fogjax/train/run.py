"""Creating the train state sharded from the start: abstract first, then shard at creation.

``jax.eval_shape`` gives the boxed (logically named) abstract state; the rules turn the names
into NamedShardings; ``jax.jit(init, out_shardings=...)`` materialises every array directly in
its shards, so no full copy of an 8B model ever lands on one device. The same abstract tree (with
shardings) is the restore target for checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fogjax import config_lib, optim, sharding
from fogjax.model import build_model, weight_decay_mask
from fogjax.precision import stats as fp8_stats
from fogjax.precision.cudnn_attention import require_cudnn_attention
from fogjax.precision.recipe import Recipe
from fogjax.precision.registry import make_recipe
from fogjax.train import compiler_options
from fogjax.train.step import make_eval_step, make_train_step

State = dict[str, Any]


def make_init_fn(
    model: nn.Module,
    tx: optax.GradientTransformation,
    seq_len: int,
    master_cast: Callable[[Any], Any] = lambda params: params,
) -> Callable[[jax.Array], State]:
    """``init(rng) -> state`` with boxed (logically partitioned) params and optimizer moments.

    ``master_cast`` turns the float32 initial params into the stored master
    (``fogjax.optim.master_cast``); the optimizer is initialised from the float32 values, so a
    remainder state describes them exactly.
    """

    def init(rng: jax.Array) -> State:
        tokens = jnp.zeros((1, seq_len), jnp.int32)
        variables = model.init(rng, tokens)
        params = variables["params"]
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": master_cast(params),
            "fp8": variables.get("fp8", {}),
            "opt_state": tx.init(params),
        }

    return init


def strip_boxes(tree: Any) -> Any:
    """Removes logical-partitioning boxes without applying sharding constraints (abstract trees)."""
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    return jax.tree.map(
        lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, tree, is_leaf=is_box
    )


def abstract_state(init: Callable[[jax.Array], State], mesh: jax.sharding.Mesh) -> tuple[Any, Any]:
    """(unboxed abstract state with shardings attached, the matching sharding tree)."""
    # The key is made inside the trace: an eager jax.random.key under a mesh of compile-only
    # devices (fogjax.bench --target) would try to run on them.
    boxed = jax.eval_shape(lambda: init(jax.random.key(0)))
    shardings = sharding.logical_shardings(boxed, mesh)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        strip_boxes(boxed),
        shardings,
    )
    return abstract, shardings


def create_state(init: Callable[[jax.Array], State], shardings: Any, seed: int) -> State:
    """The freshly initialised state, created directly in its shards."""
    unboxed_init = lambda rng: nn.unbox(init(rng))  # noqa: E731
    return jax.jit(unboxed_init, out_shardings=shardings)(jax.random.key(seed))


def count_params(abstract: State) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(abstract["params"]))


@dataclasses.dataclass
class Run:
    """Everything a config defines before any array exists: mesh, model, optimizer, shapes."""

    config: Any
    mesh: jax.sharding.Mesh
    recipe: Recipe
    model: nn.Module
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    init: Callable[[jax.Array], State]
    abstract: State  # unboxed ShapeDtypeStructs carrying their shardings
    shardings: Any

    @property
    def num_params(self) -> int:
        return count_params(self.abstract)

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step (:func:`fogjax.config_lib.tokens_per_step`)."""
        return config_lib.tokens_per_step(self.config)

    @property
    def stats_fn(self) -> Callable[[Any, Any], dict[str, Any]] | None:
        """The FP8 statistics of a statistics step (None when the recipe has no FP8 linears)."""
        return fp8_stats.fp8_metrics if self.recipe.quantizes_linears else None

    def make_train_step(
        self,
        model: nn.Module | None = None,
        tx: optax.GradientTransformation | None = None,
        schedule: optax.Schedule | None = None,
    ) -> Callable[..., Any]:
        """The pure ``train_step(state, batch, with_stats)`` of this run (unjitted), the one place
        it is assembled: micro-batches, FP8 statistics, gradient dtype and the RNG seed from the
        config. ``model``, ``tx``, ``schedule`` replace the run's own (the QAF twin of an FP4
        model and its LR schedule, fogjax.train.qaf)."""
        return make_train_step(
            model or self.model,
            tx or self.tx,
            schedule or self.schedule,
            self.config.train.micro_batches,
            self.stats_fn,
            grad_dtype=optim.grad_dtype(self.config.optim),
            rng_seed=self.config.seed,
        )

    def jit(self, fn: Callable[..., Any], extra_args: int = 0) -> Callable[..., Any]:
        """``fn(state, batch, *extra)`` jitted as the trainer runs it (and the bench compiles it):
        the state's shardings in and out, the batch sharded over (data, fsdp), ``extra_args``
        replicated arguments after them, the input state donated."""
        return jax.jit(
            fn,
            in_shardings=(self.shardings, sharding.batch_sharding(self.mesh), *[None] * extra_args),
            out_shardings=(self.shardings, None),
            donate_argnums=0,
            compiler_options=compiler_options.for_platform(self.platform) or None,
        )

    @property
    def platform(self) -> str:
        """The platform of the mesh's devices ('gpu' for a deviceless GPU target too)."""
        return str(self.mesh.devices.flat[0].platform)

    @functools.cached_property
    def train_steps(self) -> dict[bool, Callable[..., Any]]:
        """``{with_stats: step(state, batch) -> (state, metrics)}``, jitted once per run: the plain
        step and the statistics step (kurtosis, FP8 statistics) share one train_step."""
        train_step = self.make_train_step()
        return {
            flag: self.jit(functools.partial(_call_with_stats, train_step, flag))
            for flag in (False, True)
        }

    @functools.cached_property
    def eval_step(self) -> Callable[..., Any]:
        """``eval_step(state, batch) -> {'loss_sum', 'tokens'}``, jitted once per run."""
        return jax.jit(
            make_eval_step(self.model),
            in_shardings=(self.shardings, sharding.batch_sharding(self.mesh)),
        )


def _call_with_stats(
    train_step: Callable[..., Any], with_stats: bool, state: State, batch: jax.Array
) -> Any:
    return train_step(state, batch, with_stats)


def build_run(config: Any, mesh: jax.sharding.Mesh | None = None, target: Any = None) -> Run:
    """Builds the :class:`Run` of ``config`` (mesh from ``config.mesh`` unless given).

    ``target``: when compiling for GPUs this machine does not have (fogjax.bench --target), an
    object with the compile-only ``devices`` and the target's ``cudnn_version``; start-up checks
    then look at it instead of ``jax.devices()``. Nothing here runs on the devices.
    """
    mesh = mesh or sharding.make_mesh(config.mesh)
    recipe = make_recipe(config.precision)
    recipe.check_attention_impl(config.model.attention_impl)  # Before any check of the GPUs.
    if config.model.attention_impl == "cudnn":  # Fail here, not in a compile minutes later.
        require_cudnn_attention(
            fp8=recipe.quantizes_attention,
            head_dim=config.model.d_model // config.model.num_heads,
            seq_len=config.train.seq_len,
            target=target,
        )
    model = build_model(config, recipe)
    steps = config.train.steps
    schedule = optim.make_schedule(config.optim, steps)
    tx = optim.make_optimizer(config.optim, steps, weight_decay_mask)
    init = make_init_fn(model, tx, config.train.seq_len, optim.master_cast(config.optim))
    with sharding.sharding_context(mesh):
        abstract, shardings = abstract_state(init, mesh)
    return Run(config, mesh, recipe, model, tx, schedule, init, abstract, shardings)
