"""The linear layers' matmuls, in the activation dtype or as FP8 training GEMMs (V3 report s.3.3).

With `fp8`, Fprop, Dgrad and Wgrad all take E4M3 inputs: activations scaled per 1x128 tile, weights
per 128x128 block, FP32 accumulation promoted every 128 of K (`pallas_kernels.fp8_gemm`). The float32
master weights are quantised where they are used, so the parameters and their gradients stay float32.
Only the linear layers come here; the embedding, output head, router, norms, MTP projection and the
attention core keep their higher-precision matmuls, as the report keeps them.
"""
from __future__ import annotations

import jax

from pallas_kernels.fp8_gemm import fp8_grouped_linear, fp8_linear


def linear(x: jax.Array, w: jax.Array, fp8: bool = False) -> jax.Array:
    """x [M, K] @ w [K, N] -> [M, N] in x's dtype."""
    if fp8:
        return fp8_linear(x, w, backend="auto")
    return x @ w.astype(x.dtype)


def grouped_linear(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """FP8 expert matmuls: rows of x [M, K] sorted by expert, group_sizes [E], w [E, K, N] -> [M, N]."""
    return fp8_grouped_linear(x, w, group_sizes, backend="auto")


__all__ = ["grouped_linear", "linear"]
