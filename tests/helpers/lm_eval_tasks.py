"""A local lm-evaluation-harness multiple-choice task, for offline tests of the harness paths."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

_METRIC = """  - metric: {name}
    aggregation: mean
    higher_is_better: true
"""

_TASK = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
{metrics}metadata:
  version: 1.0
"""


def write_multiple_choice_task(
    directory: pathlib.Path, task: str, docs: Sequence[dict], metrics: Sequence[str] = ("acc",)
) -> pathlib.Path:
    """Writes ``<directory>/toy.jsonl`` (``docs``: {question, choices, label}) and the task YAML
    ``<directory>/toy.yaml`` naming ``task``; returns ``directory`` (an lm_eval include path)."""
    data = directory / "toy.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    body = "".join(_METRIC.format(name=m) for m in metrics)
    (directory / "toy.yaml").write_text(_TASK.format(task=task, data=data, metrics=body))
    return directory
