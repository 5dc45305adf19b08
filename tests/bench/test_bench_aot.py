"""fogjax.bench --target: the train step compiled for an H100 on this CPU-only machine.

Needs the CUDA compiler plugin (requirements-aot.txt, installed by .ci/run); without it these
tests fail with the install command rather than skip, since the deviceless compile is part of CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from helpers import REPO_ROOT

from fogjax import config_lib
from fogjax.bench import aot, estimate, gemms, hlo_module, hlo_stats, plan, targets

pytestmark = pytest.mark.slow  # module fixtures train or run commands

ROOT = str(REPO_ROOT)
ENV = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}

# Head dim 128 and seq_len 128 so that cuDNN's FP8 attention accepts the shapes.
SMALL = {
    "model.num_layers": 2,
    "model.d_model": 128,
    "model.num_heads": 1,
    "model.num_kv_heads": 1,
    "model.ffn_dim": 256,
    "model.vocab_size": 512,
    "train.batch_size": 2,
    "train.seq_len": 128,
}
H100 = targets.get_target("h100")


def small_config(arch: str, recipe: str, **overrides) -> config_lib.ml_collections.ConfigDict:
    c = config_lib.get_config(arch, "tiny")
    c.update_from_flattened_dict({**SMALL, **overrides})
    c.precision.recipe = recipe
    return c


@pytest.fixture(scope="module")
def cli_report(tmp_path_factory):
    """One CLI run: four entries compiled with Triton GEMMs off (cuBLASLt)."""
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    flags = [f"--config.{k}={v}" for k, v in SMALL.items()]
    cmd = [sys.executable, "-m", "fogjax.bench", "--target=h100", "--config=configs/llama3.py"]
    cmd += flags + [
        "--compare=llama3:bf16,fog_flash:fp8,fog_flash:fp8dpa,"
        "fog_flash:fp8dpa:model.attention_impl=cudnn",
        "--triton_gemm=off",
        f"--output={out}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def _row(report, label, triton):
    (row,) = [r for r in report["rows"] if r["label"] == label and r["triton_gemm"] is triton]
    assert row["status"] == "ok", row["error"]
    return row


def test_cli_reports_the_target_and_every_entry_in_both_triton_modes(cli_report):
    report, stdout = cli_report
    assert report["benchmark"] == "aot" and report["target"]["device"] == H100.device_name
    assert report["target"]["gpus"] == 1 and "estimate" in report["target"]["note"]
    assert len(report["rows"]) == 4 and all(r["status"] == "ok" for r in report["rows"])
    assert "est. tok/s/gpu" in stdout and "fog_flash:fp8dpa" in stdout
    for row in report["rows"]:
        assert set(row) == set(aot.AOT_FIELDS)
        assert row["estimate"]["is_estimate"] is True and row["estimate"]["step_s"] > 0
        assert row["memory"]["fits"] and row["memory"]["total_bytes"] > 0


def _check_block_gemms(row, form, n):
    assert row["gemm_counts"][f"fp8_{form}"] == n and row["gemm_counts"]["fp8_in_block"] == n
    assert row["non_fp8_block_gemms"] == []
    block = [g for g in row["gemms"] if g["in_block"]]
    assert {g["form"] for g in block if g["fp8"]} == {form}
    # Outside the block: the LM head's forward and two backward GEMMs, BF16 (never F32/TF32).
    outside = [g for g in row["gemms"] if not g["in_block"]]
    assert len(outside) == 3 and {(g["lhs_dtype"], g["rhs_dtype"]) for g in outside} == {
        ("bf16", "bf16")
    }


def test_fp8_recipes_put_every_block_gemm_in_fp8_cublaslt(cli_report):
    report, _ = cli_report
    # Per layer body: 4 linears x 3 GEMMs; fp8dpa adds QK^T and PV x 3 (xla attention).
    _check_block_gemms(_row(report, "fog_flash:fp8", False), "cublas", 12)
    _check_block_gemms(_row(report, "fog_flash:fp8dpa", False), "cublas", 18)
    _check_block_gemms(
        _row(report, "fog_flash:fp8dpa:model.attention_impl=cudnn", False), "cublas", 12
    )
    # Under fp8 the attention GEMMs stay BF16 by design and are not reported as missing FP8.
    fp8 = _row(report, "fog_flash:fp8", False)
    assert sum(1 for g in fp8["gemms"] if g["in_block"] and not g["fp8"]) == 6


def test_fp8_casts_read_bf16_not_float32_widened_copies(cli_report):
    """The train step compiles with xla_allow_excess_precision off (train/compiler_options.py):
    no FP8 cast reads a float32 copy of a bf16 tensor (the trap it removes is caught below)."""
    report, _ = cli_report
    for label in (
        "fog_flash:fp8",
        "fog_flash:fp8dpa",
        "fog_flash:fp8dpa:model.attention_impl=cudnn",
    ):
        assert _row(report, label, False)["fp8_casts_from_f32"] == [], label
    trap = (
        "ENTRY %e (p0: f32[64,32], p1: bf16[1]) -> f8e5m2[64,32] {\n"
        "  %p0 = f32[64,32]{1,0} parameter(0)\n  %p1 = bf16[1]{0} parameter(1)\n"
        "  ROOT %cast = f8e5m2[64,32]{1,0} fusion(%p0, %p1), kind=kLoop, calls=%c\n}\n"
    )
    assert hlo_stats.fp8_casts_from_float32(trap) == ["cast"]
    assert hlo_stats.fp8_casts_from_float32(trap.replace("f32[64,32]", "bf16[64,32]")) == []


def test_with_triton_gemms_fp8_dots_become_triton_fusions_and_still_count():
    """The trap: no autotuner without a GPU, so Triton takes every GEMM; f8 operands remain."""
    row = aot.aot_row("fp8dpa", small_config("fog_flash", "fp8dpa"), H100, 1, True)
    assert row["status"] == "ok", row["error"]
    _check_block_gemms(row, "triton", 18)
    assert row["gemm_counts"].get("fp8_cublas", 0) == 0


def test_cudnn_fp8dpa_has_one_fp8_attention_call_each_way(cli_report):
    report, _ = cli_report
    row = _row(report, "fog_flash:fp8dpa:model.attention_impl=cudnn", False)
    assert row["cudnn_fp8_attention_calls"] == 2 and row["cudnn_attention_calls"] == 2
    assert row["estimate"]["by_category_s"]["attention_fp8"] > 0


def test_bf16_has_no_fp8_gemm_and_no_non_fp8_list(cli_report):
    report, _ = cli_report
    row = _row(report, "llama3:bf16", False)
    assert row["gemm_counts"]["fp8_total"] == 0 and row["non_fp8_block_gemms"] is None
    # Every GEMM BF16, backward passes included (no F32/TF32 GEMM from a float32 cotangent).
    assert {(g["lhs_dtype"], g["rhs_dtype"]) for g in row["gemms"]} == {("bf16", "bf16")}
    assert row["estimated_speedup_vs_first"] == 1.0


def test_a_target_without_cuda_runtime_version_silently_loses_fp8():
    """The trap: without runtime_version GemmRewriter compiles FP8 dots as BF16 GEMMs."""
    proto = "\n".join(
        line for line in H100.proto_text.splitlines() if "runtime_version" not in line
    )
    bare = targets.Target("h100-no-runtime", "", H100.rates, proto=proto)
    row = aot.aot_row("fp8", small_config("fog_flash", "fp8"), bare, 1, False)
    assert row["status"] == "ok"
    assert row["gemm_counts"]["fp8_total"] == 0 and len(row["non_fp8_block_gemms"]) == 12
    assert any("runtime_version" in w for w in row["warnings"])


def test_lowering_for_cuda_and_compiling_gives_a_host_program():
    """The trap: lower(lowering_platforms=('cuda',)).compile() compiles for the CPU."""
    x = jnp.ones((16, 16), jnp.bfloat16)
    lowered = jax.jit(lambda a: a @ a).trace(x).lower(lowering_platforms=("cuda",))
    text = lowered.compile().as_text()
    with pytest.raises(aot.NotAGpuProgram, match="compile-only devices"):
        aot.require_gpu_program(text)


def test_390m_width_layer_body_is_fp8_under_fp8dpa():
    c = config_lib.get_config("fog_flash", "390m")
    c.update_from_flattened_dict({"model.num_layers": 1, "train.batch_size": 1})
    # The width is the point, not the length: 128 (cuDNN's FP8 minimum) compiles ~1-3 s sooner
    # than 512, with the same 18 FP8 block GEMMs and the same full-vocabulary BF16 head.
    c.train.seq_len = 128
    row = aot.aot_row("fog_flash:fp8dpa 390m", c, H100, 1, False)
    assert row["status"] == "ok", row["error"]
    assert row["gemm_counts"]["fp8_in_block"] == 18 and row["non_fp8_block_gemms"] == []
    head = [g for g in row["gemms"] if not g["in_block"] and g["pass"] == "forward"]
    assert head and head[0]["out_shape"][-1] == 131072  # the BF16 LM head over the full vocab


def test_plan_memory_grows_with_batch_falls_with_remat_and_too_big_does_not_fit():
    c = small_config("llama3", "bf16")
    (cell,) = plan.plan_cells([("llama3:bf16", "small", c)], ["none"], [1])
    none = plan.plan_cell(cell, H100, 1, False, max_batch_per_gpu=2)
    assert none["status"] == "ok" and none["max_batch_per_gpu"] == 2
    assert [t["batch_per_gpu"] for t in none["tried"]] == [1, 2]
    grow = [t["memory_gib"] for t in none["tried"]]
    assert grow[1] > grow[0]
    full = aot.aot_row(
        "full remat", small_config("llama3", "bf16", **{"model.remat": "full"}), H100, 1, False
    )
    assert full["memory"]["total_bytes"] < grow[1] * 2**30
    # A GPU with 1/4 of the batch-2 step's memory: reported as not fitting, with the size.
    small = int(grow[1] * 2**30 / 4 / H100.usable_memory_fraction)
    proto = H100.proto_text.replace(
        f"device_memory_size: {H100.memory_bytes}", f"device_memory_size: {small}"
    )
    tiny_gpu = targets.Target("small-gpu", "", H100.rates, proto=proto)
    row = aot.aot_row("too big", c, tiny_gpu, 1, False)
    assert row["status"] == "does not fit" and row["memory"]["fits"] is False
    assert row["memory"]["total_bytes"] > row["memory"]["usable_bytes"]
    assert "NO" in aot.format_aot_table([row])


def test_shipped_targets_are_hopper_with_runtime_and_cudnn():
    for name, target in targets.TARGETS.items():
        (device,) = targets.target_devices(target, 1)
        assert device.device_kind == target.device_name and device.platform == "gpu"
        assert target.compute_capability == (9, 0) and target.runtime_version
        assert target.cudnn_version >= (9, 1, 0) and target.memory_bytes > 80e9, name
    assert len(targets.target_devices(H100, 8)) == 8
    assert targets.topology_name(16) == "1x2x8"
    with pytest.raises(ValueError, match="whole nodes"):
        targets.topology_name(12)


# --- The estimate on synthetic GPU HLO -----------------------------------------------------------

LOOP_HLO = """\
HloModule m

