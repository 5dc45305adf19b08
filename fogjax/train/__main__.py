"""Train a FOG (or baseline) LLM; the workdir is the run, and running again resumes it.

    python -m fogjax.train                                   # the embedded default, ~5 min on CPU
    python -m fogjax.train --config=configs/fog_flash.py:1.5b --workdir=runs/fog-flash-1.5b
    python -m fogjax.train --config=configs/llama3.py:tiny --config.train.steps=100 \\
        --config.precision.recipe=fp8dpa --config.model.num_layers=2

--config=configs/ARCH.py:SIZE picks an architecture and a size:
  ARCH  {configs}
  SIZE  {sizes}  (paper Table 6: layers, width, heads, batch, steps, LR schedule)
--config.SECTION.FIELD=VALUE overrides one field (sections: {sections}); the config is locked,
  so a misspelt field fails. Every field is documented in fogjax/config_lib.py; derived fields
  (softmax scale, post-norm gain, the architecture's fields) follow the fields they derive from.
--workdir=DIR holds config, TensorBoard events (DIR/tb) and checkpoints; one trainer at a time.
Exit codes: 0 done or stopped by a signal (resumable), 2 bad input, 3 diverged, 4 out of disk
  space (resumable once there is room), 130 interrupted. What each covers: docs/training.md#safety.
Multi-host: see launch/README.md.
"""

from __future__ import annotations

import glob
import os
import re
import sys

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from fogjax import command_line
from fogjax.config_lib import SIZES, get_config

# fogjax/train/__main__.py -> the repository root, two levels up.
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_DEFAULT_CONFIG = os.path.join(_ROOT, "configs", "default.py")
_CONFIG_NAMES = sorted(
    os.path.splitext(os.path.basename(p))[0]
    for p in glob.glob(os.path.join(_ROOT, "configs", "*.py"))
)
__doc__ = __doc__.format(  # noqa: A001 - absl prints the main module's docstring for --help.
    configs=" ".join(_CONFIG_NAMES),
    sizes=" ".join(SIZES),
    sections=" ".join(get_config("fog_flash").keys()),
)


# Exit code of a run stopped by a full disk (docs/training.md#safety): resumable, unlike 2.
DISK_FULL = 4


def _fail(message: str, code: int = 2) -> None:
    print(f"ERROR: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _config_error(e: BaseException) -> str:
    """A one-paragraph message for a config that fails to load or to take an override."""
    text = str(e.args[0] if e.args else e)
    if "Traceback" in text:  # config_flags embeds the config file's traceback: keep its last line.
        text = [line for line in text.splitlines() if line.strip()][-1]
        text = text.split(": ", 1)[-1] if "Error: " in text else text
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":  # AttributeError's repr
        text = text[1:-1].replace("\\n", " ").replace("\\'", "'")
    missing = re.search(r"No such file or directory: '([^']+)'", text)
    if missing:
        return (
            f"Config file {missing.group(1)} does not exist. Configs in "
            f"{os.path.join(_ROOT, 'configs')}: {', '.join(_CONFIG_NAMES)} "
            f"(--config=configs/NAME.py:SIZE, SIZE one of {', '.join(SIZES)})."
        )
    text = " ".join(line.strip() for line in text.splitlines())
    if "Did you mean" in text:
        text = f"Unknown config field {text.replace(' Did', '. Did')}"
    return f"{text.rstrip('.?')}. Every field is documented in fogjax/config_lib.py (see --help)."


_CONFIG_ERRORS = (OSError, ValueError, AttributeError, KeyError, TypeError, flags.Error)
try:
    # Reads sys.argv now: a misspelt --config.x.y override fails here, before absl parses.
    _CONFIG = config_flags.DEFINE_config_file(
        "config",
        _DEFAULT_CONFIG,
        "Config file and size, e.g. configs/fog_flash.py:1.5b (fields: fogjax/config_lib.py).",
        lock_config=True,
    )
except _CONFIG_ERRORS as e:
    if __name__ != "__main__":
        raise
    _fail(_config_error(e))
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Run directory (resumes if it exists).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (multi-host without SLURM)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parse, with -h for --help and clean errors (no traceback) for bad configs."""
    argv = [argv[0]] + ["--help" if a == "-h" else a for a in argv[1:]]
    try:
        args = flags.FLAGS(argv)
        _ = _CONFIG.value.seed  # A config that failed to load raises on first access: now.
    except flags.UnrecognizedFlagError as e:
        _fail(f"{e}. See python -m fogjax.train --help.")
    except _CONFIG_ERRORS as e:
        _fail(_config_error(e))
    return args


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f"Unexpected arguments: {argv[1:]}. Flags look like --name=value (see --help).")
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
    from fogjax.checkpoint import disk_space
    from fogjax.monitoring.reporter import TrainingDiverged
    from fogjax.train.control import Interrupted
    from fogjax.train.loop import train_and_evaluate
    from fogjax.train.workdir import WorkdirLockedError

    disk_space.quiet_disk_full_logs()  # Reported below, in one line.
    try:
        summary = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except TrainingDiverged as e:
        _fail(str(e), code=3)
    except disk_space.DiskFullError as e:
        _fail(str(e), code=DISK_FULL)
    except (ValueError, FileNotFoundError, WorkdirLockedError) as e:
        _fail(str(e))
    except OSError as e:  # A full disk before training started (the config, the lock).
        if not disk_space.is_disk_full(e):
            raise
        _fail(str(disk_space.full_error(os.path.abspath(_WORKDIR.value), e, [])), DISK_FULL)
    except (Interrupted, KeyboardInterrupt) as e:
        # str(e), not e: a bare KeyboardInterrupt is truthy but prints as '' ("ERROR: ").
        print(f"ERROR: {str(e) or command_line.INTERRUPTED}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Not sys.exit: an abandoned compile thread would hold interpreter shutdown.
        os._exit(130)
    print(f"Done: step {summary['final_step']}, workdir {os.path.abspath(_WORKDIR.value)}")


if __name__ == "__main__":
    command_line.run(main, flags_parser=_parse_flags)
