"""The matmuls of the linear layers, and the 8-bit weight they accept.

`linear` runs in the activation dtype, or with `fp8` as FP8 training GEMMs (V3 report s.3.3): Fprop,
Dgrad and Wgrad on E4M3 inputs, activations scaled per 1x128 tile, weights per 128x128 block, FP32
accumulation promoted every 128 of K (`pallas_kernels.fp8_gemm`). The float32 master weights are
quantised where they are used, so parameters and their gradients stay float32. Only the linear
layers come here with `fp8`; the embedding, output head, router, norms, MTP projection and the
attention core keep their higher-precision matmuls, as the report keeps them.

An `Fp8Weight` (inference with 8-bit weights, as DeepSeek ships them) is accepted wherever a weight
is: it stays 8-bit in memory and is dequantised here, where it is used.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp

from dsv3_jax.parallel.rules import local_rows
from pallas_kernels import grouped_matmul
from pallas_kernels.fp8_gemm import fp8_grouped_linear, fp8_grouped_weight_gemm, fp8_linear, fp8_weight_gemm
from pallas_kernels.fp8_gemm import supports as fp8_supports
from pallas_kernels.quant import dequantize_weight, quantize_weight

# Grouped matmul: rows of x [M, K] sorted by group, group sizes [G], w [G, K, N] -> [M, N].
GroupedMatmul = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


@flax.struct.dataclass
class Fp8Weight:
    """A linear weight held as E4M3 with one float32 scale per 128x128 block (V3 report s.3.3), as
    DeepSeek ships it. The blocks tile the checkpoint's [out, in] matrix (per expert for stacked
    experts); the 8-bit values are kept in our leaf's layout, so Flax sees the shape it expects.
    """

    q: jax.Array  # our leaf's shape, float8_e4m3fn
    scale: jax.Array  # [E?, ceil(out/128), ceil(in/128)] float32
    in_dims: int = flax.struct.field(pytree_node=False, default=1)  # leading dims of ours that form `in`
    stacked: bool = flax.struct.field(pytree_node=False, default=False)  # the first axis indexes experts

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    @property
    def matrix_shape(self) -> tuple[int, ...]:
        """[E?, out, in]: the checkpoint's matrix shape, as the weight-only FP8 GEMMs take the weight ([(G,) N, K])."""
        lead = self.shape[:1] if self.stacked else ()
        body = self.shape[len(lead):]
        return (*lead, math.prod(body[self.in_dims:]), math.prod(body[:self.in_dims]))

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


def dense(w: jax.Array | Fp8Weight, dtype) -> jax.Array:
    """A weight as an array: an `Fp8Weight` dequantised to `dtype`; an array as it is (callers cast)."""
    return w.dequantize(dtype) if isinstance(w, Fp8Weight) else w


