"""Multi-head Latent Attention (DeepSeek-V2 report s.2.1; V3 report s.2.1.1).

Keys and values are rebuilt from a shared latent c_kv [C] (normalised) plus one rope key k_pe [R]
shared by all heads, so a cache holds only C + R values per token. Two equal ways to attend:
- `attend_naive`: expand c_kv through wkv_b into per-head keys/values (training, prefill).
- `attend_absorbed`: fold wkv_b's key half into the query and its value half into the output, and
  attend over the latent directly (decoding over a cache; DeepSeek's inference code).
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig
from dsv3_jax.layers.common import weight
from dsv3_jax.layers.linear import linear
from dsv3_jax.layers.norm import RMSNorm
from dsv3_jax.layers.rope import apply_rope, rope_angles
from pallas_kernels.backends import resolve_backend
from pallas_kernels.mla_decode import mla_decode

NEG_INF = -1e30  # finite, so fully-masked rows give a uniform softmax instead of NaN
# The norms on the q and kv latents use a fixed eps in DeepSeek's code and in transformers, not
# the config's rms_norm_eps (which only the block norms read).
LATENT_NORM_EPS = 1e-6
DECODE_KERNEL_MAX_T = 8  # query windows up to this long use the latent-decode kernel
# Causal block skipping in training attention (attend_naive): 4 query blocks measured best at T = 256
# (85 -> 53 ms per layer fwd+bwd on `small`; 2 blocks 64 ms, 8 blocks 62 ms).
QUERY_BLOCKS = 4
QUERY_BLOCK_MIN_T = 128


def causal_mask(q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
    """[B, T, S] True where key position <= query position."""
    return k_positions[:, None, :] <= q_positions[:, :, None]


def _softmax(scores: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    scores = jnp.where(mask[:, None], scores.astype(jnp.float32) * scale, NEG_INF)
    return jax.nn.softmax(scores, axis=-1)


def attend_naive(q_nope, q_pe, c_kv, k_pe, wkv_b, mask, scale, v_head_dim, fp8: bool = False,
                 query_blocks: int = 1):
    """q_nope [B,T,H,N], q_pe [B,T,H,R], c_kv [B,S,C], k_pe [B,S,R], wkv_b [C,H,N+V] -> [B,T,H,V].

    `fp8`: the expansion through wkv_b is a linear layer and runs as FP8 GEMMs; the scores, softmax
    and P.V (the attention core) stay in the activation dtype.
    `query_blocks` > 1 (causal self-attention over one sequence with increasing positions only, S = T):
    the queries in that many blocks, block i scoring only the keys up to its own end, since every
    later key is masked for all of its queries. Same result, ~(n+1)/2n of the score work: the
    attention core fwd+bwd of `small` (T = 256, 4 blocks) runs ~1.6x faster on XLA:CPU."""
    b, s, c = c_kv.shape
    h = wkv_b.shape[1]
    kv = linear(c_kv.reshape(b * s, c), wkv_b.reshape(c, -1), fp8).reshape(b, s, h, -1)
    k_nope, v = kv[..., :-v_head_dim], kv[..., -v_head_dim:]
    # One score matmul over [nope; rope] dims, heads moved ahead of positions once: [B,H,T,N+R].
    q = jnp.concatenate([q_nope, q_pe], axis=-1).transpose(0, 2, 1, 3)
    k_pe_heads = jnp.broadcast_to(k_pe[:, :, None], (b, s, h, k_pe.shape[-1]))
    k = jnp.concatenate([k_nope, k_pe_heads], axis=-1).transpose(0, 2, 1, 3)
    v = v.transpose(0, 2, 1, 3)
    t, n = q.shape[2], query_blocks
    if n <= 1 or t != s or t % n:
        n = 1
    return _attention_core(q, k, v, mask, scale, n)


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
def _attention_core(q, k, v, mask, scale, blocks):
    """q [B,H,T,K], k [B,H,S,K], v [B,H,S,V], mask [B,T,S] -> [B,T,H,V], the causal query blocks
    above. Written with its own backward: autodiff of softmax(QK^T)V makes ~3 more passes over the
    [T, S] scores, which XLA:CPU runs at a few GB/s (fwd+bwd of `small`'s core ~1.6x faster)."""
    return _core_fwd(q, k, v, mask, scale, blocks)[0]


_attention_core.defvjp(_core_fwd, _core_bwd)


def attend_absorbed(q_nope, q_pe, c_kv, k_pe, wkv_b, mask, scale, v_head_dim):
    """Same contract as `attend_naive`, without materialising per-head keys or values."""
    w = wkv_b.astype(c_kv.dtype)
    w_uk, w_uv = w[..., :-v_head_dim], w[..., -v_head_dim:]
    q_lat = jnp.einsum("bthn,chn->bthc", q_nope, w_uk)  # the query, moved into latent space
    scores = jnp.einsum("bthc,bsc->bhts", q_lat, c_kv)
    scores += jnp.einsum("bthr,bsr->bhts", q_pe, k_pe)
    probs = _softmax(scores, mask, scale).astype(c_kv.dtype)
    o_lat = jnp.einsum("bhts,bsc->bthc", probs, c_kv)
    return jnp.einsum("bthc,chv->bthv", o_lat, w_uv)


ATTEND = {"naive": attend_naive, "absorbed": attend_absorbed}


def write_cache(cache: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """cache [B*S, C+R] (rows of batch row b at b*S..b*S+S-1), new [B,T,C+R], start [B] -> the cache
    with row b's new entries at slots start[b]..start[b]+T-1. Entries past a row's S slots are dropped
    (never written into the next row's slots, nor outside the array).

    The cache is stored flat, one row per (batch row, slot): XLA:CPU then updates it in place with
    one row scatter. As [B, S, C+R] with B = 1 it duplicates the update into each reader and copies
    the whole cache four times per layer and step.
    Rolling back (speculative decoding) needs no undo: a later write at the same positions
    replaces whatever a rejected draft left there before any query can see it."""
    b, t, k = new.shape
    s = cache.shape[0] // b
    slot = start[:, None] + jnp.arange(t)
    rows = jnp.where(slot < s, jnp.arange(b)[:, None] * s + slot, cache.shape[0]).reshape(-1)  # past the end: dropped
    return cache.at[rows].set(new.reshape(b * t, k).astype(cache.dtype), mode="drop")


def absorbed_weights(wkv_b: jax.Array, v_head_dim: int) -> tuple[jax.Array, jax.Array]:
    """wkv_b [C,H,N+V] -> its key half [H,C,N] and value half [H,V,C], heads first, the layout the
    absorbed einsums read. Derive them once per generation (engine.with_absorbed_weights), not per
    decode step: in a step, XLA:CPU re-lays both halves out every time (~10% of a batch-1 step)."""
    return wkv_b[..., :-v_head_dim].transpose(1, 0, 2), wkv_b[..., -v_head_dim:].transpose(1, 2, 0)


def attend_cached(q_nope, q_pe, cache, positions, wkv_b, scale, v_head_dim, backend: str = "auto",
                  absorbed: tuple[jax.Array, jax.Array] | None = None):
    """Absorbed attention of queries at `positions` [B,T] (contiguous per row) over a latent cache
    stored flat, [B*S,C+R] (see write_cache), that already holds them. A query sees the cache slots
    at or before its own position: slots after it may hold padding or rejected drafts, never read.

    Decode windows (a token, or a token and its drafts) go through the latent-decode kernel, which
    reads only the 576-value cache rows (FlashMLA's design), wherever `backend` resolves to a Pallas
    kernel (GPUs, or "interpret"); where it resolves to "xla" (CPU), the same absorbed math in jnp,
    laid out so XLA never transposes the cache. Prefill-sized windows are compute-bound and take
    the naive path, as training does. `absorbed`: absorbed_weights(wkv_b), if already at hand."""
    (b, t), c = q_nope.shape[:2], wkv_b.shape[0]
    cache = cache.reshape(b, -1, cache.shape[-1])
    if t > DECODE_KERNEL_MAX_T:  # prefill: the training path, keys and values expanded per head
        lat = cache.astype(q_nope.dtype)
        mask = jnp.arange(cache.shape[1])[None, None, :] <= positions[:, :, None]
        return attend_naive(q_nope, q_pe, lat[..., :c], lat[..., c:], wkv_b, mask, scale, v_head_dim)
    w_k, w_v = (w.astype(q_nope.dtype) for w in absorbed or absorbed_weights(wkv_b, v_head_dim))
    q_lat = jnp.einsum("bthn,hcn->bthc", q_nope, w_k)
    q = jnp.concatenate([q_lat, q_pe], axis=-1)  # [B,T,H,C+R], against cache rows [c_kv; k_pe]
    o_lat = None
    if resolve_backend(backend) != "xla":
        try:
            o_lat = mla_decode(q.astype(cache.dtype), cache, positions[:, 0] + t, v_dim=c, softmax_scale=scale,
                               backend=backend).astype(q.dtype)
        except ValueError:
            if backend != "auto":
                raise
            # "auto" means the fastest path that takes these shapes: the GPU kernels have limits
            # (e.g. Mosaic wants a bf16 cache and C a multiple of 128) that small models miss.
    if o_lat is None:
        o_lat = _latent_attention(q, cache.astype(q.dtype), positions, scale, c)
    return jnp.einsum("bthc,hvc->bthv", o_lat, w_v)


def _latent_attention(q, cache, positions, scale, v_dim):
    """q [B,T,H,C+R] over cache [B,S,C+R] -> [B,T,H,v_dim]. The cache is the left operand of both
    matmuls ([S, C+R] as stored), so XLA never re-lays it out: S is the long axis here."""
    scores = jnp.einsum("bsk,bthk->bsth", cache, q).astype(jnp.float32) * scale
    mask = jnp.arange(cache.shape[1])[None, :, None] <= positions[:, None, :]  # [B,S,T]
    probs = jax.nn.softmax(jnp.where(mask[..., None], scores, NEG_INF), axis=1).astype(cache.dtype)
    # Over all C+R columns, then sliced: cache[..., :v_dim] would copy the cache on every step.
    return jnp.einsum("bsth,bsc->bthc", probs, cache)[..., :v_dim]


class MLA(nn.Module):
    cfg: ModelConfig

    def query(self, x: jax.Array) -> jax.Array:
        """[N,D] -> [N,H,N+R]; low-rank with a norm between when q_lora_rank > 0."""
        c, std = self.cfg, self.cfg.init_std
        shape = (c.num_heads, c.qk_head_dim)
        if not c.q_lora_rank:
            wq = weight(self, "wq", (c.hidden_size, *shape), ("embed", "heads", "qk_dim"), std)
            return _matmul(x, wq, c.fp8)
        wq_a = weight(self, "wq_a", (c.hidden_size, c.q_lora_rank), ("embed", "q_lora"), std)
        wq_b = weight(self, "wq_b", (c.q_lora_rank, *shape), ("q_lora", "heads", "qk_dim"), std)
        cq = RMSNorm(LATENT_NORM_EPS, "q_lora", name="q_norm")(_matmul(x, wq_a, c.fp8))
        return _matmul(cq, wq_b, c.fp8)

    def latent(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[N,D] -> the cached pair: normalised c_kv [N,C] and rotated k_pe [N,R]."""
        c = self.cfg
        wkv_a = weight(self, "wkv_a", (c.hidden_size, c.kv_cache_dim), ("embed", "kv_latent"), c.init_std)
        kv = _matmul(x, wkv_a, c.fp8)
        c_kv = RMSNorm(LATENT_NORM_EPS, "kv_lora", name="kv_norm")(kv[..., : c.kv_lora_rank])
        return c_kv, apply_rope(kv[..., c.kv_lora_rank:], cos, sin)

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, cache: jax.Array | None = None,
                 sorted_positions: bool = False):
        """x [B,T,D], positions [B,T] -> [B,T,D]. With a latent `cache` [B*S,C+R] (inference), the new
        tokens' latents are written at their positions (contiguous per row) and the queries attend
        over the cache with the absorbed path; returns (output, updated cache).
        `sorted_positions`: the caller vouches that positions increase along T (the model's default
        arange), which lets the causal attention skip the key blocks after each query block."""
        c = self.cfg
        b, t, d = x.shape
        # Projections run on [B*T, D]: plain 2-D matmuls, which XLA:CPU lays out without transposes.
        flat = x.reshape(b * t, d)
        cos, sin = rope_angles(positions.reshape(-1), c)  # [N,R/2]
        q = self.query(flat)
        q_nope = q[..., : c.qk_nope_head_dim]
        q_pe = apply_rope(q[..., c.qk_nope_head_dim:], cos[:, None], sin[:, None])
        c_kv, k_pe = self.latent(flat, cos, sin)
        wkv_b = weight(self, "wkv_b", (c.kv_lora_rank, c.num_heads, c.qk_nope_head_dim + c.v_head_dim),
                       ("kv_lora", "heads", "kv_dim"), c.init_std)
        wo = weight(self, "wo", (c.num_heads, c.v_head_dim, c.hidden_size), ("heads", "v_dim", "embed"),
                    c.init_std)
        unflat = lambda a: a.reshape(b, t, *a.shape[1:])
        if cache is None:
            attend = ATTEND[c.attention_impl]
            if attend is attend_naive:  # absorbed: wkv_b is folded into the core's einsums, kept BF16
                blocks = QUERY_BLOCKS if sorted_positions and t >= QUERY_BLOCK_MIN_T else 1
                attend = functools.partial(attend_naive, fp8=c.fp8, query_blocks=blocks)
            with jax.named_scope(f"mla_{c.attention_impl}"):
                o = attend(unflat(q_nope), unflat(q_pe), unflat(c_kv), unflat(k_pe), wkv_b,
                           causal_mask(positions, positions), c.softmax_scale, c.v_head_dim)
        else:
            cache = write_cache(cache, unflat(jnp.concatenate([c_kv, k_pe], axis=-1)), positions[:, 0])
            absorbed = None
            if self.has_variable("absorbed", "w_k"):  # derived once per generation by the engine
                absorbed = self.get_variable("absorbed", "w_k"), self.get_variable("absorbed", "w_v")
            with jax.named_scope("mla_cached"):
                o = attend_cached(unflat(q_nope), unflat(q_pe), cache, positions, wkv_b, c.softmax_scale,
                                  c.v_head_dim, absorbed=absorbed)
        out = linear(o.reshape(b * t, -1), wo.reshape(-1, d), c.fp8).reshape(b, t, d)
        return out if cache is None else (out, cache)


def _matmul(x: jax.Array, w: jax.Array, fp8: bool) -> jax.Array:
    """x [N, I] @ w [I, ...] -> [N, ...], as one 2-D matmul in x's dtype (FP8 GEMMs with `fp8`)."""
    return linear(x, w.reshape(w.shape[0], -1), fp8).reshape(x.shape[0], *w.shape[1:])
