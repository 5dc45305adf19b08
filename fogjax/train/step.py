"""Pure train and eval steps.

The train state is a dict ``{step, params, fp8, opt_state}``. ``fp8`` holds the delayed-scaling
state of every FP8 GEMM (empty under bf16 and under the current-scaling recipes, ``*_current``).
The loss is differentiated with respect to ``params`` and the ``scale_inv`` leaves of ``fp8``
together; by construction of the FP8 ops (fogjax/precision/fp8_dot.py) the "gradient" of a
``scale_inv`` is the amax its tensor had. The amaxes never enter the optimizer, weight decay,
clipping or the gradient norm; across micro-batches they combine by elementwise max (the full
batch's amax), never summed, and then every state is updated once per step
(fogjax/precision/bulk_scaling.py).

On statistics steps (``with_stats=True``, a separate compilation) the step also returns the
per-layer activation probes (kurtosis, rms, amax) and FP8 / FP4 statistics.

FP4 stochastic rounding draws from the ``fp4`` rng stream, ``fold_in(key(rng_seed), step)``
(then folded with the micro-batch index): a function of the step alone, so a resumed run draws
exactly the numbers an uninterrupted one does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from fogjax import optim, sharding
from fogjax.model.probes import ACTIVATION_GROUPS, PROBES_COLLECTION
from fogjax.precision import bulk_scaling, stats, weight_quantization
from fogjax.precision.fp4_dot import FP4_RNG, FP4_STATS_COLLECTION
from fogjax.precision.recipe import FP8_STATS_COLLECTION, FP8_WEIGHTS_COLLECTION
from fogjax.train import lm_loss

State = dict[str, Any]
Metrics = dict[str, Any]


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean token cross-entropy; logits [B, T, V] float32, targets [B, T] int32 -> scalar."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def _loss_fn(model: nn.Module, with_stats: bool) -> Callable[..., Any]:
    # train.loss_chunk_tokens (on the model, fogjax.model.build_model): > 0, the model returns its
    # final hidden states and LM head, and the loss takes the head a chunk of tokens at a time
    # (fogjax/train/lm_loss.py); 0, the whole float32 logits.
    chunk_tokens = getattr(model, "loss_chunk_tokens", 0)
    lm_loss.check_chunk_tokens(chunk_tokens)
    call = {"return_hidden": True} if chunk_tokens else {}

    def loss_fn(
        params: Any, fp8: Any, tokens: jax.Array, rng: jax.Array | None, fp8_weights: Any = None
    ) -> tuple[jax.Array, Any]:
        variables = {"params": params}
        if fp8:
            variables["fp8"] = fp8
        if fp8_weights:
            variables[FP8_WEIGHTS_COLLECTION] = fp8_weights
        rngs = {} if rng is None else {FP4_RNG: rng}
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        if with_stats:
            mutable = [PROBES_COLLECTION, FP8_STATS_COLLECTION, FP4_STATS_COLLECTION]
            out, aux = model.apply(variables, inputs, rngs=rngs, mutable=mutable, **call)
            aux = dict(aux)
        else:
            out, aux = model.apply(variables, inputs, rngs=rngs, **call), {}
        if chunk_tokens:
            hidden, head = out
            return lm_loss.chunked_cross_entropy(hidden, head, targets, chunk_tokens), aux
        return cross_entropy(out, targets), aux

    return loss_fn


def _is_max_statistic(path: tuple[Any, ...]) -> bool:
    return bool(path) and getattr(path[-1], "key", None) in ("amax", "scale_max")


def _is_min_statistic(path: tuple[Any, ...]) -> bool:
    return bool(path) and getattr(path[-1], "key", None) == "scale_min"


def _combine_statistic(path: tuple[Any, ...], a: jax.Array, b: jax.Array) -> jax.Array:
    if _is_max_statistic(path):
        return jnp.maximum(a, b)
    if _is_min_statistic(path):
        return jnp.minimum(a, b)
    return a + b


def _combine_microbatch(acc: Any, new: Any) -> Any:
    """Accumulates (loss, grads, fp8, aux): sums, except the FP8 state and amax statistics,
    which take the max (the full batch's amax is the max of its parts' amaxes), and the FP4
    block-scale range, whose ends take the max and min."""
    loss, grads, fp8, aux = acc
    n_loss, n_grads, n_fp8, n_aux = new
    return (
        loss + n_loss,
        jax.tree.map(jnp.add, grads, n_grads),
        jax.tree.map(jnp.maximum, fp8, n_fp8),
        jax.tree_util.tree_map_with_path(_combine_statistic, aux, n_aux),
    )


def micro_batch_size(batch_size: int, micro_batches: int) -> int:
    """Sequences per micro-batch; ValueError naming the fix when ``micro_batches`` does not divide
    ``batch_size`` (checked at start-up by preflight and again when the step is traced)."""
    if micro_batches < 1 or batch_size % micro_batches:
        raise ValueError(
            f"train.batch_size={batch_size} is not divisible by train.micro_batches="
            f"{micro_batches}; choose micro_batches that divides the batch."
        )
    return batch_size // micro_batches


def compute_grads(
    model: nn.Module,
    params: Any,
    fp8: Any,
    tokens: jax.Array,
    micro_batches: int,
    with_stats: bool,
    grad_dtype: Any = None,
    rng: jax.Array | None = None,
    local_accumulation: bool = True,
) -> tuple[jax.Array, Any, Any, Any]:
    """Loss, parameter gradients, new FP8 state and probe outputs for a batch [B, T+1].

    ``rng`` (a PRNG key, or None) is the ``fp4`` stream of this step; micro-batch j > 0 folds in j.

    With ``micro_batches`` k > 1 the batch is split into k equal parts processed sequentially
    (``lax.scan``). Each part's loss is scaled by 1/k *before* differentiation, so every gradient
    tensor an FP8 cast sees has the magnitude it has in the full batch (its E5M2 scale stays
    right); gradients then sum to the full-batch gradient. Statistics are averaged; the amaxes
    the FP8 ops observed are max-combined (exactly the full batch's amaxes) and then every FP8
    state is updated once (bulk_scaling.apply).

    Data parallelism (``local_accumulation`` and :func:`_replicas` > 1): each 'data'
    replica accumulates the gradients of its own rows over the k micro-batches and the replicas
    reduce once per step (:func:`_accumulate_per_replica`), as DDP does, instead of the k
    all-reduces per weight that XLA's partitioning of the accumulation loop leaves inside it.
    ``local_accumulation=False`` keeps that partitioned loop (tests compare the two).

    ``grad_dtype`` (``optim.grad_dtype``; None = as the backward yields them): the loss is
    differentiated with respect to the float32 view of the parameters (exact for a 16-bit master),
    and each micro-batch's gradients are cast to ``grad_dtype`` and accumulated in it.
    """
    if grad_dtype is not None:
        params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    # Differentiated: the scale_inv leaves (their gradient is the amax seen) and TE's states (their
    # gradient is their new value); not the [H] histories, which only the bulk update touches.
    observed, fixed = bulk_scaling.split(fp8)
    # The block weights in E4M3 once per step, not per micro-batch (weight_quantization.py).
    fp8_weights, rhs_amaxes = _quantized_kernels(model, params, fp8)
    loss_fn = _loss_fn(model, with_stats)
    inputs = (params, observed, fixed, fp8_weights)
    replicas = _replicas(model, tokens.shape[0], micro_batches) if local_accumulation else 1
    if micro_batches == 1:
        loss, grads, seen, aux = _micro_batch_grads(loss_fn, 1, grad_dtype)(inputs, tokens, rng)
    elif replicas > 1:
        one = _micro_batch_grads(loss_fn, micro_batches * replicas, grad_dtype)
        loss, grads, seen, aux = _accumulate_per_replica(one, inputs, tokens, micro_batches, rng)
    else:
        one = _micro_batch_grads(loss_fn, micro_batches, grad_dtype)
        loss, grads, seen, aux = _accumulate(one, inputs, tokens, micro_batches, rng)
    seen = {**seen, **{p: jnp.maximum(seen[p], a) for p, a in rhs_amaxes.items()}}
    return loss, grads, _updated_fp8(model, observed, fixed, seen), aux


# (params, observed, fixed, fp8_weights): what every micro-batch's gradient reads.
GradInputs = tuple[Any, Any, Any, Any]
# (loss, grads, seen amaxes, aux statistics) of one micro-batch, or accumulated.
GradOutputs = tuple[jax.Array, Any, Any, Any]


def _micro_batch_grads(
    loss_fn: Callable[..., Any], parts: int, grad_dtype: Any
) -> Callable[..., GradOutputs]:
    """``one(inputs, chunk [b, T+1] int32, rng, index=0) -> (loss, grads, seen, aux)``: the loss
    of a chunk that is one of ``parts`` equal parts of the batch, divided by ``parts``, and its
    gradients with respect to ``params`` (cast to ``grad_dtype``) and to the observed FP8 leaves
    (the amaxes seen); ``inputs`` a :data:`GradInputs`. Dividing before differentiation gives
    every backward tensor the magnitude it has in the whole batch's loss (the E5M2 casts' scales
    and the gradient amaxes depend on it); the parts' results then sum to the batch's."""

    def scaled_loss(
        params: Any, observed: Any, fixed: Any, fp8_weights: Any, chunk: jax.Array, rng: Any
    ) -> tuple[jax.Array, Any]:
        merged = bulk_scaling.merge(observed, fixed)
        loss, aux = loss_fn(params, merged, chunk, rng, fp8_weights)
        return loss / parts, aux

    grad_fn = jax.value_and_grad(scaled_loss, argnums=(0, 1), has_aux=True)

    def one(
        inputs: GradInputs, chunk: jax.Array, rng: jax.Array | None, index: jax.Array | int = 0
    ) -> GradOutputs:
        chunk_rng = None if rng is None else jax.random.fold_in(rng, index)
        (loss, aux), (grads, seen) = grad_fn(*inputs, chunk, chunk_rng)
        if grad_dtype is not None:
            grads = jax.tree.map(lambda g: g.astype(grad_dtype), grads)
        return loss, grads, seen, aux

    return one


def _accumulate(
    one: Callable[..., GradOutputs],
    inputs: GradInputs,
    tokens: jax.Array,
    micro_batches: int,
    rng: jax.Array | None,
) -> GradOutputs:
    """``one`` over the k micro-batches of ``tokens`` [B, T+1] in a ``lax.scan``, combined by
    :func:`_combine_microbatch`; the statistics in ``aux`` averaged (max/min ones kept)."""
    b = tokens.shape[0]
    micro_batch_size(b, micro_batches)
    # Chunk j takes rows j, j + k, j + 2k, ...: every device keeps a share of every chunk, so
    # the split needs no data movement across the batch-sharded devices.
    chunks = tokens.reshape(b // micro_batches, micro_batches, *tokens.shape[1:]).swapaxes(0, 1)
    # The amaxes seen travel the loop as ONE float32 vector: the max of every micro-batch's
    # observations over the one before is one kernel, where a max per state leaf was one kernel
    # per leaf (22 under fp8dpa) per micro-batch. Exact: the same values, max-combined.
    loss, grads, seen, aux = one(inputs, chunks[0], rng)
    seen, unravel = ravel_pytree(seen)

    def body(acc: Any, chunk_and_index: tuple[jax.Array, jax.Array]) -> tuple[Any, None]:
        loss, grads, seen, aux = one(inputs, chunk_and_index[0], rng, chunk_and_index[1])
        return _combine_microbatch(acc, (loss, grads, ravel_pytree(seen)[0], aux)), None

    indices = jnp.arange(1, micro_batches)
    first = (loss, grads, seen, aux)
    (loss, grads, seen, aux), _ = jax.lax.scan(body, first, (chunks[1:], indices))
    seen = unravel(seen)
    aux = jax.tree_util.tree_map_with_path(
        lambda path, x: (
            x if _is_max_statistic(path) or _is_min_statistic(path) else x / micro_batches
        ),
        aux,
    )
    return loss, grads, seen, aux


# The mesh axis of data parallelism: every replica holds whole parameters (no logical rule maps a
# parameter axis onto it) and its own rows of the batch.
DATA_AXIS = "data"


def _recipe_is_row_local(model: nn.Module) -> bool:
    """Whether a replica that computes on its own rows quantises them exactly as the whole batch
    would (``Recipe.quantizes_rows_locally``; a model without a recipe computes plainly)."""
    recipe = getattr(model, "recipe", None)
    return recipe is None or recipe.quantizes_rows_locally


def _replicas(model: nn.Module, batch: int, micro_batches: int) -> int:
    """How many 'data' replicas accumulate gradients locally (:func:`_accumulate_per_replica`), or
    1 (the partitioned loop accumulates): several when the active mesh splits 'data' over
    several devices (an Auto axis: not already inside a shard_map over it), each replica's
    ``batch`` / data rows split into ``micro_batches`` equal parts, and the recipe is row-local."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or DATA_AXIS not in mesh.axis_names or not _recipe_is_row_local(model):
        return 1
    index = mesh.axis_names.index(DATA_AXIS)
    replicas = mesh.axis_sizes[index]
    if mesh.axis_types[index] != AxisType.Auto or batch % (replicas * micro_batches):
        return 1
    return replicas


