"""What fogjax's command lines share: absl's ``app.run`` with ``--help`` exiting 0, the quiet
CPU fallback on machines without an NVIDIA driver, and no shutdown noise after a failed
checkpoint read or write (:func:`quiet_closed_event_loops`).

``requirements-test.txt`` installs XLA's CUDA plugin (for the deviceless GPU compiles). On a
machine with no NVIDIA driver at all, JAX then prints the plugin's "cuDNN not found" traceback
before falling back to the CPU, which looks like a broken install to a newcomer. Where no driver
is present, :func:`cpu_without_nvidia_driver` selects the CPU platform up front, so the plugin
is never initialised; where a driver is present, nothing changes, and a broken GPU install still
shows its error.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

from absl import app

# A Ctrl-C that arrived outside the trainer's signal handling (loading, building, saving the
# summary): the trainer itself says more (fogjax/train/control.py).
INTERRUPTED = (
    "Interrupted by Ctrl-C. The workdir keeps its latest checkpoint: run the same command again "
    "to resume from it."
)
# Where an NVIDIA driver shows itself on Linux (bare metal, containers given a GPU, WSL).
NVIDIA_DRIVER_PATHS = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg")
HELP_FLAGS = ("-h", "--help", "--helpshort", "--helpfull", "-?")


def nvidia_driver_present(paths: Iterable[str] = NVIDIA_DRIVER_PATHS) -> bool:
    return any(os.path.exists(p) for p in paths)


def cpu_without_nvidia_driver(
    env: dict[str, str] | None = None, paths: Iterable[str] = NVIDIA_DRIVER_PATHS
) -> bool:
    """Selects JAX's CPU platform when no NVIDIA driver is present and the user chose no platform
    (``JAX_PLATFORMS`` unset); returns True if it did. Call before the first device is used."""
    env = os.environ if env is None else env
    if env.get("JAX_PLATFORMS") or nvidia_driver_present(paths):
        return False
    env["JAX_PLATFORMS"] = "cpu"
    if env is os.environ and "jax" in sys.modules:  # jax read the variable at import already.
        sys.modules["jax"].config.update("jax_platforms", "cpu")
    return True


def _is_closed_loop_noise(unraisable: Any) -> bool:
    error = unraisable.exc_value
    return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


def quiet_closed_event_loops() -> None:
    """Drops one harmless report from ``sys.unraisablehook``: after an orbax read or write fails
    (a truncated checkpoint, a full disk), tensorstore completes its remaining futures on the
    asyncio loop orbax has already closed, and each prints a "RuntimeError: Event loop is
    closed" traceback (dozens of them under the real error). Every other report goes through."""
    previous = sys.unraisablehook
    if getattr(previous, "_fogjax_quiet", False):
        return

    def hook(unraisable: Any) -> None:
        if not _is_closed_loop_noise(unraisable):
            previous(unraisable)

    hook._fogjax_quiet = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def fail(message: str, code: int = 2) -> NoReturn:
    """Prints ``ERROR: message`` to stderr and exits with ``code``.

    A checkpoint read that failed leaves orbax's other parallel array reads abandoned: at exit
    Python closes their coroutines ("Exception ignored in: <coroutine ...>") and asyncio reports
    their tasks ("Task exception was never retrieved"), each with a page of traceback after the
    one-line error, depending on when the garbage collector runs. Both are silenced here: the
    failure they belong to is the error just reported.
    """
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not inspect.iscoroutine(unraisable.object):
            previous(unraisable)

    sys.unraisablehook = hook
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    print(f"ERROR: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def run(main: Callable[[list[str]], Any], **kwargs: Any) -> None:
    """``absl.app.run(main, **kwargs)``, except that ``--help`` exits 0 (absl exits 1), after
    :func:`cpu_without_nvidia_driver` and :func:`quiet_closed_event_loops`."""
    cpu_without_nvidia_driver()
    quiet_closed_event_loops()
    try:
        app.run(main, **kwargs)
    except SystemExit as e:
        argv = kwargs.get("argv") or sys.argv
        if e.code == 1 and any(a.split("=")[0] in HELP_FLAGS for a in argv[1:]):
            raise SystemExit(0) from None
        raise
