"""FP8 recipes (`fp8`, `fp8dpa`): registered here; filled in by the FP8 engine."""
