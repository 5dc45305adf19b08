"""The full default config of a run, per architecture and size (docs/spec.md §1-§3).

`configs/<arch>.py` files call :func:`get_config` with their architecture and the size given after
the colon on the command line (``--config=configs/fog_flash.py:1.5b``). Every field carries a
comment; the config is locked, so a typo in ``--config.x.y=...`` fails loudly.

Fields that follow from others are derived when read (:func:`_derived`, an ml_collections lazy
reference): the architecture's fields from ``model.arch`` (ARCHITECTURES, the one table), the
post-norm gain from ``model.num_layers``, the softmax scale from the head dim. So
``--config.model.num_layers=8`` gives FOG's 1/sqrt(8) gain and ``--config.model.arch=llama3``
builds Llama3; setting a derived field explicitly replaces its derivation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import ml_collections

# ml_collections' lazy op record: a FieldReference built with it is computed from other fields
# each time it is read (the mechanism behind FieldReference's own arithmetic).
from ml_collections.config_dict.config_dict import _Op

from fogjax.model.blocks import ARCHITECTURES, SIGMA0, ArchSpec, post_norm_init

ARCHS = tuple(ARCHITECTURES)
SIZES = ("tiny", "390m", "1.5b", "8b")

# Paper Table 6. ffn is F, the SwiGLU-equivalent width; non-gated FFNs use 3F/2.
_SIZE_TABLE = {
    #        L   D     F      H   G  tied   batch steps    lr      warmup cooldown fog_softmax_scale
    "tiny": (4, 256, 768, 2, 1, False, 16, 200, 3e-3, 20, 40, 0.17678),
    "390m": (16, 1024, 4096, 8, 4, True, 128, 100_000, 1e-3, 5_000, 20_000, 0.17678),
    "1.5b": (16, 2048, 8192, 16, 8, False, 256, 125_000, 2.5e-4, 2_500, 25_000, 0.125),
    "8b": (32, 4096, 14336, 32, 8, False, 512, 10_000, 3e-4, 1_250, 0, 0.125),
}

GATED_ACTIVATIONS = ("swiglu", "smooth_swiglu")
# Head dim of every paper size; FOG's table softmax scales are for it.
PAPER_HEAD_DIM = 128


def arch_spec(arch: str) -> ArchSpec:
    """The ARCHITECTURES entry of ``arch``; ValueError naming the choices if there is none."""
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"Invalid model config: unknown model.arch={arch!r}; choose one of {list(ARCHS)} "
            "(or --config=configs/<arch>.py:<size>)."
        )
    return ARCHITECTURES[arch]


def ffn_dim(activation: str, f: int) -> int:
    """FFN width for SwiGLU-equivalent width F: F when gated, 3F/2 otherwise (same count)."""
    return f if activation in GATED_ACTIVATIONS else 3 * f // 2


def softmax_scale(arch: str, head_dim: int, fog_scale_at_128: float) -> float:
    """s of docs/spec.md §1: 1/sqrt(d_h) for the baselines; for FOG the paper's fixed scale (the
    frozen QK gain g folded in, s = g/sqrt(d_h)) at d_h = 128, so s = s_128 * sqrt(128/d_h)."""
    if arch_spec(arch).fog_softmax_scale:
        return fog_scale_at_128 * math.sqrt(PAPER_HEAD_DIM / head_dim)
    return 1.0 / math.sqrt(head_dim)


def _derived(field_type: type, fn: Callable[..., Any], *refs: Any) -> ml_collections.FieldReference:
    """A field equal to ``fn(*values of refs)`` whenever it is read; setting it (config file or
    ``--config.model.x=``) replaces the derivation with the value set."""
    return ml_collections.FieldReference(
        field_type(), field_type=field_type, op=_Op(lambda _, *values: fn(*values), list(refs))
    )


def model_config(arch: str, size: str) -> ml_collections.ConfigDict:
    """The `model` section for one architecture and size."""
    arch_spec(arch)
    if size not in _SIZE_TABLE:
        raise ValueError(f"Unknown size {size!r}; choose one of {list(SIZES)}.")
    layers, d, f, h, g, tied, *_, fog_scale = _SIZE_TABLE[size]
    m = ml_collections.ConfigDict()
    m.arch = arch  # Registry name (fogjax.model.blocks.ARCHITECTURES); the fields below follow it.
    arch_ref = m.get_ref("arch")

    def from_arch(field: str, field_type: type) -> ml_collections.FieldReference:
        return _derived(field_type, lambda a: getattr(arch_spec(a), field), arch_ref)

    m.vocab_size = 4096 if size == "tiny" else 131072  # Must cover the tokenizer's vocabulary.
    m.d_model = d  # D, the residual width.
    m.num_layers = layers  # L.
    m.num_heads = h  # H query heads; head dim d_h = D / H (128 at every paper size).
    m.num_kv_heads = g  # G key/value groups (GQA).
    # 'gelu' | 'swiglu' | 'smooth_swiglu' | 'xielu'; from model.arch.
    m.ffn_activation = from_arch("ffn_activation", str)
    m.ffn_base_dim = f  # F of paper Table 6 (SwiGLU-equivalent FFN width).
    # Gated FFNs use F, non-gated 3F/2 (same parameter count); derived from the two above.
    m.ffn_dim = _derived(int, ffn_dim, m.get_ref("ffn_activation"), m.get_ref("ffn_base_dim"))
    # Embedding output multiplier: 1/sigma0 for FOG and OP; from model.arch.
    m.input_scale = from_arch("input_scale", float)
    m.pre_norm = from_arch("pre_norm", bool)  # RMSNorm before attention and FFN (Llama).
    # 'none' | 'rms' | 'layerscale' on each branch output; from model.arch.
    m.post_norm = from_arch("post_norm", str)
    # Initial post-norm / LayerScale gain: 1/sqrt(L) for FOG and OP, 1 for OLMo2 (derived).
    m.post_norm_init = _derived(
        float,
        lambda a, layers: post_norm_init(arch_spec(a) and a, layers),
        arch_ref,
        m.get_ref("num_layers"),
    )
    # 'none' | 'rms' (learnable gain) | 'frozen_rms' | 'tanh', per head over d_h; from model.arch.
    # 'rms_all_heads': learnable RMSNorm over the whole q / k projection ([H*d_h], [G*d_h] gains),
    # Hugging Face's (and OLMo-core's) OLMo2; an olmo2 trained with it exports to transformers'
    # own Olmo2ForCausalLM, per-head OLMo2 to remote code (fogjax/export).
    m.qk_norm = from_arch("qk_norm", str)
    m.tanh_alpha_init = 0.5  # alpha0 of FOG-flash's tanh(alpha x) QK regulariser.
    # FOG's fixed softmax scale at head dim 128 (paper: 0.17678 at 390M, 0.125 at 1.5B and 8B).
    m.fog_softmax_scale_at_128 = fog_scale
    # Softmax scale s (logits = s q.k), derived: 1/sqrt(d_h) for the baselines; FOG folds the
    # frozen QK gain into a larger fixed scale, s = fog_softmax_scale_at_128 * sqrt(128 / d_h).
    m.softmax_scale = _derived(
        float,
        lambda a, width, heads, s128: softmax_scale(a, width // heads, s128),
        arch_ref,
        m.get_ref("d_model"),
        m.get_ref("num_heads"),
        m.get_ref("fog_softmax_scale_at_128"),
    )
    m.final_norm = from_arch("final_norm", bool)  # RMSNorm before the LM head (not FOG or OP).
    m.norm_eps = 1e-5  # RMSNorm epsilon (reduced in float32).
    m.rope_base = 500_000.0  # RoPE base frequency.
    m.rope_scaling = True  # Llama-3.1 frequency scaling (on in the released code).
    m.rope_scaling_factor = 8.0
    m.rope_low_freq_factor = 1.0
    m.rope_high_freq_factor = 4.0
    m.rope_original_context = 8192
    m.init_std = SIGMA0  # sigma0: std of every matrix (embedding and LM head included).
    m.scale_out_init = True  # Attention-out and FFN-out use sigma0/sqrt(2L).
    m.tie_embeddings = tied  # LM head shares the embedding (390M only).
    m.xielu_alpha_init = 0.8  # Initial alpha_p and alpha_n of xIELU.
    m.xielu_beta = 0.5
    m.xielu_eps = -1e-6
    m.smooth_swiglu_per_channel = False  # SmoothSwiGLU per token (paper code) or per channel.
    m.scan_layers = True  # nn.scan over blocks (False unrolls: slower compile, same numerics).
    m.remat = "none"  # Activation checkpointing: 'none' | 'full' | 'dots'.
    m.attention_impl = "xla"  # 'xla' (einsum; everywhere) or 'cudnn' (fused, Hopper GPUs).
    return m


def tokens_per_step(config: ml_collections.ConfigDict) -> int:
    """Tokens per optimizer step: ``train.batch_size`` sequences of ``train.seq_len`` tokens (the
    one definition; tokens seen = steps x this, in checkpoints, summaries, reports and the
    bench)."""
    return int(config.train.batch_size) * int(config.train.seq_len)


def get_config(arch: str, size: str = "tiny") -> ml_collections.ConfigDict:
    """The complete, locked run config for ``arch`` at ``size``."""
    size = size or "tiny"
    if size not in _SIZE_TABLE:
        raise ValueError(f"Unknown size {size!r}; choose one of {list(SIZES)} (configs/x.py:SIZE).")
    _, _, _, _, _, _, batch, steps, lr, warmup, cooldown, _ = _SIZE_TABLE[size]
    c = ml_collections.ConfigDict()
    c.seed = 0  # Seeds parameter init and data order.
    c.model = model_config(arch, size)

    c.precision = ml_collections.ConfigDict()
    # 'bf16' | 'fp8' (linears) | 'fp8dpa' (linears + attention) | 'fp8_current' | 'fp8dpa_current'
    # (the same with current scaling: each tensor's own amax, no history) | 'nvfp4' | 'mxfp4'
    # (emulated FP4 linears; fogjax/precision/registry.py lists them). FOG models exist to train
    # in FP8DPA, so that is their default; the baselines default to their BF16 reference.
    c.precision.recipe = "fp8dpa" if arch.startswith("fog") else "bf16"
    c.precision.backend = "xla"  # 'xla' (flax fp8_ops style, runs on CPU too) | 'te' (GPU).
    c.precision.compute_dtype = "bfloat16"  # Activation dtype; parameters stay float32.
    c.precision.amax_history_len = 1024  # Delayed scaling window (unused by *_current).
    c.precision.amax_reduction = "max"  # 'max' over the window, or 'most_recent' (ditto).
    c.precision.margin = 0  # scale = fp8_max / amax / 2**margin.
    # FP4 recipes ('nvfp4', 'mxfp4'; docs/spec.md §6) only. QK^T and PV: 'bf16' (the paper) or 'fp8'
    # (FP8DPA's FP8 attention with the delayed-scaling fields above).
    c.precision.attention = "bf16"
    # NVIDIA's NVFP4 recipe options (arXiv 2509.25149), all off by default:
    c.precision.fp4_weight_2d = False  # 16x16 weight block scales (W and W^T quantise alike), §4.3.
    c.precision.fp4_hadamard_wgrad = False  # 16x16 random Hadamard on weight-gradient inputs, §4.2.
    c.precision.fp4_sr_gradients_only = False  # SR on gradients only (RtN on X^T in dW), §4.4.
    # (first, last): keep that many leading and trailing blocks entirely in BF16, §4.1 (their
    # 12B model: about 16% of linear layers, mostly the last blocks). FP4 recipes only; at least
    # one FP4 block must remain. Each run of blocks is its own nn.scan (model/transformer.py).
    c.precision.high_precision_layers = (0, 0)
    # QAF ("FP4 All the Way" §5): FP4 forward, BF16 backward from step qaf_start (a step >= 1,
    # or a fraction of train.steps in (0, 1); < 0 is off), or automatically (qaf_auto) once the
    # layer-averaged rho = RMS(g_bf16) / std(g_fp4 - g_bf16) stays below sqrt(3) for qaf_patience
    # consecutive statistics steps.
    c.precision.qaf_start = -1.0
    c.precision.qaf_auto = False
    c.precision.qaf_patience = 2
    # The paper's LR reset and short warm-up at the switch (§5; 40 warm-up iterations for its 7B),
    # both off by default. qaf_lr_reset: from the switch step s the LR restarts at optim.peak_lr
    # and decays linearly to optim.min_lr at train.steps. qaf_warmup_steps W > 0: the QAF LR is
    # multiplied by min(1, (t - s + 1) / W). s is passed to the compiled QAF step (qaf_auto finds
    # it at run time) and saved in the checkpoint with the phase (fogjax/precision/fp4_qaf.py).
    c.precision.qaf_lr_reset = False
    c.precision.qaf_warmup_steps = 0

    c.data = ml_collections.ConfigDict()
    c.data.path = "embedded"  # Directory of prepared shards, or 'embedded' (bundled corpus).
    c.data.num_workers = 0  # grain worker processes (0 = in-process).
    # Several prepared datasets drawn with weights, 'PATH=WEIGHT,PATH=WEIGHT' (shares of training
    # windows; fogjax/data/mixture.py); replaces data.path, validation uses the first. '' = off.
    c.data.mixture = ""
    # Attention stays inside each document of a window: a query sees only the keys after the last
    # EOS before it (segment ids from the tokens; model.attention_impl='xla' only). The loss is
    # unchanged otherwise. Off by default: windows attend across documents, as in the paper.
    c.data.document_mask = False
    # The EOS id that ends a document; -1: the dataset's (metadata.json), set at start-up.
    c.data.eos_id = -1

    c.optim = ml_collections.ConfigDict()
    c.optim.peak_lr = lr
    c.optim.min_lr = 1e-8
    c.optim.schedule = "wsd"  # 'wsd' (warmup, stable, 1-sqrt cooldown) | 'cosine'.
    c.optim.warmup_steps = warmup
    c.optim.cooldown_steps = cooldown
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.1  # On matrices only (embedding and LM head included).
    c.optim.grad_clip = 1.0  # Global-norm clip over parameters (never the FP8 state).
    # Optimizer-state precision (fogjax/optim/state_precision.py; docs/optimizer_state.md). A
    # preset setting the four dtypes below at once: 'fp32' | 'fog_fp16' |
    # 'fog_fp8_m1' | 'fog_fp8' | 'bf16', or 'custom' (take the four fields as given).
    c.optim.state_precision = "custom"
    c.optim.master_dtype = "float32"  # Stored parameters: 'float32' | 'bfloat16' | 'float16'.
    # Moments: 'float32' | 'bfloat16' | 'float16' | 'float8_e4m3fn' | 'int8' (8-bit blockwise).
    c.optim.mu_dtype = "float32"
    c.optim.nu_dtype = "float32"
    c.optim.grad_dtype = (
        "float32"  # Gradients after backward, accumulated in: 'float32'|'bfloat16'.
    )
    # Rounding of a 16-bit master: 'nearest' | 'stochastic' (seeded by the step) | 'remainder'
    # (bfloat16 + int16 remainder = the float32 master exactly) | 'auto' (remainder for the
    # 'bf16' preset, else nearest).
    c.optim.master_rounding = "auto"
    # Scale block of float16/float8/int8 moments: elements along the last axis (0 = per tensor).
    c.optim.state_block_size = 128
    # Requantising 16- and 8-bit moments: 'nearest' (even) | 'stochastic' (unbiased, seeded by
    # the step) | 'auto' (stochastic for 8-bit moments and where nearest would stall a moment's
    # decay, else nearest; an explicit 'nearest' that would stall it, e.g. FP8 nu, is refused).
    c.optim.moment_rounding = "auto"

    c.train = ml_collections.ConfigDict()
    c.train.steps = steps
    c.train.batch_size = batch  # Global batch, in sequences.
    c.train.seq_len = 128 if size == "tiny" else 4096
    c.train.micro_batches = 1  # Gradient accumulation steps per optimizer step.
    # The training loss's LM head and cross-entropy a chunk of about this many tokens per device
    # at a time, gradients computed in the forward pass (fogjax/train/lm_loss.py): float32 logits
    # exist for one chunk only (4 B x V per token: 4 GiB for 8,192 tokens at V = 131,072), and
    # their gradient never in float32. 0 = the whole logits at once (the model's logits and
    # optax's loss). Eval, generation and export always take whole logits. docs/speed.md compares
    # chunk sizes: smaller ones save memory for a few ms per step.
    c.train.loss_chunk_tokens = 8192
    c.train.ckpt_every = 100 if size == "tiny" else 1000
    c.train.keep_checkpoints = 3
    c.train.eval_every = 100 if size == "tiny" else 1000
    c.train.eval_batches = 4 if size == "tiny" else 20
    # The console line every N steps (TensorBoard gets every step's scalars); multi-process runs
    # also agree on a stop request (SIGTERM) at this cadence.
    c.train.log_every = 10 if size == "tiny" else 50
    c.train.stats_every = 50 if size == "tiny" else 250  # Kurtosis and FP8 statistics.
    # Resume although model fields that keep every shape changed (rope_base, softmax_scale,
    # seq_len, ...); refused by default. Every config a run used stays in config_history/.
    c.train.allow_config_change = False
    # 'FIRST,LAST': a jax.profiler trace of those steps into <workdir>/profile ('' = none).
    c.train.profile_steps = ""
    # A Hugging Face checkpoint directory (transformers' Llama / OLMo2, or any fogjax export) whose
    # weights replace the random init of a fresh run ('' = random init). Checked against the model
    # config before anything is written (fogjax/export/hf_import.py); a workdir that already has
    # checkpoints resumes from them and ignores it. Needs requirements-export.txt.
    c.train.init_from = ""

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices not used by the other axes.
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    c.log = ml_collections.ConfigDict()
    c.log.kurtosis_form = "token"  # 'token' (paper) or 'sequence' (released code).
    # Early warning (fogjax/monitoring/kurtosis.py): a layer's kurtosis above this multiple of its
    # own log-trend on `kurtosis_alarm_patience` consecutive statistics steps prints a warning.
    c.log.kurtosis_alarm_ratio = 1.5
    c.log.kurtosis_alarm_patience = 2
    # Divergence detection (fogjax/monitoring/divergence.py), recorded in <workdir>/summary.json. A
    # loss spike: the loss above its running minimum by more than `loss_spike_margin` nats (0 = off)
    # on `loss_spike_patience` consecutive steps. A grad-norm spike: above `grad_spike_ratio`
    # times its trailing average (0 = off) on `grad_spike_patience` consecutive steps. Steps up to
    # `divergence_start_step` are ignored (-1: optim.warmup_steps, whose transients are normal).
    c.log.loss_spike_margin = 1.0
    c.log.loss_spike_patience = 10
    # A single step's loss above `loss_blowup_ratio` times the first step's (about ln V, the
    # untrained model's) is a divergence at once, warm-up included (0 = off).
    c.log.loss_blowup_ratio = 2.0
    c.log.grad_spike_ratio = 10.0
    c.log.grad_spike_patience = 5
    c.log.divergence_start_step = -1
    # On a loss or grad-norm spike: 'stop' (exit code 3, like NaN) or 'continue' (record it, train
    # on). A NaN/inf loss always stops: the parameters are lost from there on.
    c.log.on_divergence = "stop"
    # MFU is always against the device's dense BF16 peak (so FP8's speed-up shows as higher MFU).
    # Devices missing from fogjax.monitoring.throughput.PEAK_FLOPS report no MFU unless a peak is
    # declared here.
    c.log.peak_tflops = 0.0
    c.lock()
    return c
