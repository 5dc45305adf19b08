"""Precision recipes: which `dot_general` each GEMM inside a transformer block gets.

A recipe is the single hook between the model and number formats. The model asks it for two things,
always from inside a Linen ``@nn.compact`` method (so that a returned Module binds to the caller):

- ``recipe.linear_dot_general(name)``: the ``dot_general`` of a block linear layer (fused QKV,
  attention output, FFN in, FFN out). Called like ``lax.dot_general(x, kernel, dimension_numbers)``.
- ``recipe.attention_dot_general(name)``: the ``dot_general`` of attention's QK^T or PV product.
- ``recipe.fused_fp8_attention(name)``: the whole FP8 attention as one fused cuDNN kernel, for
  ``model.attention_impl='cudnn'`` under a recipe that quantises attention.

Both return either a plain function or a Linen Module whose ``__call__`` has ``lax.dot_general``'s
signature. FP8 modules keep their delayed-scaling state in the ``fp8`` variable collection
(current-scaling ones keep none). ``recipe.check_attention_impl(impl)`` refuses, at start-up, a
``model.attention_impl`` the recipe cannot run. The embedding and LM head never go through a
recipe: they stay in the compute dtype (docs/spec.md §3).

This module is the interface only; of fogjax it imports only bf16_dot (a leaf). registry.py maps
recipe names (``bf16``, ``fp8``, ``fp8dpa``, ``fp8_current``, ``fp8dpa_current``, ``nvfp4``,
``mxfp4``) to factories and builds one from the config's ``precision`` section
(``registry.make_recipe``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fogjax.precision.bf16_dot import low_precision_dot_general

DotGeneral = Callable[..., jax.Array]

# The variable collection that holds FP8 scaling state (amax histories and scales).
FP8_COLLECTION = "fp8"
# The block weights already in E4M3, made once per optimizer step by the train step
# (weight_quantization.py) and read by each FP8 linear instead of casting its kernel again in every
# micro-batch; absent outside training (the dots then quantise their kernel themselves).
FP8_WEIGHTS_COLLECTION = "fp8_weights"
# The collection that FP8 dots sow their forward-operand statistics (saturation and flush-to-zero
# fractions) into, on statistics steps only (when it is mutable).
FP8_STATS_COLLECTION = "fp8_stats"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A precision recipe. Subclasses override the two hooks; this base is plain ``compute_dtype``.

    Attributes:
      name: registry name, e.g. ``bf16``.
      compute_dtype: dtype of activations and of non-FP8 GEMM inputs (parameters stay float32).
    """

    name: str = "bf16"
    compute_dtype: Any = jnp.bfloat16

    @property
    def quantizes_linears(self) -> bool:
        return False

    @property
    def quantizes_attention(self) -> bool:
        return False

    @property
    def runs_fp8_linear_gemms(self) -> bool:
        """The block linears run as FP8 GEMMs on the device (what the deviceless bench checks).
        False for FP4, whose quantise-dequantise emulation runs BF16 GEMMs by design."""
        return self.quantizes_linears

    @property
    def amax_update_rule(self) -> tuple[str, float] | None:
        """``(amax_reduction, margin)`` of the delayed-scaling states this recipe's ops keep in the
        ``fp8`` collection (the train step updates them all with it, bulk_scaling.py); None when
        it keeps none."""
        return None

    @property
    def quantizes_rows_locally(self) -> bool:
        """A device computing on its own rows of the batch quantises them exactly as the whole
        batch would (the train step may then accumulate each data replica's gradients locally):
        true of plain compute-dtype GEMMs; recipes whose casts depend on batch-wide amaxes or
        draw random numbers of the batch's shape say False."""
        return True

    @property
    def takes_lhs_amax(self) -> bool:
        """Its block linears accept ``lhs_amax=`` (max|input| measured by the caller, in the pass
        that makes the input; fused_amax.py), so the FFN passes its activation's amax."""
        return False

    @property
    def packs_block_residuals(self) -> bool:
        """Under the layer scan, its blocks save their small float32 residuals (per-tensor scales
        and amaxes) as one array per layer (fogjax/model/packed_residuals.py). For recipes whose
        ops save a few scalars each; such a block must draw no random numbers."""
        return False

    def layer_recipes(self, num_layers: int) -> tuple[tuple[Recipe, int], ...]:
        """The recipe of each run of consecutive blocks, in order: ``((recipe, count), ...)`` with
        counts summing to ``num_layers``. This one recipe for every block, unless a subclass keeps
        some blocks in higher precision (fp4_recipes: ``precision.high_precision_layers``)."""
        return ((self, num_layers),)

    def linear_dot_general(self, name: str) -> DotGeneral:
        """The dot_general of a block linear; ``name`` names its FP8 state if it has any."""
        del name
        return functools.partial(jax.lax.dot_general, preferred_element_type=self.compute_dtype)

    def attention_dot_general(self, name: str) -> DotGeneral:
        """The dot_general of QK^T (``name='qk'``) or PV (``name='pv'``): BF16 GEMMs forward and
        backward (bf16_dot.low_precision_dot_general)."""
        del name
        return low_precision_dot_general

    def check_attention_impl(self, attention_impl: str) -> None:
        """Raises ValueError, naming the fix, where this recipe cannot run ``model.attention_impl``
        (whatever the machine: the GPU checks are cudnn_attention.require_cudnn_attention's)."""
        del attention_impl

    def fused_fp8_attention(self, name: str) -> Callable[..., jax.Array]:
        """The fused FP8 attention of ``model.attention_impl='cudnn'`` when ``quantizes_attention``:
        ``f(q [B,T,G,R,H], k [B,S,G,H], v, scale) -> [B,T,G,R,H]``; its state is named ``name``."""
        raise NotImplementedError(f"recipe {self.name!r} does not quantise attention")


def dtype_from_name(name: str) -> Any:
    try:
        return {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}[name]
    except KeyError:
        raise ValueError(
            f"precision.compute_dtype={name!r} is not supported; use 'bfloat16', 'float32' or "
            "'float16'."
        ) from None
