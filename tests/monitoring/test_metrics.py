"""TensorBoard writer read back, MFU arithmetic, throughput, flattening, console, provenance."""

import io
import json
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fogjax.monitoring import throughput, writer
from fogjax.train import provenance


def _read(logdir):
    ea = EventAccumulator(str(logdir))
    ea.Reload()
    return ea


def test_writer_round_trip(tmp_path):
    w = writer.MetricWriter(str(tmp_path))
    w.write_scalars(1, {"train/loss": 3.5, "train/lr": 1e-3, "perf/mfu": None})
    w.write_scalars(2, {"train/loss": 3.25})
    w.write_text(0, "provenance", "| field | value |")
    w.close()
    ea = _read(tmp_path)
    assert sorted(ea.Tags()["scalars"]) == ["train/loss", "train/lr"]  # None was skipped.
    assert [(e.step, e.value) for e in ea.Scalars("train/loss")] == [(1, 3.5), (2, 3.25)]
    assert ea.Scalars("train/lr")[0].value == pytest.approx(1e-3)
    (text,) = ea.Tensors("provenance/text_summary")
    assert text.tensor_proto.string_val[0].decode() == "| field | value |"


def test_full_disk_warns_once_and_training_goes_on(tmp_path):
    """tensorboardX's SummaryWriter hangs for ever here (its thread dies, its queue fills)."""
    warnings = []
    w = writer.MetricWriter(str(tmp_path), warn=warnings.append)
    w.write_scalars(1, {"train/loss": 3.5})
    w.flush()
    # A real ENOSPC on every write, as on a full disk (unbuffered, so the first write fails).
    w._events._py_recordio_writer._writer = open("/dev/full", "wb", buffering=0)  # noqa: SIM115
    start = time.monotonic()
    for step in range(2, 200):  # Far more than tensorboardX's queue of 10 events.
        w.write_scalars(step, {"train/loss": 1.0, "train/lr": 2.0})
        w.write_text(step, "t", "x")
    w.flush()
    w.close()
    assert time.monotonic() - start < 5.0
    assert len(warnings) == 1 and "No space left on device" in warnings[0], warnings
    assert "No space left" in w.error
    assert [(e.step, e.value) for e in _read(tmp_path).Scalars("train/loss")] == [(1, 3.5)]


def test_writer_is_a_no_op_off_process_zero(tmp_path):
    w = writer.MetricWriter(str(tmp_path / "x"), enabled=False)
    w.write_scalars(1, {"a": 1.0})
    w.write_text(1, "t", "x")
    w.flush()
    w.close()
    assert not (tmp_path / "x").exists()


def test_no_tensorflow_import():
    assert "tensorflow" not in sys.modules


def test_peak_table():
    assert throughput.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert throughput.peak_flops("NVIDIA H100 80GB HBM3", "fp8") == 1979e12
    assert throughput.peak_flops("NVIDIA GH200 480GB", "fp8") == 1979e12
    assert throughput.peak_flops("NVIDIA H200") == 989e12
    assert throughput.peak_flops("NVIDIA H100 PCIe") == 756e12  # Not the SXM peak.
    assert throughput.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert throughput.peak_flops("NVIDIA A100-SXM4-80GB", "fp8") is None
    assert throughput.peak_flops("cpu") is None


def test_mfu_arithmetic_and_none_on_cpu():
    # 494.5 TFLOP in one second on an H100 is half its BF16 peak.
    assert throughput.mfu(494.5e12, 1.0, "NVIDIA H100 80GB HBM3") == pytest.approx(0.5)
    assert throughput.mfu(1979e12 / 2, 4.0, "NVIDIA H100 80GB HBM3", "fp8") == pytest.approx(0.125)
    assert throughput.mfu(1e12, 1.0, jax.devices()[0].device_kind) is None  # Tests run on CPU.


def test_throughput_between_ticks():
    clock = iter([100.0, 102.0, 104.0]).__next__
    t = throughput.Throughput(
        total_steps=100,
        tokens_per_step=8192,
        flops_per_step=8 * 989e12,  # 8 devices at full H100 peak for one second of work.
        num_devices=8,
        device_kind="NVIDIA H100 80GB HBM3",
        clock=clock,
    )
    assert t.tick(10) == {}  # The first tick starts the clock (compilation excluded).
    perf = t.tick(14)  # 4 steps in 2 s.
    assert perf["perf/step_time"] == pytest.approx(0.5)
    assert perf["perf/tokens_per_sec"] == pytest.approx(16384)
    assert perf["perf/tokens_per_sec_per_device"] == pytest.approx(2048)
    assert perf["perf/tflops_per_device"] == pytest.approx(1978)
    assert perf["perf/mfu"] == pytest.approx(2.0)
    assert perf["perf/eta_s"] == pytest.approx(86 * 0.5)
    assert t.tick(14) == {}  # No progress, no numbers.


