"""The pallas_call kernel body of backends "interpret" and "triton".

Program (b, head block, split): an online softmax over the split's cache blocks for its block_h x T query
rows, two passes (blocks every row sees in full, then the masked tail). Cache rows past a sequence's end are
zeroed before P.V: they may hold anything, and 0 * NaN would leak.

A packed FP8 cache (`fp8_cache`: uint8 rows) is dequantised block by block as it streams in, to q's dtype,
so the matrix products are those of a cache in that dtype (`_packed_block`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.mla_decode import fp8_cache
from pallas_kernels.mla_decode.flash import finish, online_softmax, step_counts, visible
from pallas_kernels.mla_decode.plan import Plan, make_plan, next_pow2
from pallas_kernels.quant import BLOCK, E4M3

TRITON_MIN_ROWS = 16  # tl.dot needs M >= 16 (the interpreter pads alike, so both run the same programs)


def make_pow2_plan(q_shape, cache_shape, v_dim: int, config, *, row_cap: int) -> Plan:
    """Query rows padded to a power of two, at least TRITON_MIN_ROWS."""
    return make_plan(q_shape, cache_shape, v_dim, config, row_cap=row_cap,
                     rows=lambda n: next_pow2(max(TRITON_MIN_ROWS, n)))


def _dense_block(pages_ref, page, plan: Plan, dtype):
    """One cache block as stored: (latent [block_s, C], rope [block_s, R] or None)."""
    del dtype
    dv, dr = plan.v_dim, plan.rope_dim
    return pages_ref[page, :, pl.ds(0, dv)], (pages_ref[page, :, pl.ds(dv, dr)] if dr else None)


def _float32_from_bytes(pages_ref, page, first: int, count: int, stride: int, shifts) -> jax.Array:
    """[block_s, count] float32 whose bit patterns are put together from single bytes: value j's byte k sits at
    first + stride * j + k and goes `shifts[k]` bits up (little-endian). Pallas' Triton lowering bitcasts only
    between types of one width, so a uint8 row cannot be viewed as float32 words; strided byte loads can."""
    bits = None
    for k, shift in enumerate(shifts):
        byte = pages_ref[page, :, pl.ds(first + k, count, stride)].astype(jnp.uint32)
        byte = lax.shift_left(byte, jnp.full(byte.shape, shift, jnp.uint32))
        bits = byte if bits is None else bits | byte
    return lax.bitcast_convert_type(bits, jnp.float32)


def _packed_block(pages_ref, page, plan: Plan, dtype):
    """One block of packed FP8 rows dequantised to `dtype`: the E4M3 latent times its tile's float32 scale, and
    the bfloat16 rope values (exactly: a bfloat16 is the high half of a float32)."""
    dv, dr, bs = plan.v_dim, plan.rope_dim, plan.block_s
    at_scales, at_rope = fp8_cache.offsets(dv)
    codes = lax.bitcast_convert_type(pages_ref[page, :, pl.ds(0, dv)], E4M3).astype(jnp.float32)
    # Each tile's scale as a [block_s, 1] column, spread over its 128 latent columns by selects: slicing or
    # reshaping a loaded value is not something the Triton lowering does.
    column = lax.broadcasted_iota(jnp.int32, (bs, dv), 1)
    scale = None
    for tile in range(fp8_cache.tiles(dv)):
        tile_scale = _float32_from_bytes(pages_ref, page, at_scales + 4 * tile, 1, 4, (0, 8, 16, 24))
        scale = tile_scale if scale is None else jnp.where(column >= tile * BLOCK, tile_scale, scale)
    latent = (codes * scale).astype(dtype)
    rope = _float32_from_bytes(pages_ref, page, at_rope, dr, 2, (16, 24)).astype(dtype) if dr else None
    return latent, rope


def _kernel(table_ref, len_ref, q_ref, pages_ref, o_ref, lse_ref, *, plan: Plan, scale2: float):
    """Program (b, head block, split). q_ref [M, C+R]; pages_ref [P, block_s, C+R] (or [P, block_s, row bytes],
    uint8: packed FP8 rows); o_ref [M, C]; lse_ref [M]."""
    b, split = pl.program_id(0), pl.program_id(2)
    length = len_ref[b]
    first = split * plan.steps
    n_steps, n_full = step_counts(length, first, plan)
    dv, dr, bs, rows = plan.v_dim, plan.rope_dim, plan.block_s, plan.rows
    dot = functools.partial(lax.dot_general, preferred_element_type=jnp.float32)
    qk = (((1,), (1,)), ((), ()))  # [M, D] x [N, D] -> [M, N]
    q_lat = q_ref[:, pl.ds(0, dv)]
    q_pe = q_ref[:, pl.ds(dv, dr)] if dr else None
    row_iota = lax.broadcasted_iota(jnp.int32, (rows, bs), 0)
    key_iota = lax.broadcasted_iota(jnp.int32, (rows, bs), 1)
    key_vec = lax.broadcasted_iota(jnp.int32, (bs,), 0)
    read = _packed_block if pages_ref.dtype == fp8_cache.FP8_CACHE_DTYPE else _dense_block

    def step(t, carry, masked):
        acc, m, denom = carry
        k_lat, k_pe = read(pages_ref, table_ref[b, first + t], plan, q_ref.dtype)  # [block_s, C]: also the values
        s = dot(q_lat, k_lat, qk)
        if dr:
            s = s + dot(q_pe, k_pe, qk)
        s = s * scale2
        if masked:
            base = (first + t) * bs
            s = jnp.where(visible(row_iota, key_iota + base, length, plan), s, -jnp.inf)
            k_lat = jnp.where((key_vec + base < length)[:, None], k_lat, jnp.zeros_like(k_lat))
        p, alpha, m, denom = online_softmax(s, m, denom)
        acc = acc * alpha[:, None] + dot(p.astype(k_lat.dtype), k_lat, (((1,), (0,)), ((), ())))
        return acc, m, denom

    carry = (
        jnp.zeros((rows, dv), jnp.float32),
        jnp.full((rows,), -jnp.inf, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
    carry = lax.fori_loop(n_full, n_steps, functools.partial(step, masked=True), carry)
    out, lse2 = finish(*carry)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse2


def split_outputs(n: int, hb: int, rows: int, plan: Plan, out_dtype) -> dict:
    """`pl.pallas_call`'s out_specs and out_shape for a grid (item, head block, split) writing each split's
    o [N, NS, HB, M, C] and lse2 [N, NS, HB, M]."""
    ns, dv = plan.num_splits, plan.v_dim
    return dict(
        out_specs=[
            pl.BlockSpec((None, None, None, rows, dv), lambda i, h, s: (i, s, h, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda i, h, s: (i, s, h, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((n, ns, hb, rows, dv), out_dtype),
            jax.ShapeDtypeStruct((n, ns, hb, rows), jnp.float32),
        ],
    )


def run(q_blocks, pages, table, lengths, plan: Plan, scale2: float, out_dtype, *, interpret: bool,
        compiler_params=None):
    """q_blocks [B, HB, M, D] -> (o [B, NS, HB, M, C], lse2 [B, NS, HB, M])."""
    b, hb, rows, dim = q_blocks.shape
    ns = plan.num_splits
    whole = lambda x: pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)
    return pl.pallas_call(
        functools.partial(_kernel, plan=plan, scale2=scale2),
        grid=(b, hb, ns),
        in_specs=[
            whole(table),
            whole(lengths),
            pl.BlockSpec((None, None, rows, dim), lambda i, h, s: (i, h, 0, 0)),
            whole(pages),
        ],
        **split_outputs(b, hb, rows, plan, out_dtype),
        interpret=interpret,
        compiler_params=compiler_params,
        name="mla_decode",
    )(table, lengths, q_blocks, pages)
