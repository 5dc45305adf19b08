"""The runs of the paper's divergence ordering (SPEC.md §5), shared by the ordering studies:
every architecture under FP8DPA, plus Llama3 in BF16 as the reference."""

ARCHS = ("llama3", "llama3_smooth_swiglu", "olmo2", "op", "fog_max", "fog_opt", "fog_flash")


def runs() -> list[dict]:
    fp8 = [{"name": f"{a}_fp8dpa", "arch": a, "recipe": "fp8dpa", "overrides": {}} for a in ARCHS]
    return [*fp8, {"name": "llama3_bf16", "arch": "llama3", "recipe": "bf16", "overrides": {}}]
