"""The runs of the paper's divergence ordering (docs/spec.md §5), shared by the ordering studies:
every architecture under FP8DPA and its BF16 twin (Llama3 BF16 is the paper's reference).
docs/spec.md §4: a block that fails under FP8DPA but not in BF16 fails because of FP8; one that fails
in both is not robust to the stress itself (the LR, at these sizes)."""

ARCHS = ("llama3", "llama3_smooth_swiglu", "olmo2", "op", "fog_max", "fog_opt", "fog_flash")
BF16_TWINS = ARCHS


def runs() -> list[dict]:
    fp8 = [{"name": f"{a}_fp8dpa", "arch": a, "recipe": "fp8dpa", "overrides": {}} for a in ARCHS]
    bf16 = [{"name": f"{a}_bf16", "arch": a, "recipe": "bf16", "overrides": {}} for a in BF16_TWINS]
    return [*fp8, *bf16]
