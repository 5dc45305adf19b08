"""The stock harness on an export: ``lm_eval --model hf --model_args
pretrained=DIR,trust_remote_code=True`` scores a local multiple-choice task on an exported
trained run exactly as fogjax's own harness model scores the run (same accuracy, same
per-choice log-likelihoods)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.lm_eval_tasks import write_multiple_choice_task

pytest.importorskip("torch", reason="needs requirements-test-hf.txt (torch)")
pytest.importorskip("accelerate", reason="needs requirements-test-hf.txt (lm_eval's hf model)")
lm_eval = pytest.importorskip("lm_eval", reason="needs requirements-eval.txt (lm-eval)")

from lm_eval.tasks import TaskManager  # noqa: E402

from fogjax.evaluate.harness import FogjaxLM  # noqa: E402
from fogjax.export.run_export import export_run  # noqa: E402

pytestmark = pytest.mark.slow  # module fixtures train or run commands

DOCS = [
    {"question": "2 + 2 =", "choices": ["4", "five", "22"], "label": 0},
    {"question": "The sky is", "choices": ["green", "blue", "loud"], "label": 1},
    {"question": "import numpy as", "choices": ["np", "pandas", "x y z"], "label": 0},
    {"question": "def f(x):", "choices": ["return x", "}}}", "end"], "label": 0},
    {"question": "Hello,", "choices": ["world", "123", "!!"], "label": 2},
    {"question": "for i in", "choices": ["range(3):", "while", "="], "label": 0},
    {"question": "The module", "choices": ["defines", "zzz", "qq"], "label": 0},
    {"question": "class A:", "choices": ["pass", "class", "))"], "label": 0},
]


def evaluate(model, tasks_dir):
    out = lm_eval.simple_evaluate(
        model=model,
        tasks=["fogjax_toy_mc"],
        task_manager=TaskManager(include_path=[str(tasks_dir)], include_defaults=False),
        log_samples=True,
    )
    samples = out["samples"]["fogjax_toy_mc"]
    scores = {s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in samples}
    return out["results"]["fogjax_toy_mc"], scores


@pytest.mark.slow
def test_lm_eval_hf_scores_the_export_like_fogjax(trained_run, tmp_path):
    write_multiple_choice_task(tmp_path, "fogjax_toy_mc", DOCS, ("acc", "acc_norm"))
    export_run(trained_run, str(tmp_path / "hf"))

    ours, ours_scores = evaluate(FogjaxLM(workdir=trained_run, batch_size=8), tmp_path)
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(
        pretrained=str(tmp_path / "hf"), trust_remote_code=True, dtype="float32", device="cpu",
        batch_size=4,
    )  # fmt: skip
    theirs, their_scores = evaluate(hf, tmp_path)
    print("fogjax:", ours, "\nhf:", theirs)
    assert theirs["acc,none"] == ours["acc,none"]
    assert theirs["acc_norm,none"] == ours["acc_norm,none"]
    assert their_scores.keys() == ours_scores.keys() == set(range(len(DOCS)))
    for doc in ours_scores:
        np.testing.assert_allclose(their_scores[doc], ours_scores[doc], rtol=1e-4, atol=1e-4)
