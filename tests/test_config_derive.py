"""Derived config fields follow the fields they derive from, through the real --config flags.

Every expected value is docs/spec.md §1's formula computed here: post-norm / LayerScale gain
1/sqrt(L) (1 for OLMo2), softmax scale 1/sqrt(d_h) for the baselines and g/sqrt(d_h) for FOG with
the paper's frozen gain g = s * sqrt(128) (s = 0.17678 at 390M, 0.125 at 1.5B and 8B), FFN width F
gated or 3F/2 non-gated, and every architecture field from docs/spec.md's table.
"""

from __future__ import annotations

import math

import pytest
from absl import flags
from helpers import REPO_ROOT
from ml_collections import config_flags

from fogjax import config_lib

ROOT = str(REPO_ROOT)

# docs/spec.md §1's table, restated independently of fogjax.model.blocks.ARCHITECTURES.
SPEC_TABLE = {
    #                      pre_norm post_norm     qk_norm       ffn            u    final_norm
    "llama3": (True, "none", "none", "swiglu", 1.0, True),
    "llama3_smooth_swiglu": (True, "none", "none", "smooth_swiglu", 1.0, True),
    "olmo2": (False, "rms", "rms", "swiglu", 1.0, True),
    "op": (False, "layerscale", "rms", "gelu", 50.0, False),
    "fog_max": (False, "rms", "frozen_rms", "xielu", 50.0, False),
    "fog_opt": (False, "rms", "frozen_rms", "gelu", 50.0, False),
    "fog_flash": (False, "rms", "tanh", "gelu", 50.0, False),
}
PAPER_FOG_SCALE = {"tiny": 0.17678, "390m": 0.17678, "1.5b": 0.125, "8b": 0.125}
PAPER_F = {"tiny": 768, "390m": 4096, "1.5b": 8192, "8b": 14336}


def parse(*args: str):
    """The config exactly as ``python -m fogjax.train ARGS`` builds it."""
    fv = flags.FlagValues()
    argv = ["prog", *args]
    config_flags.DEFINE_config_file(
        "config", None, "", flag_values=fv, lock_config=True, sys_argv=argv
    )
    fv(argv)
    return fv.config


def spec_post_norm_init(arch: str, layers: int) -> float:
    return 1.0 if arch == "olmo2" else 1.0 / math.sqrt(layers)


def spec_softmax_scale(arch: str, size: str, head_dim: int) -> float:
    if arch.startswith("fog"):
        return PAPER_FOG_SCALE[size] * math.sqrt(128) / math.sqrt(head_dim)
    return 1.0 / math.sqrt(head_dim)


def assert_arch_fields(m, arch: str, size: str) -> None:
    pre, post, qk, ffn, u, final = SPEC_TABLE[arch]
    assert (m.pre_norm, m.post_norm, m.qk_norm, m.ffn_activation, m.final_norm) == (
        pre,
        post,
        qk,
        ffn,
        final,
    )
    assert m.input_scale == pytest.approx(u)
    gated = ffn in ("swiglu", "smooth_swiglu")
    assert m.ffn_dim == (PAPER_F[size] if gated else 3 * PAPER_F[size] // 2)
    assert m.post_norm_init == pytest.approx(spec_post_norm_init(arch, m.num_layers), rel=1e-12)
    head_dim = m.d_model // m.num_heads
    assert m.softmax_scale == pytest.approx(spec_softmax_scale(arch, size, head_dim), rel=1e-12)


@pytest.mark.parametrize("arch", sorted(SPEC_TABLE))
def test_every_architecture_and_size_matches_the_spec(arch):
    for size in config_lib.SIZES:
        assert_arch_fields(config_lib.get_config(arch, size).model, arch, size)


def test_overrides_of_layers_heads_and_width_rederive_through_the_flags():
    m = parse(
        f"--config={ROOT}/configs/fog_flash.py:1.5b",
        "--config.model.num_layers=8",
        "--config.model.num_heads=32",  # d_h 2048/32 = 64
    ).model
    assert m.post_norm_init == pytest.approx(1 / math.sqrt(8), rel=1e-12)
    assert m.softmax_scale == pytest.approx(0.125 * math.sqrt(128 / 64), rel=1e-12)
    assert_arch_fields(m, "fog_flash", "1.5b")
    m = parse(f"--config={ROOT}/configs/llama3.py:390m", "--config.model.d_model=2048").model
    assert m.softmax_scale == pytest.approx(1 / math.sqrt(2048 / 8), rel=1e-12)
    m = parse(f"--config={ROOT}/configs/olmo2.py:8b", "--config.model.num_layers=3").model
    assert m.post_norm_init == 1.0


@pytest.mark.parametrize("target", ["llama3", "olmo2", "fog_max"])
def test_changing_arch_builds_that_architecture(target):
    m = parse(f"--config={ROOT}/configs/fog_flash.py:tiny", f"--config.model.arch={target}").model
    assert_arch_fields(m, target, "tiny")
    assert m.to_dict() == config_lib.get_config(target, "tiny").model.to_dict()


def test_explicit_values_win_over_derivations():
    m = parse(
        f"--config={ROOT}/configs/fog_opt.py:tiny",
        "--config.model.softmax_scale=0.3",
        "--config.model.qk_norm=rms",
        "--config.model.arch=op",  # After the explicit fields: they still stand.
        "--config.model.num_heads=4",
    ).model
    assert (m.softmax_scale, m.qk_norm, m.post_norm) == (0.3, "rms", "layerscale")


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown model.arch='fog_fast'; choose one of"):
        config_lib.get_config("fog_fast", "tiny")
