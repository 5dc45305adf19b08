"""`python -m fogjax.info` for every architecture and size, and config errors."""

import json
import os
import subprocess
import sys
import types

import pytest
from absl import flags
from helpers import REPO_ROOT
from ml_collections import config_flags

from fogjax import config_lib
from fogjax.model import build_model
from fogjax.precision.recipe import Recipe

ROOT = str(REPO_ROOT)


def _check_info(info, arch, size):
    cfg = config_lib.get_config(arch, size)
    assert info["arch"] == arch
    assert info["layers"] == cfg.model.num_layers and info["d_model"] == cfg.model.d_model
    assert info["seq_len"] == cfg.train.seq_len
    # 6N + 12 L D T with N = matmul weights incl. the LM head (not the embedding lookup).
    n = info["params_matmul"]
    m = cfg.model
    assert info["flops_per_token"] == 6 * n + 12 * m.num_layers * m.d_model * cfg.train.seq_len
    if size == "1.5b":
        assert info["params_embedding"] == 2 * 131072 * 2048  # untied: embedding + head
    if size == "390m":
        assert info["params_embedding"] == 131072 * 1024  # tied


# The real command for every architecture and every size: architecture i at size i mod 4 (each
# process costs ~2 s of CPU to start, so not all 28 pairs; the test below covers those).
CLI_PAIRS = [
    (a, config_lib.SIZES[i % len(config_lib.SIZES)]) for i, a in enumerate(config_lib.ARCHS)
]


@pytest.mark.slow
def test_info_cli_every_arch_and_size():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    assert {s for _, s in CLI_PAIRS} == set(config_lib.SIZES)
    procs = {
        (arch, size): subprocess.Popen(
            [sys.executable, "-m", "fogjax.info", f"--config=configs/{arch}.py:{size}"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for arch, size in CLI_PAIRS
    }
    for (arch, size), proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        _check_info(json.loads(out), arch, size)


@pytest.mark.slow
def test_info_main_every_arch_and_size(monkeypatch, capsys):
    """The command's main for all 28 pairs in this process, with the config its --config flag
    builds from configs/{arch}.py:{size}: the report it prints checks out for each."""
    import fogjax.info

    for arch in config_lib.ARCHS:
        for size in config_lib.SIZES:
            fv = flags.FlagValues()
            argv = ["fogjax.info", f"--config={ROOT}/configs/{arch}.py:{size}"]
            config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv)
            fv(argv)
            monkeypatch.setattr(fogjax.info, "flags", types.SimpleNamespace(FLAGS=fv))
            fogjax.info.main(["fogjax.info"])
            _check_info(json.loads(capsys.readouterr().out), arch, size)


def test_info_counts_from_first_principles():
    from fogjax.accounting import model_info

    info = model_info(config_lib.get_config("llama3", "8b"))
    d, f, layers, v = 4096, 14336, 32, 131072
    per_layer = d * (32 * 128 + 2 * 8 * 128) + 32 * 128 * d + 3 * d * f
    assert info["params_matmul"] == layers * per_layer + v * d


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("num_heads", 3, "not divisible by model.num_heads"),
        ("num_kv_heads", 3, "not divisible by model.num_kv_heads"),
        ("arch", "gpt2", "unknown model.arch"),
        ("ffn_activation", "relu", "unknown model.ffn_activation"),
        ("qk_norm", "layernorm", "unknown model.qk_norm"),
        ("remat", "some", "unknown model.remat"),
        ("attention_impl", "flash", "unknown model.attention_impl"),
    ],
)
def test_bad_model_config_names_field(field, value, needle):
    cfg = config_lib.get_config("fog_flash", "tiny")
    # An unknown arch already fails when the fields derived from it are read (at relock).
    with pytest.raises(ValueError, match=needle):
        with cfg.unlocked():
            setattr(cfg.model, field, value)
        build_model(cfg, Recipe())


def test_odd_head_dim_rejected():
    cfg = config_lib.get_config("llama3", "tiny")
    with cfg.unlocked():
        cfg.model.d_model, cfg.model.num_heads, cfg.model.num_kv_heads = 246, 2, 1
    with pytest.raises(ValueError, match="odd"):
        build_model(cfg, Recipe())


def test_unknown_recipe_and_locked_config():
    from fogjax.precision.registry import make_recipe

    cfg = config_lib.get_config("fog_flash", "tiny")
    with cfg.unlocked():
        cfg.precision.recipe = "fp7"
    with pytest.raises(ValueError, match="Unknown precision.recipe='fp7'"):
        make_recipe(cfg.precision)
    with pytest.raises(AttributeError):
        cfg.model.heads = 4  # locked: a typo fails loudly
    with pytest.raises(ValueError, match="unknown model.arch='gpt2'"):
        config_lib.get_config("gpt2", "tiny")
    with pytest.raises(ValueError, match="Unknown size"):
        config_lib.get_config("fog_flash", "70b")


def test_info_from_known_params_equals_traced():
    from fogjax.accounting import model_info
    from fogjax.train import run as state_lib

    cfg = config_lib.get_config("fog_flash", "tiny")
    run = state_lib.build_run(cfg)
    assert model_info(cfg, run.abstract["params"]) == model_info(cfg)
