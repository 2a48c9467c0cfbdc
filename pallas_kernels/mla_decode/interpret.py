"""Backend "interpret": the pallas_call kernel body (`common`) run by XLA on any platform."""
from __future__ import annotations

import functools

from pallas_kernels.mla_decode import common, plan, sparse, sparse_common

READS_FP8_CACHE = True  # packed FP8 rows are dequantised in the kernel body (`common`)
ROW_CAP = 64  # query rows (block_h x T) per program by default, as one Hopper MMA


def make_plan(q_shape, cache_shape, v_dim: int, config) -> plan.Plan:
    return common.make_pow2_plan(q_shape, cache_shape, v_dim, config, row_cap=ROW_CAP)


def refusal(q_shape, cache_shape, dtype, v_dim: int, config) -> str | None:
    del q_shape, cache_shape, dtype, v_dim, config
    return None


def run(q_blocks, pages, table, lengths, layout: plan.Plan, scale2: float, out_dtype, *, config):
    del config
    return common.run(q_blocks, pages, table, lengths, layout, scale2, out_dtype, interpret=True)


decode = functools.partial(plan.decode, make_plan=make_plan, run=run)


# ---- sparse decode (`sparse`): the same programs over each query's own rows (`sparse_common`)


def sparse_refusal(q_shape, rows_shape, topk: int, dtype, v_dim: int, config) -> str | None:
    del q_shape, rows_shape, topk, dtype, v_dim, config
    return None


def _sparse_run(q_blocks, rows, slots, layout: plan.Plan, scale2: float, out_dtype, *, config):
    del config
    return sparse_common.run(q_blocks, rows, slots, layout, scale2, out_dtype, interpret=True)


sparse_decode = functools.partial(sparse.decode_rows, make_plan=make_plan, run=_sparse_run)
