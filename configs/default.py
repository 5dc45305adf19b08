"""The embedded default: a tiny FOG-flash trained in FP8DPA on the bundled corpus.

Run (on 2 CPU cores it takes about 5 minutes; FP8 is emulated there, on a GPU it is real):
  python -m fogjax.train
which is the same as
  python -m fogjax.train --config=configs/default.py --workdir=runs/default
Run it again to resume from its checkpoint; watch it with
  tensorboard --logdir runs/default/tb
"""

from fogjax import config_lib


def get_config(arg: str = ""):
    del arg
    config = config_lib.get_config("fog_flash", "tiny")
    config.precision.recipe = "fp8dpa"  # every GEMM in the blocks in FP8, attention included
    config.data.path = "embedded"  # Python's own docs and stdlib sources, BPE-tokenised offline
    config.train.steps = 300
    config.train.batch_size = 16
    config.train.seq_len = 128
    config.train.ckpt_every = 100
    config.train.eval_every = 100
    config.train.eval_batches = 4
    config.optim.warmup_steps = 30
    config.optim.cooldown_steps = 60
    config.train.log_every = 10
    config.train.stats_every = 25
    return config
