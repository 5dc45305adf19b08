"""The paper's divergence ordering on 2 CPU cores: seven blocks under FP8DPA, each with its BF16 twin.

Run (14 runs; 35 minutes on 2 idle cores, most of it the 6 runs that do not diverge; FP8 is
emulated on CPU):
  python -m fogjax.study --config=configs/study/ordering_cpu.py --workdir=runs/ordering_cpu
Running it again skips finished runs and resumes an interrupted one.

Sizing: the tiny model (5.2M params) at 8 x 128 tokens a step runs ~2.5-3k tokens/s under FP8DPA
on 2 idle cores (0.4 s/step; 600-1300 tokens/s under load), and compiling the two FP8DPA step
variants takes 20-70 s.

Stress, and what it showed (docs/stability.md; benchmarks/results/study-ordering_cpu/):
  - LR 1e-2, 150 steps, warm-up 10 (exploration, Llama3 and FOG-flash under FP8DPA): neither
    diverged; Llama3's loss 7.57 -> 6.34, a kurtosis warning at step 130; FOG-flash 7.76 -> 6.23,
    QKV kurtosis flat, no warning.
  - LR 3e-2, 200 steps, warm-up 10 (this study): OP, FOG-max, FOG-opt and FOG-flash diverge at
    steps 11-14 in FP8DPA and in BF16 alike (LR robustness, not FP8: these blocks scale the
    embedding by 50 and have no final norm); Llama3, Llama3+SmoothSwiGLU and OLMo2 train in both
    (eval loss FP8DPA minus BF16: +0.07, -0.10, +0.21) and all of them warn (steps 80-150).
  No FP8-only divergence at this scale. Untried: longer runs, larger batch or sequence, a short
  amax history (precision.amax_history_len) or margin.
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
    # The stress: 10x the tiny default LR (3e-3), a short warm-up, no cooldown to hide behind.
    c.stress = {
        "optim": {"peak_lr": 3e-2, "warmup_steps": 10, "cooldown_steps": 0},
        "train": {"batch_size": 8, "seq_len": 128},
    }
    c.common = {
        "train": {"log_every": 10, "stats_every": 10, "ckpt_every": 50, "eval_every": 100,
                  "eval_batches": 4},
    }  # fmt: skip
    c.reference = "llama3_bf16"
    c.runs = _ordering.runs()
    return c
