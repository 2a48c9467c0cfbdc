"""Backend "xla": the GEMMs in plain jnp, the promotion written out as a scan over K blocks. The kernels are
held to these."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.fp8_gemm.config import Fp8GemmConfig
from pallas_kernels.fp8_gemm.operands import (
    BLOCK_K,
    cdiv,
    column_scales,
    group_ids,
    operand_refusal,
    promote,
    refuse,
    weight_operand_refusal,
)

DEFAULTS = dict(block_m=128, block_n=128, num_stages=1, num_warps=4)  # unused: no tiles


def config_refusal(config: Fp8GemmConfig) -> str | None:
    del config
    return None


def _k_blocks(x: jax.Array) -> jax.Array:
    """[R, K] e4m3, bf16 or f32 -> [kb, R, 128] float32 (exact: every such value is an f32), K zero-padded."""
    r, k = x.shape
    kb = cdiv(k, BLOCK_K)
    xp = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, kb * BLOCK_K - k)))
    return xp.reshape(r, kb, BLOCK_K).transpose(1, 0, 2)


def _block_dot(x, y):
    """[R, 128] x [C, 128] -> [R, C] float32, exact products."""
    return lax.dot_general(x, y, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST,
                           preferred_element_type=jnp.float32)


def _dense(a, a_scale, b, b_scale) -> jax.Array:
    """f32 [M, N]: the promotion as a scan over K blocks; a_scale None: a is not quantised (weight-only)."""
    m, n = a.shape[0], b.shape[0]

    def step(acc, blk):
        ak, bk, sa, sb = blk  # [M, 128], [N, 128], [M] (or None), [N]
        return promote(acc, _block_dot(ak, bk), sa, sb), None

    blocks = (_k_blocks(a), _k_blocks(b), None if a_scale is None else a_scale.T, column_scales(b_scale, n))
    acc, _ = lax.scan(step, jnp.zeros((m, n), jnp.float32), blocks)
    return acc


def _grouped(a, a_scale, b, b_scale, group_sizes) -> jax.Array:
    """f32 [M, N], row r of group g against b[g]; rows past the groups -> 0. a_scale None: weight-only."""
    m, (g, n, _) = a.shape[0], b.shape
    gid = group_ids(group_sizes, m)
    valid = gid < g

    def step(acc, blk):
        ak, bk, sa, sb = blk  # [M, 128], [G, N, 128], [M] (or None), [G, N]
        part = lax.ragged_dot(ak, jnp.swapaxes(bk, 1, 2), group_sizes.astype(jnp.int32),
                              precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
        rows_sb = sb[jnp.minimum(gid, g - 1)]  # [M, N]: each row's expert column scales
        return acc + part * (rows_sb if sa is None else sa[:, None] * rows_sb), None

    bk = jax.vmap(_k_blocks, out_axes=1)(b)  # [kb, G, N, 128]
    sa = None if a_scale is None else a_scale.T
    blocks = (_k_blocks(a), bk, sa, jnp.moveaxis(column_scales(b_scale, n), 1, 0))
    acc, _ = lax.scan(step, jnp.zeros((m, n), jnp.float32), blocks)
    return jnp.where(valid[:, None], acc, 0.0)


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def fp8_gemm_reference(a, a_scale, b, b_scale, *, out_dtype=jnp.bfloat16) -> jax.Array:
    """dequant(a) @ dequant(b).T with FP32 promotion every 128 of K, in plain jnp (a scan over K blocks)."""
    refuse("fp8_gemm_reference", operand_refusal(a, a_scale, b, b_scale, grouped=False))
    return _dense(a, a_scale, b, b_scale).astype(out_dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def fp8_grouped_gemm_reference(a, a_scale, b, b_scale, group_sizes, *, out_dtype=jnp.bfloat16) -> jax.Array:
    """Row r of group g: dequant(a)[r] @ dequant(b[g]).T, promoted every 128 of K; rows past the groups -> 0."""
    refuse("fp8_grouped_gemm_reference", operand_refusal(a, a_scale, b, b_scale, grouped=True))
    return _grouped(a, a_scale, b, b_scale, group_sizes).astype(out_dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def fp8_weight_gemm_reference(x, w, w_scale, *, out_dtype=None) -> jax.Array:
    """x @ dequant(w).T for an unquantised x [M, K] (bf16 or f32) and an e4m3 w [N, K] with 128x128 block scales.

    Each 128-wide K block's f32 partial sum is scaled by its block's scale and added into an f32 accumulator:
    the same promotion as the FP8 GEMM, with the activation scales gone. out_dtype None: x's dtype.
    """
    refuse("fp8_weight_gemm_reference", weight_operand_refusal(x, w, w_scale, grouped=False))
    return _dense(x, None, w, w_scale).astype(out_dtype or x.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def fp8_grouped_weight_gemm_reference(x, w, w_scale, group_sizes, *, out_dtype=None) -> jax.Array:
    """Row r of group g: x[r] @ dequant(w[g]).T, promoted every 128 of K; rows past the groups -> 0."""
    refuse("fp8_grouped_weight_gemm_reference", weight_operand_refusal(x, w, w_scale, grouped=True))
    return _grouped(x, None, w, w_scale, group_sizes).astype(out_dtype or x.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def fp8_kgrouped_gemm_reference(a, a_scale, b, b_scale, group_sizes, *, out_dtype=jnp.float32) -> jax.Array:
    """Wgrad of grouped layers: out[g] = dequant(a)[:, rows of g] @ dequant(b)[:, rows of g].T -> [G, K, N].

    a: e4m3 [K, M] (1x128 tiles along M), b: e4m3 [N, M] (128x128 blocks); the contraction runs over the
    rows of one group, promoted every 128 of M. Groups must start on 128-row boundaries, so that no scale
    tile mixes two experts (`tiles.aligned_layout` with bm = 128 gives that layout).
    """
    (k, m), n, g = a.shape, b.shape[0], group_sizes.shape[0]
    tile_group = group_ids(group_sizes, m)[::BLOCK_K]  # expert of each 128-row block (G past the end)

    def step(acc, blk):
        ak, bk, sa, sb, gi = blk  # [K, 128], [N, 128], [K], [N], group
        upd = promote(acc[jnp.minimum(gi, g - 1)], _block_dot(ak, bk), sa, sb)
        return lax.cond(gi < g, lambda: acc.at[gi].set(upd), lambda: acc), None

    blocks = (_k_blocks(a), _k_blocks(b), a_scale.T, column_scales(b_scale, n), tile_group)
    acc, _ = lax.scan(step, jnp.zeros((g, k, n), jnp.float32), blocks)
    return acc.astype(out_dtype)


def gemm(a, a_scale, b, b_scale, *, out_dtype, config: Fp8GemmConfig) -> jax.Array:
    del config
    return fp8_gemm_reference(a, a_scale, b, b_scale, out_dtype=out_dtype)


def grouped_gemm(a, a_scale, b, b_scale, group_sizes, *, out_dtype, config: Fp8GemmConfig) -> jax.Array:
    del config
    return fp8_grouped_gemm_reference(a, a_scale, b, b_scale, group_sizes, out_dtype=out_dtype)


def weight_gemm(x, w, w_scale, *, out_dtype, config: Fp8GemmConfig) -> jax.Array:
    del config
    return fp8_weight_gemm_reference(x, w, w_scale, out_dtype=out_dtype)


def grouped_weight_gemm(x, w, w_scale, group_sizes, *, out_dtype, config: Fp8GemmConfig) -> jax.Array:
    del config
    return fp8_grouped_weight_gemm_reference(x, w, w_scale, group_sizes, out_dtype=out_dtype)
