"""What fogjax's command lines share: absl's ``app.run`` with ``--help`` exiting 0, and the quiet
CPU fallback on machines without an NVIDIA driver.

``requirements-test.txt`` installs XLA's CUDA plugin (for the deviceless GPU compiles). On a
machine with no NVIDIA driver at all, JAX then prints the plugin's "cuDNN not found" traceback
before falling back to the CPU, which looks like a broken install to a newcomer. Where no driver
is present, :func:`cpu_without_nvidia_driver` selects the CPU platform up front, so the plugin
is never initialised; where a driver is present, nothing changes, and a broken GPU install still
shows its error.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

from absl import app

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


def run(main: Callable[[list[str]], Any], **kwargs: Any) -> None:
    """``absl.app.run(main, **kwargs)``, except that ``--help`` exits 0 (absl exits 1), after
    :func:`cpu_without_nvidia_driver`."""
    cpu_without_nvidia_driver()
    try:
        app.run(main, **kwargs)
    except SystemExit as e:
        argv = kwargs.get("argv") or sys.argv
        if e.code == 1 and any(a.split("=")[0] in HELP_FLAGS for a in argv[1:]):
            raise SystemExit(0) from None
        raise
