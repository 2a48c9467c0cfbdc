"""Backend "xla": absorbed MLA decode in plain jnp over the whole cache. The kernels are held to it."""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.mla_decode import fp8_cache

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
