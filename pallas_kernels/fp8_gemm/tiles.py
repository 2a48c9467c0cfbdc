"""Operands cut to whole output tiles for the Pallas backends, and put back.

A tile kernel takes a [Mp, Kp] e4m3, as_t [kb, Mp] f32, b [(G,) Np, Kp] e4m3 and bs_t [(G,) kb, Np] f32 (the
scale of every output column, per K block), with Mp, Np multiples of the tile and Kp of 128 (zero padding:
padded products are zero). The grouped GEMM first moves rows so that every group starts on a `block_m` tile
(DeepGEMM's "contiguous" layout); each tile then reads one expert's b.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.fp8_gemm.config import Fp8GemmConfig
from pallas_kernels.fp8_gemm.operands import BLOCK_K, cdiv, column_scales, group_ids


def pad_rows(x: jax.Array, rows: int) -> jax.Array:
    return jnp.pad(x, ((0, rows - x.shape[0]),) + ((0, 0),) * (x.ndim - 1))


def pad_k(x: jax.Array) -> jax.Array:
    return jnp.pad(x, ((0, 0),) * (x.ndim - 1) + ((0, -x.shape[-1] % BLOCK_K),))


def run_dense(kernel, a, a_scale, b, b_scale, out_dtype, config: Fp8GemmConfig) -> jax.Array:
    """kernel(a, as_t, b, bs_t, out_dtype, config) on the padded operands -> [M, N]."""
    (m, _), n = a.shape, b.shape[0]
    mp, np_ = cdiv(m, config.block_m) * config.block_m, cdiv(n, config.block_n) * config.block_n
    a_p, b_p = pad_rows(pad_k(a), mp), pad_rows(pad_k(b), np_)
    as_t = pad_rows(a_scale, mp).T  # [kb, Mp]
    bs_t = jnp.pad(column_scales(b_scale, n), ((0, 0), (0, np_ - n)))  # [kb, Np]
    return kernel(a_p, as_t, b_p, bs_t, out_dtype, config)[:m, :n]


def aligned_layout(group_sizes: jax.Array, m: int, g: int, bm: int):
    """Where each row goes when every group starts on a `bm`-row tile boundary.

    Returns dest [M] (row index in the aligned layout; out of range for rows past the groups),
    tile_group [T] (expert of each aligned tile), num_tiles [1] (tiles holding rows) and T, a static
    bound: each non-empty group adds at most one partial tile, and there are at most min(G, M) of them.
    """
    t = (m + min(g, m) * (bm - 1)) // bm
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    padded = (sizes + bm - 1) // bm * bm
    pends = jnp.cumsum(padded)
    rows = jnp.arange(m, dtype=jnp.int32)
    gid = group_ids(sizes, m)
    gc = jnp.minimum(gid, g - 1)
    dest = jnp.where(gid < g, (pends - padded)[gc] + rows - (ends - sizes)[gc], t * bm)
    tile_starts = jnp.arange(t, dtype=jnp.int32) * bm
    tile_group = jnp.minimum(jnp.searchsorted(pends, tile_starts, side="right"), g - 1).astype(jnp.int32)
    num_tiles = (pends[-1:] // bm).astype(jnp.int32)
    return dest, tile_group, num_tiles, t


def run_grouped(kernel, a, a_scale, b, b_scale, group_sizes, out_dtype, config: Fp8GemmConfig) -> jax.Array:
    """kernel(tile_group, num_tiles, a, as_t, b, bs_t, out_dtype, config) on the aligned rows -> [M, N]."""
    (m, _), (g, n, _) = a.shape, b.shape
    bm, bn = config.block_m, config.block_n
    dest, tile_group, num_tiles, t = aligned_layout(group_sizes, m, g, bm)
    mp, np_ = t * bm, cdiv(n, bn) * bn
    a_p = jnp.zeros((mp, a.shape[1]), a.dtype).at[dest].set(a, mode="drop")
    a_p = pad_k(a_p)
    as_t = jnp.zeros((mp, a_scale.shape[1]), jnp.float32).at[dest].set(a_scale, mode="drop").T
    b_p = jnp.pad(pad_k(b), ((0, 0), (0, np_ - n), (0, 0)))
    bs_t = jnp.pad(column_scales(b_scale, n), ((0, 0), (0, 0), (0, np_ - n)))  # [G, kb, Np]
    out = kernel(tile_group, num_tiles, a_p, as_t, b_p, bs_t, out_dtype, config)
    return jnp.take(out[:, :n], dest, axis=0, mode="fill", fill_value=0)
