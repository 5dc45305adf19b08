"""Block weights cast to E4M3 once per optimizer step, not once per layer call per micro-batch.

Every FP8 linear multiplies ``q4(kernel)`` (its kernel in the compute dtype, divided by the
delayed ``rhs`` scale, cast to E4M3). Within one optimizer step neither the kernel nor that scale
changes, yet inside the micro-batch loop each micro-batch would read the float32 kernel, reduce its
amax and cast it again (three passes over every block weight, per micro-batch). The train step
instead calls :func:`quantize_kernels` once, before the loop: one vectorised cast and amax over
each stacked [L, ...] kernel. The E4M3 kernels travel to the dots in the ``fp8_weights`` collection
(fp8_dot.Fp8DotGeneral reads them), and the amaxes join the observations the bulk update applies
(bulk_scaling.py), exactly where the dots would have reported them: the numbers are bit-identical.

Both layouts: a GEMM on FP8 operands needs each operand's contracted axes innermost (cuBLASLt's
FP8 kernels take only the "TN" layout). The Linear's kernel ``[in..., out...]`` has them innermost
for the backward's data gradient (contracting ``out``) but not for the forward (contracting
``in``), so XLA transposed the E4M3 kernel once per layer and micro-batch (under FSDP, after
every all-gather). Given the model's ``contracting_axes``, the step makes both layouts once per
step, as matrices: ``rhs`` = the E4M3 kernel as ``[in, out]`` (``in`` = the product of the
contracted axes; the same bytes as the kernel) and ``rhs_t`` = ``[out, in]``. The backward reads
``rhs``, the forward ``rhs_t``; each dot reshapes its copy back (fp8_dot.py; free). Matrices so
that FSDP can shard each copy along its rows, which the gather then returns outermost, as GPU
collectives need, and the GEMM reads as is (sharding.gathered_axis_major). One more byte per block
parameter, one transpose per step instead of one per GEMM per layer per micro-batch.

Which kernels: every ``kernel`` whose Linear has an FP8 dot with a delayed ``rhs`` state
(``<linear>/dot/rhs_scale_inv`` beside ``<linear>/kernel``), except those the model multiplies by
something before the GEMM (``model.kernel_is_gemm_operand(path)`` False: per-channel SmoothSwiGLU's
FFN out-projection, whose rows are scaled per batch); those keep quantising in their dot.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
from flax import traverse_util

from fogjax import sharding
from fogjax.precision import scaling
from fogjax.precision.formats import E4M3

Path = tuple[str, ...]
DOT = "dot"
RHS_SCALE_INV = "rhs_scale_inv"
RHS = "rhs"
RHS_T = "rhs_t"


def quantize_kernels(
    params: Any,
    fp8: Any,
    compute_dtype: Any,
    is_gemm_operand: Callable[[Path], bool] = lambda path: True,
    contracting_axes: Callable[[Path], int] | None = None,
) -> tuple[Any, dict[Path, Any]]:
    """``(fp8_weights, rhs_amaxes)`` for one optimizer step.

    Args:
      params: the model's parameters (float32 or a 16-bit master); stacked [L, ...] under nn.scan.
      fp8: the ``fp8`` collection (delayed-scaling states).
      compute_dtype: the dtype the Linear casts its kernel to before the dot (bf16).
      is_gemm_operand: ``path of the Linear -> bool``; False for a Linear that scales its kernel
        before the GEMM (skipped).
      contracting_axes: ``path of the Linear -> how many leading kernel axes its GEMM
        contracts``, or None for no transposed copies.
    Returns:
      ``fp8_weights``: nested like ``fp8``, ``<linear>/dot/rhs`` = the E4M3 kernel ([L, ...]);
      with ``contracting_axes``, ``rhs`` = it as ``[L, in, out]`` matrices and ``rhs_t`` =
      ``[L, out, in]``, each under FSDP sharded along its rows (sharding.gathered_axis_major);
      ``rhs_amaxes``: ``{path of <linear>/dot/rhs_scale_inv: amax float32 [..., 1]}``, the max of
      each layer's kernel in the compute dtype (what the dot would have observed).
    """
    flat_params = traverse_util.flatten_dict(dict(params)) if params else {}
    flat_fp8 = traverse_util.flatten_dict(dict(fp8)) if fp8 else {}
    weights: dict[Path, Any] = {}
    amaxes: dict[Path, Any] = {}
    for path, scale_inv in flat_fp8.items():
        if path[-2:] != (DOT, RHS_SCALE_INV):
            continue
        linear = path[:-2]
        kernel = flat_params.get(linear + ("kernel",))
        if kernel is None or not is_gemm_operand(linear):
            continue
        x = jnp.asarray(kernel).astype(compute_dtype)
        lead = scale_inv.ndim - 1  # stacked layer axes ([L] under nn.scan), before the [1]
        per_layer = scale_inv.reshape(scale_inv.shape[:lead] + (1,) * (x.ndim - lead))
        # scaling.quantize's arithmetic (divide in the compute dtype, saturating cast), per layer.
        q = scaling.quantize_per_row(x, per_layer, E4M3)
        if contracting_axes is None:
            weights[linear + (DOT, RHS)] = q
        else:
            n_in = lead + contracting_axes(linear)
            matrix = (math.prod(x.shape[lead:n_in]), math.prod(x.shape[n_in:]))
            q = q.reshape(x.shape[:lead] + matrix)
            # Each copy sharded along its rows, which its GEMM does not contract (under FSDP;
            # ``outer`` is the kernel axis the rows start with, none for a split that leaves no
            # output axis, which the dot refuses with the hook's name).
            weights[linear + (DOT, RHS)] = sharding.gathered_axis_major(q, lead, x.shape[lead])
            q_t = jnp.swapaxes(q, -1, -2)
            outer = x.shape[n_in] if n_in < x.ndim else 1
            weights[linear + (DOT, RHS_T)] = sharding.gathered_axis_major(q_t, lead, outer)
        axes = tuple(range(lead, x.ndim))
        amaxes[path] = jnp.max(jnp.abs(x), axis=axes).astype(jnp.float32)[..., None]
    return (traverse_util.unflatten_dict(weights) if weights else {}), amaxes
