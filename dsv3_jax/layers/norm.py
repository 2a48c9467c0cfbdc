"""RMSNorm, computed in float32 whatever the activation dtype."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return y.astype(x.dtype) * scale.astype(x.dtype)


class RMSNorm(nn.Module):
    eps: float = 1e-6
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,))
        scale = self.param("scale", init, (x.shape[-1],), jnp.float32)
        return rms_norm(x, scale, self.eps)