def _accumulate_per_replica(
    one: Callable[..., GradOutputs],
    inputs: GradInputs,
    tokens: jax.Array,
    micro_batches: int,
    rng: jax.Array | None,
) -> GradOutputs:
    """:func:`_accumulate` on each 'data' replica's rows of ``tokens`` [B, T+1], then one reduction
    over 'data': what the partitioned loop gives, up to the order of float32 sums.

    A ``shard_map`` manual over 'data' only ('fsdp' and 'tensor' stay with XLA's partitioner).
    ``one`` divides each replica's micro-batch loss by k * data (every replica's micro-batches
    have B / (k * data) rows, so the batch loss is the sum of these parts), so the loss and the
    gradients are sums over the replicas; the amaxes a max (exact), the statistics as
    :func:`_reduce_statistics` combines them.
    """
    # Inside, 'data' is manual: constraints may not name it, and the batch is one replica's rows.
    rules = sharding.without_mesh_axis(nn.get_logical_axis_rules(), DATA_AXIS)

    def local(inputs: GradInputs, tokens: jax.Array, rng: jax.Array | None) -> GradOutputs:
        with nn.logical_axis_rules(rules):
            loss, grads, seen, aux = _accumulate(one, inputs, tokens, micro_batches, rng)
        return (
            jax.lax.psum(loss, DATA_AXIS),
            jax.lax.psum(grads, DATA_AXIS),
            jax.lax.pmax(seen, DATA_AXIS),
            _reduce_statistics(aux),
        )

    # check_vma=False: the model's own shard_maps (chunked loss, cuDNN FP8 attention) run
    # unchecked under hand-written VJPs, whose cotangents drop the 'data'-varying type of their
    # inputs ("Custom VJP bwd rule must produce an output with the same type as the args"). With
    # no collective over 'data' in the body before the reductions above, autodiff inside it gives
    # each replica its own partial gradients (checked, an input the replicas share would have to
    # be cast to varying first, or its gradient would be psum'd in every micro-batch).
    return jax.shard_map(
        local,
        in_specs=(P(), P(DATA_AXIS), P()),
        out_specs=P(),
        axis_names={DATA_AXIS},
        check_vma=False,
    )(inputs, tokens, rng)


