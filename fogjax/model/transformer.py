"""The decoder-only Transformer: embedding, input scaling, blocks (scanned), final norm, LM head.

Collections: ``params`` (float32), ``fp8`` (FP8 scaling state, from FP8 recipes), ``probes``
(activation statistics, only when mutable), ``fp8_stats`` and ``fp4_stats``; with
``decode_length`` > 0 also ``cache`` (the decoding KV cache, attention.py). The ``fp4`` rng stream
(FP4 stochastic rounding) is split over the layers. Under ``nn.scan`` every per-layer variable is
stacked along a leading ``layers`` axis.

The recipe may give runs of blocks different recipes (``Recipe.layer_recipes``: under an FP4 recipe
with ``precision.high_precision_layers``, BF16 first and last blocks). Unrolled, block i is always
``layers_<i>``; scanned, each run is its own nn.scan (:func:`layer_segments` names them), so a
run's HLO holds only its own recipe's GEMMs and no per-layer branch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fogjax.model import packed_scales
from fogjax.model.attention import ATTENTION_IMPLS, CACHE_COLLECTION, QK_NORMS
from fogjax.model.blocks import ARCHITECTURES, POST_NORMS, Block
from fogjax.model.embedding import embed_lookup
from fogjax.model.layers import RMSNorm
from fogjax.model.mlp import ACTIVATIONS
from fogjax.model.packed_residuals import PackedResidualBlock
from fogjax.model.probes import KURTOSIS_FORMS, PROBES_COLLECTION
from fogjax.precision.bf16_dot import bf16_dot_general
from fogjax.precision.fp4_dot import FP4_RNG, FP4_STATS_COLLECTION
from fogjax.precision.recipe import (
    FP8_COLLECTION,
    FP8_STATS_COLLECTION,
    FP8_WEIGHTS_COLLECTION,
    Recipe,
)

Array = jax.Array

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# Collections whose per-layer variables are stacked by nn.scan.
SCANNED_COLLECTIONS = (
    "params",
    FP8_COLLECTION,
    FP8_WEIGHTS_COLLECTION,
    PROBES_COLLECTION,
    FP8_STATS_COLLECTION,
    FP4_STATS_COLLECTION,
)


@dataclasses.dataclass(frozen=True)
class LayerSegment:
    """Consecutive blocks ``start .. start + length - 1`` under one recipe, one top-level module:
    a scanned stack (variables [length, ...]) or, unrolled, a single block (length 1)."""

    name: str
    recipe: Recipe
    start: int
    length: int


# Scanned module names when the recipe splits the stack: (first BF16 run, FP4 run, last BF16 run).
SEGMENT_NAMES = {"first": "layers_bf16_first", "middle": "layers_fp4", "last": "layers_bf16_last"}


def layer_segments(cfg: Any, recipe: Recipe) -> tuple[LayerSegment, ...]:
    """The top-level block modules of a Transformer in layer order.

    Unrolled: ``layers_<i>`` per block. Scanned with one recipe: ``layers`` (all blocks). Scanned
    with runs (``recipe.layer_recipes``): ``layers_bf16_first``, ``layers_fp4``,
    ``layers_bf16_last`` (the runs present), each stacked over its own blocks.
    """
    runs = recipe.layer_recipes(cfg.num_layers)
    starts = [sum(n for _, n in runs[:i]) for i in range(len(runs))]
    if not cfg.scan_layers:
        return tuple(
            LayerSegment(f"layers_{start + j}", run, start + j, 1)
            for (run, n), start in zip(runs, starts, strict=True)
            for j in range(n)
        )
    if len(runs) == 1:
        return (LayerSegment("layers", recipe, 0, cfg.num_layers),)

    def name(run: Recipe, start: int) -> str:
        if run is recipe:
            return SEGMENT_NAMES["middle"]
        return SEGMENT_NAMES["first" if start == 0 else "last"]

    return tuple(
        LayerSegment(name(run, start), run, start, n)
        for (run, n), start in zip(runs, starts, strict=True)
    )


def validate_model_config(cfg: Any) -> None:
    """Raises ValueError naming the field and the fix for a model config that cannot work."""

    def fail(msg: str) -> None:
        raise ValueError(f"Invalid model config: {msg}")

    if cfg.arch not in ARCHITECTURES:
        fail(f"unknown model.arch={cfg.arch!r}; choose one of {sorted(ARCHITECTURES)}.")
    if cfg.d_model % cfg.num_heads:
        fail(
            f"model.d_model={cfg.d_model} is not divisible by model.num_heads={cfg.num_heads}; "
            "pick num_heads so that d_model / num_heads is the head dim (128 in the paper)."
        )
    if cfg.num_heads % cfg.num_kv_heads:
        fail(
            f"model.num_heads={cfg.num_heads} is not divisible by model.num_kv_heads="
            f"{cfg.num_kv_heads}; GQA needs a whole number of query heads per key/value group."
        )
    if (cfg.d_model // cfg.num_heads) % 2:
        fail(
            f"head dim d_model/num_heads={cfg.d_model // cfg.num_heads} is odd; RoPE rotates "
            "channel pairs, so choose d_model and num_heads that give an even head dim."
        )
    if cfg.ffn_activation not in ACTIVATIONS:
        fail(f"unknown model.ffn_activation={cfg.ffn_activation!r}; choose one of {ACTIVATIONS}.")
    if cfg.qk_norm not in QK_NORMS:
        fail(f"unknown model.qk_norm={cfg.qk_norm!r}; choose one of {QK_NORMS}.")
    if cfg.post_norm not in POST_NORMS:
        fail(f"unknown model.post_norm={cfg.post_norm!r}; choose one of {POST_NORMS}.")
    if cfg.remat not in REMAT_POLICIES:
        fail(f"unknown model.remat={cfg.remat!r}; choose one of {sorted(REMAT_POLICIES)}.")
    if cfg.attention_impl not in ATTENTION_IMPLS:
        fail(
            f"unknown model.attention_impl={cfg.attention_impl!r}; choose one of {ATTENTION_IMPLS}."
        )
    if cfg.vocab_size < 1 or cfg.num_layers < 1 or cfg.ffn_dim < 1:
        fail("model.vocab_size, model.num_layers and model.ffn_dim must be positive.")


class Transformer(nn.Module):
    """tokens [B, T] int32 -> logits [B, T, V] float32 (or, with ``return_hidden=True``, the final
    hidden states and the LM head, for the chunked training loss of fogjax/train/lm_loss.py).

    Attributes:
      cfg: the `model` config section (validated at construction).
      recipe: the precision recipe for every GEMM inside the blocks.
      kurtosis_form: 'token' (paper) or 'sequence' (released code), for the probes.
      decode_length: KV-cache slots for decoding (0, the default: no cache). When > 0, call with
        explicit ``positions`` and ``mutable=['cache']``; see fogjax/inference/decoding.py.
      document_eos_id: with an id, attention stays inside each document of a window (the tokens
        after an EOS start a new one: :func:`segment_ids`); None (the default) attends across.
      loss_chunk_tokens: ``train.loss_chunk_tokens``, read by the train step (fogjax/train/step.py)
        alone: > 0, it calls the model with ``return_hidden=True`` and computes the loss a chunk
        of tokens at a time; 0 (the default), from the logits. ``__call__`` never reads it.
    """

    cfg: Any
    recipe: Recipe
    kurtosis_form: str = "token"
    decode_length: int = 0
    document_eos_id: int | None = None
    loss_chunk_tokens: int = 0

    def __post_init__(self) -> None:
        validate_model_config(self.cfg)
        layer_segments(self.cfg, self.recipe)  # refuses a layer split that cannot work
        if self.kurtosis_form not in KURTOSIS_FORMS:
            raise ValueError(
                f"log.kurtosis_form={self.kurtosis_form!r}; choose one of {KURTOSIS_FORMS}."
            )
        super().__post_init__()

    def kernel_is_gemm_operand(self, path: tuple[str, ...]) -> bool:
        """Whether the Linear at ``path`` (e.g. ``('layers', 'mlp', 'wo')``) hands its kernel to
        the GEMM as stored (cast to the compute dtype, nothing else): False only for the FFN
        out-projection under per-channel SmoothSwiGLU (mlp.py), whose rows are scaled per batch.
        The train step pre-quantises exactly these kernels (precision/weight_quantization.py)."""
        cfg = self.cfg
        smooth = cfg.ffn_activation == "smooth_swiglu" and cfg.smooth_swiglu_per_channel
        return not (smooth and tuple(path[-2:]) == ("mlp", "wo"))

    def kernel_contracting_axes(self, path: tuple[str, ...]) -> int:
        """How many leading axes of the block kernel at ``path`` its Linear contracts (a Linear's
        kernel is ``[in..., out...]``): three for the attention out-projection ``[G, R, d_h, D]``
        (attention.py), one for the QKV projection ``[D, G, R + 2, d_h]`` and the FFN's ``[D, ...]``
        and ``[F, D]`` (mlp.py). The train step lays the E4M3 kernels out a second time with these
        axes last, for the forward GEMMs (precision/weight_quantization.py); an FP8 dot refuses a
        copy whose shape disagrees with its own dimension numbers."""
        return 3 if tuple(path[-2:]) == ("attn", "wo") else 1

    @property
    def layer_names(self) -> tuple[str, ...]:
        """The top-level block modules in layer order (:func:`layer_segments`)."""
        return tuple(s.name for s in layer_segments(self.cfg, self.recipe))

    @nn.compact
    def __call__(
        self, tokens: Array, positions: Array | None = None, return_hidden: bool = False
    ) -> Array | tuple[Array, Array]:
        """Logits [B, T, V] float32; with ``return_hidden``, instead (hidden [B, T, D], head
        [D, V]), both in the compute dtype: the operands of the LM head GEMM, whose product is the
        logits (``bf16_dot_general(hidden, head, ...)``)."""
        cfg, dtype = self.cfg, self.recipe.compute_dtype
        if positions is None and self.decode_length:
            raise ValueError("A decoding Transformer (decode_length > 0) needs explicit positions.")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(
                nn.initializers.normal(stddev=cfg.init_std), ("vocab", "embed")
            ),
            (cfg.vocab_size, cfg.d_model),
            jnp.float32,
        )
        # Vocab-parallel under a mesh: a plain gather here makes XLA rematerialize the output.
        x = embed_lookup(embedding, tokens, dtype)
        if cfg.input_scale != 1.0:
            x = x * jnp.asarray(cfg.input_scale, dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

        # Decoding writes one document into the cache: no segments there.
        segments = None
        if self.document_eos_id is not None and not self.decode_length:
            segments = segment_ids(tokens, self.document_eos_id)

        # Init and the per-op update path write the fp8 collection; only apply gets the views.
        pack_scales = not self.is_initializing() and not self.is_mutable_collection(FP8_COLLECTION)
        # Remat only matters for gradients; decoding never differentiates.
        remat = None if self.decode_length else REMAT_POLICIES[cfg.remat]
        collections = SCANNED_COLLECTIONS + ((CACHE_COLLECTION,) if self.decode_length else ())
        # A scanned layer saves its small float32 residuals as one array (packed_residuals.py),
        # where its recipe has such residuals and nothing rematerialises them anyway.
        pack_residuals = (
            pack_scales and cfg.scan_layers and not self.decode_length and remat is None
        )
        for segment in layer_segments(cfg, self.recipe):
            layer_args = (cfg, segment.recipe, self.kurtosis_form, self.decode_length)
            block = Block
            if pack_residuals and segment.recipe.packs_block_residuals:
                block = PackedResidualBlock
            if remat is not None:
                block = nn.remat(block, policy=remat, prevent_cse=False)
            if cfg.scan_layers:
                # The scan reads each layer's delayed-scaling scales as one packed array
                # (packed_scales.py): one cotangent write per layer instead of one per FP8 tensor.
                scanned_block = block
                if pack_scales:
                    scanned_block = nn.map_variables(block, FP8_COLLECTION, packed_scales.unpack)
                stack = nn.scan(
                    scanned_block,
                    variable_axes={c: 0 for c in collections},
                    # Each layer draws its own FP4 stochastic-rounding keys.
                    split_rngs={"params": True, FP4_RNG: True},
                    in_axes=(nn.broadcast, nn.broadcast),
                    length=segment.length,
                    metadata_params={nn.PARTITION_NAME: "layers"},
                )
                if pack_scales:
                    stack = nn.map_variables(stack, FP8_COLLECTION, packed_scales.pack)
                x, _ = stack(*layer_args, name=segment.name)(x, positions, segments)
            else:
                x, _ = block(*layer_args, name=segment.name)(x, positions, segments)

        if cfg.final_norm:
            x = RMSNorm(cfg.norm_eps, learnable=True, dtype=dtype, name="final_norm")(x)
        if cfg.tie_embeddings:
            head = embedding.T
        else:
            head = self.param(
                "lm_head",
                nn.with_logical_partitioning(
                    nn.initializers.normal(stddev=cfg.init_std), ("embed", "vocab")
                ),
                (cfg.d_model, cfg.vocab_size),
                jnp.float32,
            )
        x, head = x.astype(dtype), head.astype(dtype)
        if return_hidden:
            return nn.with_logical_constraint(x, ("batch", "length", "embed")), head
        # The LM head stays outside the recipe (docs/spec.md §3): BF16 GEMMs forward and backward,
        # float32 logits (bf16_dot.py says why the backward needs its own rule).
        logits = bf16_dot_general(x, head, (((2,), (0,)), ((), ())))
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


def segment_ids(tokens: Array, eos_id: int) -> Array:
    """int32 [B, T]: which document of its window each token belongs to, counted from 0.

    Every document ends with EOS, so a token's document is the number of EOS strictly before it:
    an EOS belongs to the document it ends, and the token after it starts the next.
    """
    is_eos = (tokens == eos_id).astype(jnp.int32)
    return jnp.cumsum(is_eos, axis=1) - is_eos


def weight_decay_mask(params: Any) -> Any:
    """True for matrices (every 'kernel', the embedding and the LM head), False for 1-D params.

    Decided by name, not ndim: nn.scan stacks 1-D gains into [L, D] arrays. Works on boxed
    (LogicallyPartitioned) trees too, where a leaf's path ends in the box's ``value`` attribute.
    """

    def is_matrix(path: tuple[Any, ...], _: Any) -> bool:
        names = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
        return bool(names) and names[-1] in ("kernel", "embedding", "lm_head")

    return jax.tree_util.tree_map_with_path(is_matrix, params)
