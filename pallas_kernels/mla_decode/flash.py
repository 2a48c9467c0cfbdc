"""The flash-decoding math both kernel bodies share (`common` for Pallas' pallas_call, `mosaic_gpu`).

Query t of a sequence of length L sits at position L - T + t and sees cache positions <= that (positions
>= L are never valid); a query with nothing to see returns zeros. Scores are in base 2 (pre-scaled by
log2 e), so the softmax uses exp2.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.mla_decode.plan import Plan


def step_counts(length, first_block, plan: Plan):
    """Blocks this split must read, and how many of them every query row sees in full."""
    start = first_block * plan.block_s
    todo = jnp.maximum(length - start, 0)
    n_steps = jnp.minimum((todo + plan.block_s - 1) // plan.block_s, plan.steps)
    # Row t of T sees positions < length - (T - 1 - t); the smallest bound is length - T + 1.
    full = jnp.maximum(length - (plan.sq - 1) - start, 0) // plan.block_s
    return n_steps, jnp.minimum(full, n_steps)


def visible(rows, keys, length, plan: Plan):
    """rows, keys: int32 [M, block_s] iotas (keys already absolute). Rows are query-major: row = t * block_h + h."""
    for t in range(1, plan.sq):  # add T - 1 - t(row), with comparisons only (no integer division)
        keys = keys + jnp.where(rows < t * plan.block_h, 1, 0)
    return keys < length


def online_softmax(s, m_prev, l_prev):
    """One flash step in base 2: s [M, N] scaled scores (-inf where hidden); running max m and sum l [M]."""
    m_new = jnp.maximum(m_prev, s.max(axis=1))
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a row with nothing visible yet stays at zero
    alpha = jnp.exp2(m_prev - m_use)
    p = jnp.exp2(s - lax.broadcast_in_dim(m_use, s.shape, [0]))
    return p, alpha, m_new, l_prev * alpha + p.sum(axis=1)


def finish(acc, m, denom):
    """Normalised split output and its base-2 log-sum-exp (-inf for a split that saw nothing)."""
    empty = denom == 0.0
    safe = jnp.where(empty, 1.0, denom)
    out = acc / lax.broadcast_in_dim(safe, acc.shape, [0])
    return out, jnp.where(empty, -jnp.inf, m + jnp.log2(safe))