def _reduce_statistics(aux: Any) -> Any:
    """The replicas' statistics combined over 'data' as micro-batches combine them: amaxes and
    the ends of scale ranges by max / min, the rest (already micro-batch means) by mean."""

    def reduce(path: tuple[Any, ...], x: jax.Array) -> jax.Array:
        if _is_max_statistic(path):
            return jax.lax.pmax(x, DATA_AXIS)
        if _is_min_statistic(path):
            return jax.lax.pmin(x, DATA_AXIS)
        return jax.lax.pmean(x, DATA_AXIS)

    return jax.tree_util.tree_map_with_path(reduce, aux)


def _quantized_kernels(model: nn.Module, params: Any, fp8: Any) -> tuple[Any, dict[Any, Any]]:
    """The E4M3 block kernels and their amaxes, once per step (none without delayed FP8 dots)."""
    recipe = getattr(model, "recipe", None)
    if not fp8 or recipe is None:
        return {}, {}
    is_gemm_operand = getattr(model, "kernel_is_gemm_operand", lambda path: True)
    contracting_axes = getattr(model, "kernel_contracting_axes", None)
    # Under FSDP each micro-batch all-gathers the E4M3 kernels; with the model's contracting axes
    # both GEMM layouts are made here, sharded so that each gathered copy is ready for its GEMM.
    return weight_quantization.quantize_kernels(
        params, fp8, recipe.compute_dtype, is_gemm_operand, contracting_axes
    )


