"""Grouped matmul for TPUs: JAX's own megablox kernels (`jax.experimental.pallas.ops.tpu.megablox`),
whose backward computes the weight gradient grouped too (`tgmm`: each expert's x^T dy over its own
rows only). `jax.lax.ragged_dot`, the reference, is differentiated by XLA, which runs the weight
gradient as dense matmuls over every group on TPU (docs/SCALE.md measures it: the experts' FLOPs
several-fold and [E, rows, F] temporaries).

    gmm(x [M, K], w [G, K, N], group_sizes [G] int32) -> [M, N] in x's dtype

Rows are grouped in order (the first group_sizes[0] rows use w[0], ...); rows past their sum are
not computed (zeros). A Pallas TPU call is not partitioned by the compiler: call it where each
device holds its own rows (inside `shard_map`), as `dsv3_jax.ops.dispatch` does.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

TILE = 128  # rows, and at most this many of K and N, a step of the kernel (the TPU's MXU width)


@jax.custom_vjp
def _rows_kept(x: jax.Array, keep: jax.Array) -> jax.Array:
    """x itself; in the backward, the cotangent of the rows outside `keep` [M] is zero."""
    return x


def _rows_kept_fwd(x, keep):
    return x, keep


def _rows_kept_bwd(keep, g):
    return jnp.where(keep[:, None], g, 0).astype(g.dtype), None


_rows_kept.defvjp(_rows_kept_fwd, _rows_kept_bwd)


def supports(k: int, n: int) -> str | None:
    """Why the compiled kernels cannot take [M, k] x [G, k, n] (None: they can). Mosaic TPU blocks are
    whole (8, 128) tiles or whole dimensions, and the backward reuses the forward's tiling transposed."""
    if k % TILE or n % TILE:
        return f"the kernels need both matmul dims in multiples of {TILE}; got {k} x {n}"
    return None


def gmm(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, interpret: bool = False) -> jax.Array:
    """The grouped matmul and its megablox VJP; rows padded to whole tiles (the padding in no group)."""
    m, k = x.shape
    n = w.shape[2]
    pad = -m % TILE
    sizes = group_sizes.astype(jnp.int32)
    # The kernels never write the rows outside every group (the padding, a buffer's empty slots): their
    # outputs and their gradients are whatever memory held, so both are zeroed here.
    keep = jnp.arange(m + pad) < jnp.sum(sizes)
    rows = _rows_kept(jnp.pad(x, ((0, pad), (0, 0))) if pad else x, keep)
    tiling = (TILE, min(TILE, k), min(TILE, n))
    # Positional: megablox's custom_vjp marks preferred_element_type, tiling, transpose_rhs and
    # interpret non-differentiable by position.
    out = megablox.gmm(rows, w.astype(x.dtype), sizes, x.dtype, tiling, None, None, False, interpret)
    out = jnp.where(keep[:, None], out, 0).astype(x.dtype)
    return out[:m] if pad else out
