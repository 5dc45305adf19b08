"""lm-evaluation-harness for fogjax runs: the ``fogjax`` model and the evaluation of a run.

    python -m fogjax.evaluate --workdir=runs/default --tasks=fog_downstream
    python -m fogjax.evaluate.harness --model fogjax --model_args workdir=runs/default --tasks
    arc_easy

The second line is lm_eval's own command line with this model registered (lm-eval 0.4.x discovers
no external models: it knows only the names its own ``lm_eval.models`` registers, so plain
``lm_eval --model fogjax`` works only where ``fogjax.evaluate.harness`` has been imported).

:func:`run_downstream` (what ``python -m fogjax.evaluate --tasks`` runs) evaluates a run's
checkpoint with ``lm_eval.simple_evaluate``, writes ``<workdir>/downstream/results_step<N>.json``
and each numeric score to TensorBoard as ``downstream/<task>/<metric>``. ``fog_downstream`` is the
task group shipped in fogjax/evaluate/tasks; ``include_path`` adds folders of the user's own task
YAMLs (local data files, for offline runs).

model_args: ``workdir`` (required), ``step`` (default latest), ``recipe`` (default the run's;
``bf16`` drops the FP8 casts), ``max_gen_toks`` (default 256), ``seed``. The batch size (rows
per forward pass, default 8) is lm_eval's own ``--batch_size`` / ``simple_evaluate(batch_size=)``.

Requests are scored in batches of ``batch_size`` rows padded to a power-of-two length bucket
(fogjax.inference.decoding.bucket_length), so a task compiles once per bucket, not once per request.
Rows are split over the mesh's ('data', 'fsdp') axes (data parallel); results come back replicated.
Importing this module needs ``lm-eval`` (requirements-eval.txt); nothing else in fogjax does.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import lm_eval
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from lm_eval import utils as lm_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import model_registry
from lm_eval.tasks import TaskManager

from fogjax import sharding
from fogjax.inference.decoding import Sampling, bucket_length
from fogjax.inference.load import LoadedModel, load_model
from fogjax.monitoring.writer import MetricWriter

# The task-group YAMLs shipped with fogjax (the paper's downstream group).
TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")


def token_log_probs(model: Any, variables: dict, inputs: jax.Array, targets: jax.Array) -> tuple:
    """(log p(target) float32 [B, T], target == argmax bool [B, T]) from one forward pass over
    ``inputs`` int32 [B, T]; ``targets`` int32 [B, T] are the next tokens."""
    logits = model.apply(variables, inputs)
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logits, axis=-1) == targets


class FogjaxLM(LM):
    """A fogjax checkpoint as an lm-evaluation-harness model (module docstring for the args)."""

    def __init__(
        self,
        workdir: str | None = None,
        step: int | str | None = None,
        recipe: str | None = None,
        batch_size: int | str = 8,
        max_gen_toks: int | str = 256,
        seed: int | str = 0,
        loaded: LoadedModel | None = None,
        **unused: Any,
    ):
        super().__init__()
        if loaded is None:
            if not workdir:
                raise ValueError("The fogjax model needs model_args workdir=DIR (a fogjax run).")
            loaded = load_model(workdir, None if step in (None, "") else int(step), recipe or None)
        self.loaded = loaded
        if str(batch_size).startswith("auto"):
            batch_size = 8  # No memory probing: a fixed batch keeps one compilation per bucket.
        rows = int(np.prod([loaded.mesh.shape[a] for a in sharding.BATCH_MESH_AXES]))
        # A whole number of rows per data-parallel device.
        self.batch_size = -(-int(batch_size) // rows) * rows
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        self.tokenizer = loaded.tokenizer
        replicated = NamedSharding(loaded.mesh, P())
        self._rows = NamedSharding(loaded.mesh, P(sharding.BATCH_MESH_AXES))
        self._score = jax.jit(
            lambda v, x, y: token_log_probs(loaded.model, v, x, y),
            out_shardings=(replicated, replicated),
        )

    @property
    def max_length(self) -> int:
        return self.loaded.seq_len

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    def tok_encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer.encode(text)]

    # -- scoring -------------------------------------------------------------------------------

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids, tokenised together so the boundary merges as in the
        text; trailing context whitespace moves to the continuation (as lm_eval's HFLM does)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return [self.eot_token_id], self.tok_encode(continuation)
        whole = self.tok_encode(context + continuation)
        n = len(self.tok_encode(context))
        return whole[:n], whole[n:]

    def score_tokens(
        self, pairs: Sequence[tuple[list[int], list[int]]]
    ) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), every continuation token greedy) per pair.

        The sequence is context + continuation, left-truncated to max_length + 1 tokens (only the
        continuation's last max_length tokens are scored if it is longer). Pairs are batched by
        length (longest first) into ``batch_size`` rows and a power-of-two length bucket.
        """
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        seqs, counts = [], []
        for context, continuation in pairs:
            if not continuation:
                raise ValueError("An lm_eval request with an empty continuation cannot be scored.")
            seq = (list(context) + list(continuation))[-(self.max_length + 1) :]
            seqs.append(seq)
            counts.append(min(len(continuation), len(seq) - 1))
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            width = bucket_length(max(len(seqs[i]) - 1 for i in chunk), self.max_length)
            inputs = np.zeros((self.batch_size, width), np.int32)
            targets = np.zeros((self.batch_size, width), np.int32)
            for row, i in enumerate(chunk):
                n = len(seqs[i]) - 1
                inputs[row, :n], targets[row, :n] = seqs[i][:-1], seqs[i][1:]
            logp, greedy = jax.device_get(
                self._score(self.loaded.variables, self._put_rows(inputs), self._put_rows(targets))
            )
            for row, i in enumerate(chunk):
                n, k = len(seqs[i]) - 1, counts[i]
                span = slice(n - k, n)
                results[i] = (
                    float(np.sum(logp[row, span], dtype=np.float64)),
                    bool(greedy[row, span].all()),
                )
        return results  # type: ignore[return-value]

    def _put_rows(self, array: np.ndarray) -> jax.Array:
        # Every process holds the same requests, so the host array is the global one.
        return jax.make_array_from_process_local_data(self._rows, array, array.shape)

    def loglikelihood(self, requests: list) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*req.args) for req in requests]
        return self.score_tokens(pairs)

    def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
        """Disjoint windows of max_length tokens covering ``text`` (lm_eval's rolling scheme:
        the first window starts after EOS, later ones keep one token of context)."""
        windows = lm_utils.get_rolling_token_windows(
            token_list=self.tok_encode(text),
            prefix_token=self.eot_token_id,
            max_seq_len=self.max_length,
            context_len=1,
        )
        return [lm_utils.make_disjoint_window(w) for w in windows]

    def loglikelihood_rolling(self, requests: list) -> list[float]:
        per_request = [self.rolling_windows(req.args[0]) for req in requests]
        flat = [w for windows in per_request for w in windows]
        scores = iter(self.score_tokens(flat))
        return [sum(next(scores)[0] for _ in windows) for windows in per_request]

    # -- generation ----------------------------------------------------------------------------

    def _generation_settings(self, kwargs: dict) -> tuple[list[str], int, Sampling]:
        kwargs = dict(kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = min(int(kwargs.pop("max_gen_toks", self.max_gen_toks)), self.max_length - 1)
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        if not kwargs.pop("do_sample", temperature > 0):
            temperature = 0.0
        sampling = Sampling(
            temperature, int(kwargs.pop("top_k", 0) or 0), float(kwargs.pop("top_p", 1.0) or 1.0)
        )
        return until, max_new, sampling

    def generate_until(self, requests: list) -> list[str]:
        """Greedy (or sampled, per gen_kwargs) continuations, cut before the first stop string
        in ``until`` and at EOS, at most ``max_gen_toks`` tokens; contexts are left-truncated
        so that context + generation fits in max_length."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        for indices in groups.values():
            until, max_new, sampling = self._generation_settings(requests[indices[0]].args[1])
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                texts = self.generate_texts(
                    [requests[i].args[0] for i in chunk], until, max_new, sampling
                )
                for i, text in zip(chunk, texts, strict=True):
                    out[i] = text
        return out  # type: ignore[return-value]

    def generate_texts(
        self, contexts: Sequence[str], until: Sequence[str], max_new: int, sampling: Sampling
    ) -> list[str]:
        """One batch of generations (at most ``batch_size`` contexts), see generate_until."""
        keep = self.max_length - max_new
        prompts = [(self.tok_encode(c) or [self.eot_token_id])[-keep:] for c in contexts]
        # Pad the batch to its fixed size with one-token prompts that stop at once.
        real = len(prompts)
        prompts += [[self.eot_token_id]] * (self.batch_size - real)
        eos = self.eot_token_id

        def stop(row: int, tokens: list[int]) -> bool:
            if row >= real or tokens[-1] == eos:
                return True
            text = self.tokenizer.decode(tokens)
            return any(s in text for s in until)

        generated = self.loaded.decoder().generate(prompts, max_new, sampling, self.seed, stop)[
            :real
        ]
        texts = []
        for tokens in generated:
            text = self.tokenizer.decode([t for t in tokens if t != eos])
            for s in until:
                text = text.split(s)[0] if s else text
            texts.append(text)
        return texts


# -- evaluation of a run ------------------------------------------------------------------


def scalar_tags(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``{'downstream/<task>/<metric>': value}`` for every finite numeric score.

    lm_eval keys metrics ``'<metric>,<filter>'``; the default filter ``none`` is dropped and any
    other becomes a path component (``exact_match,strict-match`` -> ``exact_match/strict-match``).
    """
    tags = {}
    for task, scores in results.items():
        for key, value in scores.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if not math.isfinite(value):
                continue
            metric, _, filt = key.partition(",")
            name = metric if filt in ("", "none") else f"{metric}/{filt}"
            tags[f"downstream/{task}/{name}"] = float(value)
    return tags


def run_downstream(
    workdir: str,
    tasks: Sequence[str],
    step: int | None = None,
    recipe: str | None = None,
    batch_size: int = 8,
    limit: float | None = None,
    num_fewshot: int | None = None,
    include_path: Sequence[str] = (),
    lm: Any = None,
    include_defaults: bool = True,
) -> dict[str, Any]:
    """Evaluates a run's checkpoint on lm_eval ``tasks``; returns lm_eval's results dict (with
    ``step``, ``recipe`` and ``results_path`` added) after writing it to the workdir and
    TensorBoard. ``lm``: an already loaded FogjaxLM of this workdir (else one is loaded);
    ``include_defaults=False`` skips indexing lm_eval's ~15k built-in tasks (~10 s) when only
    ``include_path`` tasks are asked for."""
    if lm is None:
        lm = FogjaxLM(workdir=workdir, step=step, recipe=recipe, batch_size=batch_size)
    step = lm.loaded.step
    manager = TaskManager(
        include_path=[TASKS_DIR, *include_path], include_defaults=include_defaults
    )
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=False,
    )
    out = {"step": step, "recipe": lm.loaded.recipe.name, **out}
    path = os.path.join(workdir, "downstream", f"results_step{step}.json")
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(out, f, indent=2, default=str)
        os.replace(path + ".tmp", path)
    writer = MetricWriter(os.path.join(workdir, "tb"))
    try:
        writer.write_scalars(step, scalar_tags(out["results"]))
    finally:
        writer.close()
    out["results_path"] = path
    return out


# Registered by name, resolved on first use: the same entry whether this module was imported or
# runs as ``python -m fogjax.evaluate.harness`` (where a class object would be
# ``__main__.FogjaxLM``).
model_registry.register("fogjax", target="fogjax.evaluate.harness:FogjaxLM")


def main() -> None:
    """lm_eval's command line, with the ``fogjax`` model registered and fogjax's tasks on the
    include path (``python -m fogjax.evaluate.harness --model fogjax --model_args
    workdir=W ...``)."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if "--include_path" not in sys.argv:
        sys.argv += ["--include_path", TASKS_DIR]
    cli_evaluate()


if __name__ == "__main__":
    main()
