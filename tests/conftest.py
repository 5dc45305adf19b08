"""Test set-up: 8 fake CPU devices for sharding tests, and GPU-only tests skipped without a GPU."""

import os

# Must be set before jax is imported anywhere: sharding tests use 8 host devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if os.environ.get("FOGJAX_TEST_GPU") != "1":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # CI has no GPU; FOGJAX_TEST_GPU=1 opts in.

import pytest  # noqa: E402


def _has_gpu() -> bool:
    try:
        import jax

        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if os.environ.get("FOGJAX_TEST_GPU") == "1" and _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (run with FOGJAX_TEST_GPU=1 on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