def dense_for(w: jax.Array | Fp8Weight, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(`dense(w, x.dtype)`, x): an `Fp8Weight` dequantised no earlier than `x` exists. Its expansion
    depends on nothing computed, so XLA may otherwise schedule every layer's at the program's start: a
    decode step of unrolled layers then holds all of the model's weights in bf16 at once."""
    if isinstance(w, Fp8Weight):
        w, x = jax.lax.optimization_barrier((w, x))
        return w.dequantize(x.dtype), x
    return w, x


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def cast_here(w: jax.Array, dtype) -> jax.Array:
    """w.astype(dtype), kept where it is written, and its gradient cast back there too. Inside a scan over
    stacked layers XLA otherwise moves the casts out of the loop: the whole stack of weights cast at once
    before it, the whole stack of gradients after it (V3's routed experts: 9.5 GB a device)."""
    return jax.lax.optimization_barrier(w).astype(dtype)


def _cast_here_fwd(w, dtype):
    return cast_here(w, dtype), jnp.zeros((), w.dtype)  # a residual carrying w's dtype


def _cast_here_bwd(dtype, like, g):
    return (jax.lax.optimization_barrier(g.astype(like.dtype)),)


cast_here.defvjp(_cast_here_fwd, _cast_here_bwd)


def linear(x: jax.Array, w: jax.Array | Fp8Weight, *, in_dims: int = 1, fp8: bool = False,
           backend: str = "xla") -> jax.Array:
    """x [..., I] @ w [I_1..I_in_dims, O...] -> [..., O...] in x's dtype, I = I_1 * ... * I_in_dims.

    One 2-D matmul whatever the ranks: XLA:CPU lays out 3-D forms' backward with transposes.
    `fp8`: FP8 GEMMs on `backend` (a concrete `pallas_kernels` backend name). An `Fp8Weight` goes through
    the weight-only FP8 GEMM where `backend` is a kernel backend that takes it (the weight read 8-bit and
    dequantised in the kernel: decoding reads half the weight bytes), else it is dequantised first."""
    if isinstance(w, Fp8Weight) and not fp8 and not w.stacked and backend != "xla" and fp8_supports(
            (math.prod(x.shape[:-1]), x.shape[-1]), w.matrix_shape, backend=backend, weight_only=True) is None:
        k = math.prod(w.shape[:in_dims])
        # The kernel reads our [in, out] leaf as it is (w_layout "kn"): a transposed copy would cost a read and a
        # write of the weight a step, and XLA hoists such copies out of the decode loop, holding a second copy of
        # all the 8-bit weights (the V3 decode plan on tpu7x: +38 GiB a device).
        x2, wq = x.reshape(-1, k), w.q.reshape(k, -1)
        gemm = lambda a, q, s: fp8_weight_gemm(a, q, s, backend=backend, w_layout="kn")
        return local_rows(gemm, (x2,), (wq, w.scale)).reshape(*x.shape[:-1], *w.shape[in_dims:])
    w, x = dense_for(w, x)
    k, out = math.prod(w.shape[:in_dims]), w.shape[in_dims:]
    x2, w2 = x.reshape(-1, k), w.reshape(k, -1)
    if fp8 and backend != "xla":  # a Pallas kernel: run on each device's rows, the weight whole
        y = local_rows(lambda a, b: fp8_linear(a, b, backend=backend), (x2,), (w2,))
    else:
        y = fp8_linear(x2, w2, backend=backend) if fp8 else x2 @ w2.astype(x.dtype)
    return y.reshape(*x.shape[:-1], *out)


def ragged_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """The full-precision grouped matmul (`GroupedMatmul`), in x's dtype."""
    return jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes)


def fp8_ragged_matmul(backend: str) -> GroupedMatmul:
    """The FP8 grouped matmul (`GroupedMatmul`): E4M3 inputs in Fprop, Dgrad and Wgrad, 1x128 activation
    tiles, 128x128 blocks per expert weight, on `backend`."""
    return lambda x, w, group_sizes: fp8_grouped_linear(x, w, group_sizes, backend=backend)


def kernel_ragged_matmul(interpret: bool) -> GroupedMatmul:
    """The grouped matmul as TPU kernels (`pallas_kernels.grouped_matmul`: megablox, whose weight
    gradient is grouped too), compiled, or in Pallas' interpreter on any platform."""
    return lambda x, w, group_sizes: grouped_matmul.gmm(x, w, group_sizes, interpret=interpret)


def fp8_weight_ragged_matmul(backend: str) -> GroupedMatmul:
    """The grouped matmul (`GroupedMatmul`) of stacked `Fp8Weight`s, for decoding with 8-bit experts: the grouped
    weight-only FP8 GEMM on `backend`. Each expert's weight is read 8-bit and dequantised in the kernel, and only
    the experts that have rows are read; dequantised first, every expert would be expanded to x's dtype in memory
    and read back at twice the bytes. Not differentiable (inference weights).

    The kernel reads our [G, in, out] leaf as it is (w_layout "kn"). A transposed copy of every local expert's
    8-bit weight was kept alive across layers by XLA:TPU (the V3 decode plan on tpu7x: +36 GiB a device)."""

    def gmm(x: jax.Array, w: Fp8Weight, group_sizes: jax.Array) -> jax.Array:
        g = w.shape[0]
        wq = w.q.reshape(g, math.prod(w.shape[1:1 + w.in_dims]), -1)
        return fp8_grouped_weight_gemm(x, wq, w.scale, group_sizes, backend=backend, w_layout="kn")

    return gmm
