"""MLA's attention over the latent (DeepSeek-V2 report s.2.1; V3 report s.2.1.1): one signature, three
variants, for training, prefill and decoding alike.

    fn(q_nope [B,T,H,N], q_pe [B,T,H,R], kv [B,S,C+R], q_positions [B,T], kv_positions [B,S] | None,
       w: KvWeights, opts: AttentionOptions) -> [B,T,H,V]

`kv` holds the latent rows [c_kv; k_pe] as a cache stores them, or packed FP8 rows (uint8 [B,S,bytes],
`pallas_kernels.mla_decode.fp8_cache`: FlashMLA's layout) that each variant reads as their dequantised values;
`kv_positions` None means a cache (slot s holds position s). A query sees the keys at or before its own position.
- `naive`: c_kv expanded through wkv_b into per-head keys and values, then an attention core
  (`CORES`: `plain` softmax, or `blocked`: causal query blocks and a hand-written backward).
- `absorbed`: wkv_b's key half folded into the query and its value half into the output; scores
  and values read the latent rows directly (DeepSeek's inference code). The cache is the left
  operand of both matmuls, as stored, so nothing re-lays it out.
- `latent_kernel`: the absorbed math through `pallas_kernels.mla_decode` (FlashMLA's design): a
  cache (`kv_positions` None) and queries at contiguous positions ending each row's length.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dsv3_jax.ops.linear import Fp8Weight, dense, linear
from dsv3_jax.ops.registry import Registry
from dsv3_jax.parallel.rules import local_rows
from pallas_kernels.mla_decode import fp8_cache, mla_decode

NEG_INF = -1e30  # finite, so fully-masked rows give a uniform softmax instead of NaN
# The variants' names, declared once; dispatch and the runtime use these constants.
NAIVE, ABSORBED, LATENT_KERNEL = "naive", "absorbed", "latent_kernel"
PLAIN, BLOCKED, CHUNKED = "plain", "blocked", "chunked"  # cores


class KvWeights(NamedTuple):
    wkv_b: jax.Array | Fp8Weight  # [C, H, N+V]
    # Its halves heads first, as the absorbed einsums read them ([H,C,N], [H,V,C]); derived once per
    # generation (`Transformer.prepare_decode`) or, when None, here.
    w_k: jax.Array | None = None
    w_v: jax.Array | None = None


class AttentionOptions(NamedTuple):
    scale: float
    core: str = PLAIN  # a key of CORES (naive only)
    # blocked core: causal query blocks (queries are the keys, positions increasing); chunked core: key
    # chunks (the scores live one [T, S / blocks] chunk at a time)
    blocks: int = 1
    fp8: bool = False  # the expansion through wkv_b as FP8 GEMMs (naive only: a linear layer)
    backend: str = "xla"  # pallas_kernels backend for FP8 GEMMs and the decode kernel


AttentionFn = Callable[..., jax.Array]
ATTENTION: Registry[AttentionFn] = Registry("attention", reference=NAIVE)
CoreFn = Callable[..., jax.Array]
CORES: Registry[CoreFn] = Registry("attention core", reference=PLAIN)


def visible(q_positions: jax.Array, kv_positions: jax.Array | None, num_keys: int) -> jax.Array:
    """[B, T, S] True where the key's position is at or before the query's."""
    if kv_positions is None:
        kv_positions = jnp.arange(num_keys)[None, :]
    return kv_positions[:, None, :] <= q_positions[:, :, None]


def latent_rows(kv: jax.Array, latent_dim: int, rope_dim: int, dtype) -> jax.Array:
    """kv [B,S,C+R] in `dtype`; packed FP8 rows are dequantised (E4M3 times each tile's scale, bf16 rope)."""
    if kv.dtype == fp8_cache.FP8_CACHE_DTYPE:
        return fp8_cache.dequantize_rows(kv, latent_dim, rope_dim, dtype)
    return kv.astype(dtype)


def absorbed_weights(wkv_b: jax.Array, v_head_dim: int) -> tuple[jax.Array, jax.Array]:
    """wkv_b [C,H,N+V] -> its key half [H,C,N] and value half [H,V,C], heads first."""
    return wkv_b[..., :-v_head_dim].transpose(1, 0, 2), wkv_b[..., -v_head_dim:].transpose(1, 2, 0)


# ---- cores: q [B,H,T,K], k [B,H,S,K], v [B,H,S,V], mask [B,T,S] -> [B,T,H,V] ---------------------
@CORES.register(PLAIN)
def core_plain(q, k, v, mask, scale, blocks=1):
    """softmax(q k^T * scale) v, differentiated by autodiff; `blocks` is not used."""
    s = jnp.einsum("bhtk,bhsk->bhts", q, k).astype(jnp.float32)
    p = jax.nn.softmax(jnp.where(mask[:, None], s * scale, NEG_INF), axis=-1)
    return jnp.einsum("bhts,bhsv->bthv", p.astype(v.dtype), v)


def _core_block(q, k, v, mask, scale):
    """Softmax attention of one query block, normalised after P.V ([T, V] divided, not [T, S]):
    (output [B,H,T,V], unnormalised probabilities e [B,H,T,S] f32, their row sums den [B,H,T,1])."""
    s = jnp.einsum("bhtk,bhsk->bhts", q, k).astype(jnp.float32)
    s = jnp.where(mask[:, None], s * scale, NEG_INF)
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    den = jnp.sum(e, axis=-1, keepdims=True)
    o = jnp.einsum("bhts,bhsv->bhtv", e.astype(v.dtype), v).astype(jnp.float32) / den
    return o.astype(v.dtype), e, den


def _query_blocks(t: int, s: int, blocks: int):
    """(i, its query rows, its key end): query block i attends to the keys up to its own end (all S
    keys with one block)."""
    tb = t // blocks
    for i in range(blocks):
        yield i, slice(i * tb, (i + 1) * tb), (i + 1) * tb if blocks > 1 else s


def _core_fwd(q, k, v, mask, scale, blocks):
    outs, saved = [], []
    for _, rows, end in _query_blocks(q.shape[2], k.shape[2], blocks):
        o, e, den = _core_block(q[:, :, rows], k[:, :, :end], v[:, :, :end], mask[:, rows, :end], scale)
        outs.append(o)
        saved.append((e, den))
    o = jnp.concatenate(outs, axis=2)
    return o.transpose(0, 2, 1, 3), (q, k, v, mask, o, saved)


def _core_bwd(scale, blocks, res, do):
    """Flash-attention's backward over the saved e and den: with p = e / den and D = rowsum(dO * O),
    dS = p * (dO V^T - D): one elementwise pass over [T, S]."""
    q, k, v, mask, o, saved = res
    do = do.transpose(0, 2, 1, 3).astype(jnp.float32)
    dq, dk, dv = [], jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    for i, rows, end in _query_blocks(q.shape[2], k.shape[2], blocks):
        e, den = saved[i]
        doi = do[:, :, rows]
        dsum = jnp.sum(doi * o[:, :, rows].astype(jnp.float32), axis=-1, keepdims=True)
        dv = dv.at[:, :, :end].add(jnp.einsum("bhts,bhtv->bhsv", e.astype(v.dtype), (doi / den).astype(v.dtype)))
        dp = jnp.einsum("bhtv,bhsv->bhts", doi.astype(v.dtype), v[:, :, :end]).astype(jnp.float32)
        # The mask again only for fully-masked rows (e = 1 there), whose scores are constants.
        ds = jnp.where(mask[:, None, rows, :end], e * (dp - dsum) * (scale / den), 0).astype(q.dtype)
        dq.append(jnp.einsum("bhts,bhsk->bhtk", ds, k[:, :, :end]))
        dk = dk.at[:, :, :end].add(jnp.einsum("bhts,bhtk->bhsk", ds, q[:, :, rows]))
    return jnp.concatenate(dq, axis=2), dk.astype(k.dtype), dv.astype(v.dtype), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blocked(q, k, v, mask, scale, blocks):
    return _core_fwd(q, k, v, mask, scale, blocks)[0]


_blocked.defvjp(_core_fwd, _core_bwd)


@CORES.register(BLOCKED)
def core_blocked(q, k, v, mask, scale, blocks=1):
    """The queries in `blocks` blocks (causal self-attention with increasing positions only, S = T),
    block i scoring only the keys up to its own end, since every later key is masked for all of its
    queries: ~(n+1)/2n of the score work. Its backward is written out (flash-attention's, over the
    saved probabilities): autodiff of softmax(QK^T)V makes ~3 more passes over the [T, S] scores."""
    t, s = q.shape[2], k.shape[2]
    if blocks <= 1 or t != s or t % blocks:
        blocks = 1
    return _blocked(q, k, v, mask, scale, blocks)


def _key_chunks(k, v, mask, n):
    """k [B,H,S,K], v [B,H,S,V], mask [B,T,S] -> each split into n chunks of keys on a leading axis."""
    b, h, s = k.shape[:3]
    split = lambda x: x.reshape(b, h, n, s // n, x.shape[-1]).transpose(2, 0, 1, 3, 4)
    masks = mask.reshape(mask.shape[0], mask.shape[1], n, s // n).transpose(2, 0, 1, 3)
    return split(k), split(v), masks


def _chunk_scores(q, kb, mb, scale):
    s = jnp.einsum("bhtk,bhsk->bhts", q, kb).astype(jnp.float32) * scale
    return jnp.where(mb[:, None], s, NEG_INF)


def _chunked_fwd(q, k, v, mask, scale, blocks):
    b, h, t = q.shape[:3]

    def step(carry, chunk):
        m, den, acc = carry
        kb, vb, mb = chunk
        s = _chunk_scores(q, kb, mb, scale)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.exp(s - m_new[..., None])
        rescale = jnp.exp(m - m_new)
        acc = acc * rescale[..., None] + jnp.einsum("bhts,bhsv->bhtv", p.astype(v.dtype), vb).astype(jnp.float32)
        return (m_new, den * rescale + jnp.sum(p, axis=-1), acc), None

    # m starts at NEG_INF (finite): a key chunk that is masked for a row adds weight exp(0) until a
    # visible key rescales it away by exp(NEG_INF - m); a row masked everywhere ends uniform, as plain's.
    init = (jnp.full((b, h, t), NEG_INF, jnp.float32), jnp.zeros((b, h, t), jnp.float32),
            jnp.zeros((b, h, t, v.shape[-1]), jnp.float32))
    (m, den, acc), _ = jax.lax.scan(step, init, _key_chunks(k, v, mask, blocks))
    o = (acc / den[..., None]).astype(v.dtype)
    # m and den kept apart, not as log-sum-exp: NEG_INF + log(den) rounds to NEG_INF in float32.
    return o.transpose(0, 2, 1, 3), (q, k, v, mask, o, m, den)


def _chunked_bwd(scale, blocks, res, do):
    """Flash-attention's backward, chunk by chunk: p recomputed from the saved row maxima and sums, then
    dS = p * (dP - rowsum(dO * O)); dQ accumulates, dK and dV come out per chunk."""
    q, k, v, mask, o, m, den = res
    do = do.transpose(0, 2, 1, 3)
    dsum = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
    do = do.astype(v.dtype)

    def step(dq, chunk):
        kb, vb, mb = chunk
        p = jnp.exp(_chunk_scores(q, kb, mb, scale) - m[..., None]) / den[..., None]
        dv = jnp.einsum("bhts,bhtv->bhsv", p.astype(v.dtype), do)
        dp = jnp.einsum("bhtv,bhsv->bhts", do, vb).astype(jnp.float32)
        ds = jnp.where(mb[:, None], p * (dp - dsum) * scale, 0).astype(q.dtype)
        dk = jnp.einsum("bhts,bhtk->bhsk", ds, q)
        return dq + jnp.einsum("bhts,bhsk->bhtk", ds, kb).astype(jnp.float32), (dk, dv)

    dq, (dk, dv) = jax.lax.scan(step, jnp.zeros(q.shape, jnp.float32), _key_chunks(k, v, mask, blocks))
    whole = lambda x: x.transpose(1, 2, 0, 3, 4).reshape(*x.shape[1:3], -1, x.shape[-1])
    return dq.astype(q.dtype), whole(dk).astype(k.dtype), whole(dv).astype(v.dtype), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked(q, k, v, mask, scale, blocks):
    return _chunked_fwd(q, k, v, mask, scale, blocks)[0]


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


@CORES.register(CHUNKED)
def core_chunked(q, k, v, mask, scale, blocks=1):
    """The keys in `blocks` chunks, scanned with an online softmax (flash attention's forward), and a
    backward that recomputes each chunk's probabilities from the saved row maxima and sums: only one [T, S/blocks]
    chunk of scores is alive at a time, for any mask. The same FLOPs as plain (no causal skipping)."""
    if blocks <= 1 or k.shape[2] % blocks:
        blocks = 1
    return _chunked(q, k, v, mask, scale, blocks)


# ---- the variants ------------------------------------------------------------------------------
@ATTENTION.register(NAIVE)
def attend_naive(q_nope, q_pe, kv, q_positions, kv_positions, w: KvWeights, opts: AttentionOptions):
    (b, s, _), (c, h) = kv.shape, w.wkv_b.shape[:2]
    n = q_nope.shape[-1]
    kv = latent_rows(kv, c, q_pe.shape[-1], q_nope.dtype)
    expanded = linear(kv[..., :c], w.wkv_b, fp8=opts.fp8, backend=opts.backend)  # [B,S,H,N+V]
    k_pe = jnp.broadcast_to(kv[:, :, None, c:], (b, s, h, kv.shape[-1] - c))
    # One score matmul over [nope; rope] dims, heads moved ahead of positions once: [B,H,T,N+R].
    q = jnp.concatenate([q_nope, q_pe], axis=-1).transpose(0, 2, 1, 3)
    k = jnp.concatenate([expanded[..., :n], k_pe], axis=-1).transpose(0, 2, 1, 3)
    v = expanded[..., n:].transpose(0, 2, 1, 3)
    mask = visible(q_positions, kv_positions, s)
    return CORES[opts.core](q, k, v, mask, opts.scale, opts.blocks)


def _absorbed_halves(w: KvWeights, v_head_dim: int, dtype) -> tuple[jax.Array, jax.Array]:
    if w.w_k is not None:
        return w.w_k.astype(dtype), w.w_v.astype(dtype)
    return absorbed_weights(dense(w.wkv_b, dtype).astype(dtype), v_head_dim)


def _latent_query(q_nope, q_pe, w_k):
    """[B,T,H,C+R]: the query moved into latent space, against latent rows [c_kv; k_pe]."""
    return jnp.concatenate([jnp.einsum("bthn,hcn->bthc", q_nope, w_k), q_pe], axis=-1)


@ATTENTION.register(ABSORBED)
def attend_absorbed(q_nope, q_pe, kv, q_positions, kv_positions, w: KvWeights, opts: AttentionOptions):
    dt, c = q_nope.dtype, w.wkv_b.shape[0]
    w_k, w_v = _absorbed_halves(w, w.wkv_b.shape[2] - q_nope.shape[-1], dt)
    q = _latent_query(q_nope, q_pe, w_k)
    kv = latent_rows(kv, c, q_pe.shape[-1], dt)
    scores = jnp.einsum("bsk,bthk->bsth", kv, q).astype(jnp.float32) * opts.scale
    mask = visible(q_positions, kv_positions, kv.shape[1]).transpose(0, 2, 1)  # [B,S,T]
    probs = jax.nn.softmax(jnp.where(mask[..., None], scores, NEG_INF), axis=1).astype(dt)
    # Over all C+R columns, then sliced: kv[..., :C] would copy a cache on every step.
    o_lat = jnp.einsum("bsth,bsc->bthc", probs, kv)[..., :c]
    return jnp.einsum("bthc,hvc->bthv", o_lat, w_v)


@ATTENTION.register(LATENT_KERNEL)
def attend_latent_kernel(q_nope, q_pe, kv, q_positions, kv_positions, w: KvWeights, opts: AttentionOptions):
    dt, c, t = q_nope.dtype, w.wkv_b.shape[0], q_nope.shape[1]
    if kv_positions is not None:
        raise ValueError(f"attention {LATENT_KERNEL!r} reads a cache: kv_positions must be None")
    w_k, w_v = _absorbed_halves(w, w.wkv_b.shape[2] - q_nope.shape[-1], dt)
    q = _latent_query(q_nope, q_pe, w_k)
    # The kernel takes q in the cache's dtype; a packed FP8 cache is dequantised to q's (the compute dtype).
    q = q if kv.dtype == fp8_cache.FP8_CACHE_DTYPE else q.astype(kv.dtype)
    # Each device decodes its own rows: a Pallas call is not partitioned by the compiler.
    decode = lambda q, kv, lengths: mla_decode(q, kv, lengths, v_dim=c, softmax_scale=opts.scale, backend=opts.backend)
    o_lat = local_rows(decode, (q, kv, q_positions[:, 0] + t)).astype(dt)
    return jnp.einsum("bthc,hvc->bthv", o_lat, w_v)
