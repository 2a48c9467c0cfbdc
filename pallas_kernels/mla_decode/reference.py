"""Backend "xla": absorbed MLA decode in plain jnp over the whole cache. The kernels are held to it."""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.mla_decode import fp8_cache, sparse

READS_FP8_CACHE = True


def mla_decode_reference(q, cache, lengths, *, v_dim: int, softmax_scale: float):
    """Plain-jnp absorbed MLA decode: q [B, T, H, C+R], cache [B, S, C+R] (or packed FP8 rows, `fp8_cache`),
    lengths [B] -> [B, T, H, v_dim]."""
    _, sq, _, dim = q.shape
    s_len = cache.shape[1]
    if cache.dtype == fp8_cache.FP8_CACHE_DTYPE:  # packed FP8 rows: read as their dequantised values
        cache = fp8_cache.dequantize_rows(cache, v_dim, dim - v_dim, jnp.float32)
    qf, cf = q.astype(jnp.float32), cache.astype(jnp.float32)
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, s_len)
    pos = lengths[:, None] - sq + jnp.arange(sq)[None, :]  # [B, T]
    keys = jnp.arange(s_len)
    valid = keys[None, None, None, :] <= pos[:, :, None, None]  # [B, T, 1, S]
    scores = jnp.einsum("bthd,bsd->bths", qf, cf, precision=lax.Precision.HIGHEST) * softmax_scale
    scores = jnp.where(valid, scores, -jnp.inf)
    peak = scores.max(axis=-1, keepdims=True)
    probs = jnp.exp(scores - jnp.where(jnp.isfinite(peak), peak, 0.0))
    denom = probs.sum(axis=-1, keepdims=True)
    # Rows past a sequence's end may hold anything (even NaN); they must not reach the output.
    values = jnp.where((keys[None, :] < lengths[:, None])[..., None], cf[..., :v_dim], 0.0)
    out = jnp.einsum("bths,bsc->bthc", probs, values, precision=lax.Precision.HIGHEST)
    return (out / jnp.where(denom > 0, denom, 1.0)).astype(q.dtype)


def refusal(q_shape, cache_shape, dtype, v_dim: int, config) -> str | None:
    del q_shape, cache_shape, dtype, v_dim, config
    return None


def decode(q, cache, lengths, *, v_dim: int, softmax_scale: float, config):
    del config
    return mla_decode_reference(q, cache, lengths, v_dim=v_dim, softmax_scale=softmax_scale)


# ---- sparse decode (DSA; `sparse` module): each query's own top-k rows -------------------------------------


def _attend_rows(q, rows, valid, *, v_dim: int, softmax_scale: float):
    """q [B, T, H, C+R] over its gathered rows [B, T, K, C+R] float32 where `valid` [B, T, K] -> [B, T, H, v_dim].
    A softmax over the valid slots only; a query with none gets zeros."""
    rows = jnp.where(valid[..., None], rows, 0.0)  # stand-in rows (slot -1) may hold anything, even NaN
    scores = jnp.einsum("bthd,btkd->bthk", q.astype(jnp.float32), rows, precision=lax.Precision.HIGHEST)
    scores = jnp.where(valid[:, :, None], scores * softmax_scale, -jnp.inf)
    peak = scores.max(axis=-1, keepdims=True)
    probs = jnp.exp(scores - jnp.where(jnp.isfinite(peak), peak, 0.0))
    denom = probs.sum(axis=-1, keepdims=True)
    out = jnp.einsum("bthk,btkc->bthc", probs, rows[..., :v_dim], precision=lax.Precision.HIGHEST)
    return (out / jnp.where(denom > 0, denom, 1.0)).astype(q.dtype)


def _gather_rows(rows, indices, v_dim: int, rope_dim: int):
    """rows [R, W] at indices [B, T, K] (-1: none; row 0 stands in) -> (float32 [B, T, K, C+R], valid [B, T, K])."""
    valid = indices >= 0
    picked = rows[jnp.where(valid, indices, 0)]
    if picked.dtype == fp8_cache.FP8_CACHE_DTYPE:  # only the K picked rows are dequantised
        picked = fp8_cache.dequantize_rows(picked, v_dim, rope_dim, jnp.float32)
    return picked.astype(jnp.float32), valid


def mla_decode_sparse_reference(q, cache, indices, *, v_dim: int, softmax_scale: float):
    """Plain-jnp sparse absorbed MLA decode: q [B, T, H, C+R], cache [B, S, C+R] (or packed FP8 rows), indices
    [B, T, K] (slots of row b's cache; -1 or out of [0, S): none) -> [B, T, H, v_dim]; zeros for a query with no
    valid slot."""
    b, s_len, width = cache.shape
    idx = sparse.flat_indices(indices, s_len, b * s_len)
    return sparse_decode(q, cache.reshape(b * s_len, width), idx, v_dim=v_dim, softmax_scale=softmax_scale,
                         config=None)


def sparse_refusal(q_shape, rows_shape, topk: int, dtype, v_dim: int, config) -> str | None:
    del q_shape, rows_shape, topk, dtype, v_dim, config
    return None


def sparse_decode(q, rows, indices, *, v_dim: int, softmax_scale: float, config):
    """q [B, T, H, C+R] over rows [R, W] through indices [B, T, K] (rows of R, -1: none)."""
    del config
    picked, valid = _gather_rows(rows, indices, v_dim, q.shape[-1] - v_dim)
    return _attend_rows(q, picked, valid, v_dim=v_dim, softmax_scale=softmax_scale)
