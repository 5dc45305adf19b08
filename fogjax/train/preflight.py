"""Checks made before a run writes anything: config values, the workdir, the dataset.

Each failure is a ValueError whose message names the field, file or folder and the fix; the CLI
prints it without a traceback and exits 2. Checked here rather than hours into a run: a
``keep_checkpoints`` of 0 (which deleted every checkpoint), a truncated shard, a validation split
shorter than one sequence, token ids beyond the model's vocabulary (which trained into NaN and
read as a divergence, even when a shard is edited after preparation), a ``checkpoints`` path that
is a file, a read-only workdir.
"""

from __future__ import annotations

import os
from typing import Any

import jax

from fogjax import data, sharding
from fogjax.data import shard_scan
from fogjax.data import shards as shards_lib
from fogjax.train import lm_loss
from fogjax.train.step import micro_batch_size


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def parse_profile_steps(text: str) -> tuple[int, int] | None:
    """'a,b' -> (a, b), the first and last step traced; '' -> None."""
    if not text:
        return None
    parts = text.split(",")
    try:
        first, last = (int(p) for p in parts)
    except ValueError:
        first = last = -1
    _require(
        len(parts) == 2 and 0 <= first <= last,
        f"train.profile_steps={text!r} must be 'FIRST,LAST' with 0 <= FIRST <= LAST, e.g. "
        "--config.train.profile_steps=10,12.",
    )
    return first, last


def validate_train_config(config: Any, num_devices: int | None = None) -> None:
    """Raises ValueError naming the field and the fix for settings that cannot work.
    ``num_devices``: the devices the run will use (default all of ``jax.devices()``; the
    deviceless GPU compile of fogjax.bench passes its target's)."""
    t, o = config.train, config.optim
    # jax.random.key keeps only the low 32 bits of larger seeds (2**32 would train seed 0's run)
    # and the data order refuses negative ones deep inside grain, naming no field.
    _require(
        0 <= config.seed < 2**32,
        f"seed={config.seed} must be in [0, 2**32) (it seeds the parameter init and the data "
        "order); e.g. --config.seed=1.",
    )
    for field in ("steps", "batch_size", "micro_batches", "log_every", "stats_every", "ckpt_every"):
        _require(getattr(t, field) >= 1, f"train.{field}={getattr(t, field)} must be >= 1.")
    _require(
        t.keep_checkpoints >= 1,
        f"train.keep_checkpoints={t.keep_checkpoints} must be >= 1 (it is how many of the latest "
        "checkpoints are kept; 0 would delete every one).",
    )
    _require(t.seq_len >= 2, f"train.seq_len={t.seq_len} must be >= 2.")
    _require(t.eval_every >= 0, f"train.eval_every={t.eval_every} must be >= 0 (0 = no eval).")
    _require(
        not t.eval_every or t.eval_batches >= 1,
        f"train.eval_batches={t.eval_batches} must be >= 1 when train.eval_every > 0.",
    )
    parse_profile_steps(t.profile_steps)
    lm_loss.check_chunk_tokens(t.loss_chunk_tokens)
    _require(o.peak_lr > 0, f"optim.peak_lr={o.peak_lr} must be > 0.")
    _require(
        0 <= o.min_lr <= o.peak_lr,
        f"optim.min_lr={o.min_lr} must be in [0, optim.peak_lr={o.peak_lr}].",
    )
    _require(
        o.warmup_steps >= 0 and o.cooldown_steps >= 0,
        f"optim.warmup_steps={o.warmup_steps} and optim.cooldown_steps={o.cooldown_steps} must "
        "be >= 0.",
    )
    _require(
        o.warmup_steps + o.cooldown_steps <= t.steps,
        f"optim.warmup_steps + optim.cooldown_steps = {o.warmup_steps + o.cooldown_steps} exceeds "
        f"train.steps={t.steps}; shorten them or train longer.",
    )
    for field in ("b1", "b2"):
        value = getattr(o, field)
        _require(0 <= value < 1, f"optim.{field}={value} must be in [0, 1).")
    _require(o.eps > 0, f"optim.eps={o.eps} must be > 0.")
    _require(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0.")
    _require(o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip} must be >= 0.")
    _require(config.data.num_workers >= 0, "data.num_workers must be >= 0.")
    _require(
        config.log.kurtosis_alarm_patience >= 1,
        f"log.kurtosis_alarm_patience={config.log.kurtosis_alarm_patience} must be >= 1.",
    )
    _require(config.log.peak_tflops >= 0, "log.peak_tflops must be >= 0 (0 = from the table).")
    _check_divergence_fields(config.log)
    m = config.model
    for field in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "ffn_dim"):
        _require(getattr(m, field) >= 1, f"model.{field}={getattr(m, field)} must be >= 1.")
    micro = micro_batch_size(t.batch_size, t.micro_batches)
    n = jax.device_count() if num_devices is None else num_devices
    mesh_batch = sharding.resolve_mesh_shape(config.mesh, n)
    shards = mesh_batch[0] * mesh_batch[1]
    _require(
        micro % shards == 0,
        f"train.batch_size / train.micro_batches = {micro} sequences "
        f"cannot be split over mesh data x fsdp = {shards} devices; make the batch a multiple of "
        f"{shards * t.micro_batches}.",
    )


