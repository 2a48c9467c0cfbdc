"""Backend "triton": the pallas_call kernel body (`common`) lowered by Pallas' Triton backend, any CUDA GPU."""
from __future__ import annotations

import functools

from jax.experimental.pallas import triton as pltriton

from pallas_kernels.mla_decode import common, plan, sparse, sparse_common

READS_FP8_CACHE = True  # packed FP8 rows are dequantised in the kernel body (`common`)
ROW_CAP = 32  # query rows (block_h x T) per program by default


def make_plan(q_shape, cache_shape, v_dim: int, config) -> plan.Plan:
    return common.make_pow2_plan(q_shape, cache_shape, v_dim, config, row_cap=ROW_CAP)


def refusal(q_shape, cache_shape, dtype, v_dim: int, config) -> str | None:
    del dtype
    layout = make_plan(q_shape, cache_shape, v_dim, config)
    for name, value in (("v_dim", layout.v_dim), ("rope dims (last dim - v_dim)", layout.rope_dim),
                        ("block_s", layout.block_s)):
        if value and value != plan.next_pow2(value):  # tl.arange takes power-of-two extents
            return f"triton: {name} must be a power of two, got {value}"
    return None


def run(q_blocks, pages, table, lengths, layout: plan.Plan, scale2: float, out_dtype, *, config):
    params = pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)
    return common.run(q_blocks, pages, table, lengths, layout, scale2, out_dtype, interpret=False,
                      compiler_params=params)


decode = functools.partial(plan.decode, make_plan=make_plan, run=run)


# ---- sparse decode (`sparse`): the same programs over each query's own rows (`sparse_common`)


def sparse_refusal(q_shape, rows_shape, topk: int, dtype, v_dim: int, config) -> str | None:
    return refusal(*sparse.virtual_shapes(q_shape, topk, rows_shape[-1]), dtype, v_dim, config)


def _sparse_run(q_blocks, rows, slots, layout: plan.Plan, scale2: float, out_dtype, *, config):
    params = pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)
    return sparse_common.run(q_blocks, rows, slots, layout, scale2, out_dtype, interpret=False,
                             compiler_params=params)


sparse_decode = functools.partial(sparse.decode_rows, make_plan=make_plan, run=_sparse_run)