def test_throughput_reset_excludes_eval_time():
    clock = iter([0.0, 1.0, 50.0, 51.0, 52.0]).__next__
    t = throughput.Throughput(100, 100, 1e9, 1, "cpu", clock=clock)
    t.tick(0)
    assert t.tick(1)["perf/step_time"] == pytest.approx(1.0)
    t.reset()  # 48 s of evaluation happen here
    assert t.tick(2) == {}
    assert t.tick(3)["perf/step_time"] == pytest.approx(1.0)


def test_throughput_has_no_mfu_on_unknown_devices():
    clock = iter([0.0, 1.0]).__next__
    t = throughput.Throughput(10, 100, 1e9, 1, "cpu", clock=clock)
    t.tick(0)
    perf = t.tick(1)
    assert "perf/mfu" not in perf
    assert perf["perf/tflops_per_device"] == pytest.approx(1e-3)


def test_metrics_to_host_flattens_nested_and_per_layer():
    tree = {
        "loss": jnp.float32(2.0),
        "kurtosis": {"qkv": jnp.array([3.0, 5.0, 7.0]), "block_out": jnp.arange(12.0)},
        "grad_norm": jnp.bfloat16(0.5),
    }
    flat = writer.metrics_to_host(tree, prefix="train")
    assert flat["train/loss"] == 2.0
    assert flat["train/grad_norm"] == 0.5
    assert flat["train/kurtosis/qkv/layer_00"] == 3.0
    assert flat["train/kurtosis/qkv/layer_02"] == 7.0
    assert flat["train/kurtosis/qkv/avg"] == 5.0
    assert flat["train/kurtosis/block_out/layer_11"] == 11.0
    assert flat["train/kurtosis/block_out/avg"] == 5.5
    assert all(type(v) is float for v in flat.values())
    assert len(flat) == 2 + 4 + 13


def test_metrics_to_host_refuses_matrices():
    with pytest.raises(ValueError, match=r"'m/x'.*\(2, 2\)"):
        writer.metrics_to_host({"x": jnp.zeros((2, 2))}, prefix="m")


def test_console_line():
    line = writer.console_line(120, 2000, 3.4121, 1e-3, 12_345.0, 0.4123, 312)
    assert line == "step 120/2000 | loss 3.412 | lr 1.0e-03 | 12.3k tok/s | mfu 41.2% | eta 5m12s"
    assert writer.console_line(5, 10, loss=2.0) == "step 5/10 | loss 2.000"
    assert writer.console_line(5, 10, loss=float("nan")) == "step 5/10 | loss nan"


@pytest.mark.parametrize(
    "seconds,text", [(0, "0s"), (45, "45s"), (312, "5m12s"), (7380, "2h03m"), (273600, "3d04h")]
)
def test_format_duration(seconds, text):
    assert writer.format_duration(seconds) == text


def test_console_without_tty_prints_lines_and_no_bar():
    out = io.StringIO()  # isatty() is False, as in a SLURM log.
    c = writer.Console(100, enabled=True, stream=out)
    c.update(10)
    c.print("step 10/100")
    c.close()
    assert out.getvalue() == "step 10/100\n"


def test_console_on_a_tty_draws_a_bar_and_prints_above_it():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    c = writer.Console(100, initial_step=5, enabled=True, stream=out)
    c.update(10)
    c.print("step 10/100")
    c.close()
    text = out.getvalue()
    assert "10/100" in text and "\r" in text  # The bar redraws in place.
    assert "step 10/100\n" in text


def test_provenance_record_and_markdown():
    cfg = ml_collections.ConfigDict({"optim": {"peak_lr": 1e-3}, "seed": 0})
    rec = provenance.provenance(cfg, 1234, extra={"mesh": {"data": 8}})
    json.dumps(rec)  # Serialisable, so it can go in checkpoint metadata.
    assert rec["param_count"] == 1234
    assert rec["versions"]["jax"] == jax.__version__
    assert rec["devices"]["count"] == jax.device_count()
    assert rec["devices"]["process_count"] == 1
    assert "peak_lr" in rec["config"]
    assert rec["git_sha"] is None or len(rec["git_sha"]) == 40
    md = provenance.to_markdown(rec)
    assert "| devices.kind |" in md and "| mesh.data | `8` |" in md
    assert "    optim:" in md  # The config as an indented code block.


def test_the_writer_does_not_import_torch_and_torch_still_imports_after_it():
    """tensorboardX tries ``import torch`` at import time (1.3 s where torch is installed, as in
    the test environment); the writer hides it, and only for that import."""
    pytest.importorskip("torch")
    import subprocess

    code = (
        "import sys, fogjax.monitoring.writer; assert 'torch' not in sys.modules, 'imported'; "
        "import torch; torch.zeros(1); print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
