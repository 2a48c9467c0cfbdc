"""SwiGLU feed-forward: the dense FFN of the first layers and the shared experts."""
from __future__ import annotations

import flax.linen as nn
import jax

from dsv3_jax.layers.common import weight
from dsv3_jax.layers.linear import linear


def swiglu(x: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array, fp8: bool = False) -> jax.Array:
    """x [..., D]; w1 (gate), w3 (up) [D, F]; w2 (down) [F, D]. `fp8`: FP8 GEMMs (see `linear`)."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])  # 2-D matmuls: XLA:CPU's layouts for 3-D ones cost transposes
    h = jax.nn.silu(linear(x, w1, fp8)) * linear(x, w3, fp8)
    return linear(h, w2, fp8).reshape(shape)


class MLP(nn.Module):
    hidden_size: int
    intermediate_size: int
    init_std: float
    fp8: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d, f, std = self.hidden_size, self.intermediate_size, self.init_std
        w1 = weight(self, "w1", (d, f), ("embed", "mlp"), std)
        w3 = weight(self, "w3", (d, f), ("embed", "mlp"), std)
        w2 = weight(self, "w2", (f, d), ("mlp", "embed"), std)
        return swiglu(x, w1, w3, w2, self.fp8)


__all__ = ["MLP", "swiglu"]
