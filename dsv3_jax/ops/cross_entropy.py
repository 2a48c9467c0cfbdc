"""Mean next-token cross-entropy of logits [N, V] against integer targets [N]: two equal variants.

- `plain`: log-softmax and a gather, differentiated by autodiff (the reference).
- `onepass`: the same value with a hand-written backward, d/dlogits = (softmax - onehot) / N in one
  pass over [N, V] with the one-hot an iota compare; autodiff also zero-fills and scatters a
  [N, V] buffer and makes two more passes.

`head_cross_entropy` puts the output head in front of either: hidden states [B, T, D] and the head
[D, V] in, the mean loss out, the [B, T, V] float32 logits made `chunks` positions-slices at a time
and recomputed in the backward, so only one slice's logits are ever alive.
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


def head_cross_entropy(h: jax.Array, head: jax.Array, targets: jax.Array, ce: CrossEntropyFn,
                       chunks: int = 1) -> jax.Array:
    """Mean of `ce` over the logits h @ head (float32, as the model's head computes them), h [B, T, D],
    targets [B, T]. With `chunks` > 1 (dividing T) the positions are scanned in that many slices, each
    slice's logits rematerialised for the backward: the same value and gradients in 1/chunks of the
    logits' memory. Slices run along T, so rows keep their batch sharding."""
    b, t, d = h.shape

    def one(hc, tc):
        logits = hc.reshape(-1, d).astype(jnp.float32) @ head.astype(jnp.float32)
        return ce(logits, tc.reshape(-1))

    if chunks <= 1 or t % chunks:
        return one(h, targets)
    slices = lambda x: x.reshape(b, chunks, t // chunks, *x.shape[2:]).swapaxes(0, 1)

    def add(total, xs):
        return total + jax.checkpoint(one)(*xs), None

    # Every slice holds the same number of positions, so the mean of slice means is the mean.
    total, _ = jax.lax.scan(add, jnp.zeros((), jnp.float32), (slices(h), slices(targets)))
    return total / chunks
