"""The one table from logical axis names to mesh axes, and the shardings it gives.

Weights carry logical names (`logical_axes(cfg)`, e.g. the routed experts' w1 is
("expert", "embed", "mlp")); `RULES` says which mesh axes each name is split over. The batch is
split over data, fsdp AND expert: as in DeepSeek-V3's expert-parallel training, every device of an
expert group brings its own tokens (the dense parts run data parallel across the group), so the
expert axis carries distinct rows of the batch, not copies.

Resolution of one array's spec (`to_mesh_spec`), dimension by dimension, left to right:
- a name missing from `RULES` is an error (a typo must not silently replicate a weight);
- mesh axes of size 1 (or absent from the mesh) are dropped;
- collisions: a mesh axis may shard only one dimension of an array, so two logical axes of one spec
  whose rules share a mesh axis (of size > 1 in the mesh) are an error naming both: the table, not
  the order of dimensions, must say which one is split (one logical axis named twice shards its
  first dimension only);
- with `shape` given, mesh axes are kept left to right only while their product divides the
  dimension; the rest are dropped, so a dimension too small or odd for the mesh is replicated
  rather than rejected by jit.
"""
from __future__ import annotations

import math

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None

RULES: dict[str, MeshAxes] = {
    "batch": ("data", "fsdp", "expert"),
    "embed": "fsdp",
    # The model dimension of activations: whole (fsdp splits weights; activations split by batch).
    "act_embed": None,
    "heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "expert": "expert",
    # Kept whole: latent ranks and per-head dims are small, the sequence is not split.
    "seq": None,
    "q_lora": None,
    "kv_lora": None,
    "kv_latent": None,
    "qk_dim": None,
    "kv_dim": None,
    "v_dim": None,
    "mtp_concat": None,
    # The scanned layout's leading axis of stacked layers: whole on every device (no pipeline stages).
    "layers": None,
}


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def _mesh_axes_of(logical, rules: dict[str, MeshAxes]) -> tuple[str, ...]:
    out = []
    for name in _as_tuple(logical):
        if name not in rules:
            raise ValueError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
        out.extend(_as_tuple(rules[name]))
    return tuple(out)


def _check_collisions(logical_spec: tuple, mesh, rules: dict[str, MeshAxes]) -> None:
    owner: dict[str, object] = {}
    for logical in logical_spec:
        for axis in _mesh_axes_of(logical, rules):
            if mesh.shape.get(axis, 1) == 1:
                continue
            if axis in owner and owner[axis] != logical:
                raise ValueError(f"spec {logical_spec}: logical axes {owner[axis]!r} and {logical!r} both map to "
                                 f"mesh axis {axis!r}; an array dimension pair cannot share one mesh axis")
            owner[axis] = logical


def to_mesh_spec(logical_spec: PartitionSpec | tuple, mesh, shape: tuple[int, ...] | None = None,
                 rules: dict[str, MeshAxes] | None = None) -> PartitionSpec:
    """Logical names -> a PartitionSpec of mesh axes for `mesh` (see the module docstring)."""
    rules = RULES if rules is None else rules
    logical_spec = tuple(logical_spec)
    if shape is not None and len(shape) < len(logical_spec):
        raise ValueError(f"spec {logical_spec} names {len(logical_spec)} dimensions, the shape {shape} has "
                         f"{len(shape)}")
    _check_collisions(logical_spec, mesh, rules)
    used: set[str] = set()  # one logical axis named twice shards only its first dimension
    entries = []
    for dim, logical in enumerate(logical_spec):
        kept: list[str] = []
        for axis in _mesh_axes_of(logical, rules):
            size = mesh.shape.get(axis, 1)
            if size == 1 or axis in used or axis in kept:
                continue
            if shape is not None and shape[dim] % (math.prod(mesh.shape[a] for a in kept) * size):
                continue
            kept.append(axis)
        used.update(kept)
        entries.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*entries)


