"""lm-evaluation-harness adapter, generation CLI core and loading, on a tiny FP8DPA checkpoint
trained by the real trainer: scores against an independent float64 re-derivation from the
model's full forward, an offline multiple-choice task end to end, stop sequences, seeds, errors."""

from __future__ import annotations

import json
import os
import types

import jax
import numpy as np
import pytest
from helpers.lm_eval_tasks import write_multiple_choice_task

pytest.importorskip("lm_eval", reason="needs requirements-eval.txt (lm-eval)")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from fogjax.evaluate.harness import (  # noqa: E402
    FogjaxLM,  # noqa: E402
    run_downstream,
    scalar_tags,
)
from fogjax.generate import generate_text  # noqa: E402
from fogjax.inference.decoding import PromptTooLongError, Sampling  # noqa: E402
from fogjax.inference.load import NoCheckpointError, load_model  # noqa: E402
from fogjax.train import loop as trainer  # noqa: E402

pytestmark = pytest.mark.slow  # module fixtures train or run commands

SEQ = 32


def tiny_run_config():
    from configs.default import get_config

    c = get_config()  # FOG-flash in FP8DPA: inference must use the checkpoint's FP8 scales.
    m = c.model
    m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.ffn_dim = 2, 64, 2, 1, 192
    m.vocab_size = 257
    c.data.path = "embedded:bytes"  # The byte tokenizer: context + continuation = concatenation.
    t = c.train
    t.steps, t.batch_size, t.seq_len, t.ckpt_every = 3, 8, SEQ, 3
    # stats_every=1: every step is a statistics step, so only one step variant compiles.
    t.eval_every, t.log_every, t.stats_every = 0, 3, 1
    c.optim.warmup_steps, c.optim.cooldown_steps = 1, 1
    return c


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("harness") / "run")
    trainer.train_and_evaluate(tiny_run_config(), path)
    return path


@pytest.fixture(scope="module")
def lm(workdir):
    return FogjaxLM(workdir=workdir, batch_size=8)


@pytest.fixture(scope="module")
def forward(lm):
    """The model's plain full forward pass on one row right-padded to the context (causal, so
    the padding changes no earlier logit): one compilation for every reference below."""
    apply = jax.jit(lm.loaded.model.apply)

    def logits_of(tokens):
        row = np.zeros((1, SEQ), np.int32)
        row[0, : len(tokens)] = tokens
        return np.asarray(apply(lm.loaded.variables, row)[0, : len(tokens)], np.float64)

    return logits_of


def reference_log_probs(forward, tokens):
    """log p(tokens[i+1] | tokens[:i+1]) float64 [n-1] (n <= SEQ + 1) and whether each is the
    argmax, re-derived in NumPy from the model's logits."""
    tokens = np.asarray(tokens)
    logits = forward(tokens[:-1])
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return logp[np.arange(len(tokens) - 1), tokens[1:]], logits.argmax(-1) == tokens[1:]


def request(*args):
    return types.SimpleNamespace(args=args)


def test_checkpoint_is_fp8_and_bf16_override_drops_the_scales(lm, workdir):
    assert lm.loaded.recipe.name == "fp8dpa" and "fp8" in lm.loaded.variables
    flat = jax.tree_util.tree_flatten_with_path(lm.loaded.variables["fp8"])[0]
    scales = np.concatenate([np.ravel(x) for p, x in flat if "scale_inv" in str(p[-1])])
    assert scales.size and np.all(scales != 1.0)  # Trained delayed scales, not the init's 1.
    bf16 = load_model(workdir, recipe="bf16")
    assert bf16.recipe.name == "bf16" and set(bf16.variables) == {"params"}
    with pytest.raises(ValueError, match="'bf16'"):
        load_model(workdir, recipe="fp8")


def test_loglikelihood_equals_sum_of_full_forward_log_probs(lm, forward):
    reqs = [request("The cat sat on", " the mat"), request("", "x"), request("a" * 40, "bcd")]
    got = lm.loglikelihood(reqs)
    eos = lm.eot_token_id
    for (ctx, cont), (ll, _) in zip([r.args for r in reqs], got, strict=True):
        ids = list(ctx.encode()) if ctx else [eos]
        ids = (ids + list(cont.encode()))[-(SEQ + 1) :]  # Left-truncated to the context.
        logp, _ = reference_log_probs(forward, np.asarray(ids))
        want = logp[-len(cont) :].sum()
        assert ll == pytest.approx(want, abs=0.02 + 0.01 * abs(want))


def test_is_greedy_on_a_constructed_continuation(lm, forward):
    context = list(b"Hello, world. ")
    seq = list(context)
    for _ in range(3):  # The model's own greedy continuation, by full forward passes.
        seq.append(int(np.argmax(forward(seq)[-1])))
    greedy = seq[len(context) :]
    runner_up = int(np.argsort(forward(seq[:-1])[-1])[-2])  # Second most likely last token.
    (ll_g, is_g), (ll_o, is_o) = lm.score_tokens(
        [(context, greedy), (context, greedy[:-1] + [runner_up])]
    )
    assert is_g and not is_o and ll_g > ll_o