def _updated_fp8(model: nn.Module, observed: Any, fixed: Any, seen: Any) -> Any:
    """The ``fp8`` collection after the step: one bulk update from the max-combined amaxes."""
    if not observed:
        return {}
    rule = getattr(getattr(model, "recipe", None), "amax_update_rule", None)
    if rule is None and fixed:
        raise ValueError(
            "the model keeps delayed-scaling state in its fp8 collection but its recipe declares "
            "no amax_update_rule; give the recipe one (fogjax/precision/recipe.py)."
        )
    reduction, margin = rule or ("max", 0)
    return bulk_scaling.apply(observed, fixed, seen, reduction, margin)


def activation_metrics(probes: Any, layer_order: tuple[str, ...] = ()) -> Metrics:
    """{'kurtosis': {tensor: [L]}, 'act_rms': {...}, 'act_amax': {...}} from the sown probes.

    ``layer_order``: the top-level block modules in layer order (``Transformer.layer_names``);
    a tensor probed in several of them (unrolled blocks, or scanned runs of blocks under
    ``precision.high_precision_layers``) gets their values concatenated in that order.
    """
    parts: dict[str, dict[str, list[jax.Array]]] = {group: {} for group in ACTIVATION_GROUPS}

    def visit(tree: Any) -> None:
        for name, value in tree.items():
            if isinstance(value, dict) and "kurtosis" in value:
                for group, read in ACTIVATION_GROUPS.items():
                    parts[group].setdefault(name, []).append(read(value))
            elif isinstance(value, dict):
                visit(value)

    ordered = [k for k in layer_order if k in probes]
    for key in ordered:
        visit({key: probes[key]})
    visit({k: v for k, v in probes.items() if k not in ordered})
    return {
        group: {
            name: values[0]
            if len(values) == 1
            else jnp.concatenate([jnp.atleast_1d(v) for v in values])
            for name, values in by_name.items()
        }
        for group, by_name in parts.items()
    }


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    micro_batches: int = 1,
    fp8_stats_fn: Callable[[Any, Any], Metrics] | None = None,
    grad_dtype: Any = None,
    rng_seed: int = 0,
) -> Callable[..., tuple[State, Metrics]]:
    """Builds ``train_step(state, batch, with_stats=False) -> (state, metrics)``; jit it outside.

    Args:
      model: the Transformer.
      tx: optimizer over parameters only.
      schedule: learning-rate schedule, reported as ``lr``.
      micro_batches: gradient accumulation steps per optimizer step.
      fp8_stats_fn: ``(fp8_state, fp8_stats) -> metrics`` for statistics steps.
      grad_dtype: dtype of the gradients (``fogjax.optim.grad_dtype(config.optim)``); see
        :func:`compute_grads`.
      rng_seed: seed of the ``fp4`` rng stream (the run's seed).
    Metrics (float32 scalars unless noted): loss, grad_norm, param_norm, update_norm, lr,
      finite (bool); with stats also ``kurtosis``, ``act_rms`` and ``act_amax`` ({tensor: [L]})
      and ``fp8`` / ``fp4`` (flat ``fp8/...`` / ``fp4/...`` tags).
    """

    def train_step(
        state: State, batch: jax.Array, with_stats: bool = False
    ) -> tuple[State, Metrics]:
        params, fp8 = state["params"], state["fp8"]
        rng = jax.random.fold_in(jax.random.key(rng_seed), state["step"])
        loss, grads, new_fp8, aux = compute_grads(
            model, params, fp8, batch, micro_batches, with_stats, grad_dtype, rng
        )
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        metrics: Metrics = {
            "loss": loss,
            **optim.norm_metrics(grads, new_params, updates),
            "lr": schedule(state["step"]),
        }
        metrics["finite"] = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])
        if with_stats:
            probes = aux.get(PROBES_COLLECTION, {})
            metrics.update(activation_metrics(probes, getattr(model, "layer_names", ())))
            fp8_stats = aux.get(FP8_STATS_COLLECTION, {})
            # Current-scaling recipes keep no FP8 state but still sow operand statistics.
            if fp8_stats_fn is not None and (new_fp8 or fp8_stats):
                metrics["fp8"] = fp8_stats_fn(new_fp8, fp8_stats)
            if aux.get(FP4_STATS_COLLECTION):
                # 'fp4/<layer path>/<lhs|rhs>_<zero_fraction|scale_min|scale_max>'
                metrics["fp4"] = stats.fp8_operand_metrics(aux[FP4_STATS_COLLECTION], "fp4")
        new_state = {
            "step": state["step"] + 1,
            "params": new_params,
            "fp8": new_fp8,
            "opt_state": opt_state,
        }
        return new_state, metrics

    return train_step


def make_eval_step(model: nn.Module) -> Callable[[State, jax.Array], Metrics]:
    """``eval_step(state, batch [B, T+1]) -> {'loss_sum', 'tokens'}`` (no state change)."""

    def eval_step(state: State, batch: jax.Array) -> Metrics:
        variables = {"params": state["params"]}
        if state["fp8"]:
            variables["fp8"] = state["fp8"]
        logits = model.apply(variables, batch[:, :-1])
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:])
        return {"loss_sum": losses.sum(), "tokens": jnp.asarray(losses.size, jnp.float32)}

    return eval_step
