"""Every architecture exported and loaded with transformers' AutoModelForCausalLM (the stock
class or the shipped remote code, trust_remote_code=True) computes fogjax's logits: max relative
difference <= 1e-4 in float32 on a batch of two sequences, and the same 20 greedy tokens as
fogjax's KV-cache decoder."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch", reason="needs requirements-test-hf.txt (torch)")
pytest.importorskip("transformers", reason="needs requirements-export.txt (transformers)")

import torch  # noqa: E402
from helpers.export import (  # noqa: E402
    CASES,
    HF_CLASS,
    VOCAB,
    fogjax_logits,
    hf_logits,
    load_hf,
    max_relative_difference,
    perturbed_params,
    tiny_config,
)

from fogjax import sharding  # noqa: E402
from fogjax.export.writer import export_params  # noqa: E402
from fogjax.inference.decoding import Decoder  # noqa: E402
from fogjax.precision.registry import make_recipe  # noqa: E402

pytestmark = pytest.mark.slow  # module fixtures train or run commands

TOKENS = np.random.default_rng(1).integers(0, VOCAB, (2, 24))
NEW_TOKENS = 20


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def exported(request, tmp_path_factory):
    case, arch, overrides = request.param
    config = tiny_config(arch, **overrides)
    params = perturbed_params(config)
    out = str(tmp_path_factory.mktemp(case) / "hf")
    export_params(params, config, out, make_recipe(config.precision), log=lambda _: None)
    return case, config, params, out, load_hf(out)


def test_logits_match_fogjax(exported):
    case, config, params, _, model = exported
    assert type(model).__name__ == HF_CLASS.get(case, "FogForCausalLM")
    want = fogjax_logits(config, params, TOKENS)
    got = hf_logits(model, TOKENS)
    assert got.shape == want.shape == (2, TOKENS.shape[1], VOCAB)
    diff = max_relative_difference(got, want)
    print(f"{case}: max relative logit difference {diff:.2e}")
    assert diff <= 1e-4


def test_greedy_generation_matches_fogjax_decoder(exported):
    _, config, params, _, model = exported
    prompts = TOKENS[:, :8]
    with torch.no_grad():
        hf = model.generate(
            torch.as_tensor(prompts), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
            do_sample=False, pad_token_id=0,
        )[:, prompts.shape[1]:].numpy()  # fmt: skip
    mesh = sharding.make_mesh(config.mesh)
    decoder = Decoder(
        config.model, make_recipe(config.precision), {"params": params}, config.train.seq_len, mesh
    )
    ours = decoder.generate(prompts.tolist(), NEW_TOKENS)
    assert hf.tolist() == ours


def test_remote_code_ships_only_where_needed(exported):
    case, config, _, out, _ = exported
    with open(f"{out}/config.json") as f:
        hf_config = json.load(f)
    remote = case not in HF_CLASS
    assert ("auto_map" in hf_config) == remote
    if remote:  # The FOG release's field names, with this model's values.
        m = config.model
        assert hf_config["input_upscale"] == m.input_scale
        assert hf_config["softmax_scale"] == pytest.approx(m.softmax_scale)
        assert hf_config["final_layernorm"] == m.final_norm
        assert hf_config["layerscale"] == (m.post_norm == "layerscale")
        assert hf_config["qk_norm"] == (m.qk_norm != "none")
        assert hf_config["freeze_qk"] == (m.qk_norm == "frozen_rms")
