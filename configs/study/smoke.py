"""Smoke study: two tiny runs for a few dozen steps (tests and a first look).

Run (about 3 minutes on 2 CPU cores):
  python -m fogjax.study --config=configs/study/smoke.py --workdir=runs/study-smoke
Fields: fogjax/study/spec.py; every run field: fogjax/config_lib.py.
"""

import ml_collections


def get_config(arg: str = ""):
    steps = int(arg) if arg else 24
    c = ml_collections.ConfigDict()
    c.name = "smoke"
    c.size = "tiny"  # Base size of every run (configs/<arch>.py:tiny).
    c.steps = steps  # train.steps of every run.
    # How the study stresses training: a short warm-up at the tiny default LR.
    c.stress = {"optim": {"warmup_steps": 4, "cooldown_steps": 4}}
    # Set on every run besides the stress: a small, fast model and batch, frequent statistics.
    c.common = {
        "model": {"num_layers": 2, "d_model": 64, "num_heads": 2, "num_kv_heads": 1,
                  "ffn_base_dim": 128},
        "train": {"batch_size": 8, "seq_len": 32, "log_every": 4, "stats_every": 1,
                  "ckpt_every": steps, "eval_every": steps, "eval_batches": 1},
        "log": {"kurtosis_alarm_ratio": 1.01, "kurtosis_alarm_patience": 1},
    }  # fmt: skip
    c.reference = "llama3_bf16"  # The run the others are compared with.
    c.runs = [
        {"name": "llama3_bf16", "arch": "llama3", "recipe": "bf16", "overrides": {}},
        {"name": "fog_flash_fp8dpa", "arch": "fog_flash", "recipe": "fp8dpa", "overrides": {}},
    ]
    return c
