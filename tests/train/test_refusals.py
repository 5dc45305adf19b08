"""Bad input to the trainer is one clean line naming the field or file and the fix, exit 2, and
nothing is written (issue 21): a seed out of range, the TE backend on a machine without it, a
size given to configs/default.py."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from helpers.cli import run, train_cmd

from fogjax import config_lib
from fogjax.train import preflight


def assert_clean_refusal(out, workdir, *needles):
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.startswith("ERROR: ") and out.stderr.count("\n") == 1, out.stderr[-3000:]
    for needle in needles:
        assert needle in out.stderr, (needle, out.stderr)
    assert not workdir.exists()  # Not even the folder: nothing written, no lock.


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_seed_out_of_range_is_refused_naming_the_field(seed):
    """-1 failed deep in grain ("expected non-negative integer", after creating checkpoints/);
    2**32 silently trained seed 0's run (jax keeps the low 32 bits)."""
    config = config_lib.get_config("fog_flash", "tiny")
    config.seed = seed
    with pytest.raises(ValueError, match=rf"seed={seed} must be in \[0, 2\*\*32\).*--config.seed"):
        preflight.validate_train_config(config)
    config.seed = 2**32 - 1
    preflight.validate_train_config(config)


@pytest.mark.slow
def test_te_backend_without_transformer_engine_is_one_line(tmp_path):
    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("Transformer Engine is installed here")
    workdir = tmp_path / "te"
    out = run(train_cmd(workdir, "--config.precision.backend=te"), timeout=120)
    assert_clean_refusal(
        out,
        workdir,
        "precision.backend='te' needs NVIDIA Transformer Engine",
        "pip install -r requirements-gpu.txt",
        "--config.precision.backend=xla",
    )


@pytest.mark.slow
def test_a_size_given_to_the_default_config_is_refused(tmp_path):
    """configs/default.py:1.5b silently trained the 5.2M tiny model before."""
    workdir = tmp_path / "default"
    out = run(
        [sys.executable, "-m", "fogjax.train", "--config=configs/default.py:1.5b",
         f"--workdir={workdir}"], timeout=120,
    )  # fmt: skip
    assert_clean_refusal(
        out, workdir, "configs/default.py takes no size (got '1.5b')", "configs/fog_flash.py:1.5b"
    )