def test_rolling_loglikelihood_is_the_sum_over_context_windows(lm, forward):
    text = "".join(chr(97 + (i * 7) % 26) for i in range(75))  # 75 tokens: 3 windows of 32.
    (got,) = lm.loglikelihood_rolling([request(text)])
    x, eos, total = list(text.encode()), lm.eot_token_id, 0.0
    # Window 1 predicts x[0:32] after EOS; later ones predict the next up-to-32 tokens, each
    # with a full 32-token input ending just before its last target.
    logp, _ = reference_log_probs(forward, np.asarray([eos] + x[:SEQ]))
    total += logp.sum()
    for start in range(SEQ, len(x), SEQ):
        end = min(start + SEQ, len(x))
        logp, _ = reference_log_probs(forward, np.asarray(x[end - SEQ - 1 : end]))
        total += logp[-(end - start) :].sum()
    assert got == pytest.approx(total, abs=0.05 + 1e-3 * abs(total))


def test_generate_until_stops_at_its_stop_sequence_and_matches_generate_text(lm):
    greedy = {"until": [], "max_gen_toks": 10, "do_sample": False}
    (free,) = lm.generate_until([request("The ", greedy)])
    assert len(free) >= 4
    stop = free[2:4]
    (cut,) = lm.generate_until([request("The ", {**greedy, "until": [stop]})])
    assert cut == free.split(stop)[0] and stop not in cut
    # The CLI's core decodes the same text (its one row is padded to the same 8-row batch, so it
    # reuses the compiled prefill and step).
    assert generate_text(lm.loaded, "The ", 10) == free.split(lm.tokenizer.eos_token)[0]


def test_same_seed_same_text_and_named_errors(lm, tmp_path):
    s = Sampling(temperature=1.0, top_p=0.9)
    a = generate_text(lm.loaded, "def ", 12, s, seed=5)
    assert a == generate_text(lm.loaded, "def ", 12, s, seed=5)
    assert a != generate_text(lm.loaded, "def ", 12, s, seed=6)
    sampled = {"until": [], "max_gen_toks": 12, "do_sample": True, "temperature": 1.0}
    assert lm.generate_until([request("def ", sampled)]) == lm.generate_until(
        [request("def ", sampled)]
    )
    with pytest.raises(PromptTooLongError, match="context of 32"):
        generate_text(lm.loaded, "x" * 30, 8)
    with pytest.raises(NoCheckpointError, match="config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(lm.loaded.config.to_dict()))
    with pytest.raises(NoCheckpointError, match="No checkpoint"):
        load_model(str(tmp_path))


DOCS = [
    {"question": "2 + 2 =", "choices": ["4", "five", "22"], "label": 0},
    {"question": "The sky is", "choices": ["green", "blue", "loud"], "label": 1},
    {"question": "import numpy as", "choices": ["np", "pandas", "x y z"], "label": 0},
    {"question": "def f(x):", "choices": ["return x", "}}}", "end"], "label": 0},
    {"question": "Hello,", "choices": ["world", "123", "!!"], "label": 2},
    {"question": "for i in", "choices": ["range(3):", "while", "="], "label": 0},
]


def test_simple_evaluate_on_an_offline_task_matches_hand_computed_accuracy(
    lm, forward, workdir, tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_multiple_choice_task(tmp_path, "fogjax_toy_mc", DOCS)
    out = run_downstream(
        workdir, ["fogjax_toy_mc"], include_path=[str(tmp_path)], lm=lm, include_defaults=False
    )
    acc = out["results"]["fogjax_toy_mc"]["acc,none"]
    # By hand: lm_eval asks for log p(" " + choice | question); pick the best choice.
    correct = []
    for d in DOCS:
        scores = []
        for choice in d["choices"]:
            ids = list(d["question"].encode()) + list((" " + choice).encode())
            logp, _ = reference_log_probs(forward, np.asarray(ids))
            scores.append(logp[-len(" " + choice) :].sum())
        correct.append(int(np.argmax(scores)) == d["label"])
    assert acc == pytest.approx(np.mean(correct))
    with open(out["results_path"]) as f:
        saved = json.load(f)
    assert saved["results"]["fogjax_toy_mc"]["acc,none"] == acc and saved["step"] == 3
    events = EventAccumulator(os.path.join(workdir, "tb"))
    events.Reload()
    (point,) = events.Scalars("downstream/fogjax_toy_mc/acc")
    assert point.step == 3 and point.value == pytest.approx(acc)


def test_scalar_tags_names():
    tags = scalar_tags(
        {"t": {"acc,none": 0.5, "exact_match,strict-match": 1, "alias": "t", "x,none": "N/A"}}
    )
    assert tags == {"downstream/t/acc": 0.5, "downstream/t/exact_match/strict-match": 1.0}