%body (p: (s32[], bf16[M,K], bf16[K,N])) -> (s32[], bf16[M,K], bf16[K,N]) {
  %p = (s32[], bf16[M,K]{1,0}, bf16[K,N]{1,0}) parameter(0)
  %a = DT[M,K]{1,0} get-tuple-element(%p), index=1
  %b = DT[K,N]{1,0} get-tuple-element(%p), index=2
  %g = (bf16[M,N]{1,0}, s8[4194304]{0}) custom-call(%a, %b), custom_call_target="TARGET", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"]}}}
  ROOT %t = (s32[], bf16[M,K]{1,0}, bf16[K,N]{1,0}) tuple(%i, %a, %b)
}

%cond (p: (s32[], bf16[M,K], bf16[K,N])) -> pred[] {
  %p = (s32[], bf16[M,K]{1,0}, bf16[K,N]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (x: bf16[M,K], y: bf16[K,N]) -> bf16[M,K] {
  %x = DT[M,K]{1,0} parameter(0)
  %y = DT[K,N]{1,0} parameter(1)
  %w = (s32[], bf16[M,K]{1,0}, bf16[K,N]{1,0}) while(%x), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"LAYERS"}}
  ROOT %r = bf16[M,K]{1,0} get-tuple-element(%w), index=1
}
"""  # noqa: E501


def _loop(layers=4, m=8192, k=4096, n=4096, fp8=False):
    text = LOOP_HLO.replace("LAYERS", str(layers)).replace("M,", f"{m},").replace("K,", f"{k},")
    text = text.replace(",K]", f",{k}]").replace(",N]", f",{n}]")
    text = text.replace("DT", "f8e4m3fn" if fp8 else "bf16")
    target = "__cublas$lt$matmul$f8" if fp8 else "__cublas$lt$matmul"
    return hlo_module.parse_module(text.replace("TARGET", target))


def test_estimate_counts_loop_bodies_times_their_trip_count():
    module = _loop(layers=4)
    (g,) = gemms.find_gemms(module)
    assert g.runs == 4 and g.flops == 2 * 8192 * 4096 * 4096 and g.loops == (4,)
    rates = H100.rates
    one = estimate.estimate_step(_loop(layers=1), rates).total_s
    assert estimate.estimate_step(module, rates).total_s == pytest.approx(4 * one)


def test_estimate_grows_with_layers_and_sequence():
    rates = H100.rates
    times = [estimate.estimate_step(_loop(layers=n), rates).total_s for n in (1, 2, 8)]
    assert times == sorted(times) and times[0] < times[-1]
    by_tokens = [estimate.estimate_step(_loop(m=m), rates).total_s for m in (1024, 4096, 16384)]
    assert by_tokens == sorted(by_tokens) and by_tokens[0] < by_tokens[-1]


def test_bf16_to_fp8_gemm_time_ratio_is_the_rate_tables():
    rates = H100.rates
    bf16 = estimate.estimate_step(_loop(fp8=False), rates)
    fp8 = estimate.estimate_step(_loop(fp8=True), rates)
    per = lambda e, kind: e.by_category[f"gemm_{kind}"] - 4 * rates.kernel_overhead_s  # noqa: E731
    expected = (rates.fp8_flops * rates.gemm_efficiency["fp8"]) / (
        rates.bf16_flops * rates.gemm_efficiency["bf16"]
    )
    assert per(bf16, "bf16") / per(fp8, "fp8") == pytest.approx(expected, rel=1e-9)


def test_compare_estimate_matches_rows_by_label_and_reports_the_error(tmp_path):
    from fogjax.bench import compare_estimate

    measured = {"rows": [{"label": "a", "step_ms": 100.0}, {"label": "b", "step_ms": None}]}
    estimated = {
        "rows": [
            {"label": "a", "triton_gemm": False, "estimate": {"step_s": 0.08}},
            {"label": "a", "triton_gemm": True, "estimate": {"step_s": 1.0}},
            {"label": "b", "triton_gemm": False, "estimate": {"step_s": 0.05}},
        ]
    }
    (row,) = compare_estimate.compare(measured, estimated)
    assert row["label"] == "a" and row["relative_error"] == pytest.approx(-0.2)
    m, e, out = tmp_path / "m.json", tmp_path / "e.json", tmp_path / "out.json"
    m.write_text(json.dumps(measured))
    e.write_text(json.dumps(estimated))
    assert compare_estimate.main([str(m), str(e), f"--output={out}"]) == 0
    assert json.loads(out.read_text())["rows"] == [row]


def test_cudnn_refusal_looks_at_the_target_not_this_machine():
    from fogjax.precision.cudnn_attention import CudnnAttentionUnavailable, require_cudnn_attention

    devices = targets.target_devices(H100, 1)
    with pytest.raises(CudnnAttentionUnavailable, match="no GPU"):  # this machine has none
        require_cudnn_attention(fp8=True, head_dim=128, seq_len=256)
    require_cudnn_attention(True, 128, 256, target=aot.CompileTarget(devices, H100.cudnn_version))
    with pytest.raises(CudnnAttentionUnavailable, match="older than 9.1"):
        require_cudnn_attention(True, 128, 256, target=aot.CompileTarget(devices, (9, 0, 0)))


COLLECTIVES_HLO = """\
HloModule m

