"""``--launch=slurm``: one sbatch array job, one array task per run of the study.

Each task sets ``CONFIG`` and ``WORKDIR`` and runs ``launch/fogjax.sbatch``'s body (its XLA
flags, coordinator port and ``srun`` of one process per GPU; launch/README.md), so each run is
the ordinary training run the study would have run in-process, resumable by resubmitting.
Runs already finished are left out of the array.
"""

from __future__ import annotations

import os
import shlex
import sys

from fogjax.study.runner import is_finished, read_summary
from fogjax.study.spec import Study

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_HEADER = """#!/bin/bash
# Stability study {name}: one array task per run ({count} runs), written by
#   python -m fogjax.study --config={source} --workdir={study_dir} --launch=slurm
# Submit:   sbatch {script}
# Report (after the array; also works on a partial study):
#   sbatch --dependency=afterany:<jobid> --wrap="{python} -m fogjax.study --config={source} \\
#       --workdir={study_dir} --report-only"
# A task that was preempted or timed out resumes when submitted again (same WORKDIR).
#
#SBATCH --job-name=fogjax-study-{name}
#SBATCH --array={array}
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output={study_dir}/slurm-%A_%a.out

set -euo pipefail
cd {root}
export PYTHON="${{PYTHON:-{python}}}"

case "${{SLURM_ARRAY_TASK_ID}}" in
"""


def write_sbatch(study: Study, study_dir: str) -> str | None:
    """Writes ``STUDY_DIR/study.sbatch``; returns its path, or None if every run is finished."""
    study_dir = os.path.abspath(study_dir)
    todo = [
        r for r in study.runs if not is_finished(r, read_summary(os.path.join(study_dir, r.name)))
    ]
    if not todo:
        return None
    os.makedirs(study_dir, exist_ok=True)
    script = os.path.join(study_dir, "study.sbatch")
    text = _HEADER.format(
        name=study.name,
        count=len(todo),
        source=study.source,
        study_dir=study_dir,
        script=script,
        python=sys.executable,
        array=f"0-{len(todo) - 1}",
        root=_ROOT,
    )
    for i, run in enumerate(todo):
        config, *fields = run.train_args()
        text += (
            f"{i})  # {run.name}: {run.arch} {run.recipe}\n"
            f"  export CONFIG={shlex.quote(config.split('=', 1)[1])}\n"
            f"  export WORKDIR={shlex.quote(os.path.join(study_dir, run.name))}\n"
            f"  ARGS=({' '.join(shlex.quote(f) for f in fields)})\n"
            "  ;;\n"
        )
    text += (
        '*) echo "no run for array task ${SLURM_ARRAY_TASK_ID}" >&2; exit 2 ;;\n'
        "esac\n"
        'exec bash launch/fogjax.sbatch "${ARGS[@]}"\n'
    )
    with open(script, "w") as f:
        f.write(text)
    os.chmod(script, 0o755)
    return script
