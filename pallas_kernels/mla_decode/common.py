"""The pallas_call kernel body of backends "interpret" and "triton".

Program (b, head block, split): an online softmax over the split's cache blocks for its block_h x T query
rows, two passes (blocks every row sees in full, then the masked tail). Cache rows past a sequence's end are
zeroed before P.V: they may hold anything, and 0 * NaN would leak.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.mla_decode.flash import finish, online_softmax, step_counts, visible
from pallas_kernels.mla_decode.plan import Plan, make_plan, next_pow2

TRITON_MIN_ROWS = 16  # tl.dot needs M >= 16 (the interpreter pads alike, so both run the same programs)


def make_pow2_plan(q_shape, cache_shape, v_dim: int, config, *, row_cap: int) -> Plan:
    """Query rows padded to a power of two, at least TRITON_MIN_ROWS."""
    return make_plan(q_shape, cache_shape, v_dim, config, row_cap=row_cap,
                     rows=lambda n: next_pow2(max(TRITON_MIN_ROWS, n)))


def _kernel(table_ref, len_ref, q_ref, pages_ref, o_ref, lse_ref, *, plan: Plan, scale2: float):
    """Program (b, head block, split). q_ref [M, C+R]; pages_ref [P, block_s, C+R]; o_ref [M, C]; lse_ref [M]."""
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

    def step(t, carry, masked):
        acc, m, denom = carry
        page = table_ref[b, first + t]
        k_lat = pages_ref[page, :, pl.ds(0, dv)]  # [block_s, C]; also the values
        s = dot(q_lat, k_lat, qk)
        if dr:
            s = s + dot(q_pe, pages_ref[page, :, pl.ds(dv, dr)], qk)
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


def run(q_blocks, pages, table, lengths, plan: Plan, scale2: float, out_dtype, *, interpret: bool,
        compiler_params=None):
    """q_blocks [B, HB, M, D] -> (o [B, NS, HB, M, C], lse2 [B, NS, HB, M])."""
    b, hb, rows, dim = q_blocks.shape
    ns, dv = plan.num_splits, plan.v_dim
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
        out_specs=[
            pl.BlockSpec((None, None, None, rows, dv), lambda i, h, s: (i, s, h, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda i, h, s: (i, s, h, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, ns, hb, rows, dv), out_dtype),
            jax.ShapeDtypeStruct((b, ns, hb, rows), jnp.float32),
        ],
        interpret=interpret,
        compiler_params=compiler_params,
        name="mla_decode",
    )(table, lengths, q_blocks, pages)
