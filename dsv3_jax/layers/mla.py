"""Multi-head Latent Attention (DeepSeek-V2 report s.2.1; V3 report s.2.1.1).

Keys and values are rebuilt from a shared latent c_kv [C] (normalised) plus one rope key k_pe [R]
shared by all heads, so a cache holds only C + R values per token (`LatentCache`). The attention
itself is the attention op (`dsv3_jax.ops.attention`: expanded per head, or absorbed into the
query and output), whose variant the runtime and `dsv3_jax.ops.dispatch` choose.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from dsv3_jax.config import ModelConfig
from dsv3_jax.layers.cache import LatentCache
from dsv3_jax.layers.common import weight
from dsv3_jax.layers.indexer import INDEX_SCORES, Indexer  # DSA indexer hook (issue 17)
from dsv3_jax.layers.norm import RMSNorm
from dsv3_jax.layers.rope import apply_rope, rope_angles
from dsv3_jax.ops import dispatch
from dsv3_jax.ops.attention import ATTENTION, KvWeights, absorbed_weights
from dsv3_jax.ops.linear import dense, linear
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

    def __call__(self, x: jax.Array, positions: jax.Array, cache: LatentCache | None = None,
                 sorted_positions: bool = False):
        """x [B,T,D], positions [B,T] -> [B,T,D]. With a latent `cache` (inference), the new tokens'
        latents are written at their positions (contiguous per row) and the queries attend over the
        cache; returns (output, updated cache). `sorted_positions`: the caller vouches that positions
        increase along T (the model's default arange), so causal attention may skip later key blocks."""
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
        # ---- DSA indexer hook (issue 17). Until the sparse attention consumes them, the indexer's scores
        # are computed only at init (creating its parameters) or sown for a caller that makes
        # INDEX_SCORES mutable (per-layer layout); decoding (a cache) has no indexer keys yet.
        if c.has_indexer and cache is None and (self.is_initializing() or self.is_mutable_collection(INDEX_SCORES)):
            scores = self.indexer(x, unflat(self.q_norm(self._linear(flat, self.wq_a))), positions)
            if not self.is_initializing():
                self.sow(INDEX_SCORES, "scores", scores)
        # ---- end of the DSA indexer hook
        if cache is not None:
            cache = cache.write(kv, positions[:, 0])
            kv, kv_positions = cache.view(), None
        name, opts = dispatch.attention(self.runtime, c, cached=cache is not None,
                                        q_shape=(b, t, c.num_heads, c.kv_cache_dim), kv_shape=kv.shape,
                                        kv_dtype=kv.dtype, sorted_positions=sorted_positions and cache is None)
        with jax.named_scope(f"mla_{name}"):
            o = ATTENTION[name](unflat(q_nope), unflat(q_pe), kv, positions, kv_positions, self.kv_weights(), opts)
        o = checkpoint_name(o, "mla_attention")
        out = self._linear(o.reshape(b, t, -1), self.wo, in_dims=2)
        return out if cache is None else (out, cache)
