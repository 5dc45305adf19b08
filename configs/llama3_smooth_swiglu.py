"""llama3_smooth_swiglu (docs/spec.md §1), sizes tiny | 390m | 1.5b | 8b.

Run:
  python -m fogjax.train --config=configs/llama3_smooth_swiglu.py:tiny --workdir=runs/llama3_smooth_swiglu-tiny
  python -m fogjax.train --config=configs/llama3_smooth_swiglu.py:1.5b --workdir=/ckpt/llama3_smooth_swiglu-1.5b \
      --config.precision.recipe=fp8dpa
Inspect:
  python -m fogjax.info --config=configs/llama3_smooth_swiglu.py:1.5b

Every field is documented in fogjax/config_lib.py; the config is locked, so a misspelt override fails.
"""

from fogjax import config_lib


def get_config(arg: str = "tiny"):
    return config_lib.get_config("llama3_smooth_swiglu", arg)
