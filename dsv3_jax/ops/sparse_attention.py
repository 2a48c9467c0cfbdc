"""DeepSeek Sparse Attention's core (DeepSeek-V3.2 report s.2.1): each query attends over the latent rows
its indexer selected, and the indexer's training signal (s.2.1.1).

    sparse_attention(q_nope [B,T,H,N], q_pe [B,T,H,R], kv [B,S,C+R], q_positions [B,T],
                     kv_positions [B,S] | None, indices [B,T,K], w: KvWeights, scale) -> [B,T,H,V]

`indices` come from `dsv3_jax.layers.indexer.select`: each query's K best keys, distinct (a repeated one
would count twice), NONE (-1) in a slot that holds none. The attention runs in MLA's absorbed (MQA) form,
as FlashMLA's sparse kernels do: the query is moved into latent space (wkv_b's key half folded in), so
every head shares one key per selected token, the C+R latent row itself, and one value, its first C
entries; wkv_b's value half is applied after. Each query gathers its K rows and attends over them
alone: O(T K) memory and FLOPs, no [T, S] score matrix. `masked_dense_attention` is its reference: the
per-head (naive) form over all S keys with the keys outside the selection masked, as transformers'
DeepseekV32 runs it. Both compute one function.

The training stages (`WARMUP`, `SPARSE`; `Runtime.dsa_stage`) train the indexer towards the main
attention: `attention_distribution` is that target, `indexer_kl` the loss and `selected_mass` how much of
the dense attention a selection keeps (its recall).

Letters beyond the package legend: K is index_topk (keys kept per query), N and V the per-head nope and
value dims.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv3_jax.ops.attention import CORES, NEG_INF, PLAIN, KvWeights, absorbed_weights, latent_rows, visible
from dsv3_jax.ops.linear import dense, linear

NONE = -1  # a slot of the indices that holds no key (FlashMLA's sparse layout)
# The training stages (V3.2 report s.2.1.1): the dense warm-up trains the indexer alone against the dense
# attention; the sparse stage trains everything, the attention sparse.
WARMUP, SPARSE = "warmup", "sparse"
DSA_STAGES = (WARMUP, SPARSE)


def selection_mask(indices: jax.Array, num_keys: int) -> jax.Array:
    """indices [B,T,K] -> bool [B,T,S=num_keys], True at the selected keys: the mask a masked-dense
    reference of sparse attention applies (NONE slots select nothing). Scattered, not compared against
    every key, so it costs [B,T,S], not [B,T,K,S]."""
    # NONE goes to a spare column past the keys, dropped after the scatter.
    target = jnp.where(indices < 0, num_keys, indices)
    mask = jnp.zeros((*indices.shape[:-1], num_keys + 1), bool)
    return jnp.put_along_axis(mask, target, True, axis=-1, inplace=False)[..., :num_keys]


def _gather(x: jax.Array, indices: jax.Array) -> jax.Array:
    """x [B,S,...], indices [B,T,K] (NONE allowed: row 0 stands in, to be masked) -> [B,T,K,...]."""
    safe = jnp.where(indices < 0, 0, indices)
    return x[jnp.arange(x.shape[0])[:, None, None], safe]


def selected_visible(indices, q_positions, kv_positions) -> jax.Array:
    """[B,T,K] True where the slot holds a key at or before the query's position. `select` only picks
    visible keys; checking again costs O(T K) and keeps the op exact for any indices."""
    key_pos = indices if kv_positions is None else _gather(kv_positions, indices)
    return (indices >= 0) & (key_pos <= q_positions[..., None])


def latent_query(q_nope, q_pe, w: KvWeights, dtype) -> tuple[jax.Array, jax.Array]:
    """(query in latent space [B,T,H,C+R], wkv_b's value half [H,V,C])."""
    if w.w_k is not None:
        w_k, w_v = w.w_k.astype(dtype), w.w_v.astype(dtype)
    else:
        w_k, w_v = absorbed_weights(dense(w.wkv_b, dtype).astype(dtype), w.wkv_b.shape[2] - q_nope.shape[-1])
    return jnp.concatenate([jnp.einsum("bthn,hcn->bthc", q_nope, w_k), q_pe], axis=-1), w_v


def _sparse_core(q, kv, ok, indices, scale, c):
    """q [B,T,H,C+R] over the rows of kv [B,S,C+R] (or packed FP8 rows) that `indices` [B,T,K] name (ok:
    the usable slots) -> (latent output [B,T,H,C], probabilities [B,T,H,K] float32)."""
    # [B,T,K,C+R]: each query's own keys, and (first C) values. Gathered before the cast or FP8 dequantisation,
    # so a decode step converts its K rows, not the whole cache.
    rows = latent_rows(_gather(kv, indices), c, q.shape[-1] - c, q.dtype)
    s = jnp.einsum("bthd,btkd->bthk", q, rows, preferred_element_type=jnp.float32) * scale
    p = jax.nn.softmax(jnp.where(ok[:, :, None], s, NEG_INF), axis=-1)
    return jnp.einsum("bthk,btkc->bthc", p.astype(q.dtype), rows[..., :c]), p


def sparse_attention(q_nope, q_pe, kv, q_positions, kv_positions, indices, w: KvWeights, scale: float,
                     query_chunks: int = 1, distribution: bool = False):
    """Attention of each query over its selected latent rows only (module docstring). `query_chunks` > 1
    (dividing T) runs the queries in that many chunks, each recomputed in the backward, so the gathered
    rows [B, T/chunks, K, C+R] are alive one chunk at a time. With `distribution`, also returns the
    attention's probabilities averaged over heads, [B,T,K] float32 (the indexer's target in the sparse
    stage: per query they sum to 1 over its selection)."""
    dt, c = q_nope.dtype, w.wkv_b.shape[0]
    q, w_v = latent_query(q_nope, q_pe, w, dt)
    ok = selected_visible(indices, q_positions, kv_positions)
    b, t = q.shape[:2]
    if query_chunks <= 1 or t % query_chunks:
        o_lat, p = _sparse_core(q, kv, ok, indices, scale, c)
    else:
        split = lambda a: a.reshape(b, query_chunks, t // query_chunks, *a.shape[2:]).swapaxes(0, 1)
        merge = lambda a: a.swapaxes(0, 1).reshape(b, t, *a.shape[3:])
        # Checkpointed: the backward re-gathers a chunk's rows instead of keeping every chunk's.
        body = jax.checkpoint(lambda args: _sparse_core(args[0], kv, args[1], args[2], scale, c))
        o_lat, p = jax.tree_util.tree_map(merge, jax.lax.map(body, (split(q), split(ok), split(indices))))
    out = jnp.einsum("bthc,hvc->bthv", o_lat, w_v)
    return (out, jnp.mean(p, axis=2)) if distribution else out


def masked_dense_attention(q_nope, q_pe, kv, q_positions, kv_positions, indices, w: KvWeights,
                           scale: float) -> jax.Array:
    """The reference: per-head keys and values expanded through wkv_b for all S keys, scores [B,H,T,S],
    the keys that are not visible or not selected masked. -> [B,T,H,V]."""
    (b, s, _), (c, h) = kv.shape, w.wkv_b.shape[:2]
    n = q_nope.shape[-1]
    kv = latent_rows(kv, c, q_pe.shape[-1], q_nope.dtype)
    expanded = linear(kv[..., :c], w.wkv_b)  # [B,S,H,N+V]
    k_pe = jnp.broadcast_to(kv[:, :, None, c:], (b, s, h, kv.shape[-1] - c))
    q = jnp.concatenate([q_nope, q_pe], axis=-1).transpose(0, 2, 1, 3)
    k = jnp.concatenate([expanded[..., :n], k_pe], axis=-1).transpose(0, 2, 1, 3)
    v = expanded[..., n:].transpose(0, 2, 1, 3)
    mask = visible(q_positions, kv_positions, s) & selection_mask(indices, s)
    return CORES[PLAIN](q, k, v, mask, scale)


# ---- the indexer's training signal (V3.2 report s.2.1.1) ----------------------------------------
def attention_distribution(q_nope, q_pe, kv, q_positions, kv_positions, w: KvWeights, scale: float) -> jax.Array:
    """The dense attention's probabilities summed over heads and L1-normalised per query (the mean of
    the heads' distributions): float32 [B,T,S], 0 at keys a query does not see. Scored in latent space
    (one [B,T,H,S] einsum); callers take it as a constant (stop_gradient): it is a target and a metric."""
    dt, c = q_nope.dtype, w.wkv_b.shape[0]
    q, _ = latent_query(q_nope, q_pe, w, dt)
    kv = latent_rows(kv, c, q_pe.shape[-1], dt)
    s = jnp.einsum("bthd,bsd->bths", q, kv, preferred_element_type=jnp.float32) * scale
    seen = visible(q_positions, kv_positions, kv.shape[1])
    p = jax.nn.softmax(jnp.where(seen[:, :, None], s, NEG_INF), axis=-1)
    return jnp.where(seen, jnp.mean(p, axis=2), 0.0)


def indexer_kl(target: jax.Array, scores: jax.Array) -> jax.Array:
    """Mean over queries of KL(target || softmax(scores)), both over the same N keys: target [B,T,N] (rows
    sum to 1; a constant), scores [B,T,N] float32 with -inf at keys outside the query's set (not
    visible, or not selected), which the softmax leaves out."""
    inside = scores > -jnp.inf
    # Finite stand-ins outside the set: no inf - inf in the forward, no NaN in the backward.
    log_q = jax.nn.log_softmax(jnp.where(inside, scores, NEG_INF), axis=-1)
    t = jax.lax.stop_gradient(target)
    terms = jnp.where(inside & (t > 0), t * (jnp.log(jnp.where(t > 0, t, 1.0)) - log_q), 0.0)
    return jnp.mean(jnp.sum(terms, axis=-1))


def gather_scores(scores: jax.Array, indices: jax.Array) -> jax.Array:
    """scores [B,T,S] at each query's selected keys -> [B,T,K], -inf in NONE slots."""
    picked = jnp.take_along_axis(scores, jnp.where(indices < 0, 0, indices), axis=-1)
    return jnp.where(indices < 0, -jnp.inf, picked)


def selected_mass(distribution: jax.Array, indices: jax.Array) -> jax.Array:
    """The share of the dense attention's mass ([B,T,S], rows summing to 1) that the selection keeps,
    averaged over queries: the selection's recall of the dense attention (1 where it keeps every key)."""
    picked = jnp.take_along_axis(distribution, jnp.where(indices < 0, 0, indices), axis=-1)
    return jnp.mean(jnp.sum(jnp.where(indices < 0, 0.0, picked), axis=-1))
