"""The Pallas kernel body of backends "interpret" and "triton": a grid over output tiles, a loop over K blocks.

Each program reads its [bm, Kp] rows of a and [bn, Kp] rows of b, multiplies one 128-wide K block at a time
into a fresh FP32 partial sum (the backend's `block_dot`) and promotes it (`operands.promote`). Operands as
`tiles` lays them out; as_t None (the weight-only GEMMs: a not quantised) drops the activation scales.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.fp8_gemm.config import Fp8GemmConfig
from pallas_kernels.fp8_gemm.operands import BLOCK_K, promote


def fp8_block_dot(ak: jax.Array, bk: jax.Array) -> jax.Array:
    """[bm, 128] x [bn, 128] e4m3 -> [bm, bn] float32: the K block's raw products, on FP8 tensor cores."""
    return lax.dot_general(ak, bk, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _promoted_tile(a_ref, as_ref, b_ref, bs_ref, k_blocks: int, block_dot, group=None) -> jax.Array:
    """FP32 [bm, bn] tile from a_ref [bm, Kp], as_ref [kb, bm] f32 (None: no activation scales), b_ref [(G,) bn, Kp]
    e4m3, bs_ref [(G,) kb, bn].

    `group` picks the expert when b_ref / bs_ref carry a leading G axis (indexed per load: Triton takes
    one indexer per ref access).
    """
    g = () if group is None else (group,)
    bm, bn = a_ref.shape[0], b_ref.shape[-2]

    def step(kk, acc):
        cols = pl.ds(pl.multiple_of(kk * BLOCK_K, BLOCK_K), BLOCK_K)
        ak, bk = a_ref[:, cols], b_ref[(*g, slice(None), cols)]  # [bm, 128], [bn, 128]
        sa = None if as_ref is None else as_ref[kk, :]
        return promote(acc, block_dot(ak, bk), sa, bs_ref[(*g, kk, slice(None))])

    return lax.fori_loop(0, k_blocks, step, jnp.zeros((bm, bn), jnp.float32))


def _with_scales(refs, scaled: bool):
    """The refs after the scalar ones, as_ref None when the call passes no activation scales."""
    return refs if scaled else (refs[0], None, *refs[1:])


def _gemm_kernel(*refs, k_blocks: int, block_dot, scaled: bool):
    # a_ref [bm, Kp], as_ref [kb, bm] f32, b_ref [bn, Kp] e4m3, bs_ref [kb, bn] f32, o_ref [bm, bn]
    a_ref, as_ref, b_ref, bs_ref, o_ref = _with_scales(refs, scaled)
    o_ref[...] = _promoted_tile(a_ref, as_ref, b_ref, bs_ref, k_blocks, block_dot).astype(o_ref.dtype)


def _grouped_kernel(tg_ref, nt_ref, *refs, k_blocks: int, block_dot, scaled: bool):
    # tg_ref [T] int32 expert of each row tile, nt_ref [1] int32 tiles in use; a_ref [bm, Kp], as_ref [kb, bm],
    # b_ref [G, bn, Kp] e4m3, bs_ref [G, kb, bn], o_ref [bm, bn]. Tiles past nt_ref[0] hold no rows: skipped.
    a_ref, as_ref, b_ref, bs_ref, o_ref = _with_scales(refs, scaled)
    i = pl.program_id(0)

    @pl.when(i < nt_ref[0])
    def _():
        tile = _promoted_tile(a_ref, as_ref, b_ref, bs_ref, k_blocks, block_dot, group=tg_ref[i])
        o_ref[...] = tile.astype(o_ref.dtype)


def _call(body, in_specs, out_shape, tile, k_blocks: int, *, scaled: bool, interpret: bool, compiler_params,
          block_dot, name: str):
    """One program per `tile` = (bm, bn) of the output."""
    bm, bn = tile
    if not scaled:
        del in_specs[-3]  # the activation scales' spec, just before b's and b's scales'
    return pl.pallas_call(
        functools.partial(body, k_blocks=k_blocks, block_dot=block_dot, scaled=scaled),
        grid=(out_shape.shape[0] // bm, out_shape.shape[1] // bn),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=out_shape,
        interpret=interpret,
        name=name,
        compiler_params=compiler_params,
    )


def pallas_gemm(a, as_t, b, bs_t, out_dtype, cfg: Fp8GemmConfig, *, interpret: bool, compiler_params=None,
                block_dot=fp8_block_dot):
    # a [Mp, Kp], as_t [kb, Mp] (or None), b [Np, Kp], bs_t [kb, Np]; Mp, Np multiples of the tile.
    (mp, kp), np_ = a.shape, b.shape[0]
    bm, bn, kb = cfg.block_m, cfg.block_n, kp // BLOCK_K
    in_specs = [
        pl.BlockSpec((bm, kp), lambda i, j: (i, 0)),
        pl.BlockSpec((kb, bm), lambda i, j: (0, i)),
        pl.BlockSpec((bn, kp), lambda i, j: (j, 0)),
        pl.BlockSpec((kb, bn), lambda i, j: (0, j)),
    ]
    scaled = as_t is not None
    call = _call(_gemm_kernel, in_specs, jax.ShapeDtypeStruct((mp, np_), out_dtype), (bm, bn), kb, scaled=scaled,
                 interpret=interpret, compiler_params=compiler_params, block_dot=block_dot,
                 name="fp8_gemm" if scaled else "fp8_weight_gemm")
    return call(a, *((as_t,) if scaled else ()), b, bs_t)


def pallas_grouped_gemm(tile_group, num_tiles, a, as_t, b, bs_t, out_dtype, cfg: Fp8GemmConfig, *,
                        interpret: bool, compiler_params=None, block_dot=fp8_block_dot):
    # a [T*bm, Kp] aligned rows, as_t [kb, T*bm] (or None), b [G, Np, Kp], bs_t [G, kb, Np], tile_group [T],
    # num_tiles [1].
    (mp, kp), (g, np_, _) = a.shape, b.shape
    bm, bn, kb = cfg.block_m, cfg.block_n, kp // BLOCK_K
    in_specs = [
        pl.BlockSpec((tile_group.shape[0],), lambda i, j: (0,)),
        pl.BlockSpec((1,), lambda i, j: (0,)),
        pl.BlockSpec((bm, kp), lambda i, j: (i, 0)),
        pl.BlockSpec((kb, bm), lambda i, j: (0, i)),
        pl.BlockSpec((g, bn, kp), lambda i, j: (0, j, 0)),
        pl.BlockSpec((g, kb, bn), lambda i, j: (0, 0, j)),
    ]
    scaled = as_t is not None
    call = _call(_grouped_kernel, in_specs, jax.ShapeDtypeStruct((mp, np_), out_dtype), (bm, bn), kb, scaled=scaled,
                 interpret=interpret, compiler_params=compiler_params, block_dot=block_dot,
                 name="fp8_grouped_gemm" if scaled else "fp8_grouped_weight_gemm")
    return call(tile_group, num_tiles, a, *((as_t,) if scaled else ()), b, bs_t)
