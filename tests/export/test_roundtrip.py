"""Import of an export gives back the very parameters (bit for bit) for every architecture and
layout; a checkpoint made by transformers itself (LlamaForCausalLM, Olmo2ForCausalLM with random
weights, save_pretrained) imports and gives transformers' logits; sharded exports load."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

pytest.importorskip("transformers", reason="needs requirements-export.txt (transformers)")

from helpers.export import (  # noqa: E402
    CASES,
    VOCAB,
    fogjax_logits,
    hf_logits,
    max_relative_difference,
    perturbed_params,
    tiny_config,
)

from fogjax.export.hf_import import read_params  # noqa: E402
from fogjax.export.layout import flatten  # noqa: E402
from fogjax.export.safetensors_io import INDEX_FILE, SafetensorsCheckpoint  # noqa: E402
from fogjax.export.writer import export_params  # noqa: E402
from fogjax.precision.registry import make_recipe  # noqa: E402

TOKENS = np.random.default_rng(2).integers(0, VOCAB, (2, 16))
# Layouts beyond the scanned default: unrolled blocks, and FP4's BF16 first/last blocks (three
# scanned runs of blocks, fogjax/model/transformer.py layer_segments).
LAYOUTS = [
    ("fog_flash_unrolled", "fog_flash", {"scan_layers": False, "num_layers": 3}, {}),
    ("llama3_fp4_runs", "llama3", {"num_layers": 4}, {"recipe": "nvfp4",
                                                      "high_precision_layers": (1, 1)}),
]  # fmt: skip


def assert_identical(a: dict, b: dict) -> None:
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for path in fa:
        x, y = np.asarray(fa[path]), np.asarray(fb[path])
        assert x.dtype == y.dtype == np.float32 and x.shape == y.shape, path
        assert np.array_equal(x, y), path


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "overrides"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_import_of_export_is_bit_identical(arch, overrides, tmp_path):
    config = tiny_config(arch, **overrides)
    params = perturbed_params(config)
    export_params(params, config, str(tmp_path / "hf"), make_recipe(config.precision), log=print)
    assert_identical(read_params(str(tmp_path / "hf"), config, params), params)


@pytest.mark.parametrize(
    ("arch", "model", "precision"), [c[1:] for c in LAYOUTS], ids=[c[0] for c in LAYOUTS]
)
@pytest.mark.slow
def test_layouts_round_trip_and_name_blocks_in_layer_order(arch, model, precision, tmp_path):
    config = tiny_config(arch, **model)
    for key, value in precision.items():
        setattr(config.precision, key, value)
    params = perturbed_params(config)
    recipe = make_recipe(config.precision)
    export_params(params, config, str(tmp_path / "hf"), recipe, log=print)
    assert_identical(read_params(str(tmp_path / "hf"), config, params), params)
    # Block i of the export is block i of the model, whatever the layout.
    ckpt = SafetensorsCheckpoint(str(tmp_path / "hf"))
    last = config.model.num_layers - 1
    if config.model.scan_layers:  # The last block is the last (only) of the BF16 last run.
        assert params["layers_bf16_last"]["mlp"]["wo"]["kernel"].shape[0] == 1
        kernel = params["layers_bf16_last"]["mlp"]["wo"]["kernel"][0]
    else:
        kernel = params[f"layers_{last}"]["mlp"]["wo"]["kernel"]
    down = ckpt.read(f"model.layers.{last}.mlp.down_proj.weight")
    assert np.array_equal(down, kernel.T)


@pytest.mark.slow
def test_sharded_export_has_an_index_and_loads(tmp_path):
    torch = pytest.importorskip("torch")
    config = tiny_config("fog_max")
    params = perturbed_params(config)
    out = str(tmp_path / "hf")
    export_params(params, config, out, make_recipe(config.precision), max_shard_bytes=300_000)
    with open(os.path.join(out, INDEX_FILE)) as f:
        index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    total = sum(np.asarray(x).nbytes for x in jax.tree.leaves(params))
    assert index["metadata"]["total_size"] == total
    assert_identical(read_params(out, config, params), params)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    got = hf_logits(model, TOKENS)
    assert max_relative_difference(got, fogjax_logits(config, params, TOKENS)) <= 1e-4


def test_bfloat16_export_rounds_once(tmp_path):
    config = tiny_config("llama3")
    params = perturbed_params(config)
    out = str(tmp_path / "hf")
    export_params(params, config, out, make_recipe(config.precision), dtype="bfloat16")
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    back = read_params(out, config, params)
    for path, x in flatten(params).items():
        want = np.asarray(x).astype(jax.numpy.bfloat16).astype(np.float32)
        assert np.array_equal(flatten(back)[path], want), path


@pytest.mark.parametrize("family", ["llama", "olmo2"])
def test_a_transformers_checkpoint_imports_with_its_logits(family, tmp_path):
    torch = pytest.importorskip("torch")
    import transformers

    torch.manual_seed(0)
    common = dict(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=64,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
    )  # fmt: skip
    if family == "llama":
        hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
        config = tiny_config("llama3")
    else:
        hf_model = transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**common))
        config = tiny_config("olmo2", qk_norm="rms_all_heads")
    with torch.no_grad():  # Gains away from 1, so a swapped norm would show.
        for name, p in hf_model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.mul_(1 + 0.3 * torch.randn_like(p))
    hf_model.save_pretrained(str(tmp_path / "hf"))
    want = hf_logits(hf_model.eval(), TOKENS)
    abstract = perturbed_params(config)  # Only its shapes are used.
    params = read_params(str(tmp_path / "hf"), config, abstract)
    got = fogjax_logits(config, params, TOKENS)
    assert max_relative_difference(got, want) <= 1e-4
