"""``data.mixture``: several prepared datasets drawn with weights (Levanter's mixtures).

    --config.data.mixture='/data/fineweb-edu=3,/data/code=1'

``PATH=WEIGHT`` pairs, comma-separated; a PATH is a prepared folder or 'embedded'. Weights are
relative shares of training windows (all windows have ``seq_len + 1`` tokens, so of tokens too).
The draw is exact and deterministic: grain's ``MapDataset.mix`` interleaves the components (each
shuffled by the run's seed, repeated for ever) so that every prefix of the stream holds them in
the weights' proportions to within one window per component, and element ``i`` is a function of
``i`` alone, so a run resumes exactly from ``{"batches_consumed": n}`` as with one dataset.
Validation uses the first component's ``val`` split. Every component must share one tokenizer
(vocabulary, EOS and BOS, and the tokenizer.json's bytes where both have one).

Without ``data.mixture`` the run trains on ``data.path`` alone, exactly as before.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

from fogjax.data.datasets import load_dataset_info
from fogjax.data.shards import DatasetInfo


@dataclasses.dataclass(frozen=True)
class Mixture:
    """The training data of a run: ``(dataset, weight)`` components, in the given order."""

    components: tuple[tuple[DatasetInfo, float], ...]

    @property
    def eval_info(self) -> DatasetInfo:
        """The dataset whose validation split the run evaluates on (the first)."""
        return self.components[0][0]

    @property
    def infos(self) -> tuple[DatasetInfo, ...]:
        return tuple(info for info, _ in self.components)

    def describe(self) -> str:
        """A markdown table of the components (TensorBoard's ``run/data`` text)."""
        total = sum(w for _, w in self.components)
        rows = [
            "| dataset | weight | share | train tokens | val tokens |",
            "|---|---|---|---|---|",
        ]
        for info, w in self.components:
            rows.append(
                f"| {info.dir} | {w:g} | {w / total:.1%} | {info.train_tokens:,} | "
                f"{info.val_tokens:,} |"
            )
        first = self.eval_info
        rows.append(
            f"\ntokenizer {first.tokenizer_source}, vocab_size {first.vocab_size}, eos_id "
            f"{first.eos_id}, bos_id {first.bos_id}; validation: {first.dir}"
        )
        return "\n".join(rows)


def parse_mixture(spec: str) -> list[tuple[str, float]]:
    """``'a=3,b=1'`` -> [('a', 3.0), ('b', 1.0)].

    Raises:
      ValueError: not PATH=WEIGHT pairs with positive weights (naming data.mixture).
    """
    out = []
    for item in spec.split(","):
        path, sep, weight = item.strip().rpartition("=")
        try:
            value = float(weight)
        except ValueError:
            value = -1.0
        if not sep or not path or not value > 0:
            raise ValueError(
                f"data.mixture={spec!r}: {item.strip()!r} is not PATH=WEIGHT with a weight > 0. "
                "Write e.g. --config.data.mixture='/data/web=3,/data/code=1'."
            )
        out.append((path, value))
    return out


def _tokenizer_digest(info: DatasetInfo) -> str:
    """The tokenizer.json's sha256, or the spec where there is no file ('bytes')."""
    try:
        with open(info.tokenizer, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return info.tokenizer


def check_same_tokenizer(infos: tuple[DatasetInfo, ...]) -> None:
    """Raises ValueError naming the two datasets whose tokenizers differ."""
    first = infos[0]
    key = (first.vocab_size, first.eos_id, first.bos_id, _tokenizer_digest(first))
    for info in infos[1:]:
        other = (info.vocab_size, info.eos_id, info.bos_id, _tokenizer_digest(info))
        if other != key:
            raise ValueError(
                f"data.mixture: {info.dir} was prepared with another tokenizer than {first.dir} "
                f"(vocab_size, eos_id, bos_id: {other[:3]} vs {key[:3]}, or another "
                "tokenizer.json). Prepare every component with the same --tokenizer."
            )


def load_mixture(data_config: Any) -> Mixture:
    """The training data of ``config.data``: ``data.mixture`` if set, else ``data.path`` alone
    (a mixture of one, which the pipeline reads exactly as a single dataset)."""
    spec = data_config.get("mixture", "")
    if not spec:
        return Mixture(((load_dataset_info(data_config.path), 1.0),))
    components = tuple((load_dataset_info(path), w) for path, w in parse_mixture(spec))
    check_same_tokenizer(tuple(info for info, _ in components))
    return Mixture(components)


def eval_dataset_info(data_config: Any) -> DatasetInfo:
    """The dataset a run evaluates on: the first ``data.mixture`` component, else ``data.path``."""
    spec = data_config.get("mixture", "")
    return load_dataset_info(parse_mixture(spec)[0][0] if spec else data_config.path)
