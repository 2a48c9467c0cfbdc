"""The pallas_call kernel body of the sparse decode (`sparse`) on backends "interpret" and "triton".

Program (query, head block, split): an online softmax over the split's blocks of block_s slots for the query's
block_h heads. Each block's rows are gathered by number from the flattened cache (a pointer gather in Triton:
one load of [block_s, C] with a row index per slot); packed FP8 rows are dequantised as they arrive, by the
dense kernel's readers (`common`). A slot with no row (-1) reads row 0 in its place; its score is -inf and its
row is zeroed before P.V, for that row may hold anything, and 0 * NaN would leak.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.mla_decode import fp8_cache
from pallas_kernels.mla_decode.common import _dense_block, _packed_block, split_outputs
from pallas_kernels.mla_decode.flash import finish, online_softmax
from pallas_kernels.mla_decode.plan import Plan


class _Gathered:
    """One block's rows, gathered by number, with the interface of a page of `common`'s block readers
    (`ref[page, :, columns]`), so a packed FP8 row is dequantised by the same code as in the dense kernel."""

    def __init__(self, rows_ref, row):
        self.rows_ref, self.row, self.dtype = rows_ref, row, rows_ref.dtype

    def __getitem__(self, index):
        _, _, columns = index
        return self.rows_ref[self.row, columns]


def _kernel(idx_ref, q_ref, rows_ref, o_ref, lse_ref, *, plan: Plan, scale2: float):
    """Program (n, head block, split). idx_ref [slots] int32 (rows, -1: none); q_ref [M, C+R]; rows_ref
    [rows, C+R]; o_ref [M, C]; lse_ref [M]."""
    split = pl.program_id(2)
    dv, dr, bs, rows = plan.v_dim, plan.rope_dim, plan.block_s, plan.rows
    dot = functools.partial(lax.dot_general, preferred_element_type=jnp.float32)
    qk = (((1,), (1,)), ((), ()))  # [M, D] x [N, D] -> [M, N]
    q_lat = q_ref[:, pl.ds(0, dv)]
    q_pe = q_ref[:, pl.ds(dv, dr)] if dr else None
    read = _packed_block if rows_ref.dtype == fp8_cache.FP8_CACHE_DTYPE else _dense_block

    def step(t, carry):
        acc, m, denom = carry
        slot = idx_ref[pl.ds((split * plan.steps + t) * bs, bs)]  # [block_s]
        valid = slot >= 0
        row = jnp.where(valid, slot, 0)
        k_lat, k_pe = read(_Gathered(rows_ref, row), None, plan, q_ref.dtype)  # [block_s, C]: also the values
        s = dot(q_lat, k_lat, qk)
        if dr:
            s = s + dot(q_pe, k_pe, qk)
        s = jnp.where(valid[None, :], s * scale2, -jnp.inf)
        k_lat = jnp.where(valid[:, None], k_lat, jnp.zeros_like(k_lat))
        p, alpha, m, denom = online_softmax(s, m, denom)
        acc = acc * alpha[:, None] + dot(p.astype(k_lat.dtype), k_lat, (((1,), (0,)), ((), ())))
        return acc, m, denom

    carry = (
        jnp.zeros((rows, dv), jnp.float32),
        jnp.full((rows,), -jnp.inf, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    out, lse2 = finish(*lax.fori_loop(0, plan.steps, step, carry))
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse2


def run(q_blocks, rows, slots, plan: Plan, scale2: float, out_dtype, *, interpret: bool, compiler_params=None):
    """q_blocks [N, HB, M, D], rows [R, D], slots [N, NS steps block_s] -> (o [N, NS, HB, M, C], lse2 [N, NS,
    HB, M])."""
    n, hb, m, dim = q_blocks.shape
    ns = plan.num_splits
    return pl.pallas_call(
        functools.partial(_kernel, plan=plan, scale2=scale2),
        grid=(n, hb, ns),
        in_specs=[
            pl.BlockSpec((None, slots.shape[1]), lambda i, h, s: (i, 0)),
            pl.BlockSpec((None, None, m, dim), lambda i, h, s: (i, h, 0, 0)),
            pl.BlockSpec(rows.shape, lambda *_: (0, 0)),
        ],
        **split_outputs(n, hb, m, plan, out_dtype),
        interpret=interpret,
        compiler_params=compiler_params,
        name="mla_decode_sparse",
    )(slots, q_blocks, rows)
