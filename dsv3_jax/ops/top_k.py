"""Top-k along the last axis, as `jax.lax.top_k`: the k largest values in descending order, equal values by
ascending index, in XLA's total order of floats (NaN above +inf).

Variants (`TOP_K`): "xla", the reference (`lax.top_k`: XLA's TopK); "cpu_kernel", an XLA:CPU FFI kernel
(`ops/cpu_kernels/top_k.cc`) for float32, the same indices and values: DSA's indexer asks for 256 of up to
32K keys for every query, where XLA:CPU's TopK runs 3.7-9 ns a key on one thread (docs/PERFORMANCE.md).
`ops.dispatch.top_k` chooses.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dsv3_jax.ops import cpu_kernels
from dsv3_jax.ops.registry import Registry

TopKFn = Callable[[jax.Array, int], tuple[jax.Array, jax.Array]]
XLA, CPU_KERNEL = "xla", "cpu_kernel"
TOP_K: Registry[TopKFn] = Registry("top_k", reference=XLA)


@TOP_K.register(XLA)
def xla_top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    return jax.lax.top_k(x, k)


@TOP_K.register(CPU_KERNEL)
def cpu_kernel_top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The FFI kernel on a CPU device; float32 only (other dtypes, and a host without the kernel, take the
    reference). Batched by vmap over leading axes, which the kernel treats as rows."""
    if x.dtype != jnp.float32 or not cpu_kernels.available():
        return jax.lax.top_k(x, k)
    if not 1 <= k <= x.shape[-1]:
        raise ValueError(f"top_k: k = {k} must be in [1, {x.shape[-1]}] (the last axis)")
    return _ffi_top_k(x, k)


def _call(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    out = jax.ShapeDtypeStruct((*x.shape[:-1], k), jnp.float32), jax.ShapeDtypeStruct((*x.shape[:-1], k), jnp.int32)
    return jax.ffi.ffi_call("dsv3_top_k_f32", out, vmap_method="broadcast_all")(x)


# Rows are independent: under a mesh each device ranks its own rows, sharded as x's leading axes are (the ranked
# axis whole). Without this XLA treats the FFI call as opaque and gathers every row onto every device first.
_partitioned = custom_partitioning(_call, static_argnums=(1,))


def _row_shardings(mesh, x):
    """x's sharding with the ranked (last) axis whole, for x and both outputs. A spec may name fewer axes
    than x has: the rest are unsharded."""
    spec = tuple(x.sharding.spec)
    spec += (None,) * (len(x.shape) - len(spec))
    rows = NamedSharding(mesh, P(*spec[:-1], None))
    return rows, (rows, rows)


def _infer(k, mesh, arg_shapes, result_shape):
    return _row_shardings(mesh, arg_shapes[0])[1]


def _partition(k, mesh, arg_shapes, result_shape):
    rows, out = _row_shardings(mesh, arg_shapes[0])
    return mesh, functools.partial(_call, k=k), out, (rows,)


_partitioned.def_partition(infer_sharding_from_operands=_infer, partition=_partition,
                           sharding_rule="... s -> ... k, ... k")


@functools.cache
def _rows_op(k: int):
    """`_partitioned` for one k, batched by vmap as more leading rows (custom_partitioning has no batching rule;
    the vmapped axis arrives first, and the kernel ranks the rows of every leading axis alike)."""

    @jax.custom_batching.custom_vmap
    def op(x):
        return _partitioned(x, k)

    @op.def_vmap
    def _batched(axis_size, in_batched, x):
        return op(x), (True, True)

    return op


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _ffi_top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    return _rows_op(k)(x)


@_ffi_top_k.defjvp
def _ffi_top_k_jvp(k, primals, tangents):
    """As lax.top_k's: the values' tangent is x's at the chosen indices; the indices have none."""
    (x,), (dx,) = primals, tangents
    values, indices = _ffi_top_k(x, k)
    return (values, indices), (jnp.take_along_axis(dx, indices, axis=-1), np.zeros(indices.shape, jax.dtypes.float0))
