"""The paper's divergence ordering at 390M on GPUs: seven blocks under FP8DPA, each with its
BF16 twin (14 runs; the twins tell an FP8 failure from an LR one, docs/spec.md §4).

Paper (docs/spec.md §5): under FP8DPA Llama3 390M diverges at 0.7B tokens, OLMo2 at 3.3B; OP and
Llama3+SmoothSwiGLU also diverge; only FOG blocks pass 20B. 20k steps x 128 x 4096 = 10.5B
tokens per run (paper LR and schedule of the 390m size, no extra stress).
Run (one array task of 8 GPUs per run):
  python -m fogjax.study --config=configs/study/ordering_390m.py --workdir=/ckpt/ordering_390m \
      --launch=slurm
or in-process, one run after the other, on one GPU machine:
  python -m fogjax.study --config=configs/study/ordering_390m.py --workdir=runs/ordering_390m
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
    steps = int(arg) if arg else 20_000
    c = ml_collections.ConfigDict()
    c.name = "ordering_390m"
    c.size = "390m"
    c.steps = steps  # 128 x 4096 = 524k tokens per step.
    # The paper's 390m recipe (LR 1e-3, 5k warm-up); the cooldown scaled to the shorter run.
    c.stress = {"optim": {"warmup_steps": min(5_000, steps // 4), "cooldown_steps": steps // 5}}
    c.common = {"train": {"ckpt_every": 1000, "eval_every": 1000, "stats_every": 250}}
    c.reference = "llama3_bf16"
    c.runs = _ordering.runs()
    return c
