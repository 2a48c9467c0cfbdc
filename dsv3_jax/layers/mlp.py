"""SwiGLU feed-forward: the dense FFN of the first layers and the shared experts."""
from __future__ import annotations

import flax.linen as nn
import jax

from dsv3_jax.layers.common import weight


def swiglu(x: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array) -> jax.Array:
    """x [..., D]; w1 (gate), w3 (up) [D, F]; w2 (down) [F, D]."""
    dt, shape = x.dtype, x.shape
    x = x.reshape(-1, shape[-1])  # 2-D matmuls: XLA:CPU's layouts for 3-D ones cost transposes
    h = jax.nn.silu(x @ w1.astype(dt)) * (x @ w3.astype(dt))
    return (h @ w2.astype(dt)).reshape(shape)


class MLP(nn.Module):
    hidden_size: int
    intermediate_size: int
    init_std: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d, f, std = self.hidden_size, self.intermediate_size, self.init_std
        w1 = weight(self, "w1", (d, f), ("embed", "mlp"), std)
        w3 = weight(self, "w3", (d, f), ("embed", "mlp"), std)
        w2 = weight(self, "w2", (f, d), ("mlp", "embed"), std)
        return swiglu(x, w1, w3, w2)


__all__ = ["MLP", "swiglu"]
