"""Parameter counts, FLOPs per token and train-state memory of a config, as one JSON object.

    python -m fogjax.info --config=configs/fog_flash.py:1.5b --config.optim.state_precision=fog_fp16

Shapes come from ``jax.eval_shape``: nothing is allocated, so the 8B config answers in seconds.
The numbers come from :mod:`fogjax.accounting`.
"""

from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

from fogjax import command_line
from fogjax.accounting import abstract_variables, model_info, state_memory


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = flags.FLAGS.config
    if config is None:
        raise app.UsageError("Give a config: --config=configs/fog_flash.py:1.5b")
    variables = abstract_variables(config)  # One trace serves both reports.
    report = {**model_info(config, variables["params"]), "memory": state_memory(config, variables)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/fog_flash.py:1.5b.")
    command_line.run(main)
