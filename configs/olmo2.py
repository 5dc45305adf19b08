"""olmo2 (docs/spec.md §1), sizes tiny | 390m | 1.5b | 8b.

Run:
  python -m fogjax.train --config=configs/olmo2.py:tiny --workdir=runs/olmo2-tiny
  python -m fogjax.train --config=configs/olmo2.py:1.5b --workdir=/ckpt/olmo2-1.5b \
      --config.precision.recipe=fp8dpa
Inspect:
  python -m fogjax.info --config=configs/olmo2.py:1.5b

Every field is documented in fogjax/config_lib.py; the config is locked, so a misspelt override fails.
"""

from fogjax import config_lib


def get_config(arg: str = "tiny"):
    return config_lib.get_config("olmo2", arg)
