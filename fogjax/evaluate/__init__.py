"""Evaluation of a run: held-out loss (:mod:`.loss`, also the trainer's eval) and downstream
tasks with lm-evaluation-harness (:mod:`.harness`, needs requirements-eval.txt).
``python -m fogjax.evaluate`` is the command line."""
