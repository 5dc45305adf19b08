"""The device mesh, the logical-axis rules, and the shardings of state and batches.

The model names the axes of every parameter and activation logically ('embed', 'mlp', 'heads', ...);
:data:`LOGICAL_AXIS_RULES` maps those names onto a three-axis mesh ('data', 'fsdp', 'tensor'), so a
change of parallelism is a config edit (``--config.mesh.fsdp=8``), never a model edit.

The pattern for creating state is "abstract first, shard at creation" (:func:`create_sharded`):
``jax.eval_shape(init)`` gives the shapes and logical names without allocating anything, the rules
turn those into shardings, and ``jax.jit(init, out_shardings=...)`` builds every array directly in
its shards, so no full copy of the model ever lands on one device.

Divisibility: a parameter dimension whose size is not divisible by the mesh axes its logical name
maps to is replicated along that dimension instead (and a warning names it). ``jax.jit`` rejects
uneven output shardings, and small models hit this legitimately (one key/value group on
``tensor=2``); replicating a small dimension costs little memory, while an error would make every
such model/mesh pairing a config puzzle. Activation constraints need no fallback: XLA pads uneven
``with_sharding_constraint`` shards itself.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# The axes a batch is split over: each data-parallel replica and each FSDP shard gets its own rows.
BATCH_MESH_AXES = ("data", "fsdp")

LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# Logical axis -> mesh axis (or axes, or None = replicated). flax assigns each mesh axis at most
# once per array, first rule first: a [batch, embed] activation shards batch on (data, fsdp) and
# leaves embed whole, while an [embed, mlp] kernel shards embed on fsdp and mlp on tensor.
LOGICAL_AXIS_RULES: LogicalRules = (
    ("batch", BATCH_MESH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),  # Query heads, or key/value groups in the fused QKV kernel.
    ("vocab", "tensor"),
    ("kv", None),  # Head dim: always whole, so attention never needs a collective inside a head.
    ("layers", None),  # nn.scan's stacking axis: every device holds its slice of every layer.
    ("length", None),
    ("norm", None),  # 1-D gains: tiny, replicated.
)


def mesh_axis_of(logical: str, rules: LogicalRules = LOGICAL_AXIS_RULES) -> str | None:
    """The single mesh axis ``rules`` map the logical axis ``logical`` onto (None: replicated),
    for shard_map code that must name the same axes as the rules (e.g. the embedding lookup)."""
    for name, mesh_axis in rules:
        if name == logical:
            if isinstance(mesh_axis, tuple):
                raise ValueError(
                    f"Logical axis {logical!r} maps onto several mesh axes {mesh_axis}."
                )
            return mesh_axis
    raise KeyError(f"Logical axis {logical!r} is not in the rules ({[n for n, _ in rules]}).")


def resolve_mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
    """The (data, fsdp, tensor) sizes for ``num_devices``, with at most one -1 filled in.

    Args:
      mesh_cfg: the config's ``mesh`` section (a ConfigDict or dict with keys data, fsdp, tensor).
      num_devices: how many devices the mesh must cover exactly.

    Raises:
      ValueError: naming mesh.data / mesh.fsdp / mesh.tensor, the device count and a fix, when the
        sizes are not positive (or -1), hold more than one -1, or do not multiply to num_devices.
    """
    sizes = {axis: int(mesh_cfg[axis]) for axis in MESH_AXES}
    given = ", ".join(f"mesh.{axis}={size}" for axis, size in sizes.items())
    fix = (
        f"Make the sizes multiply to {num_devices}, or set exactly one of them to -1 "
        f"(all the devices the others leave), e.g. --config.mesh.data=-1."
    )
    if any(size == 0 or size < -1 for size in sizes.values()):
        raise ValueError(f"Invalid mesh {given}: each size must be a positive integer or -1.")
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(
            f"Invalid mesh {given}: only one axis may be -1, got {len(free)} "
            f"({', '.join('mesh.' + a for a in free)}). {fix}"
        )
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(
                f"Invalid mesh {given} for {num_devices} devices: the other axes use {fixed} "
                f"devices, which does not divide {num_devices}, so mesh.{free[0]}=-1 has no "
                f"whole size. {fix}"
            )
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(
            f"Invalid mesh {given}: the sizes multiply to {fixed} but there are {num_devices} "
            f"devices. {fix}"
        )
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The ('data', 'fsdp', 'tensor') mesh over ``devices`` (default: all devices of all processes).

    Axis types are Auto: shardings propagate through jit from the in/out shardings and constraints,
    as the model's logical annotations expect (jax >= 0.10 would otherwise default to Explicit).
    ``jax.make_mesh`` orders the devices; on GPU that is process-major, so 'tensor' (the fastest
    varying axis) stays inside a node's NVLink domain and 'data' spans nodes.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: LogicalRules = LOGICAL_AXIS_RULES) -> Iterator[None]:
    """Activates ``mesh`` and the logical rules, so ``nn.with_logical_constraint`` takes effect.

    Trace (jit, eval_shape) the model inside this context; outside it the model's activation
    constraints are no-ops.
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def _auto_axis_sizes(mesh: Any) -> dict[str, int]:
    """{axis: devices} of ``mesh``'s axes that are not Manual. Inside a ``shard_map`` the abstract
    mesh marks the axes that map has taken over as Manual (each body sees one slice of them), so
    code that partitions arrays itself (a nested shard_map) must leave those axes alone."""
    manual = set(getattr(mesh, "manual_axes", ()))
    return {a: n for a, n in zip(mesh.axis_names, mesh.axis_sizes, strict=True) if a not in manual}


