"""Export tests: transformers' caches (its remote-code module cache included) in a temporary
folder, and never the network."""

import os
import tempfile

# Before transformers is imported: its remote-code modules are copied under HF_HOME.
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="fogjax-hf-home-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"


import pytest  # noqa: E402


def trained_config():
    """A tiny FOG-flash (remote-code family) on the byte tokenizer, trained in float32 without
    FP8 casts, so fogjax's own harness model and the exported float32 model compute alike."""
    from configs.default import get_config

    c = get_config()
    m = c.model
    m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.ffn_base_dim = 2, 64, 2, 1, 128
    m.vocab_size = 300  # Padded beyond the byte tokenizer's 257: the export keeps every row.
    c.precision.recipe, c.precision.compute_dtype = "bf16", "float32"
    c.data.path = "embedded:bytes"
    t = c.train
    t.steps, t.batch_size, t.seq_len, t.ckpt_every = 4, 8, 32, 2
    t.eval_every, t.log_every, t.stats_every = 0, 4, 1
    c.optim.warmup_steps, c.optim.cooldown_steps = 1, 1
    return c


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A workdir trained by the real trainer for 4 steps (checkpoints at steps 2 and 4)."""
    from fogjax.train import loop

    path = str(tmp_path_factory.mktemp("trained") / "run")
    loop.train_and_evaluate(trained_config(), path)
    return path
