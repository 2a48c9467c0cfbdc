"""Backend "interpret": the Pallas kernel body (`common`) run by XLA on any platform."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.fp8_gemm import common, tiles
from pallas_kernels.fp8_gemm.config import Fp8GemmConfig

DEFAULTS = dict(block_m=128, block_n=128, num_stages=1, num_warps=4)


def config_refusal(config: Fp8GemmConfig) -> str | None:
    del config
    return None


def _f32_block_dot(ak: jax.Array, bk: jax.Array) -> jax.Array:
    """XLA:CPU has no FP8 dot: the K block in f32 at HIGHEST precision, where every product of two e4m3 values, or
    of an e4m3 weight and a bf16 activation, is exact (an f32 activation's products round once, as the reference's)."""
    ak, bk = ak.astype(jnp.float32), bk.astype(jnp.float32)
    return lax.dot_general(ak, bk, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                           precision=lax.Precision.HIGHEST)


def gemm(a, a_scale, b, b_scale, *, out_dtype, config: Fp8GemmConfig):
    kernel = functools.partial(common.pallas_gemm, interpret=True, block_dot=_f32_block_dot)
    return tiles.run_dense(kernel, a, a_scale, b, b_scale, out_dtype, config)


def grouped_gemm(a, a_scale, b, b_scale, group_sizes, *, out_dtype, config: Fp8GemmConfig):
    kernel = functools.partial(common.pallas_grouped_gemm, interpret=True, block_dot=_f32_block_dot)
    return tiles.run_grouped(kernel, a, a_scale, b, b_scale, group_sizes, out_dtype, config)


def weight_gemm(x, w, w_scale, *, out_dtype, config: Fp8GemmConfig):
    kernel = functools.partial(common.pallas_gemm, interpret=True, block_dot=_f32_block_dot)
    return tiles.run_dense(kernel, x, None, w, w_scale, out_dtype, config)


def grouped_weight_gemm(x, w, w_scale, group_sizes, *, out_dtype, config: Fp8GemmConfig):
    kernel = functools.partial(common.pallas_grouped_gemm, interpret=True, block_dot=_f32_block_dot)
    return tiles.run_grouped(kernel, x, None, w, w_scale, group_sizes, out_dtype, config)
