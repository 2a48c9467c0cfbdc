"""SwiGLU feed-forward: the dense FFN of the first layers and the shared experts."""
from __future__ import annotations

import flax.linen as nn
import jax

from dsv3_jax.layers.common import weight
from dsv3_jax.ops import dispatch
from dsv3_jax.ops.linear import linear
from dsv3_jax.runtime import Runtime


def swiglu(x: jax.Array, w1, w3, w2, fp8: bool = False, backend: str = "xla") -> jax.Array:
    """x [..., D]; w1 (gate), w3 (up) [D, F]; w2 (down) [F, D]. `fp8`: FP8 GEMMs (see `linear`)."""
    mm = lambda a, w: linear(a, w, fp8=fp8, backend=backend)
    return mm(jax.nn.silu(mm(x, w1)) * mm(x, w3), w2)


class MLP(nn.Module):
    hidden_size: int
    intermediate_size: int
    init_std: float
    runtime: Runtime = Runtime()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d, f, std = self.hidden_size, self.intermediate_size, self.init_std
        w1 = weight(self, "w1", (d, f), ("embed", "mlp"), std)
        w3 = weight(self, "w3", (d, f), ("embed", "mlp"), std)
        w2 = weight(self, "w2", (f, d), ("mlp", "embed"), std)
        return swiglu(x, w1, w3, w2, self.runtime.fp8, dispatch.fp8_backend(self.runtime))


__all__ = ["MLP", "swiglu"]
