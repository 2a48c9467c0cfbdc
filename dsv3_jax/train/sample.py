"""A short text sample at the end of training.

Deliberately simple: one jitted full forward over a fixed-size buffer per new token (causal
attention makes the padding after the cursor irrelevant), so nothing retraces. The latent KV cache
and speculative decoding belong to the inference package.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import Transformer
from dsv3_jax.runtime import Runtime


def sample_tokens(cfg: ModelConfig, variables: dict, prompt: list[int], new_tokens: int,
                  temperature: float = 0.8, seed: int = 0, vocab_limit: int | None = None,
                  runtime: Runtime = Runtime()) -> list[int]:
    """`vocab_limit`: ids at or above it are never drawn (a tokenizer smaller than the model's vocab)."""
    length = min(len(prompt) + new_tokens, cfg.max_position_embeddings)
    buf = jnp.zeros((1, length), jnp.int32).at[0, : len(prompt)].set(jnp.asarray(prompt, jnp.int32))

    @jax.jit
    def next_token(buf, cursor, key):
        logits = Transformer(cfg, runtime).apply(variables, buf)[0, cursor - 1]
        if vocab_limit is not None:
            logits = jnp.where(jnp.arange(logits.shape[0]) < vocab_limit, logits, -jnp.inf)
        if temperature == 0:
            return jnp.argmax(logits).astype(jnp.int32)
        return jax.random.categorical(key, logits / temperature).astype(jnp.int32)

    key = jax.random.PRNGKey(seed)
    for cursor in range(len(prompt), length):
        key, sub = jax.random.split(key)
        buf = buf.at[0, cursor].set(next_token(buf, cursor, sub))
    return np.asarray(buf[0, len(prompt):]).tolist()


def sample_text(cfg: ModelConfig, state, tokenizer, prompt: str, new_tokens: int, seed: int = 0,
                runtime: Runtime = Runtime()) -> str:
    variables = {"params": state.params, **({"router": state.router} if state.router else {})}
    ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
    new = sample_tokens(cfg, variables, ids, new_tokens, seed=seed, vocab_limit=tokenizer.vocab_size,
                        runtime=runtime)
    return prompt + tokenizer.decode(new)
