"""Test set-up: 8 fake CPU devices for sharding tests, a shared compilation cache, and GPU-only
tests skipped without a GPU."""

import os

# Must be set before jax is imported anywhere: sharding tests use 8 host devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if os.environ.get("FOGJAX_TEST_GPU") != "1":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # CI has no GPU; FOGJAX_TEST_GPU=1 opts in.

# One persistent XLA compilation cache for the whole suite, its workers and the CLI subprocesses
# they start (inherited through the environment): many tests compile the same tiny train step,
# and a cached executable loads ~4x faster than it compiles on 2 cores. A size limit turns on
# jax's file lock, so concurrent workers never read a half-written entry. The cache key covers
# the program, the compile options, the flags and the jax version: a hit is the same executable.
# Tests that need a real compile (Ctrl-C during compilation) switch it off for their process.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "jax"),
)
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 * 2**30))

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
