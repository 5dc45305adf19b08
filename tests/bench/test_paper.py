"""fogjax.bench --paper: the paper's throughput table (docs/spec.md §5), estimated by one command.

The end-to-end run compiles the tiny stand-in (``--paper_scale=tiny``) deviceless for a GH200 on
this CPU: the driver, the aot compile, the estimate, the table and the JSON, for five rows (every
recipe, both sizes' meshes, every row with a paper figure at 1.5B). The other rows' configs are
checked without compiling; all ten compile in about 2.5 minutes on 2 cores (too long for CI).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO_ROOT

from fogjax.bench import aot, paper, targets
from fogjax.precision.cudnn_attention import require_cudnn_attention
from fogjax.train.preflight import validate_train_config

ENV = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
GH200 = targets.get_target("gh200")
# Llama3 BF16 of each size comes with them (the ratios' base): 5 rows.
E2E_ROWS = "1.5b:fog_flash:fp8dpa,1.5b:llama3_smooth_swiglu:fp8,8b:fog_flash:fp8dpa"


@pytest.mark.parametrize("scale", paper.SCALES)
def test_every_row_is_a_valid_cudnn_config_at_the_papers_work(scale):
    for row in paper.ROWS:
        work = paper.WORK[scale][row.size]
        c = paper.row_config(row, scale)
        validate_train_config(c, num_devices=work.gpus)
        assert (c.model.arch, c.precision.recipe) == (row.arch, row.recipe)
        assert c.model.attention_impl == "cudnn"
        head_dim = c.model.d_model // c.model.num_heads
        devices = targets.target_devices(GH200, work.gpus)
        require_cudnn_attention(
            row.recipe == "fp8dpa",
            head_dim,
            c.train.seq_len,
            target=aot.CompileTarget(devices, GH200.cudnn_version),
        )
        if scale == "full":  # docs/spec.md §2 and §5
            t = c.train
            assert t.seq_len == 4096 and c.model.d_model == {"1.5b": 2048, "8b": 4096}[row.size]
            assert t.batch_size // work.gpus == {"1.5b": 64, "8b": 16}[row.size]
            per_micro = t.batch_size // t.micro_batches // work.gpus
            common = {"1.5b": 4, "8b": 2}[row.size]  # 8B: the largest that fits both recipes
            assert per_micro == common * row.micro_batch_scale


def test_paper_rows_selects_and_keeps_the_baseline():
    assert paper.select_rows(None) == paper.ROWS
    picked = paper.select_rows(E2E_ROWS)
    assert [r.key for r in picked] == [
        "1.5b:llama3:bf16",
        "1.5b:fog_flash:fp8dpa",
        "1.5b:llama3_smooth_swiglu:fp8",
        "8b:llama3:bf16",
        "8b:fog_flash:fp8dpa",
    ]
    assert {r.size for r in paper.select_rows("8b")} == {"8b"}
    with pytest.raises(ValueError, match="unknown '8b:fog_flash:fp8'"):
        paper.select_rows("8b:fog_flash:fp8")


def test_larger_micro_batch_rows_keep_the_work_and_are_never_the_baseline():
    larger = [r for r in paper.ROWS if r.micro_batch_scale > 1]
    assert {r.key for r in larger} == {"8b:llama3:bf16:mb2x", "8b:fog_flash:fp8dpa:mb2x"}
    for row in larger:
        common = next(r for r in paper.ROWS if r.key == row.key.rsplit(":", 1)[0])
        for scale in paper.SCALES:
            a, b = paper.row_config(row, scale).train, paper.row_config(common, scale).train
            assert a.batch_size == b.batch_size  # the same sequences per GPU per step
            assert a.micro_batches * row.micro_batch_scale == b.micro_batches
    assert [r.key for r in paper.select_rows("8b:fog_flash:fp8dpa:mb2x")] == [
        "8b:llama3:bf16",
        "8b:fog_flash:fp8dpa:mb2x",
    ]


def test_ratios_are_to_llama3_bf16_of_the_same_size():
    def row(size, arch, recipe, est, measured):
        r = dict.fromkeys(paper.PAPER_FIELDS)
        r.update(size=size, arch=arch, recipe=recipe, estimated_tokens_per_sec_per_gpu=est)
        r.update(paper_tokens_per_sec_per_gpu=measured)
        return r

    rows = paper.with_ratios(
        [
            row("1.5b", "llama3", "bf16", 100.0, 40),
            row("1.5b", "fog_flash", "fp8dpa", 120.0, 50),
            row("1.5b", "fog_opt", "fp8dpa", None, None),  # a failed row without a paper figure
            row("8b", "llama3", "bf16", 10.0, 8),
            row("8b", "fog_flash", "fp8dpa", 15.0, None),
            {**row("8b", "llama3", "bf16", 5.0, None), "micro_batch_scale": 2},  # not the base
        ]
    )
    assert [r["estimated_ratio"] for r in rows] == [1.0, 1.2, None, 1.0, 1.5, 0.5]
    assert [r["paper_ratio"] for r in rows] == [1.0, 1.25, None, 1.0, None, None]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper") / "paper.json"
    cmd = [sys.executable, "-m", "fogjax.bench", "--paper", "--target=gh200"]
    cmd += ["--paper_scale=tiny", f"--paper_rows={E2E_ROWS}", f"--output={out}"]
    proc = subprocess.run(
        cmd, cwd=str(REPO_ROOT), env=ENV, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow
def test_paper_table_end_to_end_on_the_tiny_stand_in(cli_run):
    report, stdout = cli_run
    rows = report["rows"]
    assert [r["label"] for r in rows] == [r.label for r in paper.select_rows(E2E_ROWS)]
    for key in ("command", "git_sha", "versions", "target", "work", "rows"):
        assert report[key], key
    assert report["benchmark"] == "paper" and report["scale"] == "tiny"
    assert "--paper" in report["command"] and report["target"]["name"] == "gh200"
    assert report["target"]["gpus"] == {"1.5b": 4, "8b": 8}
    assert report["work"]["8b"]["mesh"] == {"data": 1, "fsdp": 8}

    # Progress per row, then the Markdown table with every column.
    assert "compiling row 1/5: 1.5B Llama3 BF16" in stdout and "done in" in stdout
    assert "| " + " | ".join(paper.HEADER) + " |" in stdout

    for r in rows:
        assert set(r) == set(paper.PAPER_FIELDS)
        assert r["status"] == "ok", r["error"]
        assert r["estimated_tokens_per_sec_per_gpu"] > 0 and r["kernels_per_step"] > 0
        assert r["fits"] and 0 < r["memory_gib"] < r["usable_gib"]
        assert r["config"]["attention_impl"] == "cudnn" and r["aot"]["triton_gemm"] is False
        # The split is the whole estimated step; each share is a time.
        assert sum(r["split_s"].values()) == pytest.approx(r["estimated_step_s"])
        assert min(r["split_s"].values()) >= 0 and r["split_s"]["gemm"] > 0
        assert r["split_s"]["attention"] > 0 and r["split_s"]["collective"] > 0  # DP / FSDP
        # The paper's figures beside ours, and ratios consistent with the tokens/s.
        assert r["paper_tokens_per_sec_per_gpu"] == paper_figure(r)
        (base,) = [b for b in rows if b["size"] == r["size"] and b["recipe"] == "bf16"]
        ours = r["estimated_tokens_per_sec_per_gpu"] / base["estimated_tokens_per_sec_per_gpu"]
        assert r["estimated_ratio"] == pytest.approx(ours)
        theirs = r["paper_tokens_per_sec_per_gpu"] / base["paper_tokens_per_sec_per_gpu"]
        assert r["paper_ratio"] == pytest.approx(theirs)
        # FP8 rows: every block GEMM FP8 in cuBLASLt (the aot checks); BF16: none at all.
        if r["recipe"] == "bf16":
            assert r["aot"]["gemm_counts"]["fp8_total"] == 0 and r["fp8_gemms_in_block"] == 0
            assert r["cudnn_fp8_attention_calls"] == 0
        else:
            assert r["fp8_gemms_in_block"] > 0 and r["aot"]["non_fp8_block_gemms"] == []
            assert r["aot"]["gemm_counts"]["fp8_cublas"] == r["fp8_gemms_in_block"]
            assert r["non_fp8_gemms_in_block"] == 0 and not r["warnings"]
        fp8_attention = r["recipe"] == "fp8dpa"
        assert (r["cudnn_fp8_attention_calls"] > 0) is fp8_attention
        assert r["cudnn_attention_calls"] > 0
    paper_row = {(r["size"], r["model"]): r for r in rows}
    assert paper_row[("1.5b", "FOG-flash")]["paper_ratio"] == pytest.approx(54_848 / 46_470)
    assert paper_row[("8b", "FOG-flash")]["paper_ratio"] == pytest.approx(12_764 / 9_105)


def paper_figure(r):
    key = (r["size"], r["arch"], r["recipe"], r["micro_batch_scale"])
    (row,) = [p for p in paper.ROWS if (p.size, p.arch, p.recipe, p.micro_batch_scale) == key]
    return row.paper_tokens_per_sec_per_gpu
