"""Device meshes over the four named axes: data, fsdp, expert, tensor.

`--mesh=data=2,expert=4` -> `parse_mesh` -> {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1} ->
`make_mesh`. Every mesh has all four axes, in the order of `MESH_AXES`, so sharding rules can name
any of them; unused axes have size 1. The order puts `tensor` innermost: its collectives run on
every layer, so its devices should be the closest ones (jax.make_mesh fills the last axis first
from neighbouring devices).
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "expert", "tensor")
_ENTRY = re.compile(r"^\s*([A-Za-z_]\w*)\s*=\s*([+-]?\d+)\s*$")


def parse_mesh(spec: str, num_devices: int) -> dict[str, int]:
    """"data=2,expert=4" -> the size of every mesh axis; "" puts all devices on `data`.

    Raises ValueError naming the problem: bad syntax, an unknown or repeated axis, a size below 1,
    or sizes whose product is not `num_devices`.
    """
    shape = dict.fromkeys(MESH_AXES, 1)
    if not spec.strip():
        shape["data"] = num_devices
        return shape
    seen = set()
    for entry in spec.split(","):
        m = _ENTRY.match(entry)
        if m is None:
            raise ValueError(f"mesh {spec!r}: cannot read {entry.strip()!r}; expected axis=size entries "
                             f"separated by commas, e.g. 'data=2,expert=4'")
        name, size = m.group(1), int(m.group(2))
        if name not in shape:
            raise ValueError(f"mesh {spec!r}: unknown axis {name!r}; the axes are {', '.join(MESH_AXES)}")
        if name in seen:
            raise ValueError(f"mesh {spec!r}: axis {name!r} is given twice")
        if size < 1:
            raise ValueError(f"mesh {spec!r}: axis {name!r} has size {size}; sizes must be at least 1")
        seen.add(name)
        shape[name] = size
    total = math.prod(shape.values())
    if total != num_devices:
        raise ValueError(f"mesh {spec!r}: the axis sizes multiply to {total}, but there are {num_devices} "
                         f"devices; they must multiply to exactly the device count")
    return shape


def make_mesh(shape: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh with the axes of `MESH_AXES` in that order, size 1 where `shape` does not give one.

    The axes are Auto, not jax.make_mesh's default Explicit: the model is written without sharding
    annotations on activations, so GSPMD propagates the parameter and batch shardings through it.
    (With Explicit axes jax.shard_map would also demand inputs already sharded as its in_specs.)
    The expert-parallel MoE manages its own layout with an explicit shard_map over this mesh.
    """
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh shape {shape}: unknown axes {unknown}; the axes are {', '.join(MESH_AXES)}")
    sizes = tuple(int(shape.get(name, 1)) for name in MESH_AXES)
    if min(sizes) < 1:
        raise ValueError(f"mesh shape {shape}: sizes must be at least 1")
    devices = list(jax.devices() if devices is None else devices)
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh shape {shape} needs {math.prod(sizes)} devices, got {len(devices)}")
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)
