"""Command line entry point.

    python -m fogjax.train --config=configs/fog_flash.py:1.5b --workdir=runs/fog-flash-1.5b \
        [--config.precision.recipe=fp8dpa ...]

With no flags it trains the embedded default (configs/default.py) in runs/default. Running the same
command on the same workdir resumes. Multi-host: see launch/README.md.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEFAULT_CONFIG = os.path.join(_ROOT, "configs", "default.py")

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    _DEFAULT_CONFIG,
    "Config file and size, e.g. configs/fog_flash.py:1.5b.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Run directory (resumes if it exists).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (multi-host without SLURM)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    # Library INFO chatter (e.g. "Unable to initialize backend 'tpu'") hides the progress lines;
    # --verbosity=0 brings it back.
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    from fogjax import distributed

    # Join the multi-controller runtime before anything touches a device.
    distributed.initialize(
        coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value,
    )
    from fogjax.trainer import TrainingDiverged, train_and_evaluate

    try:
        summary = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except TrainingDiverged as e:
        print(f"ERROR: {e}", file=sys.stderr)
        sys.exit(3)
    except (ValueError, FileNotFoundError) as e:
        print(f"ERROR: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"Done: step {summary['final_step']}, workdir {os.path.abspath(_WORKDIR.value)}")


if __name__ == "__main__":
    app.run(main)
