"""The parts of the fogjax <-> Hugging Face weight mapping every architecture family shares:
the record of one mapping, the attention and FFN projections, the top-level tensors, and the
conversion of a whole parameter tree in both directions.

Conventions (shapes for D, H query heads, G key/value groups, R = H / G, d_h, F, V):
- fogjax kernels are [in, out] (x @ W); HF's nn.Linear weights are [out, in] (x @ W.T).
- fogjax's fused QKV kernel is [D, G, R + 2, d_h]: per group its R query heads, then K, then V.
  Query head h = g * R + r uses key/value group g = h // R, which is HF's repeat_kv order, so q
  is the [D, G, R, d_h] slab flattened to [D, H * d_h] with no permutation of heads.
- RoPE is rotate-half on both sides (channel i pairs with i + d_h / 2), so q and k need no
  channel permutation either (the permutation of Meta's interleaved checkpoints does not apply).
- The attention output kernel [G, R, d_h, D] flattens to [H * d_h, D] in the same head order.
- The gated FFN kernel [D, 2, F] holds gate (0) and up (1); the FFN output kernel is [F, D].
Every transform is an exact reshape / transpose / slice, so export and import are bit-exact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from fogjax.export.layout import flatten, unflatten

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Mapping:
    """One fogjax leaf <-> one or more HF tensors.

    Attributes:
      path: the leaf's path in a block's params (or the top level), e.g. ('attn', 'wqkv',
        'kernel').
      names: the HF tensor names (in a block: after ``model.layers.{i}.``).
      to_hf: fogjax array -> tuple of HF arrays (one per name).
      from_hf: HF arrays (one per name) -> fogjax array.
    """

    path: Path
    names: tuple[str, ...]
    to_hf: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    from_hf: Callable[..., np.ndarray]


def same(path: Path, name: str) -> Mapping:
    """A leaf stored as it is (gains, scalars, the embedding)."""
    return Mapping(path, (name,), lambda a: (a,), lambda a: a)


def transposed(path: Path, name: str) -> Mapping:
    """A [in, out] kernel stored as an [out, in] nn.Linear weight."""
    return Mapping(path, (name,), lambda a: (a.T,), lambda a: a.T)


def attention(model_cfg: Any) -> list[Mapping]:
    """q, k, v from the fused QKV kernel, and the output projection."""
    d, g = model_cfg.d_model, model_cfg.num_kv_heads
    r, d_h = model_cfg.num_heads // g, model_cfg.d_model // model_cfg.num_heads

    def split(w: np.ndarray) -> tuple[np.ndarray, ...]:  # [D, G, R + 2, d_h]
        q = w[:, :, :r, :].reshape(d, g * r * d_h)
        k, v = (w[:, :, i, :].reshape(d, g * d_h) for i in (r, r + 1))
        return q.T, k.T, v.T

    def fuse(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        slabs = [q.T.reshape(d, g, r, d_h), k.T.reshape(d, g, 1, d_h), v.T.reshape(d, g, 1, d_h)]
        return np.concatenate(slabs, axis=2)

    names = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
    return [
        Mapping(("attn", "wqkv", "kernel"), names, split, fuse),
        Mapping(
            ("attn", "wo", "kernel"),
            ("self_attn.o_proj.weight",),
            lambda w: (w.reshape(g * r * d_h, d).T,),  # [G, R, d_h, D] -> [D, H * d_h]
            lambda w: w.T.reshape(g, r, d_h, d),
        ),
    ]


def mlp(model_cfg: Any, gated: bool) -> list[Mapping]:
    """The FFN projections: gate and up from [D, 2, F] (gated) or up from [D, F], and down."""
    down = transposed(("mlp", "wo", "kernel"), "mlp.down_proj.weight")
    if not gated:
        return [transposed(("mlp", "wi", "kernel"), "mlp.up_proj.weight"), down]
    gate_up = Mapping(
        ("mlp", "wi", "kernel"),
        ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
        lambda w: (w[:, 0, :].T, w[:, 1, :].T),
        lambda gate, up: np.stack([gate.T, up.T], axis=1),
    )
    return [gate_up, down]


def top_level(model_cfg: Any) -> list[Mapping]:
    """Embedding, final norm (when the model has one) and LM head (when untied): the names of
    every transformers causal LM of the Llama lineage and of the remote code alike."""
    out = [same(("embedding",), "model.embed_tokens.weight")]
    if model_cfg.final_norm:
        out.append(same(("final_norm", "scale"), "model.norm.weight"))
    if not model_cfg.tie_embeddings:
        out.append(transposed(("lm_head",), "lm_head.weight"))
    return out


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def to_hf(
    top: dict, layers: list[dict], top_maps: list[Mapping], layer_maps: list[Mapping]
) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, contiguous NumPy array) for the top-level entries, then block by block, made
    one leaf at a time (a caller that writes and drops them holds one block at most).

    Raises:
      ValueError: a fogjax leaf that no mapping covers (a model option this family cannot
        express), or a mapping whose leaf is missing; raised before anything is yielded.
    """
    blocks = [("", top, top_maps)] + [
        (layer_prefix(i), p, layer_maps) for i, p in enumerate(layers)
    ]
    for prefix, params, maps in blocks:
        _check_covered(flatten(params), maps, prefix or "top level")
    for prefix, params, maps in blocks:
        leaves = flatten(params)
        for m in maps:
            arrays = m.to_hf(np.asarray(leaves[m.path]))
            for name, array in zip(m.names, arrays, strict=True):
                # np.asarray, not np.ascontiguousarray, which turns 0-d scalars into [1].
                yield prefix + name, np.asarray(array, order="C")


def from_hf(
    read: Callable[[str], np.ndarray],
    num_layers: int,
    top_maps: list[Mapping],
    layer_maps: list[Mapping],
) -> tuple[dict, list[dict]]:
    """(top-level entries, one dict per block) of fogjax params from HF tensors; ``read(name)``
    returns the tensor ``name`` (KeyError if absent)."""

    def convert(prefix: str, maps: list[Mapping]) -> dict:
        leaves = {m.path: m.from_hf(*(read(prefix + n) for n in m.names)) for m in maps}
        return unflatten(leaves)

    top = convert("", top_maps)
    return top, [convert(layer_prefix(i), layer_maps) for i in range(num_layers)]


def _check_covered(leaves: dict[Path, Any], maps: list[Mapping], where: str) -> None:
    mapped = {m.path for m in maps}
    extra = sorted("/".join(p) for p in set(leaves) - mapped)
    missing = sorted("/".join(p) for p in mapped - set(leaves))
    if extra or missing:
        raise ValueError(
            f"The parameters at {where} do not match the export mapping (unmapped fogjax "
            f"parameters: {extra or 'none'}; mapped but absent: {missing or 'none'}). This "
            "model's options are not covered by fogjax.export; please report it."
        )
