"""Block-scaled FP8 (E4M3) quantisation, as DeepSeek-V3 trains and ships its weights (report s.3.3).

Weights: one float32 scale per 128x128 block; activations: one per 1x128 tile (per token, per 128
channels). Scale = max(amax, 1e-4) / 448 (E4M3's largest finite value), so dequantisation is
q * scale (DeepSeek's checkpoints call the scale `weight_scale_inv`). Edge blocks are padded
internally; any shape works. Plain jnp: this is the reference the kernels are held to.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

BLOCK = 128
E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0
MIN_AMAX = 1e-4  # as DeepSeek's act_quant: an all-zero block still gets a finite scale


def _pad_to(x: jax.Array, multiples: tuple[int, ...]) -> jax.Array:
    pads = [(0, -d % m) for d, m in zip(x.shape, multiples)]
    return jnp.pad(x, pads)


def _scale(amax: jax.Array, pow2: bool) -> jax.Array:
    s = jnp.maximum(amax, MIN_AMAX) / E4M3_MAX
    return jnp.exp2(jnp.ceil(jnp.log2(s))) if pow2 else s


def quantize_weight(w: jax.Array, *, block: int = BLOCK, pow2: bool = False):
    """w [N, K] -> (e4m3 [N, K], float32 scales [ceil(N/block), ceil(K/block)])."""
    if w.ndim != 2:
        raise ValueError(f"quantize_weight: expected a 2-D weight [N, K], got shape {w.shape}")
    n, k = w.shape
    wp = _pad_to(w.astype(jnp.float32), (block, block))
    nb, kb = wp.shape[0] // block, wp.shape[1] // block
    blocks = wp.reshape(nb, block, kb, block)
    scale = _scale(jnp.abs(blocks).max(axis=(1, 3)), pow2)
    q = (blocks / scale[:, None, :, None]).reshape(wp.shape)[:n, :k]
    return jnp.clip(q, -E4M3_MAX, E4M3_MAX).astype(E4M3), scale


def dequantize_weight(q: jax.Array, scale: jax.Array, dtype=jnp.float32, *, block: int = BLOCK):
    """Inverse of `quantize_weight`: q [N, K] e4m3, scale [ceil(N/b), ceil(K/b)] -> dtype [N, K]."""
    n, k = q.shape
    want = (math.ceil(n / block), math.ceil(k / block))
    if scale.shape != want:
        raise ValueError(f"dequantize_weight: weight {q.shape} needs scales of shape {want}, got {scale.shape}")
    full = jnp.repeat(jnp.repeat(scale.astype(jnp.float32), block, axis=0), block, axis=1)[:n, :k]
    return (q.astype(jnp.float32) * full).astype(dtype)


@functools.partial(jax.jit, static_argnames=("block", "pow2"))
def quantize_act(x: jax.Array, *, block: int = BLOCK, pow2: bool = False):
    """x [M, K] -> (e4m3 [M, K], float32 scales [M, ceil(K/block)]), one scale per 1 x block tile."""
    if x.ndim != 2:
        raise ValueError(f"quantize_act: expected a 2-D activation [M, K], got shape {x.shape}")
    m, k = x.shape
    xp = _pad_to(x.astype(jnp.float32), (1, block))
    tiles = xp.reshape(m, xp.shape[1] // block, block)
    scale = _scale(jnp.abs(tiles).max(axis=2), pow2)
    q = (tiles / scale[:, :, None]).reshape(xp.shape)[:, :k]
    return jnp.clip(q, -E4M3_MAX, E4M3_MAX).astype(E4M3), scale


@functools.partial(jax.jit, static_argnames=("dtype", "block"))
def dequantize_act(q: jax.Array, scale: jax.Array, dtype=jnp.float32, *, block: int = BLOCK):
    """Inverse of `quantize_act`: q [M, K] e4m3, scale [M, ceil(K/block)] -> dtype [M, K]."""
    m, k = q.shape
    want = (m, math.ceil(k / block))
    if scale.shape != want:
        raise ValueError(f"dequantize_act: activation {q.shape} needs scales of shape {want}, got {scale.shape}")
    full = jnp.repeat(scale.astype(jnp.float32), block, axis=1)[:, :k]
    return (q.astype(jnp.float32) * full).astype(dtype)
