"""Operands cut to whole output tiles for the Pallas backends, and put back.

A tile kernel takes a [Mp, Kp] e4m3, as_t [Kp/128, Mp] f32, b [(G,) Np, Kp] e4m3 (or [(G,) Kp, Np], a weight held as
the model holds it) and bs_t [(G,) Kp/128, Np] f32 (the scale of every output column, per K block), with Mp, Np
multiples of the tile and Kp of 128, or of the `k_multiple` a backend steps K by (zero padding: padded products are
zero). The weight-only GEMMs pass an unquantised a and no a_scale (as_t None). The grouped GEMM first moves rows so
that every group starts on a `block_m` tile (DeepGEMM's "contiguous" layout); each tile then reads one expert's b.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.fp8_gemm.config import Fp8GemmConfig
from pallas_kernels.fp8_gemm.operands import BLOCK_K, cdiv, column_scales, group_ids


def pad_rows(x: jax.Array, rows: int) -> jax.Array:
    return jnp.pad(x, ((0, rows - x.shape[0]),) + ((0, 0),) * (x.ndim - 1))


def pad_k(x: jax.Array, multiple: int = BLOCK_K) -> jax.Array:
    return jnp.pad(x, ((0, 0),) * (x.ndim - 1) + ((0, -x.shape[-1] % multiple),))


def _scales_t(scale: jax.Array, cols: int, kp: int) -> jax.Array:
    """[R, kb] per-K-block scales -> [Kp/128, cols]: transposed, zero-padded (zero scales for padded K)."""
    return jnp.pad(scale, ((0, cols - scale.shape[0]), (0, kp // BLOCK_K - scale.shape[1]))).T


def _column_scales_t(b_scale: jax.Array, n: int, np_: int, kp: int) -> jax.Array:
    """[(G,) nb, kb] block scales -> [(G,) Kp/128, Np], the scale of every output column per K block."""
    cs = column_scales(b_scale, n)
    pads = ((0, 0),) * (cs.ndim - 2) + ((0, kp // BLOCK_K - cs.shape[-2]), (0, np_ - n))
    return jnp.pad(cs, pads)


def _padded_b(b: jax.Array, np_: int, k_multiple: int, b_kn: bool) -> jax.Array:
    """b [(G,) N, K] (or [(G,) K, N] with b_kn) zero-padded to Np columns and K to a multiple of k_multiple."""
    lead = ((0, 0),) * (b.ndim - 2)
    if b_kn:
        return jnp.pad(b, (*lead, (0, -b.shape[-2] % k_multiple), (0, np_ - b.shape[-1])))
    return jnp.pad(b, (*lead, (0, np_ - b.shape[-2]), (0, -b.shape[-1] % k_multiple)))


def run_dense(kernel, a, a_scale, b, b_scale, out_dtype, config: Fp8GemmConfig, k_multiple: int = BLOCK_K,
              b_kn: bool = False):
    """kernel(a, as_t, b, bs_t, out_dtype, config) on the padded operands -> [M, N]; a_scale None: as_t None.
    b_kn: b is [K, N] (a weight-only GEMM's weight in the model's layout) and goes to the kernel as [Kp, Np]."""
    (m, k), n = a.shape, b.shape[-1 if b_kn else 0]
    mp, np_ = cdiv(m, config.block_m) * config.block_m, cdiv(n, config.block_n) * config.block_n
    kp = cdiv(k, k_multiple) * k_multiple
    a_p, b_p = pad_rows(pad_k(a, k_multiple), mp), _padded_b(b, np_, k_multiple, b_kn)
    as_t = None if a_scale is None else _scales_t(a_scale, mp, kp)  # [Kp/128, Mp]
    bs_t = _column_scales_t(b_scale, n, np_, kp)  # [Kp/128, Np]
    return kernel(a_p, as_t, b_p, bs_t, out_dtype, config)[:m, :n]


def rows_to(x: jax.Array, dest: jax.Array, rows: int) -> jax.Array:
    """x [R, ...] with row r moved to row dest[r] of a zero [rows, ...] array; out-of-range dest: dropped.

    8-bit floats move as int8, the same bytes: XLA:TPU expands a scatter of float8 rows into far more code (and
    compile time) than one of int8 rows.
    """
    byte = x.dtype.itemsize == 1 and jnp.issubdtype(x.dtype, jnp.floating)
    moved = lax.bitcast_convert_type(x, jnp.int8) if byte else x
    out = jnp.zeros((rows, *x.shape[1:]), moved.dtype).at[dest].set(moved, mode="drop")
    return lax.bitcast_convert_type(out, x.dtype) if byte else out


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


def run_grouped(kernel, a, a_scale, b, b_scale, group_sizes, out_dtype, config: Fp8GemmConfig,
                k_multiple: int = BLOCK_K, b_kn: bool = False) -> jax.Array:
    """kernel(tile_group, num_tiles, a, as_t, b, bs_t, out_dtype, config) on the aligned rows -> [M, N];
    a_scale None: as_t None. b_kn: b is [G, K, N] and goes to the kernel as [G, Kp, Np]."""
    (m, k), g, n = a.shape, b.shape[0], b.shape[-1 if b_kn else 1]
    bm, bn = config.block_m, config.block_n
    dest, tile_group, num_tiles, t = aligned_layout(group_sizes, m, g, bm)
    mp, np_, kp = t * bm, cdiv(n, bn) * bn, cdiv(k, k_multiple) * k_multiple
    a_p = pad_k(rows_to(a, dest, mp), k_multiple)
    as_t = None if a_scale is None else _scales_t(rows_to(a_scale, dest, mp), mp, kp)
    b_p = _padded_b(b, np_, k_multiple, b_kn)
    bs_t = _column_scales_t(b_scale, n, np_, kp)  # [G, Kp/128, Np]
    out = kernel(tile_group, num_tiles, a_p, as_t, b_p, bs_t, out_dtype, config)
    return jnp.take(out[:, :n], dest, axis=0, mode="fill", fill_value=0)
