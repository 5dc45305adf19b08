"""The stability study end to end on the smoke study: report, figures, summary, skipping finished
runs, --report-only, --launch=slurm, validation before any run; and the kurtosis monitor's state
surviving a SIGTERM + resume (the smoke study's run is the uninterrupted twin)."""

from __future__ import annotations

import json
import os
import pathlib
import sys

import pytest
from helpers.cli import ROOT, run, scalars, sigterm_after
from PIL import Image

from fogjax.study import figures
from fogjax.study.__main__ import main as study_main
from fogjax.study.spec import build_study

pytestmark = pytest.mark.slow  # module fixtures train or run commands

SMOKE = "configs/study/smoke.py"
RUNS = ["llama3_bf16", "fog_flash_fp8dpa"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    study_dir = str(tmp_path_factory.mktemp("study") / "smoke")
    out = run([sys.executable, "-m", "fogjax.study", f"--config={SMOKE}",
               f"--workdir={study_dir}"], timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return study_dir, out


def test_smoke_study_writes_report_figures_and_summary(smoke):
    study_dir, out = smoke
    assert "[study smoke 1/2] llama3_bf16 (llama3, bf16): training 24 steps" in out.stdout
    assert "step 24/24" in out.stdout  # The trainer's progress lines come through.
    summary = json.loads(pathlib.Path(study_dir, "summary.json").read_text())
    assert [r["name"] for r in summary["runs"]] == RUNS
    for row in summary["runs"]:
        assert row["status"] == "completed" and row["diverged"] is False, row
        assert row["steps_done"] == 24 and row["tokens_per_step"] == 8 * 32
        assert 3.0 < row["final_train_loss"] < 9.0 and 3.0 < row["final_eval_loss"] < 9.0
        assert row["max_qkv_kurtosis"] > 1.0
        # The smoke study's alarm ratio (1.01) is low enough that some layer departs.
        assert row["first_kurtosis_warning_step"] is not None
    report = pathlib.Path(study_dir, "report.md").read_text()
    for name in RUNS:
        assert f"| {name} |" in report
    for png in figures.FIGURES:
        assert f"]({png})" in report
        path = os.path.join(study_dir, png)
        assert os.path.getsize(path) > 5000, png
        with Image.open(path) as image:
            image.load()  # Decodes the whole file.
            assert image.size[0] > 300 and image.size[1] > 200
    run_summary = json.loads(pathlib.Path(study_dir, RUNS[1], "summary.json").read_text())
    assert run_summary["recipe"] == "fp8dpa" and run_summary["arch"] == "fog_flash"


def test_rerun_skips_finished_runs_and_report_only_rebuilds(smoke, capsys):
    study_dir, _ = smoke
    stamps = {n: os.path.getmtime(os.path.join(study_dir, n, "summary.json")) for n in RUNS}
    study_main([f"--config={SMOKE}", f"--workdir={study_dir}"])
    printed = capsys.readouterr().out
    for i, name in enumerate(RUNS, start=1):
        assert f"[study smoke {i}/2] {name}" in printed and "skipped" in printed
    assert "training" not in printed
    assert stamps == {n: os.path.getmtime(os.path.join(study_dir, n, "summary.json")) for n in RUNS}
    for name in ("report.md", "summary.json", *figures.FIGURES):
        os.remove(os.path.join(study_dir, name))
    study_main([f"--config={SMOKE}", f"--workdir={study_dir}", "--report-only"])
    assert "training" not in capsys.readouterr().out
    for name in ("report.md", "summary.json", *figures.FIGURES):
        assert os.path.getsize(os.path.join(study_dir, name)) > 0, name
    rows = json.loads(pathlib.Path(study_dir, "summary.json").read_text())["runs"]
    assert [r["status"] for r in rows] == ["completed", "completed"]


def test_slurm_launch_writes_one_array_job_of_the_unfinished_runs(smoke, tmp_path, capsys):
    study_dir = str(tmp_path / "slurm")
    study_main([f"--config={SMOKE}", f"--workdir={study_dir}", "--launch=slurm"])
    script = pathlib.Path(study_dir, "study.sbatch").read_text()
    assert "#SBATCH --array=0-1" in script and "#SBATCH --signal=TERM@120" in script
    assert "export CONFIG=configs/llama3.py:tiny" in script
    assert "--config.precision.recipe=fp8dpa" in script and "--config.train.steps=24" in script
    assert 'exec bash launch/fogjax.sbatch "${ARGS[@]}"' in script
    assert not any(os.path.isdir(os.path.join(study_dir, n)) for n in RUNS)  # Nothing trained.
    # In the smoke study's own folder both runs are finished: nothing is left to launch.
    study_main([f"--config={SMOKE}", f"--workdir={smoke[0]}", "--launch=slurm"])
    assert "nothing to launch" in capsys.readouterr().out
    assert not os.path.exists(os.path.join(smoke[0], "study.sbatch"))


BAD_STUDY = """
import ml_collections
def get_config():
    c = ml_collections.ConfigDict()
    c.size, c.steps = "tiny", 100
    c.runs = [{{"name": "good", "arch": "llama3", "recipe": "bf16", "overrides": {{}}}},
              {{"name": "bad_one", "arch": {arch!r}, "recipe": {recipe!r},
                "overrides": {overrides!r}}}]
    return c
"""


@pytest.mark.parametrize(
    "arch, recipe, overrides, needle",
    [
        ("gpt2", "bf16", {}, "runs[1] (bad_one): unknown arch='gpt2'; choose one of"),
        ("op", "fp7", {}, "runs[1] (bad_one): unknown recipe='fp7'; choose one of"),
        ("op", "bf16", {"optim": {"peak_lrr": 1.0}}, "cannot set optim.peak_lrr=1.0"),
        ("op", "bf16", {"optim": {"peak_lr": -1.0}}, "optim.peak_lr=-1.0 must be > 0"),
    ],
)
def test_bad_study_entry_fails_before_any_run_naming_it(tmp_path, arch, recipe, overrides, needle):
    path = tmp_path / "bad.py"
    path.write_text(BAD_STUDY.format(arch=arch, recipe=recipe, overrides=overrides))
    with pytest.raises(ValueError) as e:
        build_study(str(path))
    assert needle in str(e.value) and str(path) in str(e.value)
    study_dir = tmp_path / "out"
    if arch == "gpt2":  # The CLI: exit 2, one line, and nothing trained (not even the good run).
        out = run([sys.executable, "-m", "fogjax.study", f"--config={path}",
                   f"--workdir={study_dir}"])  # fmt: skip
        assert out.returncode == 2 and needle in out.stderr, out.stderr[-2000:]
        assert "Traceback" not in out.stderr and not study_dir.exists()


def test_shipped_studies_validate():
    names = {}
    for source in ("configs/study/smoke.py", "configs/study/ordering_cpu.py",
                   "configs/study/ordering_390m.py", "configs/study/kurtosis_cpu.py"):  # fmt: skip
        study = build_study(os.path.join(ROOT, source))
        names[study.name] = {(r.arch, r.recipe) for r in study.runs}
    fp8dpa = {"llama3", "llama3_smooth_swiglu", "olmo2", "op", "fog_max", "fog_opt", "fog_flash"}
    for name in ("ordering_cpu", "ordering_390m"):
        assert names[name] == {(a, r) for a in fp8dpa for r in ("fp8dpa", "bf16")}
    assert names["kurtosis_cpu"] == {
        (a, r) for a in ("llama3", "fog_flash") for r in ("fp8dpa", "bf16")
    }


def test_kurtosis_warnings_survive_sigterm_and_resume(smoke, tmp_path):
    """The smoke study's llama3_bf16 run is the straight run; the same run through the CLI,
    stopped by SIGTERM mid-way and resumed, must warn identically."""
    study_dir, _ = smoke
    study = build_study(os.path.join(ROOT, SMOKE))
    args = study.runs[0].train_args()
    workdir = str(tmp_path / "resumed")
    cmd = [sys.executable, "-m", "fogjax.train", f"--workdir={workdir}", *args,
           "--config.train.log_every=1"]  # fmt: skip
    stopped = sigterm_after(cmd, "step 12/24")
    assert 12 <= stopped < 20
    assert json.loads(pathlib.Path(workdir, "summary.json").read_text())["status"] == "stopped"
    out = run(cmd)
    assert out.returncode == 0, out.stderr[-3000:]

    straight = json.loads(pathlib.Path(study_dir, "llama3_bf16", "summary.json").read_text())
    resumed = json.loads(pathlib.Path(workdir, "summary.json").read_text())
    assert resumed["status"] == "completed" and resumed["step"] == 24
    assert straight["kurtosis_warnings"], "the straight run must warn for this test to mean much"
    assert resumed["kurtosis_warnings"] == straight["kurtosis_warnings"]
    for key in ("first_kurtosis_warning_step", "max_qkv_kurtosis", "final_train_loss"):
        assert resumed[key] == straight[key], key
    # Right after the resume the trend ratios continue from the saved history (a fresh monitor
    # would report none until it had 6 new points).
    _, a = scalars(os.path.join(study_dir, "llama3_bf16"))
    _, b = scalars(workdir)
    tag = "monitor/kurtosis_trend_ratio/qkv"
    after = [s for s in sorted(a[tag]) if s > stopped][:3]
    assert after and all(b[tag].get(s) == a[tag][s] for s in after), (stopped, after)


def test_each_run_is_judged_against_its_bf16_twin():
    """docs/spec.md §4: only the FP8 run diverging is an FP8 failure; both diverging is the
    stress."""
    from fogjax.study.report import _with_twins, bf16_twins

    study = build_study(os.path.join(ROOT, "configs/study/ordering_cpu.py"))
    twins = bf16_twins(study)
    assert twins["fog_flash_fp8dpa"] == "fog_flash_bf16" and "llama3_bf16" not in twins
    assert len(twins) == 7
    diverged = {"llama3_fp8dpa": True, "llama3_bf16": False, "fog_flash_fp8dpa": True,
                "fog_flash_bf16": True, "olmo2_fp8dpa": False, "olmo2_bf16": False}  # fmt: skip
    rows = [{"name": r.name, "diverged": diverged.get(r.name), "final_eval_loss": 3.0 + i}
            for i, r in enumerate(study.runs)]  # fmt: skip
    out = {r["name"]: r for r in _with_twins(study, rows)}
    assert out["llama3_fp8dpa"]["verdict"] == "FP8 failure"
    assert out["fog_flash_fp8dpa"]["verdict"] == "fails in BF16 too"
    assert out["olmo2_fp8dpa"]["verdict"] == "stable"
    assert out["op_fp8dpa"]["verdict"] is None  # Not run yet: no verdict.
    names = [r.name for r in study.runs]
    gap = names.index("olmo2_fp8dpa") - names.index("olmo2_bf16")
    assert out["olmo2_fp8dpa"]["gap_to_twin"] == gap  # Eval loss minus the twin's.
    assert out["llama3_fp8dpa"]["gap_to_twin"] is None  # It diverged: no precision gap.
