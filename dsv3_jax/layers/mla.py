"""Multi-head Latent Attention (DeepSeek-V2 report s.2.1; V3 report s.2.1.1).

Keys and values are rebuilt from a shared latent c_kv [C] (normalised) plus one rope key k_pe [R]
shared by all heads, so a cache holds only C + R values per token (`LatentCache`). The attention
itself is the attention op (`dsv3_jax.ops.attention`: expanded per head, or absorbed into the
query and output), whose variant the runtime and `dsv3_jax.ops.dispatch` choose. With a DSA indexer
(DeepSeek-V3.2), the attention reads each query's top-k keys only: uncached (`_dsa`), and over a cache
(`_dsa_cached`), where the cache also holds the indexer's keys.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from dsv3_jax.config import ModelConfig
from dsv3_jax.layers.cache import LatentCache
from dsv3_jax.layers.common import weight
from dsv3_jax.layers.indexer import INDEX_SCORES, Indexer, select, select_cached  # DSA (issue 17)
from dsv3_jax.layers.norm import RMSNorm
from dsv3_jax.layers.rope import apply_rope, rope_angles
from dsv3_jax.ops import dispatch
from dsv3_jax.ops.attention import ATTENTION, KvWeights, absorbed_weights
from dsv3_jax.ops.linear import dense, linear
from dsv3_jax.ops.sparse_attention import (  # DSA (issue 17)
    attention_distribution,
    gather_scores,
    indexer_kl,
    selected_mass,
    sparse_attention,
)
from dsv3_jax.runtime import Runtime

# The norms on the q and kv latents use a fixed eps in DeepSeek's code and in transformers, not
# the config's rms_norm_eps (which only the block norms read).
LATENT_NORM_EPS = 1e-6
ABSORBED = "absorbed"  # the variable collection of wkv_b's halves, derived once per generation


class MLA(nn.Module):
    cfg: ModelConfig
    runtime: Runtime = Runtime()

    def setup(self):
        # Created in this order (each draws its own initial values in turn).
        c, std = self.cfg, self.cfg.init_std
        q_shape = (c.num_heads, c.qk_head_dim)
        if c.q_lora_rank:
            self.wq_a = weight(self, "wq_a", (c.hidden_size, c.q_lora_rank), ("embed", "q_lora"), std)
            self.wq_b = weight(self, "wq_b", (c.q_lora_rank, *q_shape), ("q_lora", "heads", "qk_dim"), std)
            self.q_norm = RMSNorm(LATENT_NORM_EPS, "q_lora")
        else:
            self.wq = weight(self, "wq", (c.hidden_size, *q_shape), ("embed", "heads", "qk_dim"), std)
        self.wkv_a = weight(self, "wkv_a", (c.hidden_size, c.kv_cache_dim), ("embed", "kv_latent"), std)
        self.kv_norm = RMSNorm(LATENT_NORM_EPS, "kv_lora")
        self.wkv_b = weight(self, "wkv_b", (c.kv_lora_rank, c.num_heads, c.qk_nope_head_dim + c.v_head_dim),
                            ("kv_lora", "heads", "kv_dim"), std)
        self.wo = weight(self, "wo", (c.num_heads, c.v_head_dim, c.hidden_size), ("heads", "v_dim", "embed"), std)
        if c.has_indexer:  # DSA indexer hook (issue 17): its parameters, attn/indexer
            self.indexer = Indexer(c)

    def _linear(self, x: jax.Array, w, in_dims: int = 1) -> jax.Array:
        rt = self.runtime
        return linear(x, w, in_dims=in_dims, fp8=rt.fp8, backend=dispatch.fp8_backend(rt))

    def query(self, x: jax.Array) -> jax.Array:
        """[N,D] -> [N,H,N+R]; low-rank with a norm between when q_lora_rank > 0."""
        if not self.cfg.q_lora_rank:
            return self._linear(x, self.wq)
        return self._linear(self.q_norm(self._linear(x, self.wq_a)), self.wq_b)

    def latent(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """[N,D] -> the cached rows [N,C+R]: normalised c_kv and rotated k_pe."""
        kv, c = self._linear(x, self.wkv_a), self.cfg.kv_lora_rank
        return jnp.concatenate([self.kv_norm(kv[..., :c]), apply_rope(kv[..., c:], cos, sin)], axis=-1)

    def absorb(self) -> None:
        """Put wkv_b's halves, heads first, in the ABSORBED collection, where decode steps read them
        instead of re-deriving them on every step (XLA re-lays both halves out each time)."""
        w_k, w_v = absorbed_weights(dense(self.wkv_b, self.runtime.compute_dtype), self.cfg.v_head_dim)
        self.put_variable(ABSORBED, "w_k", w_k)
        self.put_variable(ABSORBED, "w_v", w_v)

    def kv_weights(self) -> KvWeights:
        if self.has_variable(ABSORBED, "w_k"):
            return KvWeights(self.wkv_b, self.get_variable(ABSORBED, "w_k"), self.get_variable(ABSORBED, "w_v"))
        return KvWeights(self.wkv_b)

    def _dense(self, q_nope, q_pe, kv, positions, kv_positions, cached: bool, sorted_positions: bool) -> jax.Array:
        """The attention variant dispatch picks, over every visible key: [B,T,H,V]."""
        c, (b, t) = self.cfg, q_nope.shape[:2]
        name, opts = dispatch.attention(self.runtime, c, cached=cached, q_shape=(b, t, c.num_heads, c.kv_cache_dim),
                                        kv_shape=kv.shape, kv_dtype=kv.dtype,
                                        sorted_positions=sorted_positions and not cached)
        with jax.named_scope(f"mla_{name}"):
            return ATTENTION[name](q_nope, q_pe, kv, positions, kv_positions, self.kv_weights(), opts)

    # ---- DSA (issue 17): DeepSeek Sparse Attention without a cache (training, prefill) ----------------
    def _dsa(self, x, flat, q_nope, q_pe, kv, positions, sorted_positions: bool) -> jax.Array:
        """x [B,T,D] (the indexer's input), flat its [B*T,D] rows, q_nope/q_pe [B,T,H,*], kv [B,T,C+R] ->
        [B,T,H,V]. The indexer scores the keys (sown for a caller that makes INDEX_SCORES mutable) and each
        query attends over its top index_topk (`ops.sparse_attention`), or over all it sees where
        `dispatch.dsa_sparse` says dense. In a training stage (`Runtime.dsa_stage`, with "intermediates"
        mutable) it also sows the indexer's loss (`_sow_indexer_loss`)."""
        c, rt = self.cfg, self.runtime
        sparse = dispatch.dsa_sparse(rt, c, kv.shape[1])
        training = rt.dsa_stage is not None and self.is_mutable_collection("intermediates")
        sow_scores = self.is_mutable_collection(INDEX_SCORES) and not self.is_initializing()
        if not (sparse or training or sow_scores or self.is_initializing()):
            return self._dense(q_nope, q_pe, kv, positions, positions, False, sorted_positions)
        # The indexer reads the main model's activations but never trains them (V3.2 report s.2.1.1: its
        # input is detached); the top-k passes no gradient, so only its KL trains its weights.
        q_latent = self.q_norm(self._linear(flat, self.wq_a)).reshape(*x.shape[:2], -1)
        scores = self.indexer(*jax.lax.stop_gradient((x, q_latent)), positions)
        if sow_scores:
            self.sow(INDEX_SCORES, "scores", scores)
        indices = select(scores, c.index_topk, dispatch.top_k(rt)) if sparse or training else None
        target = None
        if sparse:
            chunks = dispatch.sparse_query_chunks(kv.shape[0], kv.shape[1], c.index_topk,
                                                  kv.shape[-1] * jnp.dtype(q_nope.dtype).itemsize)
            with jax.named_scope("mla_sparse"):
                o = sparse_attention(q_nope, q_pe, kv, positions, positions, indices, self.kv_weights(),
                                     c.softmax_scale, chunks, distribution=training)
            if training:
                o, target = o
        else:
            o = self._dense(q_nope, q_pe, kv, positions, positions, False, sorted_positions)
        if training:
            self._sow_indexer_loss(scores, indices, target, q_nope, q_pe, kv, positions)
        return o

    def _sow_indexer_loss(self, scores, indices, target, q_nope, q_pe, kv, positions) -> None:
        """Sow ("intermediates", "dsa") [KL, recall]: the indexer's KL to the main attention summed over
        heads and L1-normalised (a constant), over every visible key where the attention was dense
        (`target` None: the warm-up), else over the selected keys against the sparse attention's own
        distribution `target` [B,T,K] (V3.2 report s.2.1.1); and the share of the dense attention's
        mass the selection keeps (a metric, also in the sparse stage: one more [B,T,H,S] score pass)."""
        dense_p = jax.lax.stop_gradient(attention_distribution(q_nope, q_pe, kv, positions, positions,
                                                               self.kv_weights(), self.cfg.softmax_scale))
        kl = indexer_kl(dense_p, scores) if target is None else indexer_kl(target, gather_scores(scores, indices))
        self.sow("intermediates", "dsa", jnp.stack([kl, selected_mass(dense_p, indices)]))
    def _dsa_cached(self, x, flat, q_nope, q_pe, cache: LatentCache, positions, cos, sin, from_start: bool = False):
        """The cached path with an indexer: x [B,T,D] at `positions` (contiguous per row, already written to
        the latent `cache`), q_nope/q_pe [B,T,H,*], cos/sin [B*T,R/2] -> ([B,T,H,V], cache with the new
        tokens' indexer keys). Each query scores the keys of every slot at or before its position (a slot
        holds the position it is numbered by; slots past it are stale or empty and hidden) and attends over
        its top index_topk latent rows. A cache of at most index_topk slots runs the dense cached attention:
        the selection would keep every visible key, the same function. `from_start`: positions are 0..T-1 in
        every row, so each query chunk's indexer scores only the slots up to its own end (`select_cached`)."""
        c, (b, t) = self.cfg, x.shape[:2]
        cos, sin = cos.reshape(b, t, -1), sin.reshape(b, t, -1)
        cache = cache.write_index(self.indexer.keys(x, cos, sin), positions[:, 0])
        kv = cache.view()
        if not dispatch.dsa_sparse(self.runtime, c, cache.slots):
            return self._dense(q_nope, q_pe, kv, positions, None, True, False), cache
        q_latent = self.q_norm(self._linear(flat, self.wq_a)).reshape(b, t, -1)
        # Prefill scores T queries against S slots: in query chunks, [B, T/chunks, H, S] float32 at a time.
        chunks = dispatch.sparse_query_chunks(b, t, cache.slots, 4 * c.index_n_heads)
        indices = select_cached(self.indexer.queries(q_latent, cos, sin), self.indexer.head_weights(x),
                                cache.index_view(), positions, c.index_topk, chunks, from_start,
                                dispatch.top_k(self.runtime))
        chunks = dispatch.sparse_query_chunks(b, t, c.index_topk, kv.shape[-1] * jnp.dtype(q_nope.dtype).itemsize)
        with jax.named_scope("mla_sparse"):
            attend = dispatch.cached_sparse_attention(self.runtime, c, t, kv.shape, kv.dtype)  # decode: a kernel
            o = attend(q_nope, q_pe, kv, positions, None, indices, self.kv_weights(), c.softmax_scale, chunks)
        return o, cache
    # ---- end of DSA

    def __call__(self, x: jax.Array, positions: jax.Array, cache: LatentCache | None = None,
                 sorted_positions: bool = False):
        """x [B,T,D], positions [B,T] -> [B,T,D]. With a latent `cache` (inference), the new tokens'
        latents are written at their positions (contiguous per row) and the queries attend over the
        cache; returns (output, updated cache). `sorted_positions`: the caller vouches that positions
        increase along T (the model's default arange), so causal attention may skip later key blocks; with a
        cache, that they are 0..T-1 in every row (a prefill from an empty cache)."""
        c = self.cfg
        b, t, d = x.shape
        # Projections run on [B*T, D]: plain 2-D matmuls, which XLA:CPU lays out without transposes.
        flat = x.reshape(b * t, d)
        cos, sin = rope_angles(positions.reshape(-1), c)  # [N,R/2]
        q = checkpoint_name(self.query(flat), "mla_query")  # names: ops.remat.ATTENTION_SAVED
        q_nope = q[..., : c.qk_nope_head_dim]
        q_pe = apply_rope(q[..., c.qk_nope_head_dim:], cos[:, None], sin[:, None])
        unflat = lambda a: a.reshape(b, t, *a.shape[1:])
        kv, kv_positions = unflat(checkpoint_name(self.latent(flat, cos, sin), "mla_latent")), positions
        if cache is not None:
            cache = cache.write(kv, positions[:, 0])
            kv, kv_positions = cache.view(), None
        if c.has_indexer and cache is None:  # DSA (issue 17): the indexer's selection, see _dsa
            o = self._dsa(x, flat, unflat(q_nope), unflat(q_pe), kv, positions, sorted_positions)
        elif c.has_indexer:
            o, cache = self._dsa_cached(x, flat, unflat(q_nope), unflat(q_pe), cache, positions, cos, sin,
                                        sorted_positions)
        else:
            o = self._dense(unflat(q_nope), unflat(q_pe), kv, positions, kv_positions, cache is not None,
                            sorted_positions)
        o = checkpoint_name(o, "mla_attention")
        out = self._linear(o.reshape(b, t, -1), self.wo, in_dims=2)
        return out if cache is None else (out, cache)
