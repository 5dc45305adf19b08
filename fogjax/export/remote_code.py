"""The remote code shipped in an export directory: remote/configuration_fog.py and
remote/modeling_fog.py (package data of fogjax.export), copied next to the weights so that
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` finds them through the
config's ``auto_map`` (fogjax/export/hf_config.py)."""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

REMOTE_DIR = Path(__file__).resolve().parent / "remote"
FILES = ("configuration_fog.py", "modeling_fog.py")


def write_remote_code(directory: str) -> list[str]:
    """Copies the remote-code files into ``directory``; returns their names."""
    for name in FILES:
        shutil.copyfile(REMOTE_DIR / name, Path(directory) / name)
    return list(FILES)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' warnings off while an export's config is built or read: its RoPE check
    warns that llama3 scaling's original context (8192) exceeds max_position_embeddings, which
    fogjax sets to the trained context on purpose (lm_eval reads it as the model's length)."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def config_class() -> type:
    """``FogConfig`` from remote/configuration_fog.py (needs transformers, not torch), to
    validate and write an export's config.json with the class that will read it."""
    name = "fogjax_remote_configuration_fog"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REMOTE_DIR / "configuration_fog.py")
        module = importlib.util.module_from_spec(spec)
        # Registered before it runs: transformers turns the class into a dataclass, which looks
        # its module up in sys.modules.
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name].FogConfig
