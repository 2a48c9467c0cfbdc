"""Parameter helpers shared by the layers: every weight carries logical axis names."""
from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from dsv3_jax.ops.linear import Fp8Weight


def weight(module: nn.Module, name: str, shape: Sequence[int], axes: Sequence[str | None],
           std: float) -> jnp.ndarray | Fp8Weight:
    """A float32 master weight drawn from N(0, std), annotated with logical axes. The variables may
    hold an `Fp8Weight` in its place (inference with 8-bit weights): it is returned as it is, and the
    ops that use it (`dsv3_jax.ops.linear`) dequantise it there."""
    init = nn.with_logical_partitioning(nn.initializers.normal(stddev=std), tuple(axes))
    return module.param(name, init, tuple(shape), jnp.float32)
