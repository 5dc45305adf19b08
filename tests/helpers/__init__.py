"""Shared test helpers: the repository root, the float64 reference model
(:mod:`helpers.reference_model`) and the cuDNN FP8 attention emulation
(:mod:`helpers.cudnn_fp8_emulation`)."""

import pathlib

# tests/helpers/__init__.py -> the repository root.
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
