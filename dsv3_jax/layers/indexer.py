"""The lightning indexer of DeepSeek Sparse Attention (DeepSeek-V3.2 report s.2.1, eq. 1).

Each query t scores every key s it may see with a few cheap heads, and the attention then reads only
the `index_topk` best keys:

    I(t, s) = sum_h w(t, h) * ReLU(q(t, h) . k(s)) / sqrt(index_head_dim),
    w(t, h) = weights_proj(x_t)[h] / sqrt(index_n_heads).

The queries come from the query latent MLA already computes (q_a_proj then its RMSNorm, [Q]); the key
is one vector per token shared by all heads: wk on the block's normed hidden state, then a LayerNorm
with scale and bias. RoPE rotates the first qk_rope_head_dim dims of q and k in the half-split layout
(x_i paired with x_{i+R/2}), not MLA's adjacent pairs: DeepSeek's reference code fixed its indexer to
this layout (2025-11), and transformers' DeepseekV32Indexer uses it. The frequencies and YaRN factor
are MLA's (`rope.rope_angles`).

Precision, against DeepSeek's reference code: it rotates q and k by a normalised Hadamard transform,
quantises both to FP8 (1x128 blocks) and scores them with an FP8 kernel. The rotation is orthogonal,
so without the quantisation it changes no dot product; transformers computes the scores in float32
without either, and so does this reference path. DeepSeek's FP8 scores differ from these by FP8
rounding only, which can swap near-tied keys at the top-k boundary.

Letters beyond the package legend: here H counts the indexer's heads, I is index_head_dim, K is
index_topk (keys kept per query).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig
from dsv3_jax.layers.common import weight
from dsv3_jax.layers.rope import rope_angles
from dsv3_jax.ops.attention import visible
from dsv3_jax.ops.linear import linear
from dsv3_jax.ops.sparse_attention import NONE, selection_mask  # noqa: F401 (the mask is re-exported)
from dsv3_jax.ops.top_k import TopKFn

# DeepSeek's code and transformers fix the key LayerNorm's eps; the config has no field for it.
KEY_NORM_EPS = 1e-6
# The variable collection MLA sows the indexer's scores into when a caller makes it mutable.
INDEX_SCORES = "index_scores"


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis, in float32 whatever x's dtype, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)
    return (y * scale + bias).astype(x.dtype)


class LayerNorm(nn.Module):
    eps: float = KEY_NORM_EPS
    axis_name: str = "qk_dim"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        axes = (self.axis_name,)
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, axes), (x.shape[-1],),
                           jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, axes), (x.shape[-1],),
                          jnp.float32)
        return layer_norm(x, scale, bias, self.eps)


def apply_rope_half(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the first R dims of x[..., I] as halves (x_i with x_{i+R/2}), R = 2 * cos.shape[-1];
    the dims past R pass unchanged. cos/sin broadcast against x[..., R/2]."""
    half = cos.shape[-1]
    x32 = x.astype(jnp.float32)
    x1, x2, rest = x32[..., :half], x32[..., half: 2 * half], x32[..., 2 * half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return out.astype(x.dtype)


def index_scores(q: jax.Array, w: jax.Array, k: jax.Array, q_positions: jax.Array,
                 kv_positions: jax.Array | None, keys_t: bool = False) -> jax.Array:
    """q [B,T,H,I], w [B,T,H] (both scales folded in), k [B,S,I] (or [B,I,S] with `keys_t`: a cache's
    keys, `LatentCache.index_view`) -> float32 scores [B,T,S], -inf where the key is not visible (after the
    query's position; `kv_positions` None: slot s holds position s, as in a cache). Materialises
    [B,T,H,S]: the ReLU sits between the dot product and the sum over heads, so the two do not fold into
    one matmul. A cache's keys in bfloat16 (`layers.cache.index_dtype`) meet q rounded to bfloat16, their
    products exact and summed in float32: widening the keys instead would write and read them again at twice
    the bytes, every step (32K cached keys: 0.16 against 0.27 ms a layer). Keys as rows (training) are
    widened to float32, their gradients too."""
    dt = jnp.bfloat16 if keys_t and k.dtype == jnp.bfloat16 else jnp.float32
    q, k, w = q.astype(dt), k.astype(dt), w.astype(jnp.float32)
    logits = jnp.einsum("bthi,bis->bths" if keys_t else "bthi,bsi->bths", q, k, preferred_element_type=jnp.float32)
    scores = jnp.einsum("bth,bths->bts", w, jax.nn.relu(logits))
    return jnp.where(visible(q_positions, kv_positions, k.shape[-1 if keys_t else 1]), scores, -jnp.inf)


def select(scores: jax.Array, topk: int, top_k: TopKFn = jax.lax.top_k) -> jax.Array:
    """scores [B,T,S] (-inf: not visible) -> int32 indices [B,T,topk] of each query's best keys, by
    descending score (equal scores: the lower index first). A query that sees fewer than `topk`
    keys has its slots past them set to NONE (-1), as FlashMLA's sparse kernels read them; so
    does every slot past S when S < topk. The shape is [B,T,topk] whatever S. `top_k`: a variant of
    `ops.top_k` (`dispatch.top_k`), all the same function."""
    kept = min(topk, scores.shape[-1])
    values, idx = top_k(scores, kept)
    idx = jnp.where(values > -jnp.inf, idx, NONE).astype(jnp.int32)
    if kept < topk:
        idx = jnp.pad(idx, ((0, 0), (0, 0), (0, topk - kept)), constant_values=NONE)
    return idx


# A prefill from an empty cache scores its query chunks in up to this many groups, each group against the slots
# up to its own end: the indexer's scores and top-k over ~(1 + 1/groups)/2 of the slots, not all of them.
FROM_START_GROUPS = 8


def select_cached(q: jax.Array, w: jax.Array, keys: jax.Array, q_positions: jax.Array, topk: int,
                  query_chunks: int = 1, from_start: bool = False, top_k: TopKFn = jax.lax.top_k) -> jax.Array:
    """`select` over the scores of q [B,T,H,I], w [B,T,H] against a cache's keys [B,I,S] (transposed, as
    `LatentCache.index_view` gives them; slot s holds position s) -> [B,T,topk]. `query_chunks` > 1 (dividing
    T) scores the queries a chunk at a time, so a prefill holds [B, T/chunks, H, S] float32 logits, not
    [B,T,H,S]. `from_start`: the caller vouches that q_positions are 0..T-1 in every row, so the slots past a
    query block's last position are hidden from all of it: each block scores only the slots up to its end.
    The same indices (those slots would score -inf, which `select` never ranks above a visible key). `top_k` as
    `select`'s."""
    score = lambda qc, wc, pc, kc: select(index_scores(qc, wc, kc, pc, None, keys_t=True), topk, top_k)
    b, t = q.shape[:2]
    s = keys.shape[-1]
    if query_chunks <= 1 or t % query_chunks:
        return score(q, w, q_positions, keys[..., :min(s, t)] if from_start else keys)
    groups = math.gcd(query_chunks, FROM_START_GROUPS) if from_start else 1
    per_group, tg = query_chunks // groups, t // groups
    split = lambda a: a.reshape(b, per_group, tg // per_group, *a.shape[2:]).swapaxes(0, 1)
    out = []
    for g in range(groups):  # group g: queries [g tg, (g+1) tg), at positions below (g+1) tg when from_start
        rows = slice(g * tg, (g + 1) * tg)
        kc = keys[..., :min(s, (g + 1) * tg)] if from_start else keys
        idx = jax.lax.map(lambda a, kc=kc: score(*a, kc), (split(q[:, rows]), split(w[:, rows]),
                                                          split(q_positions[:, rows])))
        out.append(idx.swapaxes(0, 1).reshape(b, tg, topk))
    return jnp.concatenate(out, axis=1) if groups > 1 else out[0]


class Indexer(nn.Module):
    """The indexer's weights, named as DeepSeek's checkpoints name them (`self_attn.indexer.*`):
    wq_b [Q,H,I], wk [D,I], k_norm (LayerNorm scale and bias [I]), weights_proj [D,H]."""

    cfg: ModelConfig

    def setup(self):
        c, std = self.cfg, self.cfg.init_std
        h, i = c.index_n_heads, c.index_head_dim
        self.wq_b = weight(self, "wq_b", (c.q_lora_rank, h, i), ("q_lora", "heads", "qk_dim"), std)
        self.wk = weight(self, "wk", (c.hidden_size, i), ("embed", "qk_dim"), std)
        self.k_norm = LayerNorm(KEY_NORM_EPS)
        self.weights_proj = weight(self, "weights_proj", (c.hidden_size, h), ("embed", "heads"), std)

    def queries(self, q_latent: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """q_latent [B,T,Q] (MLA's normed query latent), cos/sin [B,T,R/2] -> [B,T,H,I]."""
        return apply_rope_half(linear(q_latent, self.wq_b), cos[..., None, :], sin[..., None, :])

    def keys(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """x [B,S,D] (the block's normed hidden state), cos/sin [B,S,R/2] -> [B,S,I]: what a cache of
        the indexer's keys would hold, one row per token."""
        return apply_rope_half(self.k_norm(linear(x, self.wk)), cos, sin)

    def head_weights(self, x: jax.Array) -> jax.Array:
        """x [B,T,D] -> float32 [B,T,H]: each head's weight with both of eq. 1's scales folded in
        (ReLU commutes with a positive scale). In float32 from a float32 x, as DeepSeek's code and
        transformers keep weights_proj."""
        c = self.cfg
        w = linear(x.astype(jnp.float32), self.weights_proj)
        return w * (c.index_n_heads ** -0.5 * c.index_head_dim ** -0.5)

    def __call__(self, x: jax.Array, q_latent: jax.Array, positions: jax.Array) -> jax.Array:
        """x [B,T,D], q_latent [B,T,Q], positions [B,T] -> scores [B,T,T] of each query against the
        same tokens as keys, -inf where causality hides the key (`select` picks from them)."""
        cos, sin = rope_angles(positions, self.cfg)
        q, k = self.queries(q_latent, cos, sin), self.keys(x, cos, sin)
        return index_scores(q, self.head_weights(x), k, positions, positions)
