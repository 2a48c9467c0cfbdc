"""Sparse MLA decode (DeepSeek-V3.2's DSA, report s.2.1): each query attends over the cache rows its indexer
selected, FlashMLA's sparse layout, instead of a prefix of the cache.

Indices [B, T, K] name rows of the cache: each query t of sequence b has its own K slots, NONE (-1) in a slot
that holds no row. The attention is the absorbed one of the package (keys are the C+R rows, values their first
C entries, shared by all heads), its softmax over the query's valid slots only; a query with no valid slot
returns zeros (FlashMLA's convention; `dsv3_jax.ops.sparse_attention` instead averages its stand-in rows, so
it is compared on queries with at least one valid slot).

The backends read one flattened array of rows [rows, C+R] (or packed FP8 rows) through indices into it: the
dense cache [B, S, W] is rows [B S, W] with sequence b's slot s at row b S + s, FlashMLA's paged cache
[P, page_size, W] is rows [P page_size, W] and its indices are page * page_size + offset already. So a kernel
only ever gathers rows by number, and one query's slots are like one sequence of the dense kernels: query
(b, t) becomes a sequence of length K with T = 1, and K is cut into blocks of block_s slots, the splits and
their merge those of `plan` (flash-decoding over the top-k).

Each backend module may provide `sparse_refusal(q_shape, rows_shape, topk, dtype, v_dim, config) -> str | None`
and `sparse_decode(q, rows, indices, *, v_dim, softmax_scale, config)` with rows [R, W] and indices [B, T, K]
already checked against R (-1 or a row); `SPARSE_REFUSALS` says why a backend without them has none.
"""
from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.mla_decode import plan

NONE = -1  # a slot that holds no row (FlashMLA's sparse layout, `dsv3_jax.ops.sparse_attention.NONE`)

# Backends with no sparse kernel, and why (one line each; `supports_sparse` returns it).
SPARSE_REFUSALS = {
    "mosaic_gpu": ("mosaic_gpu: no sparse kernel: Hopper's TMA copies rectangular tiles and cannot gather "
                   "arbitrary rows (Blackwell's gather4 can), so top-k rows would take one copy each; use backend "
                   "'triton' (pointer gathers; 'auto' picks it)"),
}
# What "auto" takes for the sparse op where the dense op's choice has no sparse kernel.
SPARSE_STAND_IN = {"mosaic_gpu": "triton"}


def flat_indices(indices, rows_per_batch: int | None, total_rows: int):
    """indices [B, T, K] -> int32 rows of the flattened cache, NONE where a slot holds none or is out of range.

    rows_per_batch S: indices are slots of sequence b's own cache [S] (the dense form: row b S + slot);
    None: they are rows of the flattened array already (the paged form: page * page_size + offset).
    """
    idx = indices.astype(jnp.int32)
    bound = total_rows if rows_per_batch is None else rows_per_batch
    valid = (idx >= 0) & (idx < bound)
    if rows_per_batch is not None:
        idx = idx + (jnp.arange(idx.shape[0], dtype=jnp.int32) * rows_per_batch)[:, None, None]
    return jnp.where(valid, idx, NONE)


def virtual_shapes(q_shape, topk: int, width: int):
    """The dense decode the sparse one is cut like: q [B T, 1, H, C+R] over a 'cache' [B T, K, W]."""
    b, t, h, d = q_shape
    return (b * t, 1, h, d), (b * t, topk, width)


def decode_rows(q, rows, indices, *, v_dim: int, softmax_scale: float, config, make_plan, run):
    """q [B, T, H, C+R] over rows [R, W] through indices [B, T, K] (rows, NONE: none) -> [B, T, H, v_dim].

    The backend's `make_plan` cuts the virtual dense call (`virtual_shapes`); its kernel `run(q_blocks
    [B T, HB, M, D], rows, slots [B T, NS steps block_s], layout, scale2, out_dtype, *, config)` returns the
    splits' (o, lse2) as `plan` merges them. Slots past K are padded with NONE.
    """
    b, t, h, d = q.shape
    topk = indices.shape[-1]
    q_shape, cache_shape = virtual_shapes(q.shape, topk, rows.shape[-1])
    layout = make_plan(q_shape, cache_shape, v_dim, config)
    slots = layout.num_splits * layout.steps * layout.block_s
    idx = jnp.pad(indices.reshape(b * t, topk), ((0, 0), (0, slots - topk)), constant_values=NONE)
    out_dtype = q.dtype if layout.num_splits == 1 else jnp.float32
    scale2 = float(softmax_scale) * plan.LOG2E  # scores in base 2, so the kernels use exp2
    o, lse2 = run(plan.to_blocks(q.reshape(q_shape), layout), rows, idx, layout, scale2, out_dtype, config=config)
    return plan.from_blocks(plan.combine(o, lse2), layout).reshape(b, t, h, v_dim).astype(q.dtype)
