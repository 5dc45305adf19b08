"""The paper's divergence ordering on 2 CPU cores: seven blocks under FP8DPA + Llama3 BF16.

Run (8 runs; about 5 minutes each on 2 idle cores, 40 minutes in all; FP8 is emulated on CPU):
  python -m fogjax.study --config=configs/study/ordering_cpu.py --workdir=runs/ordering_cpu
Running it again skips finished runs and resumes an interrupted one.

Sizing and stress (measured on a shared 2-core machine, tiny model 5.2M params, FP8DPA):
EXPLORATION_NOTES
"""

import importlib.util
import os

import ml_collections

_spec = importlib.util.spec_from_file_location(
    "_ordering", os.path.join(os.path.dirname(os.path.abspath(__file__)), "_ordering.py")
)
_ordering = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_ordering)


def get_config(arg: str = ""):
    steps = int(arg) if arg else 200
    c = ml_collections.ConfigDict()
    c.name = "ordering_cpu"
    c.size = "tiny"  # 4 layers, d_model 256, 5.2M parameters.
    c.steps = steps  # 8 x 128 = 1024 tokens per step.
    # The stress: LR_NOTE, a short warm-up, no cooldown to hide behind.
    c.stress = {
        "optim": {"peak_lr": 1e-2, "warmup_steps": 10, "cooldown_steps": 0},
        "train": {"batch_size": 8, "seq_len": 128},
    }
    c.common = {
        "train": {"log_every": 10, "stats_every": 10, "ckpt_every": 50, "eval_every": 100,
                  "eval_batches": 4},
    }  # fmt: skip
    c.reference = "llama3_bf16"
    c.runs = _ordering.runs()
    return c
