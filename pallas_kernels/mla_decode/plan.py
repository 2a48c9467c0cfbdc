"""How one decode call is cut into kernel programs, and the glue around the kernels.

Flash-decoding: the cache is cut into `num_splits` contiguous splits of whole blocks of `block_s` positions;
each program runs an online softmax over its split for `block_h` heads x T queries (rows query-major:
row = t * block_h + h, padded to `rows`), and returns the split's normalised output and base-2
log-sum-exp; `combine` merges the splits with log-sum-exp weights. A dense cache is viewed as pages of
`block_s` rows with an identity block table (FlashMLA's paged design), so the kernels read through a table.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax.numpy as jnp

from pallas_kernels import backends

LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static layout of one call: how heads, queries and the cache are cut into programs."""

    batch: int
    sq: int
    heads: int
    dim: int  # C + R
    v_dim: int  # C
    block_s: int
    blocks: int  # cache blocks per sequence (block-table columns)
    block_h: int
    rows: int  # padded query rows per program (M)
    num_splits: int
    steps: int  # cache blocks per split

    @property
    def rope_dim(self) -> int:
        return self.dim - self.v_dim

    @property
    def head_blocks(self) -> int:
        return -(-self.heads // self.block_h)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def make_plan(q_shape, cache_shape, v_dim: int, config, *, row_cap: int, rows: Callable[[int], int]) -> Plan:
    """Programs for q [B, T, H, C+R] over a cache [B, S, C+R]. A backend packs up to `row_cap` query rows
    (block_h x T) into one program by default, padded to `rows(block_h * T)`."""
    batch, sq, heads, dim = q_shape
    block_s = config.block_s
    blocks = max(1, -(-cache_shape[1] // block_s))
    block_h = config.block_h or min(heads, max(1, row_cap // sq))
    head_blocks = -(-heads // block_h)
    splits = config.num_splits or -(-backends.num_sms() // (batch * head_blocks))
    steps = -(-blocks // max(1, min(splits, blocks)))
    return Plan(
        batch=batch, sq=sq, heads=heads, dim=dim, v_dim=v_dim, block_s=block_s, blocks=blocks,
        block_h=block_h, rows=rows(block_h * sq), num_splits=-(-blocks // steps), steps=steps,
    )


def to_blocks(q, plan: Plan):
    """q [B, T, H, D] -> [B, HB, M, D]; within a program, rows are query-major (row = t * block_h + h)."""
    b, sq, h, d = q.shape
    hb, bh = plan.head_blocks, plan.block_h
    q = jnp.pad(q, ((0, 0), (0, 0), (0, hb * bh - h), (0, 0)))
    q = q.reshape(b, sq, hb, bh, d).transpose(0, 2, 1, 3, 4).reshape(b, hb, sq * bh, d)
    return jnp.pad(q, ((0, 0), (0, 0), (0, plan.rows - sq * bh), (0, 0)))


def from_blocks(out, plan: Plan):
    """[B, HB, M, C] -> [B, T, H, C]."""
    b, hb, _, c = out.shape
    out = out[:, :, : plan.sq * plan.block_h].reshape(b, hb, plan.sq, plan.block_h, c)
    return out.transpose(0, 2, 1, 3, 4).reshape(b, plan.sq, hb * plan.block_h, c)[:, :, : plan.heads]


def combine(o, lse2):
    """Merge splits: o [B, NS, HB, M, C] (each split normalised), lse2 [B, NS, HB, M] base-2 log-sum-exp."""
    if o.shape[1] == 1:
        return o[:, 0]
    peak = lse2.max(axis=1, keepdims=True)
    weight = jnp.exp2(lse2 - jnp.where(jnp.isfinite(peak), peak, 0.0))  # 0 for empty splits
    total = weight.sum(axis=1)
    out = (weight[..., None] * o.astype(jnp.float32)).sum(axis=1)
    return out / jnp.where(total > 0, total, 1.0)[..., None]


def decode_pages(q, pages, table, lengths, *, softmax_scale: float, plan: Plan, run):
    """q [B, T, H, C+R] over pages [P, block_s, C+R] through a block table [B, blocks] (sequence b's block j is
    page table[b, j]; entries are clipped to [0, P), and those past a sequence's end are never read), lengths
    [B] -> [B, T, H, v_dim]. The kernel `run(q_blocks [B, HB, M, D], pages, table, lengths, plan, scale2,
    out_dtype)` returns (o, lse2) as `combine` takes them."""
    num_pages = pages.shape[0]
    table = jnp.clip(table.astype(jnp.int32), 0, num_pages - 1)
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, plan.blocks * plan.block_s)
    if plan.num_splits * plan.steps > plan.blocks:  # the last split may run past the table: pad it
        table = jnp.pad(table, ((0, 0), (0, plan.num_splits * plan.steps - plan.blocks)))
    out_dtype = q.dtype if plan.num_splits == 1 else jnp.float32
    scale2 = float(softmax_scale) * LOG2E  # scores in base 2, so the kernels use exp2
    o, lse2 = run(to_blocks(q, plan), pages, table, lengths, plan, scale2, out_dtype)
    return from_blocks(combine(o, lse2), plan).astype(q.dtype)


def gather_pages(pages, table):
    """pages [P, block_s, W] through a block table [B, blocks] -> the dense cache [B, blocks * block_s, W] they
    stand for (entries clipped to [0, P), as `decode_pages` reads them): for backends without a paged kernel."""
    table = jnp.clip(table.astype(jnp.int32), 0, pages.shape[0] - 1)
    return pages[table].reshape(table.shape[0], table.shape[1] * pages.shape[1], pages.shape[2])


def decode(q, cache, lengths, *, v_dim: int, softmax_scale: float, config, make_plan, run):
    """q [B, T, H, C+R] over a dense cache [B, S, C+R] (padded to whole blocks: a copy), lengths [B], on a
    backend's `make_plan(q_shape, cache_shape, v_dim, config)` and kernel `run(..., *, config)`."""
    layout = make_plan(q.shape, cache.shape, v_dim, config)
    b, s_len, dim = cache.shape
    bs, blocks = layout.block_s, layout.blocks
    if blocks * bs != s_len:
        cache = jnp.pad(cache, ((0, 0), (0, blocks * bs - s_len), (0, 0)))
    pages = cache.reshape(b * blocks, bs, dim)
    table = jnp.arange(b * blocks, dtype=jnp.int32).reshape(b, blocks)
    return decode_pages(q, pages, table, jnp.minimum(lengths, s_len), softmax_scale=softmax_scale, plan=layout,
                        run=functools.partial(run, config=config))