ENTRY %main (x: f32[1024,1024]) -> f32[1024,1024] {
  %x = f32[1024,1024]{1,0} parameter(0)
  %ar = f32[1024,1024]{1,0} all-reduce(%x), replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
  %ag-start = (f32[128,1024]{1,0}, f32[1024,1024]{1,0}) all-gather-start(%x), replica_groups=[1,8]<=[8], dimensions={0}
  %ag-done = f32[1024,1024]{1,0} all-gather-done(%ag-start)
  ROOT %rs = f32[128,1024]{1,0} reduce-scatter(%x), replica_groups=[2,4]<=[8], dimensions={0}, to_apply=%add
}
"""  # noqa: E501


def test_collectives_are_found_with_bytes_group_sizes_and_ring_costs():
    module = hlo_module.parse_module(COLLECTIVES_HLO)
    found = {c.kind: c for c in gemms.find_collectives(module)}
    assert set(found) == {"all-reduce", "all-gather", "reduce-scatter"}
    assert found["all-reduce"].bytes == 4 * 2**20 and found["all-reduce"].group_size == 8
    assert found["all-gather"].bytes == 4 * 2**20 and found["all-gather"].group_size == 8
    assert found["reduce-scatter"].group_size == 4
    rates = H100.rates
    est = estimate.estimate_step(module, rates)
    link = rates.nvlink_bytes_per_s * rates.link_efficiency
    expected = 4 * 2**20 * (2 * 7 / 8 + 7 / 8 + 3 / 4) / link + 3 * rates.kernel_overhead_s
    assert est.by_category["collective"] == pytest.approx(expected)


MESH_COLLECTIVES_HLO = """\
HloModule m

