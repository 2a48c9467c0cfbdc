"""Mean next-token cross-entropy of logits [N, V] against integer targets [N]: two equal variants.

- `plain`: log-softmax and a gather, differentiated by autodiff (the reference).
- `onepass`: the same value with a hand-written backward, d/dlogits = (softmax - onehot) / N in one
  pass over [N, V] with the one-hot an iota compare; autodiff also zero-fills and scatters a
  [N, V] buffer and makes two more passes.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from dsv3_jax.ops.registry import Registry

CrossEntropyFn = Callable[[jax.Array, jax.Array], jax.Array]
PLAIN, ONEPASS = "plain", "onepass"  # the variants' names, declared once
CROSS_ENTROPY: Registry[CrossEntropyFn] = Registry("cross_entropy", reference=PLAIN)


@CROSS_ENTROPY.register(PLAIN)
def cross_entropy_plain(logits: jax.Array, targets: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[:, None], axis=-1))


def _logsumexp_and_picked(logits, targets):
    x = logits.astype(jnp.float32)
    top = jnp.max(x, axis=-1)
    lse = top + jnp.log(jnp.sum(jnp.exp(x - top[:, None]), axis=-1))
    return lse, jnp.take_along_axis(x, targets[:, None], axis=-1)[:, 0]


@jax.custom_vjp
def _onepass(logits, targets):
    lse, picked = _logsumexp_and_picked(logits, targets)
    return jnp.mean(lse - picked)


def _onepass_fwd(logits, targets):
    lse, picked = _logsumexp_and_picked(logits, targets)
    return jnp.mean(lse - picked), (logits, targets, lse)


def _onepass_bwd(res, g):
    logits, targets, lse = res
    n, v = logits.shape
    onehot = jnp.arange(v)[None, :] == targets[:, None]
    d = (jnp.exp(logits.astype(jnp.float32) - lse[:, None]) - onehot) * (g / n)
    return d.astype(logits.dtype), None


_onepass.defvjp(_onepass_fwd, _onepass_bwd)
CROSS_ENTROPY.register(ONEPASS)(_onepass)
