"""Under FSDP the scanned FP8 layers report their amaxes per device (scaling.amax_partials,
fogjax/model/packed_scales.py) and the step max-reduces them once per micro-batch, instead of
all-reducing each amax inside every layer.

The test compiles the step twice on one FSDP mesh, the per-device path and the path it replaces
(``scaling.partial_devices`` patched to 1: every amax a global max where it is measured), from
one state and batch:

- gradients, loss and the observed amaxes (the new FP8 state) are the same bits: only where the
  cross-device max runs moves, and a max is exact in any order;
- the layer loops of the old program all-reduce every amax of the layer as a scalar; the new
  one's loops all-reduce no amax scalar, and at most a few per-device vectors (in these tiny
  models the partitioner splits the FFN's hidden activation along its features, not its batch,
  so a device's rows of it span devices; the 8B step's loops have none, docs/speed.md).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import cudnn_fp8_emulation as emulation
from test_dp_accumulation import BATCH, assert_same, compiled_grads, cudnn_model_and_state, mesh_of

from fogjax import sharding
from fogjax.bench import hlo_module
from fogjax.precision import cudnn_attention, scaling

FSDP = (1, 4, 1)


def loop_amax_all_reduces(hlo_text: str) -> list[tuple[tuple[int, ...], ...]]:
    """The operand shapes of every all-reduce of amaxes (a cross-device max of reduce_max
    results) that runs inside a loop, i.e. more than once per step."""
    module = hlo_module.parse_module(hlo_text)
    runs = hlo_module.executions(module).runs
    found = []
    for name, insts in module.computations.items():
        for inst in insts:
            if not inst.opcode.startswith("all-reduce") or runs.get(name, 0) <= 1:
                continue
            if "reduce_max" in hlo_module.op_name(inst):
                found.append(tuple(shape for _, shape in inst.shapes))
    return found


def both_paths(monkeypatch, model, state, tokens, mesh):
    """(amaxes reduced where measured, per device) compiled grads of one step."""
    with sharding.sharding_context(mesh):
        assert scaling.partial_devices() == 4
    new = compiled_grads(model, state, tokens, mesh, 2, False)
    monkeypatch.setattr(scaling, "partial_devices", lambda: 1)
    old = compiled_grads(model, state, tokens, mesh, 2, False)
    return old, new


def assert_amaxes_left_the_layer_loops(old, new) -> None:
    old_reduces, new_reduces = loop_amax_all_reduces(old.hlo), loop_amax_all_reduces(new.hlo)
    assert any(() in shapes for shapes in old_reduces), old_reduces
    assert not any(() in shapes for shapes in new_reduces), new_reduces
    # Fewer amaxes reduced in the loops: the old program's every one, the new one's only those.
    assert sum(map(len, new_reduces)) < sum(map(len, old_reduces)) / 2


@pytest.mark.slow
def test_fsdp_per_device_amaxes_give_the_same_bits_and_leave_the_layer_loops(monkeypatch):
    """The tiny FOG-flash in fp8dpa with cuDNN FP8 attention (emulated kernels, bf16 compute):
    every per-device path in one step: the FP8 Linears' input, weight and gradient amaxes, the
    FFN activation's amax measured in its cast's pass, GeLU's backward amax, and the amaxes cuDNN's
    kernels measure, which leave its shard_maps split over the batch axes."""
    monkeypatch.setattr(
        cudnn_attention, "KERNEL", cudnn_attention.Kernel(emulation.forward, emulation.backward)
    )
    mesh = mesh_of(FSDP)
    model, state = cudnn_model_and_state("fp8dpa", mesh)
    tokens = np.random.default_rng(0).integers(0, 4096, (BATCH, 129), dtype=np.int32)
    old, new = both_paths(monkeypatch, model, state, tokens, mesh)
    assert_same(old, new, 0.0)
    assert_amaxes_left_the_layer_loops(old, new)