def partitioned_axes(mesh: Any) -> tuple[str, ...]:
    """The axes of ``mesh`` (a Mesh, an AbstractMesh, or None) with several devices that are not
    Manual: those a collective inside code that partitions itself must still reduce over (a
    Manual axis belongs to an enclosing ``shard_map``, which reduces over it itself)."""
    if mesh is None or mesh.empty:
        return ()
    return tuple(a for a, n in _auto_axis_sizes(mesh).items() if n > 1)


def is_partitioned(mesh: Any) -> bool:
    """Whether ``mesh`` (a Mesh, an AbstractMesh, or None) has an axis that is not Manual with
    several devices: the test for whether shard_map code has anything to split (False on one
    device, and inside a shard_map that holds every multi-device axis manual)."""
    return bool(partitioned_axes(mesh))


def split_axis(mesh: Any, axis: str, dim: int) -> str | None:
    """``axis`` if it has several devices in ``mesh`` (a Mesh or AbstractMesh), is not Manual
    there, and divides ``dim``, else None: how shard_map code splits a dimension, with the same
    divisibility fallback (replicate) that :func:`logical_shardings` gives parameters."""
    n = _auto_axis_sizes(mesh).get(axis, 1)
    return axis if n > 1 and dim % n == 0 else None


def gathered_axis_major(x: jax.Array, axis: int, outer: int | None = None) -> jax.Array:
    """``x`` sharded over 'fsdp' along ``axis``, every other axis whole: the layout an FSDP
    all-gather returns with ``axis`` outermost, as GPU collectives need, and the later axes
    contiguous. For a matrix that must reach its GEMM with its last axis innermost (an E4M3 kernel
    copy, precision/weight_quantization.py): sharded along the contracted axis, the gathered copy
    would need a transpose per use.

    ``outer``: when ``axis`` merges several axes of the array it was reshaped from, the size of
    the outermost of them. The split must fall on it alone: otherwise the partitioner has to
    re-tile the source across several axes, which it does by a full rematerialization.

    Unchanged without a multi-device 'fsdp' axis, with a multi-device 'tensor' axis (whose
    sharding of the kernel this leaves to the partitioner), or when 'fsdp' does not divide.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or "tensor" in partitioned_axes(mesh):
        return x
    fsdp = split_axis(mesh, "fsdp", x.shape[axis])
    if fsdp is None or (outer is not None and split_axis(mesh, "fsdp", outer) is None):
        return x
    spec = [None] * x.ndim
    spec[axis] = fsdp
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))


def split_batch_axes(mesh: Any, batch: int) -> tuple[str, ...]:
    """The :data:`BATCH_MESH_AXES` with several devices in ``mesh`` and not Manual there (inside a
    shard_map over 'data', ``batch`` is already one replica's rows), if their product divides
    ``batch``; else () (the batch stays whole)."""
    return () if batch % batch_devices(mesh) else partitioned_batch_axes(mesh)


def partitioned_batch_axes(mesh: Any) -> tuple[str, ...]:
    """The :data:`BATCH_MESH_AXES` with several devices in ``mesh`` (a Mesh, an AbstractMesh, or
    None) that are not Manual there: those the partitioner splits a batch over (no divisibility
    check; see :func:`split_batch_axes`)."""
    if mesh is None or mesh.empty:
        return ()
    sizes = _auto_axis_sizes(mesh)
    return tuple(a for a in BATCH_MESH_AXES if sizes.get(a, 1) > 1)


def batch_devices(mesh: Any) -> int:
    """How many devices :func:`partitioned_batch_axes` split a batch over; 1 without any."""
    axes = partitioned_batch_axes(mesh)
    sizes = _auto_axis_sizes(mesh) if axes else {}
    return math.prod(sizes[a] for a in axes)


def without_mesh_axis(rules: LogicalRules, axis: str) -> LogicalRules:
    """``rules`` with the mesh axis ``axis`` removed from every rule (a rule left with no axis maps
    to None, replicated): the rules inside a shard_map that holds ``axis`` manual, where a sharding
    constraint may not name it. E.g. ``('batch', ('data', 'fsdp'))`` -> ``('batch', ('fsdp',))``."""
    out = []
    for name, mesh_axes in rules:
        if isinstance(mesh_axes, tuple):
            mesh_axes = tuple(a for a in mesh_axes if a != axis) or None
        elif mesh_axes == axis:
            mesh_axes = None
        out.append((name, mesh_axes))
    return tuple(out)


def _mesh_axis_size(mesh: Mesh, axes: str | tuple[str, ...]) -> int:
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def _leaf_spec(
    path: str, leaf: Any, mesh: Mesh, rules: LogicalRules, fallbacks: list[str]
) -> PartitionSpec:
    """The mesh PartitionSpec of one leaf: from its logical names, or replicated if it has none."""
    if not isinstance(leaf, nn.Partitioned):
        return PartitionSpec()  # Unnamed state (FP8 scales, optimizer counts): replicated.
    shape = leaf.value.shape
    if len(leaf.names) != len(shape):
        raise ValueError(f"{path}: logical names {leaf.names} do not match its shape {shape}.")
    if isinstance(leaf, nn.LogicallyPartitioned):
        known = {name for name, _ in rules}
        unknown = [n for n in leaf.names if n is not None and n not in known]
        if unknown:
            raise ValueError(
                f"{path}: logical axis {unknown[0]!r} has no rule; add it to "
                f"fogjax.sharding.LOGICAL_AXIS_RULES (known: {sorted(known)})."
            )
        mesh_axes = tuple(nn.logical_to_mesh_axes(leaf.names, rules))
    else:  # nn.with_partitioning names mesh axes directly.
        mesh_axes = tuple(leaf.names)
    dims = []
    for size, axes in zip(shape, mesh_axes, strict=True):
        if axes is not None and size % _mesh_axis_size(mesh, axes):
            fallbacks.append(f"{path} dim of size {size} on {axes}")
            axes = None
        dims.append(axes)
    return PartitionSpec(*dims)


def logical_shardings(
    abstract_variables: Any, mesh: Mesh, rules: LogicalRules = LOGICAL_AXIS_RULES
) -> Any:
    """A NamedSharding for every array in ``abstract_variables``.

    Args:
      abstract_variables: a pytree as returned by ``jax.eval_shape(model.init, ...)`` (or by any
        function building state from boxed params): ``nn.LogicallyPartitioned`` boxes carry logical
        names; bare leaves (ShapeDtypeStruct or arrays) have none.
      mesh: the device mesh.
      rules: logical axis -> mesh axes.

    Returns:
      A pytree of NamedSharding with one entry per box or bare leaf: a tree prefix of the variables
      both boxed and unboxed (``nn.meta.unbox``), so it serves as ``out_shardings`` /
      ``in_shardings`` for either. Named leaves follow the rules; bare leaves (the 'fp8'
      collection, optimizer step counts) are replicated; a dimension not divisible by its mesh
      axes is replicated (module docstring).
    """
    fallbacks: list[str] = []

    def sharding(path: jax.tree_util.KeyPath, leaf: Any) -> NamedSharding:
        spec = _leaf_spec(jax.tree_util.keystr(path), leaf, mesh, rules, fallbacks)
        return NamedSharding(mesh, spec)

    shardings = jax.tree_util.tree_map_with_path(
        sharding, abstract_variables, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )
    if fallbacks:
        log.warning(
            "Replicating %d parameter dimension(s) not divisible by their mesh axes: %s",
            len(fallbacks),
            "; ".join(fallbacks),
        )
    return shardings


def create_sharded(init_fn: Callable[..., Any], mesh: Mesh, rules: LogicalRules, *args: Any) -> Any:
    """``init_fn(*args)``, with every output array created directly in its shards.

    eval_shape (no allocation) -> :func:`logical_shardings` -> ``jax.jit(init_fn,
    out_shardings=...)``. Returns what ``init_fn`` returns (``model.init`` keeps its
    ``nn.LogicallyPartitioned`` boxes; ``nn.meta.unbox`` strips them). Each array's ``.sharding``
    is its NamedSharding, so ``jax.tree.map(lambda x: x.sharding, nn.meta.unbox(out))`` gives the
    shardings for a later ``jax.jit(step, in_shardings=...)``.
    """
    with sharding_context(mesh, rules):
        abstract = jax.eval_shape(init_fn, *args)
        shardings = logical_shardings(abstract, mesh, rules)
        return jax.jit(init_fn, out_shardings=shardings)(*args)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of an int32 token batch [B, T+1]: rows split over ('data', 'fsdp'), T whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_MESH_AXES))


def process_batch_shard(mesh: Mesh) -> tuple[int, int]:
    """(index, count): which slice of the global batch this process must load, out of how many.

    Usually (process_index, process_count), but not always: processes whose devices share batch
    rows (a 'tensor' group spanning processes) must load the same rows, and a mesh over a subset
    of the devices may leave a process fewer rows. The data pipeline loads rows
    ``[index * B / count, (index + 1) * B / count)`` of each global batch of B rows.

    Raises:
      ValueError: if this process has no device in the mesh, or its rows are not one aligned
        contiguous block (a hand-made device order).
    """
    rows_total = _mesh_axis_size(mesh, BATCH_MESH_AXES)
    index_map = batch_sharding(mesh).addressable_devices_indices_map((rows_total,))
    rows = sorted({idx[0].start or 0 for idx in index_map.values()})
    if not rows:
        raise ValueError(f"Process {jax.process_index()} has no device in the mesh {mesh.shape}.")
    first, n = rows[0], len(rows)
    if rows != list(range(first, first + n)) or first % n:
        raise ValueError(
            f"Process {jax.process_index()} holds batch rows {rows} of {rows_total}, not one "
            "aligned block; build the mesh with fogjax.sharding.make_mesh (process-major order)."
        )
    return first // n, rows_total // n


def global_batch_from_local(local_batch: np.ndarray, mesh: Mesh) -> jax.Array:
    """The global [B, ...] jax.Array, sharded by :func:`batch_sharding`, from this process's rows.

    Args:
      local_batch: this process's slice [B / count, ...] (see :func:`process_batch_shard`).
      mesh: the device mesh.

    Raises:
      ValueError: naming train.batch_size and the mesh when B does not split over data x fsdp.
    """
    _, count = process_batch_shard(mesh)
    global_shape = (local_batch.shape[0] * count, *local_batch.shape[1:])
    rows_total = _mesh_axis_size(mesh, BATCH_MESH_AXES)
    if global_shape[0] % rows_total:
        raise ValueError(
            f"Global batch of {global_shape[0]} rows does not split over mesh.data x mesh.fsdp = "
            f"{rows_total} devices; set train.batch_size to a multiple of {rows_total}."
        )
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local_batch, global_shape)
