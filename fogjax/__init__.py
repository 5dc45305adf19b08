"""fogjax: fully-FP8 GEMM LLM pretraining in JAX with the FOG architectures (arXiv 2505.20524)."""

__version__ = "0.1.0"
