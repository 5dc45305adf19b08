"""Training: ``python -m fogjax.train`` (:mod:`.__main__`) calls
:func:`fogjax.train.loop.train_and_evaluate`.

Reading order: :mod:`.loop` (restore-or-init, the loop, eval, checkpoints) -> :mod:`.run` (the
model, optimizer, shapes and the one jitted step of a config) -> :mod:`.step` (the pure train
step) -> :mod:`.control` (signals, compile thread, profiler, cadence), :mod:`.preflight`
(start-up checks), :mod:`.workdir` (lock, run config, summary), :mod:`.qaf` (FP4 finetuning
switch), :mod:`.provenance`.
"""
