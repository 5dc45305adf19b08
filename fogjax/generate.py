"""Sample text from a trained run, with a KV cache.

    python -m fogjax.generate --workdir=runs/default --prompt="The module" \
        [--step 300] [--max-new-tokens 64] [--temperature 0.8] [--top-k 40] [--top-p 0.95] \
        [--seed 0] [--recipe bf16]

Loads the checkpoint read-only with the run's own config, tokenizer and precision recipe
(fogjax/inference/load.py), prefills the prompt and decodes one token per step
(fogjax/inference/decoding.py), stopping early at the end-of-document token. Prints the prompt
followed by the generated text. Exit code 2 with a one-line error for a workdir without checkpoints
or a prompt that does not fit in the model's context.
"""

from __future__ import annotations

import sys

from absl import app, flags
from absl import logging as absl_logging

from fogjax import command_line
from fogjax.inference.decoding import GREEDY, PromptTooLongError, Sampling
from fogjax.inference.load import LoadedModel, NoCheckpointError, load_model


def generate_text(
    loaded: LoadedModel,
    prompt: str,
    max_new_tokens: int = 64,
    sampling: Sampling = GREEDY,
    seed: int = 0,
) -> str:
    """The text generated after ``prompt`` (without the prompt), ending before EOS if reached.

    Raises:
      PromptTooLongError: the prompt's tokens plus ``max_new_tokens`` exceed train.seq_len.
      ValueError: an empty prompt.
    """
    ids = [int(i) for i in loaded.tokenizer.encode(prompt)]
    if not ids:
        raise ValueError("The prompt is empty after tokenisation; give at least one character.")
    if len(ids) + max_new_tokens > loaded.seq_len:
        raise PromptTooLongError(
            f"The prompt is {len(ids)} tokens; with --max-new-tokens={max_new_tokens} that "
            f"exceeds the model's context of {loaded.seq_len} tokens (train.seq_len). Shorten "
            "the prompt or lower --max-new-tokens."
        )
    eos = loaded.tokenizer.eos_id
    (new,) = loaded.decoder().generate(
        [ids], max_new_tokens, sampling, seed, stop=lambda _, toks: toks[-1] == eos
    )
    if new and new[-1] == eos:
        new = new[:-1]
    return loaded.tokenizer.decode(new)


def _define_flags() -> None:
    """Defined only when run as a program, so importing this module defines no flags."""
    flags.DEFINE_string("workdir", None, "A run directory written by fogjax.train.")
    flags.DEFINE_string("prompt", None, "The text to continue.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate at most.")
    flags.DEFINE_float("temperature", 0.0, "0 = greedy; otherwise sample logits / temperature.")
    flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = all).")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: smallest set reaching p (1 = all).")
    flags.DEFINE_integer("seed", 0, "Sampling seed: the same seed gives the same text.")
    flags.DEFINE_string("recipe", None, "None = the run's recipe; 'bf16' drops the FP8 casts.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)  # orbax's INFO lines; --verbosity=0.
    if not f.workdir or f.prompt is None:
        raise app.UsageError("Give --workdir=DIR (a run of python -m fogjax.train) and --prompt.")
    try:
        sampling = Sampling(f.temperature, f.top_k, f.top_p)
        loaded = load_model(f.workdir, f.step, f.recipe)
        text = generate_text(loaded, f.prompt, f.max_new_tokens, sampling, f.seed)
    except (NoCheckpointError, PromptTooLongError, ValueError) as e:
        command_line.fail(str(e))
    print(f.prompt + text)


def underscore_flag_names(argv: list[str]) -> list[str]:
    """``--max-new-tokens=8`` -> ``--max_new_tokens=8``: absl flags are spelt with underscores,
    the documented command line with dashes; both work."""
    out = []
    for arg in argv:
        if arg.startswith("--") and not arg.startswith("--prompt"):
            name, eq, value = arg[2:].partition("=")
            arg = "--" + name.replace("-", "_") + eq + value
        out.append(arg)
    return out


if __name__ == "__main__":
    _define_flags()
    command_line.run(main, argv=underscore_flag_names(sys.argv))
