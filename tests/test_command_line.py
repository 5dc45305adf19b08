"""The command lines' shared start-up: the quiet CPU fallback without an NVIDIA driver."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import REPO_ROOT

from fogjax import command_line


def test_cpu_is_chosen_only_without_a_driver_and_without_a_user_choice(tmp_path):
    driver = tmp_path / "nvidiactl"
    env: dict[str, str] = {}
    assert command_line.cpu_without_nvidia_driver(env, paths=[str(driver)])
    assert env == {"JAX_PLATFORMS": "cpu"}
    driver.write_text("")  # A driver is present: a broken GPU install must still show its error.
    env = {}
    assert not command_line.cpu_without_nvidia_driver(env, paths=[str(driver)])
    assert env == {}
    env = {"JAX_PLATFORMS": "cuda"}  # The user's choice stands.
    assert not command_line.cpu_without_nvidia_driver(env, paths=[str(tmp_path / "none")])
    assert env == {"JAX_PLATFORMS": "cuda"}


def test_a_command_without_a_driver_prints_no_cuda_plugin_traceback():
    """With requirements-test.txt the CUDA plugin is installed; on a machine without an NVIDIA
    driver (as CI) a command must start as quietly as on a plain CPU install."""
    if command_line.nvidia_driver_present():
        return  # Here the plugin's errors are the user's to see.
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    out = subprocess.run(
        [sys.executable, "-m", "fogjax.info", "--config=configs/default.py"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert '"params_total"' in out.stdout
    assert "Traceback" not in out.stderr and "cuDNN" not in out.stderr, out.stderr[-3000:]
