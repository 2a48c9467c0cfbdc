"""The FP8 latent cache: FlashMLA's per-token layout, bytes of one row of a uint8 array.

A cache row [c_kv (C); k_pe (R)] is stored as
    C   bytes  c_kv in E4M3, in tiles of 128 values (the last tile may be shorter),
    4 T bytes  one float32 scale per tile (T = ceil(C / 128)), dequantised value = e4m3 * scale,
    2 R bytes  k_pe in bfloat16, unquantised (RoPE'd keys are sensitive to rounding).
For DeepSeek-V3 (C = 512, R = 64) that is 512 + 16 + 128 = 656 bytes a token against 1,152 in bfloat16
(FlashMLA's FP8 sparse-decode cache, the V3.2 release). Scale = max(amax, 1e-4) / 448 per tile, as
`quant.quantize_act` scales activations. Little-endian byte order, as every JAX platform stores them.

Plain jnp; every backend reads the cache through `dequantize_rows` or the same byte offsets.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.quant import BLOCK, E4M3, E4M3_MAX, MIN_AMAX

FP8_CACHE_DTYPE = jnp.uint8


def tiles(latent_dim: int) -> int:
    return -(-latent_dim // BLOCK)


def row_bytes(latent_dim: int, rope_dim: int) -> int:
    """Bytes of one packed row: C + 4 ceil(C / 128) + 2 R (656 for C = 512, R = 64)."""
    return latent_dim + 4 * tiles(latent_dim) + 2 * rope_dim


def offsets(latent_dim: int) -> tuple[int, int]:
    """(where the scales start, where the rope values start) in a packed row."""
    return latent_dim, latent_dim + 4 * tiles(latent_dim)


def is_packed(shape, dtype, latent_dim: int, rope_dim: int) -> bool:
    """Whether an array of `shape` and `dtype` is a packed FP8 cache of rows [C + R]."""
    return jnp.dtype(dtype) == FP8_CACHE_DTYPE and len(shape) > 0 and shape[-1] == row_bytes(latent_dim, rope_dim)


def quantize_rows(rows: jax.Array, latent_dim: int) -> jax.Array:
    """rows [..., C + R] (any float dtype) -> uint8 [..., row_bytes(C, R)]."""
    lead, dim = rows.shape[:-1], rows.shape[-1]
    c, r = latent_dim, dim - latent_dim
    if not 0 < c <= dim:
        raise ValueError(f"quantize_rows: latent_dim {c} must be in [1, {dim}] (rows {rows.shape})")
    t = tiles(c)
    latent = jnp.pad(rows[..., :c].astype(jnp.float32), [(0, 0)] * len(lead) + [(0, t * BLOCK - c)])
    latent = latent.reshape(*lead, t, BLOCK)
    scale = jnp.maximum(jnp.abs(latent).max(axis=-1), MIN_AMAX) / E4M3_MAX  # [..., T]
    q = jnp.clip(latent / scale[..., None], -E4M3_MAX, E4M3_MAX).astype(E4M3).reshape(*lead, t * BLOCK)[..., :c]
    as_bytes = lambda x: jax.lax.bitcast_convert_type(x, jnp.uint8).reshape(*lead, -1)
    parts = [jax.lax.bitcast_convert_type(q, jnp.uint8), as_bytes(scale.astype(jnp.float32))]
    if r:
        parts.append(as_bytes(rows[..., c:].astype(jnp.bfloat16)))
    return jnp.concatenate(parts, axis=-1)


def unpack(packed: jax.Array, latent_dim: int, rope_dim: int):
    """uint8 [..., bytes] -> (e4m3 [..., C], float32 scales [..., T], bfloat16 rope [..., R])."""
    lead, c, r = packed.shape[:-1], latent_dim, rope_dim
    if packed.dtype != FP8_CACHE_DTYPE or packed.shape[-1] != row_bytes(c, r):
        raise ValueError(f"a packed FP8 cache of C={c}, R={r} is uint8 [..., {row_bytes(c, r)}]; "
                         f"got {packed.dtype} {packed.shape}")
    at_scales, at_rope = offsets(c)
    q = jax.lax.bitcast_convert_type(packed[..., :c], E4M3)
    scale = jax.lax.bitcast_convert_type(packed[..., at_scales:at_rope].reshape(*lead, -1, 4), jnp.float32)
    rope = jax.lax.bitcast_convert_type(packed[..., at_rope:].reshape(*lead, r, 2), jnp.bfloat16)
    return q, scale, rope


def dequantize_rows(packed: jax.Array, latent_dim: int, rope_dim: int, dtype=jnp.bfloat16) -> jax.Array:
    """Inverse of `quantize_rows`: uint8 [..., bytes] -> dtype [..., C + R]."""
    q, scale, rope = unpack(packed, latent_dim, rope_dim)
    lead, c = packed.shape[:-1], latent_dim
    full = jnp.repeat(scale, BLOCK, axis=-1)[..., :c]
    latent = q.astype(jnp.float32) * full
    return jnp.concatenate([latent.astype(dtype), rope.astype(dtype)], axis=-1).reshape(*lead, c + rope_dim)
