"""The one read-only way to load a trained run: its config, a checkpoint, tokenizer and mesh.

    restored = load_run("runs/default", step=None)     # config, Run, train state, step
    loaded = load_model("runs/default", step=None, recipe=None)
    logits = loaded.model.apply(loaded.variables, tokens)        # [B, T, V] float32

Every reader of a run (``fogjax.evaluate``, ``fogjax.generate``, the lm-evaluation-harness
model, export) goes through :func:`load_run`, which opens the checkpoints with a read-only
:class:`fogjax.checkpoint.Checkpointer`: a reader beside a live trainer never creates, cleans or
deletes anything (a writable one would delete the trainer's in-flight
``<step>.orbax-checkpoint-tmp`` at start-up, and with it that checkpoint).

The config is the one the run wrote (``<workdir>/config.json``), the tokenizer the one its data
was prepared with (the data folder's metadata), the numerics the run's own recipe: under FP8 the
checkpoint's delayed scales are used as they are and never updated. ``recipe='bf16'`` instead
evaluates the same parameters without any FP8 cast. Nothing in the workdir is written.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax

from fogjax import checkpoint, data, sharding
from fogjax.data.tokenizer import Tokenizer
from fogjax.inference.decoding import Decoder
from fogjax.model import build_model
from fogjax.precision.recipe import Recipe
from fogjax.precision.registry import make_recipe
from fogjax.train.run import Run, build_run
from fogjax.train.workdir import load_run_config


class NoCheckpointError(FileNotFoundError):
    """The workdir holds no run config or no checkpoint to load."""


@dataclasses.dataclass
class LoadedModel:
    """A checkpoint ready for forward passes and decoding.

    Attributes:
      config: the run's config (precision.recipe as evaluated, after any override).
      recipe: the precision recipe the model runs with.
      model: the Transformer (no cache; see fogjax.inference.decoding for the cached one).
      variables: {'params'} plus {'fp8'} under FP8 recipes, sharded on ``mesh``.
      tokenizer: the run's tokenizer.
      step: the checkpoint's training step.
      mesh: the device mesh from the run's config.
    """

    config: Any
    recipe: Recipe
    model: Any
    variables: dict
    tokenizer: Tokenizer
    step: int
    mesh: jax.sharding.Mesh

    _decoder: Decoder | None = dataclasses.field(default=None, repr=False)

    @property
    def seq_len(self) -> int:
        """The context the model was trained on (train.seq_len)."""
        return int(self.config.train.seq_len)

    def decoder(self) -> Decoder:
        """The KV-cache decoder over the whole context (created once, so its compilations are
        reused by every generation from this model)."""
        if self._decoder is None:
            self._decoder = Decoder(
                self.config.model, self.recipe, self.variables, self.seq_len, self.mesh
            )
        return self._decoder


@dataclasses.dataclass
class RestoredRun:
    """A run's checkpoint as the trainer holds it.

    Attributes:
      config: the run's config (``<workdir>/config.json``).
      run: the :class:`fogjax.train.run.Run` of that config (mesh, model, jitted eval step).
      state: the restored train state ``{step, params, fp8, opt_state}``, sharded on run.mesh.
      step: the checkpoint's training step.
    """

    config: Any
    run: Run
    state: dict[str, Any]
    step: int


def _root_cause(error: BaseException) -> str:
    """'Type: first line' of the innermost exception ``error`` was raised from (orbax wraps the
    file-level reason, e.g. a byte range beyond a truncated file, in generic ones)."""
    seen = {id(error)}
    while (inner := error.__cause__ or error.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        error = inner
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def reader_config(config: Any) -> Any:
    """The run's config as a reader builds it: ``optim.moment_rounding`` reset to 'auto'.

    Readers never step the optimizer, and the rounding of its moments is not part of the checkpoint
    layout (optim.state_precision.LAYOUT_FIELDS); a run saved before a rounding was refused (an FP8
    ``nu`` with "nearest", which cannot decay) must still load to evaluate, generate and export.
    """
    if config.optim.get("moment_rounding", "auto") == "auto":
        return config
    config = config.copy_and_resolve_references()
    config.optim.moment_rounding = "auto"
    return config


def load_run(workdir: str, step: int | None = None) -> RestoredRun:
    """Restores checkpoint ``step`` (the latest readable if None) of the run in ``workdir``,
    reading only: nothing in the workdir is created, changed or deleted.

    Raises:
      NoCheckpointError: no config.json, no checkpoint, or no checkpoint ``step`` in ``workdir``,
        or checkpoint ``step`` cannot be read (the message names it and the steps kept).
    """
    try:
        config = load_run_config(workdir)
    except FileNotFoundError as e:
        raise NoCheckpointError(str(e)) from None
    config = reader_config(config)
    run = build_run(config)
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise NoCheckpointError(
            f"No checkpoint in {directory}: train first (python -m fogjax.train "
            f"--workdir={workdir}) or point --workdir at a run that saved one."
        )
    ckpt = checkpoint.Checkpointer(directory, keep=1, read_only=True)
    try:
        if ckpt.latest_step() is None:
            raise NoCheckpointError(
                f"No checkpoint in {ckpt.directory}: train first (python -m fogjax.train "
                f"--workdir={workdir}) or point --workdir at a run that saved one."
            )
        if step is not None and step not in ckpt.all_steps():
            raise NoCheckpointError(
                f"No checkpoint step {step} in {ckpt.directory}; it holds steps "
                f"{ckpt.all_steps()}. Leave out --step for the latest."
            )
        with sharding.sharding_context(run.mesh):
            try:
                state, _, _ = ckpt.restore(run.abstract, step=step)
            except checkpoint.CheckpointMismatchError:
                raise  # Says which model wrote it and what to do.
            except Exception as e:
                if step is None:  # The latest: restore already fell back as far as it could.
                    raise
                # An explicit step is never skipped, so orbax's read error (pages of tensorstore
                # detail) is all the user would see.
                raise NoCheckpointError(
                    f"Checkpoint step {step} in {ckpt.directory} cannot be read "
                    f"({_root_cause(e)}): its files are truncated or were changed. "
                    f"It holds steps {ckpt.all_steps()}: pass another --step, or leave --step "
                    "out for the latest readable one."
                ) from None
    finally:
        ckpt.close()
    return RestoredRun(config, run, state, int(state["step"]))


def load_model(workdir: str, step: int | None = None, recipe: str | None = None) -> LoadedModel:
    """Loads checkpoint ``step`` (latest readable if None) of the run in ``workdir`` for forward
    passes and decoding (:func:`load_run`, so read-only).

    Args:
      workdir: a directory written by ``python -m fogjax.train``.
      step: a checkpoint step, or None for the latest.
      recipe: None (the run's recipe) or 'bf16' (the same parameters without FP8 casts).
    Raises:
      NoCheckpointError: no config.json or no checkpoint in ``workdir``.
      ValueError: an unsupported recipe override.
    """
    restored = load_run(workdir, step)
    config, state = restored.config, restored.state
    variables = {"params": state["params"]}
    if state["fp8"]:
        variables["fp8"] = state["fp8"]
    trained = config.precision.recipe
    if recipe is not None and recipe != trained:
        if recipe != "bf16":
            raise ValueError(
                f"recipe={recipe!r}: a {trained!r} checkpoint can be evaluated in its own recipe "
                "or in 'bf16' (FP8 scales exist only for the GEMMs it was trained with)."
            )
        config = config.copy_and_resolve_references()
        config.precision.recipe = recipe
        variables = {"params": variables["params"]}
    active = make_recipe(config.precision)
    tokenizer = data.eval_dataset_info(config.data).load_tokenizer()
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ValueError(
            f"The run's tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
            f"{config.model.vocab_size}; the workdir's data folder does not match its model."
        )
    return LoadedModel(
        config=config,
        recipe=active,
        model=build_model(config, active),
        variables=variables,
        tokenizer=tokenizer,
        step=restored.step,
        mesh=restored.run.mesh,
    )
