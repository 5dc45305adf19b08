"""Writing a Hugging Face checkpoint directory from fogjax parameters, and from a run.

    export_run("runs/fog-1.5b", "hf/fog-1.5b")                  # latest checkpoint
    export_params(params, config, "hf/x", tokenizer=tok)         # any params of a config

The directory holds ``config.json``, ``generation_config.json``, ``model.safetensors`` (or shards
and ``model.safetensors.index.json`` above ``max_shard_bytes``), the tokenizer files when the
run's tokenizer is known, the remote code for the ``fog`` family, and ``fogjax_export.json``
(what was exported from where). It is written into a temporary sibling and renamed into place at
the end, so a failed export leaves nothing at ``output``.

Not exported: the FP8/FP4 scaling state (amax histories and scales; inference runs in BF16 or
FP32 without FP8 casts, as ``fogjax.generate --recipe=bf16``) and the optimizer state. The
vocabulary is exported whole, padded rows included (``model.vocab_size`` may exceed the
tokenizer's): the logits, their log-softmax and greedy choices are then those of the fogjax
model exactly; a tokenizer never produces the padded ids. ``fogjax_export.json`` records both
sizes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np

from fogjax.data.tokenizer import Tokenizer
from fogjax.export import family_fog, family_llama, family_olmo2, hf_config, mapping
from fogjax.export.layout import split_layers
from fogjax.export.remote_code import config_class, quiet_transformers, write_remote_code
from fogjax.export.safetensors_io import DEFAULT_MAX_SHARD_BYTES, ShardWriter
from fogjax.export.tokenizer_files import write_tokenizer
from fogjax.precision.recipe import Recipe

DTYPES = ("float32", "bfloat16")
EXPORT_INFO_FILE = "fogjax_export.json"
LAYER_MAPPINGS = {
    "llama": family_llama.layer_mappings,
    "olmo2": family_olmo2.layer_mappings,
    "fog": family_fog.layer_mappings,
}


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What an export wrote: the directory, the family ('llama' | 'olmo2' | 'fog') and its
    files."""

    output: str
    family: str
    files: tuple[str, ...]


def check_output(output: str) -> None:
    """ValueError naming the fix when ``output`` exists and is not an empty directory."""
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise ValueError(
            f"--output={output} exists and is not an empty directory; choose a new directory "
            "(or remove that one). Nothing was written."
        )


def hf_tensors(params: dict, model_cfg: Any, recipe: Recipe, family: str) -> Any:
    """(HF name, NumPy array) of every parameter, for ``family``'s class (mapping.to_hf)."""
    top, layers = split_layers(params, model_cfg, recipe)
    return mapping.to_hf(
        top, layers, mapping.top_level(model_cfg), LAYER_MAPPINGS[family](model_cfg)
    )


def _write_config(fields: dict, family: str, directory: str) -> None:
    """config.json through the transformers class that will read it (which validates it)."""
    from transformers import LlamaConfig, Olmo2Config  # requirements-export.txt

    cls = {"llama": LlamaConfig, "olmo2": Olmo2Config, "fog": None}[family] or config_class()
    extra = {k: fields[k] for k in ("architectures", "auto_map") if k in fields}
    with quiet_transformers():
        config = cls(**{k: v for k, v in fields.items() if k not in extra})
        for key, value in extra.items():
            setattr(config, key, value)
        config.save_pretrained(directory)


def _write_generation_config(eos_id: int | None, directory: str) -> None:
    from transformers import GenerationConfig

    GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id).save_pretrained(
        directory
    )


def export_params(
    params: dict,
    config: Any,
    output: str,
    recipe: Recipe,
    *,
    tokenizer: Tokenizer | None = None,
    dtype: str = "float32",
    info: dict | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    log: Callable[[str], None] = print,
) -> ExportResult:
    """Writes ``params`` (a Transformer's params tree of config ``config``) as a Hugging Face
    checkpoint directory ``output`` (module docstring).

    Args:
      params: NumPy or jax arrays in the model's layout (scanned or not).
      config: the full run config (``model``; ``train.seq_len`` is max_position_embeddings).
      recipe: the recipe the params were built with (it decides the layer layout under FP4's
        high-precision layers).
      tokenizer: the run's tokenizer, for the tokenizer files and EOS (None: neither).
      dtype: 'float32' (exact) or 'bfloat16' of the weights.
      info: extra entries for fogjax_export.json (source workdir, step, ...).
    Raises:
      ValueError: ``output`` exists and is not empty, or an unknown dtype.
    """
    check_output(output)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype={dtype!r}; choose one of {DTYPES}.")
    m = config.model
    family = hf_config.choose_family(m)
    seq_len = int(config.train.seq_len)
    eos_id = None if tokenizer is None else int(tokenizer.eos_id)
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{os.path.basename(os.path.abspath(output))}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        _write_config(hf_config.config_dict(m, family, seq_len, eos_id, dtype), family, staging)
        _write_generation_config(eos_id, staging)
        cast = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
        writer = ShardWriter(staging, max_shard_bytes, log)
        for name, array in hf_tensors(params, m, recipe, family):
            writer.add(name, array.astype(cast))
        writer.close()
        if tokenizer is not None:
            write_tokenizer(tokenizer, staging, seq_len)
        if family == "fog":
            write_remote_code(staging)
        record = {
            **(info or {}),
            "arch": m.arch,
            "family": family,
            "hf_class": hf_config.ARCHITECTURES[family],
            "dtype": dtype,
            "vocab_size": int(m.vocab_size),
            "tokenizer_vocab_size": None if tokenizer is None else int(tokenizer.vocab_size),
            "model": json.loads(json.dumps(dict(m.items()), default=str)),
        }
        with open(os.path.join(staging, EXPORT_INFO_FILE), "w") as f:
            json.dump(record, f, indent=2)
        if os.path.isdir(output):
            os.rmdir(output)  # Empty (check_output): replaced by the finished export.
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(output, family, tuple(sorted(os.listdir(output))))
