"""A run's curves read back from its TensorBoard events (``<workdir>/tb``)."""

from __future__ import annotations

import os
import re

_QKV_LAYER = re.compile(r"^kurtosis/qkv/layer_\d+$")


def read_scalars(workdir: str) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of every scalar of the run; {} if it has no events. A step written
    twice (a run resumed from an older checkpoint) keeps its latest value."""
    tb = os.path.join(workdir, "tb")
    if not os.path.isdir(tb):
        return {}
    # Imported here: tensorboard is slow to import and only the report needs it.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def series(scalars: dict[str, dict[int, float]], tag: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``tag``, sorted by step; empty lists if the run has no such tag."""
    points = sorted(scalars.get(tag, {}).items())
    return [s for s, _ in points], [v for _, v in points]


def worst_qkv_layer(scalars: dict[str, dict[int, float]]) -> str | None:
    """The ``kurtosis/qkv/layer_NN`` tag with the largest value over the run."""
    tags = [t for t in scalars if _QKV_LAYER.match(t) and scalars[t]]
    return max(tags, key=lambda t: max(scalars[t].values()), default=None)


def fp8_fraction(scalars: dict[str, dict[int, float]], kind: str) -> tuple[list[int], list[float]]:
    """Mean over every FP8 operand of ``fp8/.../<op>_<kind>`` (kind: saturation | underflow)."""
    tags = [t for t in scalars if t.startswith("fp8/") and t.endswith(f"_{kind}")]
    steps = sorted({s for t in tags for s in scalars[t]})
    values = []
    for s in steps:
        at = [scalars[t][s] for t in tags if s in scalars[t]]
        values.append(sum(at) / len(at))
    return steps, values
