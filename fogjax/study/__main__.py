"""Run a stability study: many training runs, one report with a table and figures.

    python -m fogjax.study --config=configs/study/smoke.py --workdir=runs/study-smoke
    python -m fogjax.study --config=configs/study/ordering_cpu.py --workdir=runs/ordering_cpu
    python -m fogjax.study --config=configs/study/ordering_390m.py --workdir=/ckpt/ordering \\
        --launch=slurm         # writes STUDY_DIR/study.sbatch (one array task per run)
    python -m fogjax.study --config=... --workdir=... --report-only   # rebuild the report

Every run trains in STUDY_DIR/<run>/ as an ordinary run (TensorBoard events, checkpoints,
summary.json); a finished run is skipped, an interrupted one resumes, so running the same
command again continues the study. The report is STUDY_DIR/report.md, STUDY_DIR/summary.json
and PNG figures beside them. The whole study config is validated before any run starts.
Exit codes: 0 done (or stopped by a signal: run again to continue), 2 bad input, 4 out of disk
space (run again once there is room), 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys

from fogjax import command_line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fogjax.study",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="configs/study/<name>.py[:arg]")
    p.add_argument("--workdir", required=True, help="STUDY_DIR: one folder per run + the report")
    p.add_argument("--launch", choices=("local", "slurm"), default="local",
                   help="local: train here, one run after the other; slurm: write an sbatch "
                   "array job instead")  # fmt: skip
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild report.md, summary.json and the figures from the run folders",
    )
    return p


def _fail(message: str, code: int = 2) -> None:
    print(f"ERROR: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    command_line.cpu_without_nvidia_driver()
    command_line.quiet_closed_event_loops()
    from fogjax.study import report, slurm
    from fogjax.study.spec import build_study

    try:
        study = build_study(args.config)
    except (ValueError, OSError, SyntaxError) as e:
        _fail(str(e))
    study_dir = os.path.abspath(args.workdir)
    print(f"Study {study.name}: {len(study.runs)} runs in {study_dir}", flush=True)
    if args.report_only:
        _report(report, study, study_dir)
        return
    if args.launch == "slurm":
        script = slurm.write_sbatch(study, study_dir)
        if script is None:
            print("Every run is finished; nothing to launch.", flush=True)
            _report(report, study, study_dir)
        else:
            print(f"Wrote {script}. Submit it with: sbatch {script}", flush=True)
        return
    from fogjax.checkpoint import disk_space
    from fogjax.checkpoint.disk_space import DiskFullError
    from fogjax.study.runner import run_study
    from fogjax.train.control import Interrupted
    from fogjax.train.workdir import WorkdirLockedError

    disk_space.quiet_disk_full_logs()  # Reported below, in one line.
    try:
        finished = run_study(study, study_dir)
    except DiskFullError as e:
        _fail(f"{e} The study continues from there when run again.", code=4)
    except (ValueError, FileNotFoundError, WorkdirLockedError) as e:
        _fail(str(e))
    except (Interrupted, KeyboardInterrupt) as e:
        # str(e), not e: a bare KeyboardInterrupt is truthy but prints as '' ("ERROR: ").
        print(f"ERROR: {str(e) or command_line.INTERRUPTED}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)  # Not sys.exit: an abandoned compile thread would hold the shutdown.
    _report(report, study, study_dir)
    if not finished:
        print("Study stopped before its end; run the same command again to continue.")


def _report(report: object, study: object, study_dir: str) -> None:
    report.write_report(study, study_dir)
    print(f"Report: {os.path.join(study_dir, 'report.md')}", flush=True)


if __name__ == "__main__":
    main()
