"""Does the kurtosis warning separate the blocks where nothing diverges? Llama3 and FOG-flash,
each under FP8DPA and in BF16, at an LR every block survives on 2 CPU cores.

Run (4 runs; about 3 minutes each on 2 idle cores):
  python -m fogjax.study --config=configs/study/kurtosis_cpu.py --workdir=runs/kurtosis_cpu

Why: at ``ordering_cpu``'s LR 3e-2 the FOG blocks and OP blow up inside the warm-up in BF16 as in
FP8DPA (LR robustness, not FP8; see docs/stability.md), so that study cannot say whether the
kurtosis monitor tells FP8-fragile blocks from robust ones. At 1e-2 all of them train; docs/spec.md §4
asks that a warning fire on the fragile block and stay quiet on its BF16 twin.
"""

import ml_collections


def get_config(arg: str = ""):
    steps = int(arg) if arg else 300
    c = ml_collections.ConfigDict()
    c.name = "kurtosis_cpu"
    c.size = "tiny"  # 4 layers, d_model 256, 5.2M parameters.
    c.steps = steps  # 8 x 128 = 1024 tokens per step.
    c.stress = {
        "optim": {"peak_lr": 1e-2, "warmup_steps": 30, "cooldown_steps": 0},
        "train": {"batch_size": 8, "seq_len": 128},
    }
    c.common = {
        "train": {"log_every": 10, "stats_every": 10, "ckpt_every": 100, "eval_every": 100,
                  "eval_batches": 4},
    }  # fmt: skip
    c.reference = "llama3_bf16"
    c.runs = [
        {"name": f"{arch}_{recipe}", "arch": arch, "recipe": recipe, "overrides": {}}
        for arch in ("llama3", "fog_flash")
        for recipe in ("fp8dpa", "bf16")
    ]
    return c
