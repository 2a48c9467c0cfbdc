"""The distribution a token is drawn from: temperature, top-k, top-p, and greedy as its limit.

Everything is expressed as log-probabilities over the vocabulary, greedy included (a one-hot at the
argmax), so that plain decoding, speculative drafting and the speculative acceptance rule all share
one code path: with one-hot distributions the rejection rule reduces to "accept a draft exactly
when it is the argmax", which is why speculative greedy output equals plain greedy output.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0
    vocab_limit: int | None = None  # ids at or above it are never drawn (a tokenizer smaller than the vocab)

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no limit), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def _keep_top_k(logits: jax.Array, k: int) -> jax.Array:
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits >= kth, logits, -jnp.inf)


def _keep_top_p(logits: jax.Array, p: float) -> jax.Array:
    """The smallest set of most likely tokens whose mass reaches p (the token crossing p included)."""
    desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
    cutoff = jnp.min(jnp.where(before < p, desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= cutoff, logits, -jnp.inf)


def _limit(logits: jax.Array, s: Sampling) -> jax.Array:
    if s.vocab_limit is not None and s.vocab_limit < logits.shape[-1]:
        return jnp.where(jnp.arange(logits.shape[-1]) < s.vocab_limit, logits, -jnp.inf)
    return logits


def greedy(logits: jax.Array, s: Sampling) -> jax.Array:
    """The argmax token [...] of logits [..., V]: what `draw` picks from `log_probs` at temperature
    0, without building the one-hot distribution (the speculative step's fast path)."""
    return jnp.argmax(_limit(logits.astype(jnp.float32), s), axis=-1).astype(jnp.int32)


def log_probs(logits: jax.Array, s: Sampling) -> jax.Array:
    """[..., V] logits -> [..., V] float32 log-probabilities of the distribution to sample from."""
    logits = _limit(logits.astype(jnp.float32), s)
    if s.temperature == 0:
        best = jnp.argmax(logits, axis=-1)
        return jnp.where(jnp.arange(logits.shape[-1]) == best[..., None], 0.0, -jnp.inf)
    logits = logits / s.temperature
    if s.top_k and s.top_k < logits.shape[-1]:
        logits = _keep_top_k(logits, s.top_k)
    if s.top_p < 1:
        logits = _keep_top_p(logits, s.top_p)
    return jax.nn.log_softmax(logits, axis=-1)


def draw(key: jax.Array, logp: jax.Array) -> jax.Array:
    """One token id per row of log-probabilities [..., V] (-inf entries are never drawn)."""
    return jax.random.categorical(key, logp, axis=-1).astype(jnp.int32)
