"""Parameter helpers shared by the layers: every weight carries logical axis names."""
from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from pallas_kernels.quant import dequantize_weight, quantize_weight


def weight(module: nn.Module, name: str, shape: Sequence[int], axes: Sequence[str | None],
           std: float) -> jnp.ndarray:
    """A float32 master weight drawn from N(0, std), annotated with logical axes. An `Fp8Weight` in
    the variables (inference with 8-bit weights) is dequantised here, where it is used; the callers
    cast to their compute dtype as for any weight."""
    init = nn.with_logical_partitioning(nn.initializers.normal(stddev=std), tuple(axes))
    w = module.param(name, init, tuple(shape), jnp.float32)
    if isinstance(w, Fp8Weight):
        return w.dequantize(jnp.float32)
    return w


@flax.struct.dataclass
class Fp8Weight:
    """A linear weight held as E4M3 with one float32 scale per 128x128 block (V3 report s.3.3), as
    DeepSeek ships it. The blocks tile the checkpoint's [out, in] matrix (per expert for stacked
    experts); the 8-bit values are kept in our leaf's layout, so Flax sees the shape it expects.
    `weight` dequantises where the weight is used, so it stays 8-bit in memory.
    """

    q: jax.Array  # our leaf's shape, float8_e4m3fn
    scale: jax.Array  # [E?, ceil(out/128), ceil(in/128)] float32
    in_dims: int = flax.struct.field(pytree_node=False, default=1)  # leading dims of ours that form `in`
    stacked: bool = flax.struct.field(pytree_node=False, default=False)  # the first axis indexes experts

    def _as_matrix(self, x: jax.Array) -> jax.Array:
        """Our layout -> [E?, out, in]."""
        lead = x.shape[:1] if self.stacked else ()
        k = math.prod(x.shape[len(lead): len(lead) + self.in_dims])
        return jnp.swapaxes(x.reshape(*lead, k, -1), -1, -2)

    def dequantize(self, dtype) -> jax.Array:
        deq = lambda q, s: dequantize_weight(q, s, dtype)
        if self.stacked:
            deq = jax.vmap(deq)
        return jnp.swapaxes(deq(self._as_matrix(self.q), self.scale), -1, -2).reshape(self.q.shape)

    @classmethod
    def quantize(cls, w: jax.Array, in_dims: int = 1, stacked: bool = False) -> Fp8Weight:
        """From one of our full-precision leaves."""
        layout = cls(w, jnp.zeros(()), in_dims, stacked)
        quant = jax.vmap(quantize_weight) if stacked else quantize_weight
        q, s = quant(layout._as_matrix(w))
        return cls(jnp.swapaxes(q, -1, -2).reshape(w.shape), s, in_dims, stacked)

    @classmethod
    def from_file(cls, q, scale, shape: tuple[int, ...], in_dims: int = 1, stacked: bool = False) -> Fp8Weight:
        """From a checkpoint's 8-bit [E?, out, in] values and block scales, kept 8-bit."""
        return cls(jnp.swapaxes(jnp.asarray(q), -1, -2).reshape(shape), jnp.asarray(scale, jnp.float32),
                   in_dims, stacked)
