"""fogjax.bench and fogjax.hlo_stats: the CLI end to end on CPU, the GPU-side HLO counters on
synthetic HLO, the jaxpr counter, and (GPU only) the cuBLASLt FP8 GEMM count of a real step."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from helpers import REPO_ROOT
from jax import lax

from fogjax import config_lib
from fogjax.bench import attention as bench_attention
from fogjax.bench import entries as bench_entries
from fogjax.bench import hlo_stats
from fogjax.bench import measure as bench

ROOT = str(REPO_ROOT)
# One CPU device for the CLI run (this test process has 8 fake devices).
ENV = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}

# Per scanned block body: 4 FP8 linears (fused QKV, attention out, FFN in, FFN out), each with a
# forward E4M3 x E4M3 GEMM and two backward E5M2 x E4M3 GEMMs (data and weight gradient);
# fp8dpa adds QK^T and PV, 3 GEMMs each.
E4M3, E5M2 = "float8_e4m3fn", "float8_e5m2"
# Both backward GEMMs of every dot read the E5M2 gradient first: at these tiny shapes (32 tokens)
# the out-projections' gradients do not tile for the cast-transpose kernel, and keep the flax
# transposes (precision/cast_transpose.py; tests/precision/test_cast_transpose.py covers the other).
EXPECTED_FP8 = {
    "bf16": {},
    "fp8": {f"{E4M3} x {E4M3}": 4, f"{E5M2} x {E4M3}": 8},
    "fp8dpa": {f"{E4M3} x {E4M3}": 6, f"{E5M2} x {E4M3}": 12},
}

# Small enough that the three compilations dominate (about 15 s on 2 CPU cores).
TINY = [
    "--config=configs/fog_flash.py:tiny",
    "--config.model.num_layers=2",
    "--config.model.d_model=128",
    "--config.model.num_heads=1",
    "--config.model.ffn_dim=256",
    "--config.model.vocab_size=512",
    "--config.train.batch_size=2",
    "--config.train.seq_len=16",
]


@pytest.mark.slow
def test_cli_benchmarks_every_recipe_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "fogjax.bench", *TINY, "--recipes=bf16,fp8,fp8dpa"]
    cmd += ["--steps=2", "--warmup=1", f"--output={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fog_flash:fp8dpa" in proc.stdout and f"Wrote {out}" in proc.stdout

    report = json.loads(out.read_text())
    for key in ("command", "date", "git_sha", "versions", "devices", "config", "rows"):
        assert key in report
    assert "--recipes=bf16,fp8,fp8dpa" in report["command"]
    assert report["versions"]["jax"] == jax.__version__
    assert report["devices"]["platform"] == "cpu" and report["devices"]["count"] == 1
    assert report["config"]["num_layers"] == 2 and report["config"]["seq_len"] == 16
    assert report["config"]["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}

    rows = report["rows"]
    assert [r["recipe"] for r in rows] == ["bf16", "fp8", "fp8dpa"]
    for row in rows:
        assert set(row) == set(bench.ROW_FIELDS)
        assert row["status"] == "ok" and row["error"] is None
        assert row["step_ms"] > 0 and row["compile_s"] > 0 and len(row["step_times_ms"]) == 2
        assert row["tokens_per_sec"] == pytest.approx(2 * 16 / (row["step_ms"] / 1e3))
        assert row["tokens_per_sec_per_device"] == row["tokens_per_sec"]
        assert row["tflops_per_device"] > 0
        assert row["mfu"] is None and row["mfu_fp8_peak"] is None  # no peak for a CPU
        assert row["peak_memory_bytes"] is None  # CPU reports no allocator stats
        assert row["compiled_memory_bytes"] > 0
        expected = EXPECTED_FP8[row["recipe"]]
        assert row["fp8_dot_generals_by_dtype"] == expected
        assert row["fp8_dot_generals"] == row["fp8_dots_hlo"] == sum(expected.values())
        # CPU: XLA converts FP8 operands to f32 before the dot, and there is no cuBLASLt.
        assert row["fp8_dots_left_in_optimized_hlo"] == 0
        assert row["fp8_gemm_custom_calls"] == row["cudnn_attention_calls"] == 0
    assert rows[0]["speedup_vs_first"] == 1.0
    assert rows[2]["speedup_vs_first"] == pytest.approx(
        rows[2]["tokens_per_sec"] / rows[0]["tokens_per_sec"]
    )


def test_compare_entries_share_size_and_overrides():
    overrides = {"model.num_layers": 2, "train.seq_len": 16}
    size = bench_entries.size_of_config_arg("configs/fog_flash.py:tiny")
    llama, fog = bench_entries.compare_entries("llama3:bf16, fog_flash:fp8dpa", size, overrides)
    assert (llama.label, fog.label) == ("llama3:bf16", "fog_flash:fp8dpa")
    assert llama.config.precision.recipe == "bf16" and fog.config.precision.recipe == "fp8dpa"
    for entry in (llama, fog):
        assert entry.config.model.num_layers == 2 and entry.config.train.seq_len == 16
    assert llama.config.model.ffn_activation == "swiglu"
    assert fog.config.model.ffn_activation == "gelu"
    assert bench_entries.size_of_config_arg("configs/llama3.py") == "tiny"
    for spec, message in (
        ("llama3", "arch:recipe"),
        ("gpt2:bf16", "gpt2"),
        ("llama3:int4", "int4"),
    ):
        with pytest.raises(ValueError, match=message):
            bench_entries.compare_entries(spec, "tiny", {})
    with pytest.raises(ValueError, match="SIZE"):
        bench_entries.size_of_config_arg("configs/fog_flash.py:huge")


def test_compare_entries_take_their_own_overrides():
    spec = "llama3:bf16:model.attention_impl=cudnn:model.scan_layers=false,fog_flash:fp8dpa"
    llama, fog = bench_entries.compare_entries(spec, "tiny", {"model.num_layers": 2})
    assert llama.config.model.attention_impl == "cudnn" and llama.config.model.scan_layers is False
    assert fog.config.model.attention_impl == "xla" and fog.config.model.scan_layers is True
    assert llama.config.model.num_layers == fog.config.model.num_layers == 2
    with pytest.raises(ValueError, match="unknown config field 'model.heads'"):
        bench_entries.compare_entries("llama3:bf16:model.heads=4", "tiny", {})
    with pytest.raises(ValueError, match="field=value"):
        bench_entries.compare_entries("llama3:bf16:cudnn", "tiny", {})


def test_recipe_entries_copy_the_config():
    config = config_lib.get_config("fog_flash", "tiny")
    entries = bench_entries.recipe_entries(config, ["bf16", "fp8"])
    assert [e.label for e in entries] == ["fog_flash:bf16", "fog_flash:fp8"]
    assert config.precision.recipe == "fp8dpa"  # the original is untouched
    with pytest.raises(ValueError, match="fp9"):
        bench_entries.recipe_entries(config, ["fp9"])


def test_failing_entry_becomes_an_error_row():
    config = config_lib.get_config("fog_flash", "tiny")
    config.precision.backend = "te"  # no Transformer Engine on CPU: fails while building the run
    (entry,) = bench_entries.recipe_entries(config, ["fp8"])
    row = bench.bench_entry(entry, steps=1, warmup=0)
    assert row["status"] == "error" and "TransformerEngine" in row["error"]
    assert row["num_params"] > 0 and row["step_ms"] is None  # measured fields up to the failure
    table = bench.format_table([row])
    assert "error" in table and "fog_flash:fp8: TransformerEngine" in table


# --- hlo_stats on synthetic GPU HLO --------------------------------------------------------------

GPU_HLO = """\
HloModule jit_train_step, entry_computation_layout={(f8e4m3fn[16,32]{1,0})->bf16[16,16]{1,0}}

