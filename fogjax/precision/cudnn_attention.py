"""FP8DPA on cuDNN: JAX's binding of cuDNN's fused FP8 flash attention, with our delayed scaling.

JAX carries cuDNN's FP8 fused attention only privately (``jax._src.cudnn.fused_attention_stablehlo``
): a forward and a backward primitive that take E4M3 Q, K, V (and dO) with per-tensor scale factors,
return E4M3 results, and report the amaxes cuDNN measured on the way. This module wraps the pair in
one custom VJP whose inputs are compute-dtype q, k, v and the delayed-scaling states (scaling.py) of
ten tensors:

  ======  =========================================  ====================  ===============
  tensor  what it is                                 quantised by          amax from
  ======  =========================================  ====================  ===============
  q k v   attention inputs                           us (E4M3)             us
  p       softmax probabilities (the PV operand)      cuDNN (scale_s)       cuDNN (amax_s)
  o       attention output                           cuDNN (scale_o)       cuDNN (amax_o)
  do      output gradient                            us (E4M3)             us
  dp      logit gradient (the dQ/dK GEMM operand)     cuDNN (scale_dP)      cuDNN (amax_dP)
  dq dk   input gradients                            cuDNN (scale_dQ, ..)  cuDNN (amax_dQ, ..)
  dv
  ======  =========================================  ====================  ===============

cuDNN's convention: ``scale_x`` multiplies a tensor into FP8 and ``descale_x`` multiplies it back
out, so scale = 1 / scale_inv and descale = scale_inv in fogjax's terms; the amaxes it returns are
of the unscaled tensors. As with fp8_dot.py, each state's "gradient" is the amax its tensor had
(scaling.observation); the train step max-combines them over micro-batches and updates every
state once per optimizer step (bulk_scaling.py).

Formats: JAX's binding gives every backward tensor the dtype of Q, so under this implementation
dO, dP, dQ, dK and dV are E4M3 (max 448) rather than E5M2 as in the XLA einsum path. Delayed scaling
sets their range; E4M3's narrower exponent makes the FIRST step (scale 1, nothing seen yet) flush
most attention gradients to zero, after which the recorded amaxes take over.

Sharding: the primitives' partitioning rules hand back each shard's own amax as if it were
replicated. Both kernels therefore run inside ``shard_map`` (batch over 'data'/'fsdp', key/value
groups over 'tensor') and the amaxes are reduced with ``lax.pmax`` over the whole mesh, so every
device keeps the same state; except inside the scanned layers under FSDP, where the states carry
per-device stand-ins (scaling.ScalingState.partials, packed_scales.py): there the amaxes leave
the kernels split over the batch axes, one row per device, and are reduced once per micro-batch.

Constraints (cuDNN FP8 training kernels): Hopper or newer, cuDNN >= 9.1, head dim 128, sequence
lengths that are multiples of 128. :func:`require_cudnn_fp8_attention` refuses anything else at
start-up with the fix (``model.attention_impl='xla'``). On CPU nothing here can compile; the tests
swap :data:`KERNEL` for an emulation of cuDNN's arithmetic and lower the real primitives for CUDA
to check the wiring.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from fogjax import sharding
from fogjax.precision import scaling
from fogjax.precision.formats import E4M3
from fogjax.precision.fp8_dot import sow_operand_stats
from fogjax.precision.scaling import ScalingState

FORWARD_TENSORS = ("q", "k", "v", "p", "o")
BACKWARD_TENSORS = ("do", "dp", "dq", "dk", "dv")
TENSORS = FORWARD_TENSORS + BACKWARD_TENSORS

HEAD_DIM = 128  # cuDNN's FP8 training kernels: head dim exactly 128 ...
SEQ_MULTIPLE = 128  # ... and sequence lengths that are multiples of 128.
MIN_CUDNN_VERSION = 90100  # 9.1.0, the first with FP8 flash attention backward.
MIN_COMPUTE_CAPABILITY = (9, 0)  # Hopper.


class Kernel(NamedTuple):
    """The two FP8 attention kernels, in cuDNN's calling convention (BTNH layout, causal).

    ``forward(q8, k8, v8, descale_q, descale_k, descale_v, descale_s, scale_s, scale_o, *, scale)``
      -> ``(o8, amax_s, amax_o, softmax_stats)``: o8 like q8; amaxes float32 [1, 1, 1, 1];
      softmax_stats float32 [B, N, T] (whatever the backward kernel wants back).
    ``backward(q8, k8, v8, o8, do8, softmax_stats, descale_q, descale_k, descale_v, descale_o,
      descale_dO, descale_s, descale_dP, scale_s, scale_dQ, scale_dK, scale_dV, scale_dP, *,
      scale)``
      -> ``(dq8, dk8, dv8, amax_dQ, amax_dK, amax_dV, amax_dP)``.

    Every factor is float32 [1, 1, 1, 1]; ``scale`` is the softmax scale (a Python float).
    """

    forward: Callable[..., tuple[jax.Array, ...]]
    backward: Callable[..., tuple[jax.Array, ...]]


def _fused_attention_module() -> Any:
    from jax._src.cudnn import fused_attention_stablehlo  # Private: JAX has no public FP8 binding.

    return fused_attention_stablehlo


def _cudnn_forward(q8, k8, v8, *factors, scale):
    fa = _fused_attention_module()
    return tuple(
        fa._dot_product_attention_fp8_fwd_p.bind(
            q8,
            k8,
            v8,
            *factors,
            scale=scale,
            use_causal_mask=True,
            layout=fa.AttentionLayout.BTNH.value,
            is_training=True,
        )
    )


def _cudnn_backward(q8, k8, v8, o8, do8, stats, *factors, scale):
    fa = _fused_attention_module()
    return tuple(
        fa._dot_product_attention_fp8_bwd_p.bind(
            q8,
            k8,
            v8,
            o8,
            do8,
            stats,
            *factors,
            scale=scale,
            use_causal_mask=True,
            layout=fa.AttentionLayout.BTNH.value,
        )
    )


CUDNN_KERNEL = Kernel(_cudnn_forward, _cudnn_backward)
# The kernel pair the attention runs; tests substitute an emulation (CPU cannot run cuDNN).
KERNEL = CUDNN_KERNEL


def _descale(state: ScalingState) -> jax.Array:
    return jnp.reshape(state.scale_inv, (1, 1, 1, 1)).astype(jnp.float32)


def _scale(state: ScalingState) -> jax.Array:
    return 1.0 / _descale(state)


def _mesh_specs(
    mesh: Any, batch: int, kv_heads: int, devices: int = 1
) -> tuple[P, tuple[str, ...], tuple[str, ...]] | None:
    """The shard_map spec of a [B, T, N, H] operand, the mesh axes to reduce amaxes over, and the
    batch axes the amaxes stay split over instead (when the states want ``devices`` > 1 rows and
    the batch is split over exactly that many); None when no multi-device axis is left to
    partition (the kernels then run on the arrays as given).

    Axes that an enclosing ``shard_map`` holds Manual are neither split nor reduced over here:
    inside the train step's per-replica accumulation (manual over 'data'), each replica's amaxes
    are max-reduced over 'data' once per step with every other observation (train/step.py), not
    in every layer of every micro-batch.
    """
    axes = sharding.partitioned_axes(mesh)
    if not axes:
        return None
    batch_axes = sharding.split_batch_axes(mesh, batch)
    spec = P(
        batch_axes or None,
        None,
        sharding.split_axis(mesh, sharding.mesh_axis_of("heads"), kv_heads),
        None,
    )
    keep = batch_axes if batch_axes and sharding.batch_devices(mesh) == devices > 1 else ()
    return spec, tuple(a for a in axes if a not in keep), keep


def _pmax(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    return lax.pmax(x, axes) if axes else x


def _run_forward(q8, k8, v8, factors, scale, specs):
    call = functools.partial(KERNEL.forward, scale=scale)
    if specs is None:
        return call(q8, k8, v8, *factors)
    spec, axes, keep = specs
    stats_spec = P(spec[0], spec[2], None)  # [B, N, T]
    amax_spec = P(keep or None)  # [1, 1, 1, 1] per device: [D, 1, 1, 1] when kept split

    def local(q8, k8, v8, *factors):
        o8, amax_s, amax_o, stats = call(q8, k8, v8, *factors)
        return o8, _pmax(amax_s, axes), _pmax(amax_o, axes), stats

    return jax.shard_map(
        local,
        in_specs=(spec, spec, spec) + (P(),) * len(factors),
        out_specs=(spec, amax_spec, amax_spec, stats_spec),
        check_vma=False,
    )(q8, k8, v8, *factors)


def _run_backward(q8, k8, v8, o8, do8, stats, factors, scale, specs):
    call = functools.partial(KERNEL.backward, scale=scale)
    if specs is None:
        return call(q8, k8, v8, o8, do8, stats, *factors)
    spec, axes, keep = specs
    stats_spec = P(spec[0], spec[2], None)

    def local(q8, k8, v8, o8, do8, stats, *factors):
        dq8, dk8, dv8, *amaxes = call(q8, k8, v8, o8, do8, stats, *factors)
        return (dq8, dk8, dv8, *(_pmax(a, axes) for a in amaxes))

    return jax.shard_map(
        local,
        in_specs=(spec,) * 5 + (stats_spec,) + (P(),) * len(factors),
        out_specs=(spec,) * 3 + (P(keep or None),) * 4,
        check_vma=False,
    )(q8, k8, v8, o8, do8, stats, *factors)


def cudnn_fp8_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    states: dict[str, ScalingState],
    scale: float,
    amax_reduction: str = "max",
    margin: float = 0,
) -> tuple[jax.Array, jax.Array]:
    """Causal softmax(scale * q.k) v with every GEMM on E4M3 operands, in cuDNN's fused kernel.

    Args:
      q: [B, T, N, H]; k, v: [B, S, G, H] with N a multiple of G (query head n uses group
        n // (N / G)); the compute dtype (bf16).
      states: the delayed-scaling state of every tensor in :data:`TENSORS`.
      scale: the softmax scale.
      amax_reduction, margin: the scale update rule (scaling.py).
    Returns:
      ``(out, o8)``: [B, T, N, H] in q's dtype, and cuDNN's E4M3 output itself (``out`` is
      ``o8 * states['o'].scale_inv``), for an out-projection that reads it without a BF16 round
      trip (``Fp8DotGeneral(lhs_fp8=...)``). Under ``jax.grad`` q, k, v get their gradients (from
      ``out``'s cotangent; ``o8`` takes none) and every state the observation
      ``ScalingState(None, amax [1])`` of its tensor.
    """
    mesh = jax.sharding.get_abstract_mesh()
    partials = states["q"].partials
    devices = 1 if partials is None else partials.shape[0]
    specs = _mesh_specs(mesh, q.shape[0], k.shape[2], devices)
    return _attention(q, k, v, states, float(scale), amax_reduction, float(margin), specs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _attention(q, k, v, states, scale, reduction, margin, specs):
    return _fwd(q, k, v, states, scale, reduction, margin, specs)[0]


def _fwd(q, k, v, states, scale, reduction, margin, specs):
    q8, k8, v8 = (
        scaling.quantize(x, states[n].scale_inv, E4M3, clip_in_float32=True)
        for n, x in (("q", q), ("k", k), ("v", v))
    )
    factors = (
        _descale(states["q"]),
        _descale(states["k"]),
        _descale(states["v"]),
        _descale(states["p"]),
        _scale(states["p"]),
        _scale(states["o"]),
    )
    o8, amax_p, amax_o, stats = _run_forward(q8, k8, v8, factors, scale, specs)
    out = scaling.dequantize(o8, states["o"].scale_inv, q.dtype)
    scales = [states[n].scale_inv for n in TENSORS]
    form = states["q"].partials
    # In FORWARD_TENSORS order: scalars, or [D, 1] per device (scaling.ScalingState.partials).
    seen = [scaling.measure(x, form) for x in (q, k, v)]
    seen += [_kernel_amax(a, form) for a in (amax_p, amax_o)]
    if form is not None:
        # Kept apart from the replicated scales: ([10], [D, 5]).
        return (out, o8), (q8, k8, v8, o8, stats, (jnp.concatenate(scales), jnp.hstack(seen)))
    # The scales and the forward's amaxes travel to the backward as ONE float32 [15] (a stacked
    # residual per layer and micro-batch: one write, not fifteen), the [H] histories not at all.
    scalars = jnp.concatenate(scales + [jnp.reshape(a, (1,)) for a in seen])
    return (out, o8), (q8, k8, v8, o8, stats, scalars)


def _kernel_amax(amax: jax.Array, form: jax.Array | None) -> jax.Array:
    """An amax the kernels returned ([1, 1, 1, 1], or [D, 1, 1, 1] kept split over the devices)
    in ``form``'s form (scaling.measure): a scalar, or [D, 1] per device."""
    if form is None:
        return scaling.amax(amax)
    return scaling.conform(jnp.reshape(amax, (-1, 1)), form)


def _bwd(scale, reduction, margin, specs, residuals, cotangents):
    del reduction, margin  # The step applies the rule (bulk_scaling.py); kept for the signature.
    g, _ = cotangents  # o8's: zeros (its readers take it without a gradient).
    q8, k8, v8, o8, stats, scalars = residuals
    form = None
    if isinstance(scalars, tuple):  # per-device amaxes: ([10] scales, [D, 5] amaxes)
        scalars, forward_amaxes = scalars
        form = forward_amaxes[:, :1]
    else:
        forward_amaxes = scalars[len(TENSORS) :]
    states = {n: ScalingState(None, scalars[i : i + 1]) for i, n in enumerate(TENSORS)}
    do8 = scaling.quantize(g, states["do"].scale_inv, E4M3)
    factors = (
        _descale(states["q"]),
        _descale(states["k"]),
        _descale(states["v"]),
        _descale(states["o"]),
        _descale(states["do"]),
        _descale(states["p"]),
        _descale(states["dp"]),
        _scale(states["p"]),
        _scale(states["dq"]),
        _scale(states["dk"]),
        _scale(states["dv"]),
        _scale(states["dp"]),
    )
    dq8, dk8, dv8, amax_dq, amax_dk, amax_dv, amax_dp = _run_backward(
        q8, k8, v8, o8, do8, stats, factors, scale, specs
    )
    grads = tuple(
        scaling.dequantize(x8, states[n].scale_inv, g.dtype)
        for n, x8 in (("dq", dq8), ("dk", dk8), ("dv", dv8))
    )
    kernel_amaxes = {"dp": amax_dp, "dq": amax_dq, "dk": amax_dk, "dv": amax_dv}
    seen = {"do": scaling.seen_as(scaling.measure(g, form))}
    seen.update({n: scaling.seen_as(_kernel_amax(a, form)) for n, a in kernel_amaxes.items()})
    for i, n in enumerate(FORWARD_TENSORS):  # [1] each, or [D, 1]
        seen[n] = scaling.seen_as(forward_amaxes[..., i : i + 1])
    return (*grads, {n: seen[n] for n in TENSORS})


_attention.defvjp(_fwd, _bwd)


class CudnnFp8Attention(nn.Module):
    """Causal GQA attention in cuDNN's fused FP8 kernel, with delayed per-tensor scaling.

    Variables (collection ``fp8``, float32): ``<t>_amax_history`` [H] and ``<t>_scale_inv`` [1] for
    every ``t`` in :data:`TENSORS`; stacked [L, ...] under nn.scan. When ``fp8_stats`` is mutable,
    sows the saturation/underflow fractions of q, k and v (the operands quantised outside cuDNN).
    """

    amax_history_len: int = 1024
    amax_reduction: str = "max"
    margin: float = 0

    @nn.compact
    def __call__(
        self, q: jax.Array, k: jax.Array, v: jax.Array, scale: float, fp8_output: bool = False
    ) -> Any:
        """q [B, T, G, R, H], k and v [B, S, G, H] (compute dtype) -> [B, T, G, R, H]; with
        ``fp8_output`` also ``(o8, scale_inv)``: the E4M3 output (same shape) and its float32 [1]
        scale_inv, for an out-projection that reads FP8 across the attention boundary."""
        b, t, g, r, d = q.shape
        states = {n: scaling.declare_state(self, n, self.amax_history_len) for n in TENSORS}
        sow_operand_stats(self, {n: (x, states[n]) for n, x in (("q", q), ("k", k), ("v", v))})
        out, o8 = cudnn_fp8_attention(
            q.reshape(b, t, g * r, d), k, v, states, scale, self.amax_reduction, self.margin
        )
        out = out.reshape(b, t, g, r, d)
        if not fp8_output:
            return out
        return out, (o8.reshape(b, t, g, r, d), states["o"].scale_inv)


class CudnnAttentionUnavailable(ValueError):
    """model.attention_impl='cudnn' asked for where cuDNN's fused attention cannot run."""


def _gpu_problem(fp8: bool, target: Any = None) -> str | None:
    """Why cuDNN (FP8) attention cannot run here, or None if it can. With ``target`` (a compile
    target of fogjax.bench: ``devices`` and ``cudnn_version``), its GPUs are checked, not this
    machine's."""
    if target is not None:
        gpus = [d for d in target.devices if d.platform == "gpu"]
    else:
        try:
            gpus = [d for d in jax.devices() if d.platform == "gpu"]
        except RuntimeError:
            gpus = []
    if not gpus:
        return f"JAX sees no GPU (backend: {jax.default_backend()})"
    if fp8:
        capability = getattr(gpus[0], "compute_capability", "0.0")
        if tuple(int(x) for x in str(capability).split(".")[:2]) < MIN_COMPUTE_CAPABILITY:
            return (
                f"{gpus[0].device_kind} has compute capability {capability}; FP8 attention "
                "needs Hopper (9.0) or newer"
            )
    if target is not None:
        major, minor, patch = target.cudnn_version
        version = major * 10000 + minor * 100 + patch
    else:
        try:
            version = _fused_attention_module().check_cudnn_version()
        except RuntimeError as e:
            return f"cuDNN is not available to JAX ({e})"
    if fp8 and version < MIN_CUDNN_VERSION:
        return f"cuDNN {version} is older than 9.1.0, the first with FP8 attention backward"
    return None


def require_cudnn_attention(fp8: bool, head_dim: int, seq_len: int, target: Any = None) -> None:
    """Fails at start-up, saying why and what to use instead, where model.attention_impl='cudnn'
    cannot run: FP8 (``fp8dpa``) needs head dim 128, ``seq_len`` % 128 == 0, a Hopper GPU and cuDNN
    >= 9.1; BF16 needs a GPU with cuDNN. ``target``: the GPUs compiled for instead of this
    machine's (see :func:`_gpu_problem`).

    Raises:
      CudnnAttentionUnavailable (a ValueError).
    """
    what = "FP8 attention (precision.recipe='fp8dpa')" if fp8 else "attention"
    problems = []
    if fp8 and head_dim != HEAD_DIM:
        problems.append(f"the head dim d_model/num_heads is {head_dim}, cuDNN FP8 needs 128")
    if fp8 and seq_len % SEQ_MULTIPLE:
        problems.append(f"train.seq_len={seq_len} is not a multiple of {SEQ_MULTIPLE}")
    if not problems:
        gpu = _gpu_problem(fp8, target)
        problems += [gpu] if gpu else []
    if problems:
        raise CudnnAttentionUnavailable(
            f"model.attention_impl='cudnn' cannot run {what} here: {'; '.join(problems)}. Use "
            "--config.model.attention_impl=xla (the einsum path: FP8 QK^T and PV under fp8dpa, "
            "runs on every backend) or change the shapes."
        )
