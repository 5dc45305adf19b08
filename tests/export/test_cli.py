"""``python -m fogjax.export`` and ``train.init_from`` as a user runs them: an export of a trained
run with its tokenizer, a fresh run initialised from it, and the errors (exit 2, the fix named,
nothing written)."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

pytest.importorskip("transformers", reason="needs requirements-export.txt (transformers)")

from helpers.cli import run  # noqa: E402

from fogjax.export.layout import flatten  # noqa: E402
from fogjax.inference.load import load_run  # noqa: E402

pytestmark = pytest.mark.slow  # module fixtures train or run commands


def export_cmd(workdir, output, *extra):
    return [sys.executable, "-m", "fogjax.export", f"--workdir={workdir}", f"--output={output}",
            *extra]  # fmt: skip


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cli") / "hf")
    result = run(export_cmd(trained_run, out, "--step=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_export_writes_the_checkpoint_and_the_byte_tokenizer(exported, trained_run):
    want = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "modeling_fog.py", "configuration_fog.py"}  # fmt: skip
    assert want <= set(os.listdir(exported))
    with open(os.path.join(exported, "config.json")) as f:
        config = json.load(f)
    assert config["model_type"] == "fog" and config["eos_token_id"] == config["bos_token_id"] == 256
    assert config["vocab_size"] == 300 and config["max_position_embeddings"] == 32
    with open(os.path.join(exported, "fogjax_export.json")) as f:
        info = json.load(f)
    assert info["step"] == 2 and info["tokenizer_vocab_size"] == 257
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exported, trust_remote_code=True)
    text = "déf f(x):\n  return x"
    assert tok(text).input_ids == list(text.encode()) and tok.eos_token_id == 256
    assert tok.decode(list(text.encode())) == text


def test_a_fresh_run_starts_from_the_export(exported, trained_run, tmp_path):
    from helpers.export import trained_config

    from fogjax.train import loop

    config = trained_config()
    config.train.steps, config.train.init_from = 2, exported
    # A learning rate too small to move a float32 parameter: the run's checkpoint then holds the
    # parameters it started from, which must be the exported step-2 ones, not a random init.
    config.optim.peak_lr, config.optim.min_lr = 1e-12, 0.0
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["train"]["init_from"] == exported
    started = flatten(load_run(workdir).state["params"])
    source = flatten(load_run(trained_run, 2).state["params"])
    assert started.keys() == source.keys()
    for path in source:
        np.testing.assert_allclose(started[path], source[path], rtol=1e-6, atol=1e-9)
    random_init = flatten(load_run(trained_run, 4).state["params"])
    assert not np.allclose(started[("embedding",)], random_init[("embedding",)])


@pytest.mark.slow
def test_errors_exit_2_name_the_fix_and_write_nothing(exported, trained_run, tmp_path):
    out = str(tmp_path / "out")
    result = run(export_cmd(trained_run, out, "--step=7"))
    assert result.returncode == 2 and "No checkpoint step 7" in result.stderr
    assert "holds steps [2, 4]" in result.stderr and not os.path.exists(out)

    empty = tmp_path / "empty"
    empty.mkdir()
    result = run(export_cmd(str(empty), out))
    assert result.returncode == 2 and "config.json not found" in result.stderr
    assert "written by python -m fogjax.train" in result.stderr and not os.path.exists(out)

    before = {f: os.path.getmtime(os.path.join(exported, f)) for f in os.listdir(exported)}
    result = run(export_cmd(trained_run, exported))  # exists and is not empty
    assert result.returncode == 2 and "choose a new directory" in result.stderr
    after = {f: os.path.getmtime(os.path.join(exported, f)) for f in os.listdir(exported)}
    assert after == before

    fresh = str(tmp_path / "fresh")
    cmd = [sys.executable, "-m", "fogjax.train", f"--workdir={fresh}",
           "--config=configs/default.py", "--config.data.path=embedded:bytes",
           "--config.model.vocab_size=300", "--config.model.num_layers=2",
           "--config.model.d_model=128",
           f"--config.train.init_from={exported}"]  # fmt: skip
    result = run(cmd)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "hidden_size=64 in config.json but model.d_model gives 128" in result.stderr
    assert not os.path.exists(fresh)
