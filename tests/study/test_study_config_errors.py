"""A study config that is wrong fails before any run, naming the file and the fix (issue 21): one
that raises while it loads (NameError, a bad argument) and a misspelt top-level field, which was
silently ignored (``c.stres = ...``: the study ran without its stress)."""

from __future__ import annotations

import pytest

from fogjax.study import __main__ as study_main
from fogjax.study.spec import build_study

GOOD = """
import ml_collections

def get_config(arg=""):
    c = ml_collections.ConfigDict()
    c.size = "tiny"
    c.steps = int(arg) if arg else 4
    c.stress = {{"optim": {{"peak_lr": 1e-2, "warmup_steps": 1, "cooldown_steps": 1}}}}
    c.runs = [{{"name": "a", "arch": "llama3", "recipe": "bf16", "overrides": {{}}}}]
    {extra}
    return c
"""


def study_file(tmp_path, extra=""):
    path = tmp_path / "study.py"
    path.write_text(GOOD.format(extra=extra))
    return str(path)


def fails_cleanly(capsys, tmp_path, source):
    """Runs the CLI on ``source``; returns its one-line error (exit 2, no run folder)."""
    out_dir = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        study_main.main([f"--config={source}", f"--workdir={out_dir}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and not out_dir.exists(), err
    assert err.startswith("ERROR: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_study_config_that_raises_at_load_names_the_file_the_line_and_the_error(tmp_path, capsys):
    good = study_file(tmp_path)
    assert build_study(good).runs[0].config.optim.peak_lr == 1e-2  # The file itself is fine.
    bad = study_file(tmp_path, extra="c.common = undefined_name")
    err = fails_cleanly(capsys, tmp_path, bad)
    assert f"Study config {bad} raised NameError at line 10" in err, err
    assert "name 'undefined_name' is not defined" in err and "Fix the file" in err
    # An argument its get_config cannot take: the ValueError names the file too.
    err = fails_cleanly(capsys, tmp_path, f"{good}:many")
    assert f"Study config {good} raised ValueError at line 7" in err, err
    assert "invalid literal for int()" in err


def test_a_misspelt_top_level_field_is_refused_naming_the_known_ones(tmp_path, capsys):
    source = study_file(tmp_path, extra='c.stres = {"optim": {"peak_lr": 1.0}}')
    err = fails_cleanly(capsys, tmp_path, source)
    assert f"Study {source}: unknown field(s) 'stres' (did you mean 'stress'?)" in err, err
    assert "name, size, steps, stress, common, reference, runs" in err
