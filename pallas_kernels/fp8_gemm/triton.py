"""Backend "triton": the Pallas kernel body (`common`) lowered by Pallas' Triton backend, any CUDA GPU."""
from __future__ import annotations

import functools

from jax.experimental.pallas import triton as pltriton

from pallas_kernels.fp8_gemm import common, tiles
from pallas_kernels.fp8_gemm.config import Fp8GemmConfig

DEFAULTS = dict(block_m=64, block_n=128, num_stages=4, num_warps=4)


def config_refusal(config: Fp8GemmConfig) -> str | None:
    for name in ("block_m", "block_n"):
        v = getattr(config, name)
        if v < 16 or v & (v - 1):
            return f"triton: {name} must be a power of two >= 16, got {v}"
    return None


def _compiled(kernel, config: Fp8GemmConfig):
    params = pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)
    return functools.partial(kernel, interpret=False, compiler_params=params)


def gemm(a, a_scale, b, b_scale, *, out_dtype, config: Fp8GemmConfig):
    return tiles.run_dense(_compiled(common.pallas_gemm, config), a, a_scale, b, b_scale, out_dtype, config)


def grouped_gemm(a, a_scale, b, b_scale, group_sizes, *, out_dtype, config: Fp8GemmConfig):
    kernel = _compiled(common.pallas_grouped_gemm, config)
    return tiles.run_grouped(kernel, a, a_scale, b, b_scale, group_sizes, out_dtype, config)