def constrain(x: jax.Array, logical_spec: tuple) -> jax.Array:
    """`x` constrained to the sharding its logical axes give on the current mesh (`jax.set_mesh`), so
    the compiler's layout of activations stays the table's on real meshes; as it is without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.shape.values()) == 1:
        return x
    return jax.lax.with_sharding_constraint(x, to_mesh_spec(logical_spec, mesh, x.shape))


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


# ZeRO-3: a weight is split over each of these mesh axes (devices with rows of their own, the data axis
# aside) even where its logical axes do not name them: an axis its spec leaves unused goes to its
# largest dimension that stays divisible. Without it MLA's up-projections ([q_lora | kv_lora, heads,
# dim], no "embed") and, under an expert axis, every dense weight would be copied on every device
# of those axes (V3 on 128 chips: ~2.3B replicated parameters, 23 GB a device with gradients and moments).
SPREAD_AXES = ("fsdp", "expert")


def spread(spec: PartitionSpec, shape: tuple[int, ...], mesh) -> PartitionSpec:
    """`spec` with each SPREAD_AXES mesh axis it does not use added to the dimension it divides that has
    the most elements a shard (none for vectors: norm scales and biases stay whole)."""
    if len(shape) < 2:
        return spec
    entries, changed = list(spec) + [None] * (len(shape) - len(spec)), False
    split = lambda e: math.prod(mesh.shape.get(a, 1) for a in _as_tuple(e))
    used = {a for e in entries for a in _as_tuple(e)}
    for axis in SPREAD_AXES:
        size = mesh.shape.get(axis, 1)
        if size == 1 or axis in used:
            continue
        fits = [i for i, e in enumerate(entries) if shape[i] % (split(e) * size) == 0]
        if not fits:
            continue
        i = max(fits, key=lambda j: shape[j] // split(entries[j]))
        kept = (*_as_tuple(entries[i]), axis)
        entries[i] = kept[0] if len(kept) == 1 else kept
        used.add(axis)
        changed = True
    return PartitionSpec(*entries) if changed else spec


def param_shardings(axes: dict, shapes: dict, mesh: Mesh) -> dict:
    """NamedShardings for a variables tree, from the same tree of logical PartitionSpecs (the model's
    `logical_axes(cfg)`) and of shapes (`variable_shapes(cfg)`), each `spread` over the ZeRO-3 axes."""
    return jax.tree_util.tree_map(
        lambda spec, x: NamedSharding(mesh, spread(to_mesh_spec(spec, mesh, x.shape), x.shape, mesh)),
        axes, shapes, is_leaf=_is_spec)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Token batches [B, ...]: rows split over the batch mesh axes, everything else whole."""
    return NamedSharding(mesh, to_mesh_spec(PartitionSpec("batch"), mesh))


def batch_axes() -> tuple[str, ...]:
    """The mesh axes the rows of a batch are split over."""
    return _as_tuple(RULES["batch"])


def batch_shards(mesh: Mesh) -> int:
    """Into how many parts `batch_sharding` splits the rows (the batch size must divide by it)."""
    return math.prod(mesh.shape.get(a, 1) for a in batch_axes())


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def local_rows(fn, rows: tuple, whole: tuple = ()):
    """fn(*rows, *whole) on each device's rows: the leading axis of every `rows` array split over the current
    mesh's batch axes, each of `whole` entering whole (an FSDP gather, as the compiler makes for a matmul;
    its gradient summed over the shards). For Pallas kernels, which the compiler cannot partition. Without
    a mesh, with one batch shard, or rows that do not split evenly: fn itself."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = () if mesh.empty else tuple(a for a in batch_axes() if mesh.shape.get(a, 1) > 1)
    if not axes or rows[0].shape[0] % math.prod(mesh.shape[a] for a in axes):
        return fn(*rows, *whole)
    split, entire = PartitionSpec(axes), PartitionSpec()
    return jax.shard_map(fn, mesh=mesh, in_specs=(split,) * len(rows) + (entire,) * len(whole), out_specs=split,
                         check_vma=False)(*rows, *whole)
