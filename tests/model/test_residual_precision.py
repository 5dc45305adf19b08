"""The backward pass saves activations in the precision they carry (bf16), not float32 upcasts.

Norms, LayerScale, the QK regulariser and the FFN activations compute in float32 on bf16 inputs;
autodiff would keep the float32 upcast of each input for the backward, one per layer, stacked by
the layer scan. ``fogjax.model.layers.recompute_in_backward`` keeps the bf16 input instead and
recomputes. What float32 may remain: XLA attention's softmax probabilities (the softmax runs in
float32 by the spec; the cuDNN path saves none of them), RoPE's sin / cos, and values one wide
along the last axis (per-token norm or SmoothSwiGLU statistics, per-layer scalars): 1/D of an
activation.
"""

from __future__ import annotations

import contextlib
import io
import re

import jax
import jax.numpy as jnp
import pytest
from jax.ad_checkpoint import print_saved_residuals

from fogjax import config_lib
from fogjax.model import build_model
from fogjax.model.blocks import ARCHITECTURES

T = 24  # a sequence length equal to no model dimension


def float32_residuals(arch: str, recipe: str) -> list[tuple[int, ...]]:
    """Shapes of the float32 values autodiff saves for the loss's backward (parameters and RoPE's
    sin / cos excluded), for a 2-layer tiny ``arch``."""
    c = config_lib.get_config(arch, "tiny")
    c.model.num_layers = 2
    c.precision.recipe = recipe
    model = build_model(c)
    tokens = jnp.zeros((2, T), jnp.int32)
    # Shapes only: the residuals are read off the traced backward, which no value changes (an
    # eager init would compile for ~8 s per architecture on 2 cores).
    variables = jax.eval_shape(model.init, jax.random.key(0), tokens)

    def loss(params):
        return model.apply({**variables, "params": params}, tokens).mean()

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(loss, variables["params"])
    shapes = []
    for line in out.getvalue().splitlines():
        match = re.match(r"f32\[([\d,]*)\]", line)
        if not match or "from the argument" in line or "apply_rope" in line:
            continue
        shapes.append(tuple(int(d) for d in match.group(1).split(",") if d))
    return shapes


def is_attention_softmax(shape: tuple[int, ...]) -> bool:
    """XLA attention's probabilities [..., T, R, T]."""
    return len(shape) >= 3 and shape[-1] == T


def is_one_wide(shape: tuple[int, ...]) -> bool:
    """Scalars per layer [L] or statistics one wide along the last axis [..., 1]."""
    return len(shape) <= 1 or shape[-1] == 1


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_no_float32_copy_of_an_activation_is_saved(arch):
    shapes = float32_residuals(arch, "bf16")
    activations = [s for s in shapes if not (is_attention_softmax(s) or is_one_wide(s))]
    assert not activations, activations
    assert any(is_attention_softmax(s) for s in shapes)  # the filter sees the residuals at all