%body (p: (s32[], f8e4m3fn[16,32])) -> (s32[], f8e4m3fn[16,32]) {
  %p = (s32[], f8e4m3fn[16,32]{1,0}) parameter(0)
  %x = f8e4m3fn[16,32]{1,0} get-tuple-element(%p), index=1
  %g = f8e5m2[16,32]{1,0} parameter(1)
  %s = f32[] constant(1)
  %cublas-gemm.7 = (bf16[16,16]{1,0}, s8[33554432]{0}) custom-call(%g, %x, %s, %s), custom_call_target="__cublas$lt$matmul$f8", backend_config={"gemm_backend_config":{"alpha_real":1,"beta":0}}
  ROOT %t = (s32[], f8e4m3fn[16,32]{1,0}) tuple(%i, %x)
}

ENTRY %main (a: f8e4m3fn[16,32], b: f8e4m3fn[16,32]) -> bf16[16,16] {
  %a = f8e4m3fn[16,32]{1,0} parameter(0)
  %b = f8e4m3fn[16,32]{1,0} parameter(1)
  %c1 = f32[] constant(1)
  %cublas-gemm.1 = (bf16[16,16]{1,0}, s8[33554432]{0}) custom-call(%a, %b, %c1, %c1, %c1, /*index=5*/%c1), custom_call_target="__cublas$lt$matmul$f8", metadata={op_name="jit(step)/dot_general"}
  gemm.2 = (f32[16,16]{1,0}, s8[67108864]{0}) custom-call(a, b, c1, c1),
    custom_call_target="__cublas$lt$matmul$f8",
    backend_config={
      "gemm_backend_config":{"alpha_real":1,"beta":0}
    }
  %bf = bf16[16,32]{1,0} parameter(2)
  %cublas-gemm.3 = (bf16[16,16]{1,0}, s8[4194304]{0}) custom-call(%bf, %bf), custom_call_target="__cublas$lt$matmul"
  %q = bf16[1,128,2,128]{3,2,1,0} parameter(3)
  %fmha.1 = (bf16[1,2,128,128]{3,2,1,0}, f32[1,2,128]{2,1,0}, u8[0]{0}) custom-call(%q, %q, %q), custom_call_target="__cudnn$fmhaSoftmax"
  %fmha.2 = (bf16[1,2,128,128]{3,2,1,0}, u8[0]{0}) custom-call(%q, %q, %q), custom_call_target="__cudnn$fmhaSoftmaxBackward"
  %q8 = f8e4m3fn[1,128,2,128]{3,2,1,0} parameter(4)
  %fmha.3 = (f8e4m3fn[1,2,128,128]{3,2,1,0}, f32[1,1,1,1]{3,2,1,0}, u8[0]{0}) custom-call(%q8, %q8, %q8, %c1), custom_call_target="__cudnn$fmhaSoftmaxF8"
  %fmha.4 = (f8e5m2[1,2,128,128]{3,2,1,0}, u8[0]{0}) custom-call(%q8, %q8, %q8), custom_call_target="__cudnn$fmhaSoftmaxBackwardF8"
  %fmha.5 = (bf16[1,2,128,128]{3,2,1,0}, u8[0]{0}) custom-call(%q8, %q8, %q8), custom_call_target="__cudnn$fmhaFutureVariant"
  ROOT %out = bf16[16,16]{1,0} get-tuple-element(%cublas-gemm.1), index=0
}
"""  # noqa: E501  (HLO prints one instruction per line)


def test_gpu_custom_call_counters_on_synthetic_hlo():
    # One per-line jax-style call inside a while body, one in ENTRY, one written over 4 lines;
    # the plain BF16 cuBLASLt call does not count.
    assert hlo_stats.count_fp8_gemm_custom_calls(GPU_HLO) == 3
    assert hlo_stats.custom_call_counts(GPU_HLO)["__cublas$lt$matmul"] == 1
    assert hlo_stats.count_cudnn_attention_calls(GPU_HLO) == 5
    # The two ...F8 targets, and a target of another name whose operands are FP8.
    assert hlo_stats.count_cudnn_fp8_attention_calls(GPU_HLO) == 3
    assert hlo_stats.count_fp8_dots(GPU_HLO) == 0
    assert hlo_stats.count_fp8_gemm_custom_calls("HloModule empty\n") == 0


DOTS_HLO = """\
HloModule m

