"""Rotary embeddings on the decoupled rope dims, with YaRN (arXiv 2309.00071).

Layout: DeepSeek rotates *adjacent* pairs (x0, x1), (x2, x3), ... (its code views the rope dims as
complex numbers). The released weights were trained in that layout, so we keep it; transformers'
`rope_interleave=True` reaches the same dot products through a permutation.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig


def _correction_dim(rotations: float, dim: int, base: float, max_pos: int) -> float:
    """The rope dim whose wavelength completes `rotations` turns over `max_pos` positions."""
    return dim * math.log(max_pos / (rotations * 2 * math.pi)) / (2 * math.log(base))


def inv_frequencies(cfg: ModelConfig) -> np.ndarray:
    """[R/2] inverse frequencies; YaRN blends interpolated (low) and original (high) ones."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    inv = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    if not cfg.yarn_active:
        return inv
    orig = cfg.original_max_position_embeddings
    low = max(math.floor(_correction_dim(cfg.beta_fast, dim, base, orig)), 0)
    high = min(math.ceil(_correction_dim(cfg.beta_slow, dim, base, orig)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0.0, 1.0)
    keep = 1.0 - ramp  # 1 where the dim keeps its original (extrapolated) frequency
    return (inv / cfg.rope_factor * (1.0 - keep) + inv * keep).astype(np.float32)


def rope_angles(positions: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape positions.shape + [R/2], float32, with YaRN's attention factor."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_frequencies(cfg))
    factor = cfg.rope_attention_factor
    return jnp.cos(freqs) * factor, jnp.sin(freqs) * factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate adjacent pairs of x[..., R]; cos/sin broadcast against x[..., R/2]."""
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., 0::2], x32[..., 1::2]
    out = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
