"""Export a run to a Hugging Face transformers checkpoint directory.

    python -m fogjax.export --workdir=runs/fog-1.5b [--step=N] --output=hf/fog-1.5b \
        [--dtype=float32|bfloat16] [--max_shard_gb=5]

Writes config.json, generation_config.json, model.safetensors (sharded with an index above
--max_shard_gb), the tokenizer files and, for FOG, OP and per-head OLMo2, the remote code
(configuration_fog.py, modeling_fog.py). Load it with
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``, evaluate it with
``lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True``. Llama3 (and
SmoothSwiGLU) and OLMo2 trained with ``model.qk_norm=rms_all_heads`` become transformers' own
LlamaForCausalLM / Olmo2ForCausalLM. Needs requirements-export.txt. Exit 2 with a one-line error
for a workdir without checkpoints, an unknown step or an --output that exists and is not empty;
nothing is written then.
"""

from __future__ import annotations

import sys

from absl import app, flags
from absl import logging as absl_logging

from fogjax import command_line
from fogjax.export.writer import DTYPES
from fogjax.inference.load import NoCheckpointError


def _define_flags() -> None:
    """Defined only when run as a program, so importing this module defines no flags."""
    flags.DEFINE_string("workdir", None, "A run directory written by fogjax.train.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_string("output", None, "The export directory (must not exist, or be empty).")
    flags.DEFINE_enum("dtype", "float32", DTYPES, "Weights dtype: float32 (exact) or bfloat16.")
    flags.DEFINE_float("max_shard_gb", 5.0, "Split model.safetensors into shards of this size.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if not f.workdir or not f.output:
        raise app.UsageError(
            "Give --workdir=RUN (a run of python -m fogjax.train) and --output=DIR."
        )
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)  # orbax's INFO lines.
    try:
        from fogjax.export.run_export import export_run  # Needs transformers and safetensors.
    except ModuleNotFoundError as e:
        print(f"ERROR: {e}; pip install -r requirements-export.txt", file=sys.stderr)
        sys.exit(2)
    try:
        result = export_run(
            f.workdir, f.output, f.step, f.dtype, max_shard_bytes=int(f.max_shard_gb * 1e9)
        )
    except (NoCheckpointError, ValueError) as e:
        print(f"ERROR: {e}", file=sys.stderr)
        sys.exit(2)
    kind = "remote code (trust_remote_code=True)" if result.family == "fog" else "transformers"
    print(f"Exported to {result.output} as {kind}: {', '.join(result.files)}")


if __name__ == "__main__":
    _define_flags()
    command_line.run(main)
