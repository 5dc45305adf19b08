"""fog_flash (docs/spec.md §1), sizes tiny | 390m | 1.5b | 8b.

Run:
  python -m fogjax.train --config=configs/fog_flash.py:tiny --workdir=runs/fog_flash-tiny
  python -m fogjax.train --config=configs/fog_flash.py:1.5b --workdir=/ckpt/fog_flash-1.5b \
      --config.precision.recipe=fp8dpa
Inspect:
  python -m fogjax.info --config=configs/fog_flash.py:1.5b

Every field is documented in fogjax/config_lib.py; the config is locked, so a misspelt override fails.
"""

from fogjax import config_lib


def get_config(arg: str = "tiny"):
    return config_lib.get_config("fog_flash", arg)
