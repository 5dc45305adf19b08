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

from fogjax import optim
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
) -> tuple[jax.Array, Any, Any, Any]:
    """Loss, parameter gradients, new FP8 state and probe outputs for a batch [B, T+1].

    ``rng`` (a PRNG key, or None) is the ``fp4`` stream of this step; micro-batch j > 0 folds in j.

    With ``micro_batches`` k > 1 the batch is split into k equal parts processed sequentially
    (``lax.scan``). Each part's loss is scaled by 1/k *before* differentiation, so every gradient
    tensor an FP8 cast sees has the magnitude it has in the full batch (its E5M2 scale stays
    right); gradients then sum to the full-batch gradient. Statistics are averaged; the amaxes
    the FP8 ops observed are max-combined (exactly the full batch's amaxes) and then every FP8
    state is updated once (bulk_scaling.apply).

    ``grad_dtype`` (``optim.grad_dtype``; None = as the backward yields them): the loss is
    differentiated with respect to the float32 view of the parameters (exact for a 16-bit master),
    and each micro-batch's gradients are cast to ``grad_dtype`` and accumulated in it.
    """
    loss_fn = _loss_fn(model, with_stats)
    if grad_dtype is not None:
        params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    # Differentiated: the scale_inv leaves (their gradient is the amax seen) and TE's states (their
    # gradient is their new value); not the [H] histories, which only the bulk update touches.
    observed, fixed = bulk_scaling.split(fp8)
    # The block weights in E4M3 once per step, not per micro-batch (weight_quantization.py).
    fp8_weights, rhs_amaxes = _quantized_kernels(model, params, fp8)

    def scaled_loss(
        params: Any, observed: Any, chunk: jax.Array, chunk_rng: jax.Array | None
    ) -> tuple[jax.Array, Any]:
        merged = bulk_scaling.merge(observed, fixed)
        loss, aux = loss_fn(params, merged, chunk, chunk_rng, fp8_weights)
        return loss / micro_batches, aux

    grad_fn = jax.value_and_grad(scaled_loss, argnums=(0, 1), has_aux=True)

    def one(chunk: jax.Array, index: jax.Array | int = 0) -> tuple[jax.Array, Any, Any, Any]:
        chunk_rng = None if rng is None else jax.random.fold_in(rng, index)
        (loss, aux), (grads, seen) = grad_fn(params, observed, chunk, chunk_rng)
        if grad_dtype is not None:
            grads = jax.tree.map(lambda g: g.astype(grad_dtype), grads)
        return loss, grads, seen, aux

    if micro_batches == 1:
        loss, grads, seen, aux = one(tokens)
    else:
        b = tokens.shape[0]
        micro_batch_size(b, micro_batches)
        # Chunk j takes rows j, j + k, j + 2k, ...: every device keeps a share of every chunk, so
        # the split needs no data movement across the batch-sharded devices.
        chunks = tokens.reshape(b // micro_batches, micro_batches, *tokens.shape[1:]).swapaxes(0, 1)
        first = one(chunks[0])

        def body(acc: Any, chunk_and_index: tuple[jax.Array, jax.Array]) -> tuple[Any, None]:
            return _combine_microbatch(acc, one(*chunk_and_index)), None

        indices = jnp.arange(1, micro_batches)
        (loss, grads, seen, aux), _ = jax.lax.scan(body, first, (chunks[1:], indices))
        aux = jax.tree_util.tree_map_with_path(
            lambda path, x: (
                x if _is_max_statistic(path) or _is_min_statistic(path) else x / micro_batches
            ),
            aux,
        )
    seen = {**seen, **{p: jnp.maximum(seen[p], a) for p, a in rhs_amaxes.items()}}
    return loss, grads, _updated_fp8(model, observed, fixed, seen), aux


def _quantized_kernels(model: nn.Module, params: Any, fp8: Any) -> tuple[Any, dict[Any, Any]]:
    """The E4M3 block kernels and their amaxes, once per step (none without delayed FP8 dots)."""
    recipe = getattr(model, "recipe", None)
    if not fp8 or recipe is None:
        return {}, {}
    is_gemm_operand = getattr(model, "kernel_is_gemm_operand", lambda path: True)
    return weight_quantization.quantize_kernels(params, fp8, recipe.compute_dtype, is_gemm_operand)


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
