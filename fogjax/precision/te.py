"""Transformer Engine (TE-JAX) adapter for the block linears (``precision.backend='te'``).

TE supplies the FP8 GEMMs of every block linear through ``te_flax.make_dot_general_cls(recipe)``,
a Linen module with ``lax.dot_general``'s calling convention that leaves the kernel parameter to
us. The recipe is ``DelayedScaling(fp8_format=HYBRID, amax_history_len, amax_compute_algo,
margin)`` from the config (paper: 1024, 'max', 0). TE keeps its amax histories and scales in
flax's ``_overwrite_with_gradient`` collection with the same overwrite-with-gradient contract as
fp8_dot.py; this adapter runs TE's module as a pure function of state it keeps in the ``fp8``
collection, so the train step and nn.scan see one FP8 state (DetachedDotGeneral).

TE-JAX has no FP8 QK^T / PV as a ``dot_general``, so FP8DPA under this backend keeps fp8_dot.py for
attention. This module imports ``transformer_engine`` lazily: importing it on a CPU-only machine is
fine, building a recipe with backend 'te' there fails with an error naming requirements-gpu.txt.

Verified on CPU only: the error path, and DetachedDotGeneral with flax's own
``Fp8DirectDotGeneralOp`` (same collection, same contract) standing in for TE's module. The TE calls
themselves follow TE 2.x's documented API and run only in the GPU-marked tests.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

from fogjax.precision.recipe import FP8_COLLECTION

GPU_REQUIREMENTS = "requirements-gpu.txt"


class TransformerEngineUnavailable(ValueError):
    """precision.backend='te' on a machine without Transformer Engine or without a CUDA GPU.

    A ValueError: the config asks for what this machine lacks, which every command line reports
    as bad input (exit 2, the message alone, no traceback)."""


def _fail(reason: str) -> TransformerEngineUnavailable:
    return TransformerEngineUnavailable(
        f"precision.backend='te' needs NVIDIA Transformer Engine and a CUDA GPU, but {reason}. "
        f"On a Hopper (or newer) GPU machine run `pip install -r {GPU_REQUIREMENTS}`; anywhere "
        "else use --config.precision.backend=xla (same FP8 recipe through XLA, CPU included)."
    )


def require_transformer_engine(devices: Any = None) -> tuple[Any, Any]:
    """Imports TE-JAX and checks for a CUDA GPU; returns ``(te_flax, te_recipe)`` modules.
    ``devices``: the devices the run compiles for (compile-only GPUs of fogjax.bench --target)
    instead of this machine's.

    Raises:
      TransformerEngineUnavailable: TE is not importable or JAX sees no GPU; the message names
        requirements-gpu.txt.
    """
    try:
        from transformer_engine.common import recipe as te_recipe
        from transformer_engine.jax import flax as te_flax
    except Exception as e:  # ImportError, or OSError from a TE build without its CUDA libraries.
        raise _fail(f"`import transformer_engine.jax` failed ({type(e).__name__}: {e})") from e
    try:
        gpus = [d for d in (jax.devices() if devices is None else devices) if d.platform == "gpu"]
    except RuntimeError:
        gpus = []
    if not gpus:
        raise _fail(f"JAX sees no GPU (devices: {jax.devices() if devices is None else devices})")
    return te_flax, te_recipe


def delayed_scaling(amax_history_len: int, amax_reduction: str, margin: float) -> Any:
    """TE's ``DelayedScaling`` recipe: hybrid formats (E4M3 forward, E5M2 gradients)."""
    _, te_recipe = require_transformer_engine()
    return te_recipe.DelayedScaling(
        margin=margin,
        fp8_format=te_recipe.Format.HYBRID,
        amax_history_len=amax_history_len,
        amax_compute_algo=amax_reduction,
    )


class DetachedDotGeneral(nn.Module):
    """Runs a foreign Linen ``dot_general`` module as a pure function, its state kept in ``fp8``.

    ``make_module()`` returns an UNBOUND module (``parent=None``) with ``lax.dot_general``'s calling
    convention and no ``params`` (TE's ``make_dot_general_cls`` instances, flax's FP8 ops). On
    first use its variables are initialised and stored whole as ``fp8/<path>/state``, keyed by the
    foreign collection name; every call applies the module to them. Because the foreign module is
    applied as a pure function of that state, nn.scan stacks it like ours, and the gradient with
    respect to it is whatever the foreign module defines (the new state, for TE and flax).
    """

    make_module: Callable[[], nn.Module]

    @nn.compact
    def __call__(
        self,
        lhs: jax.Array,
        rhs: jax.Array,
        dimension_numbers: Any,
        precision: Any = None,
        preferred_element_type: Any = None,
    ) -> jax.Array:
        module = self.make_module()

        def init_state() -> dict:
            # No parameters are created (the kernel is ours), so the key only satisfies init.
            variables = dict(module.init(jax.random.PRNGKey(0), lhs, rhs, dimension_numbers))
            if "params" in variables:
                raise ValueError(f"{type(module).__name__} creates params; it must not own them.")
            return variables

        state = self.variable(FP8_COLLECTION, "state", init_state)
        out = module.apply(state.value, lhs, rhs, dimension_numbers, precision=precision)
        return out.astype(preferred_element_type or lhs.dtype)


def te_dot_general(
    name: str, amax_history_len: int, amax_reduction: str, margin: float
) -> DetachedDotGeneral:
    """The ``dot_general`` of one block linear through Transformer Engine's FP8 GEMM.

    Its TE state (amax histories and scales, TE's names) sits at ``fp8/<path>/state/<TE
    collection>``. TE's dense GEMM takes no batch dimensions, which block linears never have.
    """
    te_flax, _ = require_transformer_engine()
    te_cls = te_flax.make_dot_general_cls(delayed_scaling(amax_history_len, amax_reduction, margin))
    return DetachedDotGeneral(make_module=functools.partial(te_cls, parent=None), name=name)
