"""A bad ``bench --compare`` entry is one line naming the entry, the field and the fix (issue 21):
``model.num_layers=abc`` printed only "invalid literal for int() with base 10: 'abc'", and
``model=3`` an AttributeError traceback."""

from __future__ import annotations

import sys

import pytest
from helpers.cli import run

from fogjax.bench.entries import compare_entries


@pytest.mark.parametrize(
    "spec, needle",
    [
        (
            "llama3:bf16:model.num_layers=abc",
            "model.num_layers='abc' must be an integer (e.g. model",
        ),
        (
            "llama3:bf16:model.scan_layers=maybe",
            "model.scan_layers='maybe' must be true or false (e.g",
        ),
        ("llama3:bf16:model=3", "'model' is a config section, not a field; set one of its"),
        ("llama3:bf16:model.num_layers.x=3", "unknown config field 'model.num_layers.x'"),
        ("llama3:fp9", "unknown recipe 'fp9'; choose from"),
    ],
)
def test_bad_compare_entries_name_the_entry_and_the_field(spec, needle):
    with pytest.raises(ValueError) as e:
        compare_entries(spec, "tiny", {})
    message = str(e.value)
    assert message.startswith(f"--compare entry {spec!r}: ") and needle in message, message


@pytest.mark.slow
def test_the_bench_cli_prints_one_line_and_exits_2():
    spec = "llama3:bf16:model.num_layers=abc"
    out = run([sys.executable, "-m", "fogjax.bench", "--config=configs/fog_flash.py:tiny",
               f"--compare={spec}"], timeout=120)  # fmt: skip
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr == (
        f"ERROR: --compare entry {spec!r}: model.num_layers='abc' must be an integer (e.g. "
        "model.num_layers=4).\n"
    )
    assert "flags:" not in out.stdout  # No --help dump.