%other (x: f8e4m3fn[4,4], w: bf16[4,4]) -> bf16[4,4] {
  %x = bf16[4,4]{1,0} parameter(0)
  %w = bf16[4,4]{1,0} parameter(1)
  ROOT %d = bf16[4,4]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY main.1 {
  x = f8e4m3fn[4,4]{1,0} parameter(0)
  w = f8e5m2[4,4]{1,0} parameter(1)
  d1 = bf16[4,4]{1,0} dot(x, w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  d2 = f32[4,4]{1,0} dot(f8e4m3fn[4,4]{1,0} %x, bf16[4,4]{1,0} %b), lhs_contracting_dims={1}
  c1 = f32[1,4,4,1]{3,2,1,0} convolution(f8e4m3fn[1,4,4,1]{3,2,1,0} %i, f8e4m3fn[1,1,1,1]{3,2,1,0} %k), window={size=1x1}, dim_labels=b01f_01io->b01f
  b = bf16[4,4]{1,0} parameter(2)
  ROOT d3 = bf16[4,4]{1,0} dot(b, b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
"""  # noqa: E501


def test_count_fp8_dots_resolves_operand_types_per_computation():
    # d1 (names resolved), d2 (types inline), the convolution; not d3, nor %d in %other, whose
    # %x is bf16 there although ENTRY's x is f8.
    assert hlo_stats.count_fp8_dots(DOTS_HLO) == 3
    d1 = next(i for i in hlo_stats.instructions(DOTS_HLO) if i.name == "d1")
    assert d1.operand_dtypes == ("f8e4m3fn", "f8e5m2") and d1.dtype == "bf16"


def _f8_dot(x, w):
    dims = (((1,), (0,)), ((), ()))
    return lax.dot_general(
        x.astype(jnp.float8_e4m3fn), w.astype(jnp.float8_e5m2), dims, preferred_element_type=x.dtype
    )


def test_count_fp8_dots_cpu_before_and_after_optimization():
    x = jnp.ones((8, 16), jnp.float32)
    w = jnp.ones((16, 8), jnp.float32)
    lowered = jax.jit(_f8_dot).lower(x, w)
    assert hlo_stats.count_fp8_dots(lowered.as_text(dialect="hlo")) == 1
    # XLA CPU emulates: f8 -> f32 converts, then an f32 dot. Hence the jaxpr-level counter.
    assert hlo_stats.count_fp8_dots(lowered.compile().as_text()) == 0


def test_count_fp8_dot_generals_walks_scan_remat_cond_and_jit():
    e4, e5 = "float8_e4m3fn", "float8_e5m2"

    def body(carry, w):
        y = jax.checkpoint(_f8_dot)(carry, w)
        y = lax.cond(y.sum() > 0, lambda v: _f8_dot(v, w), lambda v: v, y)
        both = lax.dot_general(
            y.astype(jnp.float8_e5m2), w.astype(jnp.float8_e4m3fn), (((1,), (0,)), ((), ()))
        )
        return jax.jit(lambda a, b: a @ b)(y, w) + both.astype(y.dtype), None

    def f(x, ws):
        return lax.scan(body, x, ws)[0]

    x = jnp.ones((4, 4), jnp.float32)
    ws = jnp.ones((3, 4, 4), jnp.float32)
    counts = hlo_stats.count_fp8_dot_generals(jax.make_jaxpr(f)(x, ws))
    # The scan body counts once for its 3 iterations; the plain f32 matmul not at all.
    assert counts == {(e4, e5): 2, (e5, e4): 1}
    # An open Jaxpr works too, and a jaxpr without FP8 gives {}.
    assert hlo_stats.count_fp8_dot_generals(jax.make_jaxpr(f)(x, ws).jaxpr) == counts
    assert hlo_stats.count_fp8_dot_generals(jax.make_jaxpr(jnp.dot)(x, x)) == {}


# --- GPU --------------------------------------------------------------------------------------


def _tiny_gpu_config(recipe: str):
    config = config_lib.get_config("fog_flash", "tiny")
    config.precision.recipe = recipe
    config.model.num_layers = 2
    config.train.batch_size = 2 * jax.device_count()
    config.train.seq_len = 128  # cuBLASLt FP8 wants GEMM dims that are multiples of 16
    return config


@pytest.mark.gpu
def test_gpu_fp8_linears_become_cublaslt_fp8_gemms():
    built = bench.compile_train_step(_tiny_gpu_config("fp8"))
    # 4 linears x 3 GEMMs in the scanned body, every one rewritten into cuBLASLt FP8.
    assert built["fp8_gemm_custom_calls"] == 12
    assert built["fp8_dots_left_in_optimized_hlo"] == 0


@pytest.mark.gpu
def test_gpu_fp8dpa_keeps_every_fp8_gemm_in_fp8():
    built = bench.compile_train_step(_tiny_gpu_config("fp8dpa"))
    # The linears as above; attention's 6 batched FP8 GEMMs go to cuBLASLt where XLA can, and
    # otherwise stay FP8 dots: none is lost to a higher precision.
    assert built["fp8_gemm_custom_calls"] >= 12
    assert built["fp8_gemm_custom_calls"] + built["fp8_dots_left_in_optimized_hlo"] == 18


def test_attention_flops_count_the_causal_half_of_each_gemm():
    # B=2, N=4, T=8, d=16: QK^T and PV are 2 * (2*4*8*8*16) FLOPs each unmasked; causal halves.
    forward, train = bench_attention.attention_flops(2, 8, 4, 16)
    assert forward == 2 * (2 * 2 * 4 * 8 * 8 * 16) // 2
    assert train == 3 * forward  # backward: dQ, dK, dV and dP, twice the forward's GEMMs


@pytest.mark.parametrize("spec", ["flash:bf16", "cudnn", "", "xla:bf16,,cudnn:"])
def test_attention_variants_must_be_impl_colon_recipe(spec):
    with pytest.raises(ValueError, match="impl:recipe"):
        bench_attention.parse_variants(spec)


@pytest.mark.slow
def test_attention_benchmark_times_the_einsum_path_and_reports_cudnn_as_an_error_on_cpu():
    config = config_lib.get_config("fog_flash", "tiny")
    with config.unlocked():
        config.train.batch_size, config.train.seq_len = 2, 128
    report = bench.run_attention_benchmark(config, "xla:bf16,xla:fp8dpa,cudnn:fp8dpa", 2, 1)
    assert report["benchmark"] == "attention" and report["git_sha"]
    bf16, fp8, cudnn = report["rows"]
    for row in (bf16, fp8):
        assert row["status"] == "ok", row["error"]
        assert row["shape"] == {
            "batch": 2,
            "seq_len": 128,
            "num_heads": 2,
            "num_kv_heads": 1,
            "head_dim": 128,
        }
        assert row["fwd_ms"] > 0 and row["train_ms"] > 0
        forward, train = bench_attention.attention_flops(2, 128, 2, 128)
        assert row["fwd_tflops"] == pytest.approx(forward / row["fwd_ms"] / 1e9)
        assert row["train_tflops"] == pytest.approx(train / row["train_ms"] / 1e9)
        assert row["cudnn_attention_calls"] == 0
    assert cudnn["status"] == "error" and "JAX sees no GPU" in cudnn["error"]
    assert "attention_impl=xla" in cudnn["error"]
    assert "cudnn:fp8dpa: CudnnAttentionUnavailable" in bench_attention.format_table(report["rows"])


@pytest.mark.gpu
def test_gpu_attention_benchmark_runs_cudnn_fp8_in_one_fused_call_each_way():
    config = config_lib.get_config("fog_flash", "tiny")
    with config.unlocked():
        config.train.batch_size, config.train.seq_len = 2, 256
    rows = bench.run_attention_benchmark(config, "cudnn:bf16,cudnn:fp8dpa", 3, 1)["rows"]
    assert [r["status"] for r in rows] == ["ok", "ok"], [r["error"] for r in rows]
    assert rows[0]["cudnn_attention_calls"] == 2 and rows[0]["cudnn_fp8_attention_calls"] == 0
    assert rows[1]["cudnn_fp8_attention_calls"] == 2 and rows[1]["fp8_dots_hlo"] == 0


def test_default_output_is_the_repositorys_benchmarks_results():
    """The bench moved into fogjax/bench/: its default JSON went to fogjax/benchmarks/results."""
    from fogjax.bench.measure import default_output_path

    report = {"rows": [{"arch": "fog_flash"}], "devices": {"kind": "NVIDIA H100 80GB HBM3"}}
    path = default_output_path(report)
    assert os.path.dirname(path) == os.path.join(ROOT, "benchmarks", "results")
    assert os.path.basename(path).startswith("fog_flash-") and path.endswith(
        "-nvidia-h100-80gb-hbm3.json"
    )
