"""DeepSeekMoE: shared experts plus fine-grained routed experts (V3 report s.2.1.2).

Routing: affinities s = sigmoid(x W) (V3) or softmax (V2). A per-expert bias b, moved by the
auxiliary-loss-free balancer, is added ONLY to choose experts; the gate weights are the unbiased
s of the chosen experts, normalised and times the routed scaling factor. Group-limited routing
first keeps the `topk_group` best of `n_group` expert groups. The routed experts (stacked
[E, ...]) then run through the experts op (`dsv3_jax.ops.experts`), whose variant the runtime and
`dsv3_jax.ops.dispatch` choose; all compute the same function.
"""
from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig
from dsv3_jax.layers.common import weight
from dsv3_jax.layers.mlp import MLP
from dsv3_jax.ops import dispatch
from dsv3_jax.runtime import Runtime


class Routing(NamedTuple):
    weights: jax.Array  # [T, K] float32 gate weights
    experts: jax.Array  # [T, K] int32 chosen expert ids
    scores: jax.Array  # [T, E] float32 unbiased affinities (for balance statistics and losses)


def _group_mask(choice: jax.Array, cfg: ModelConfig) -> jax.Array:
    """[T, E] True for experts inside each token's `topk_group` best groups."""
    t = choice.shape[0]
    grouped = choice.reshape(t, cfg.n_group, cfg.experts_per_group)
    if cfg.group_score == "top2_sum":
        group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)
    else:
        group_scores = grouped.max(-1)
    _, best = jax.lax.top_k(group_scores, cfg.topk_group)
    keep = jnp.zeros((t, cfg.n_group), bool).at[jnp.arange(t)[:, None], best].set(True)
    return jnp.repeat(keep, cfg.experts_per_group, axis=1)


def route(x: jax.Array, router: jax.Array, bias: jax.Array, cfg: ModelConfig) -> Routing:
    """x [T, D], router [D, E], bias [E] -> Routing. Computed in float32, as the report keeps it."""
    logits = x.astype(jnp.float32) @ router.astype(jnp.float32)
    if cfg.score_func == "sigmoid":
        scores = jax.nn.sigmoid(logits)
    else:
        scores = jax.nn.softmax(logits, axis=-1)
    choice = scores + bias.astype(jnp.float32)  # the bias steers selection only
    if cfg.topk_group < cfg.n_group:
        choice = jnp.where(_group_mask(choice, cfg), choice, -jnp.inf)
    _, experts = jax.lax.top_k(choice, cfg.num_experts_per_tok)
    weights = jnp.take_along_axis(scores, experts, axis=-1)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return Routing(weights * cfg.routed_scaling_factor, experts.astype(jnp.int32), scores)


class MoE(nn.Module):
    cfg: ModelConfig
    runtime: Runtime = Runtime()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, std = self.cfg, self.cfg.init_std
        d, e, f = c.hidden_size, c.n_routed_experts, c.moe_intermediate_size
        router = weight(self, "router", (d, e), ("embed", "expert"), std)
        # The balancing bias is state updated outside the optimizer, so it lives in its own
        # collection ("router"), not in "params".
        if c.router_bias:
            bias = self.variable("router", "bias", jnp.zeros, (e,), jnp.float32).value
        else:
            bias = jnp.zeros((e,), jnp.float32)
        flat = x.reshape(-1, d)
        routing = route(flat, router, bias, c)
        self.sow("intermediates", "routing", routing)
        w1 = weight(self, "w1", (e, d, f), ("expert", "embed", "mlp"), std)
        w3 = weight(self, "w3", (e, d, f), ("expert", "embed", "mlp"), std)
        w2 = weight(self, "w2", (e, f, d), ("expert", "mlp", "embed"), std)
        with jax.named_scope("routed_experts"):
            out = dispatch.routed_experts(self.runtime, c, flat, routing.weights, routing.experts, w1, w3, w2)
        out = out.reshape(x.shape)
        if c.n_shared_experts:
            out = out + MLP(d, f * c.n_shared_experts, std, self.runtime, name="shared")(x)
        return out