ENTRY %main (x: f32[1024,1024]) -> f32[1024,1024] {
  %x = f32[1024,1024]{1,0} parameter(0)
  %ar = f32[1024,1024]{1,0} all-reduce(%x), channel_id=1, replica_groups=mesh['axis_0'=8,'axis_1'=1,'axis_2'=1] {'axis_0'}, use_global_device_ids=true, to_apply=%add
  %ag-start = (f32[128,1024]{1,0}, f32[1024,1024]{1,0}) all-gather-start(%x), channel_id=2, replica_groups=mesh['axis_0'=1,'axis_1'=4,'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_1'}, dimensions={0}, use_global_device_ids=true
  %ag-done = f32[1024,1024]{1,0} all-gather-done(%ag-start)
  ROOT %rs = f32[128,1024]{1,0} reduce-scatter(%x), channel_id=3, replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=2] {'axis_0','axis_2'}, dimensions={0}, to_apply=%add
}
"""  # noqa: E501


def test_mesh_replica_groups_span_their_named_axes():
    """XLA prints a sharded step's groups as mesh[...] {axes}; read as one device, an FSDP
    all-gather or gradient all-reduce would cost nothing in the estimate."""
    found = {
        c.kind: c for c in gemms.find_collectives(hlo_module.parse_module(MESH_COLLECTIVES_HLO))
    }
    assert found["all-reduce"].group_size == 8
    assert found["all-gather"].group_size == 4
    assert found["reduce-scatter"].group_size == 8