def _check_divergence_fields(log: Any) -> None:
    _require(
        log.on_divergence in ("stop", "continue"),
        f"log.on_divergence={log.on_divergence!r} must be 'stop' or 'continue'.",
    )
    _require(
        log.loss_spike_margin >= 0,
        f"log.loss_spike_margin={log.loss_spike_margin} must be >= 0 (nats; 0 = off).",
    )
    _require(
        log.grad_spike_ratio == 0 or log.grad_spike_ratio > 1,
        f"log.grad_spike_ratio={log.grad_spike_ratio} must be > 1 (or 0 = off).",
    )
    _require(
        log.loss_blowup_ratio == 0 or log.loss_blowup_ratio > 1,
        f"log.loss_blowup_ratio={log.loss_blowup_ratio} must be > 1 (or 0 = off).",
    )
    for field in ("loss_spike_patience", "grad_spike_patience"):
        _require(getattr(log, field) >= 1, f"log.{field}={getattr(log, field)} must be >= 1.")
    _require(
        log.divergence_start_step >= -1,
        f"log.divergence_start_step={log.divergence_start_step} must be >= 0 (or -1 = "
        "optim.warmup_steps).",
    )


def check_workdir(workdir: str) -> None:
    """Creates ``workdir`` and checks that the run can write there."""
    _require(
        not os.path.exists(workdir) or os.path.isdir(workdir),
        f"--workdir={workdir} is a file, not a directory; choose another --workdir.",
    )
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"Cannot create --workdir={workdir} ({e}); choose another.") from None
    for sub in ("checkpoints", "tb", "config_history"):
        path = os.path.join(workdir, sub)
        _require(
            not os.path.exists(path) or os.path.isdir(path),
            f"{path} is a file, but the run keeps a folder there; move it away.",
        )
    probe = os.path.join(workdir, f".write_test.{os.getpid()}")
    try:
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ValueError(
            f"--workdir={workdir} is not writable ({e.strerror}); the run writes its "
            "checkpoints and events there. Fix its permissions or choose another --workdir."
        ) from None


def check_dataset(info: data.DatasetInfo, config: Any, evaluates: bool = True) -> None:
    """The shards are readable, long enough, and their ids fit the model's vocabulary (checked
    on the shards themselves, cheaply: :mod:`fogjax.data.shard_scan`). ``evaluates``: the run
    reads this dataset's validation split."""
    t, m = config.train, config.model
    _require(
        info.vocab_size <= m.vocab_size,
        f"The data's tokenizer has {info.vocab_size} tokens but model.vocab_size="
        f"{m.vocab_size}; set --config.model.vocab_size={info.vocab_size} (or more).",
    )
    shards_lib.check_shards(info)
    _require(
        info.train_tokens >= t.seq_len + 1,
        f"The train split of {info.dir} has {info.train_tokens} tokens, fewer than one sequence "
        f"(train.seq_len + 1 = {t.seq_len + 1}); use more data or a shorter train.seq_len.",
    )
    _require(
        not evaluates or not t.eval_every or info.val_tokens >= t.seq_len + 1,
        f"{info.dir} has no usable validation split ({info.val_tokens} tokens, fewer than "
        f"train.seq_len + 1 = {t.seq_len + 1}) but train.eval_every={t.eval_every}; prepare it "
        "with a larger --val-tokens, shorten train.seq_len, or set --config.train.eval_every=0.",
    )
    largest = shard_scan.shard_max_token_ids(info)
    path, top = max(largest.items(), key=lambda item: item[1])
    _require(
        top < m.vocab_size,
        f"Shard {path} holds token id {top}, beyond model.vocab_size={m.vocab_size} (ids must "
        f"be < vocab_size; {info.dir}/{shards_lib.METADATA} says {info.vocab_size}): the shard "
        "was changed after preparation, or the model is too small. Prepare the data again (or "
        f"restore the shard), or set --config.model.vocab_size={top + 1} or more.",
    )


def check_data(mixture: data.Mixture, config: Any) -> None:
    """:func:`check_dataset` for every dataset a run reads (validation: the first only), and
    sets ``data.eos_id`` from them for ``data.document_mask``."""
    for info in mixture.infos:
        check_dataset(info, config, evaluates=info is mixture.eval_info)
    if config.data.document_mask:
        eos = mixture.eval_info.eos_id
        _require(
            config.data.eos_id in (-1, eos),
            f"data.eos_id={config.data.eos_id} but {mixture.eval_info.dir} ends its documents "
            f"with id {eos}; leave data.eos_id at -1 (the dataset's) or set it to {eos}.",
        )
        config.data.eos_id = eos
