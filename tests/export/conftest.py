"""Export tests: transformers' caches (its remote-code module cache included) in a temporary
folder, and never the network."""

import os
import tempfile

# Before transformers is imported: its remote-code modules are copied under HF_HOME.
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="fogjax-hf-home-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A workdir trained by the real trainer for 4 steps (checkpoints at steps 2 and 4)."""
    from helpers.export import trained_config

    from fogjax.train import loop

    path = str(tmp_path_factory.mktemp("trained") / "run")
    loop.train_and_evaluate(trained_config(), path)
    return path
