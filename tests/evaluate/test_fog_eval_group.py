"""The FOG release's ``fog_eval`` group is found next to ``fog_downstream`` and names only tasks
and tags lm-eval knows (so a run fetches datasets, never fails on a name)."""

from __future__ import annotations

import pytest
import yaml

pytest.importorskip("lm_eval", reason="needs requirements-eval.txt (lm-eval)")

from lm_eval.tasks import TaskManager  # noqa: E402

from fogjax.evaluate.harness import TASKS_DIR  # noqa: E402

FOG_EVAL = ["lambada_openai", "winogrande", "piqa", "social_iqa", "openbookqa", "arc_easy",
            "commonsense_qa", "triviaqa", "wikitext", "lambada", "hellaswag"]  # fmt: skip


@pytest.mark.slow
def test_fog_eval_lists_the_release_tasks_and_lm_eval_knows_each():
    with open(f"{TASKS_DIR}/fog_eval.yaml") as f:
        group = yaml.safe_load(f)
    assert group["group"] == "fog_eval" and group["task"] == FOG_EVAL
    assert [m["metric"] for m in group["aggregate_metric_list"]] == ["acc", "acc_norm"]
    manager = TaskManager(include_path=[TASKS_DIR])
    assert {"fog_eval", "fog_downstream"} <= set(manager.all_groups)
    known = set(manager.all_tasks) | set(manager.all_groups) | set(manager.all_tags)
    assert [t for t in FOG_EVAL if t not in known] == []
