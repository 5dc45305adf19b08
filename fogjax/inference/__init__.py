"""Inference from a trained run: :mod:`.load` (the one read-only way to load a run) and
:mod:`.decoding` (KV-cache prefill and sampling)."""
