"""DeepSeekMoE: shared experts plus fine-grained routed experts (V3 report s.2.1.2).

Routing: affinities s = sigmoid(x W) (V3) or softmax (V2). A per-expert bias b, moved by the
auxiliary-loss-free balancer, is added ONLY to choose experts; the gate weights are the unbiased
s of the chosen experts, normalised and times the routed scaling factor. Group-limited routing
first keeps the `topk_group` best of `n_group` expert groups.

Routed experts are stored stacked [E, ...]. Three equal computations:
- `experts_dense`: every expert on every token, weighted by a [T, E] combine matrix. Wasteful in
  FLOPs, but one large einsum, which XLA:CPU runs faster than ragged_dot at small sizes.
- `experts_ragged`: dropless; sort the T*K assignments by expert and run grouped matmuls
  (`jax.lax.ragged_dot`). The path for accelerators and for many experts.
- `experts_blocked`: dropless; the sorted assignments padded per expert into fixed-size blocks,
  then one batched matmul over blocks. The CPU path.
With `ModelConfig.fp8`, whatever `moe_impl` says, `experts_fp8`: the sorted layout of `experts_ragged`
with FP8 grouped GEMMs (E4M3 inputs in Fprop, Dgrad and Wgrad; V3 report s.3.3).
"""
from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig
from dsv3_jax.layers.common import weight
from dsv3_jax.layers.linear import grouped_linear
from dsv3_jax.layers.mlp import MLP


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


def experts_dense(x, routing: Routing, w1, w3, w2):
    """x [T, D]; w1, w3 [E, D, F]; w2 [E, F, D] -> [T, D]."""
    t, e = x.shape[0], w1.shape[0]
    combine = jnp.zeros((t, e), jnp.float32).at[jnp.arange(t)[:, None], routing.experts].add(routing.weights)
    dt = x.dtype
    # Batched over experts, the weights' leading axis: XLA:CPU then reads [E, D, F] as stored,
    # where a "td,edf->tef" contraction re-lays every weight out on each call (2x slower decoding).
    xe = jnp.broadcast_to(x, (e, *x.shape))
    h = jax.nn.silu(jnp.einsum("etd,edf->etf", xe, w1.astype(dt))) * jnp.einsum("etd,edf->etf", xe, w3.astype(dt))
    h = h * combine.T.astype(dt)[..., None]
    return jnp.einsum("etf,efd->td", h, w2.astype(dt))


def _sorted_layout(routing: Routing, num_experts: int):
    """The T*K assignments sorted by expert: their order, source tokens and per-expert counts [E]."""
    k = routing.experts.shape[1]
    flat = routing.experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return order, order // k, sizes


def experts_gather(x, routing: Routing, w1, w3, w2):
    """Dropless, for a few tokens: the T*K (token, chosen expert) pairs sorted by expert, each run as
    three matrix-vector products; an expert's weights are sliced out once per run of its pairs and
    stay in cache for the rest of the run. Reads only the chosen experts, where dense reads all E:
    decoding, where the step is bound by reading weights, not by FLOPs (and XLA:CPU's small-M
    matmuls run far below its matrix-vector speed). A loop over pairs: one small program whatever
    T*K. Same contract as experts_dense."""
    t, k = routing.experts.shape
    dt = x.dtype
    flat = routing.experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    experts, token, weights = flat[order], order // k, routing.weights.reshape(-1)[order].astype(dt)
    load = lambda e: tuple(jax.lax.dynamic_index_in_dim(m, e, keepdims=False).astype(dt) for m in (w1, w3, w2))

    def pair(i, carry):
        y, current, w = carry
        e = experts[i]
        w = jax.lax.cond(e != current, lambda: load(e), lambda: w)
        xi = jax.lax.dynamic_index_in_dim(x, token[i], keepdims=False)
        h = jax.nn.silu(xi @ w[0]) * (xi @ w[1])
        return y.at[token[i]].add(weights[i] * (h @ w[2])), e, w

    return jax.lax.fori_loop(0, t * k, pair, (jnp.zeros_like(x), experts[0], load(experts[0])))[0]


def experts_ragged(x, routing: Routing, w1, w3, w2):
    """Dropless grouped matmuls over assignments sorted by expert; same contract as experts_dense."""
    dt = x.dtype
    order, token, sizes = _sorted_layout(routing, w1.shape[0])
    xs = x[token]
    h = jax.nn.silu(jax.lax.ragged_dot(xs, w1.astype(dt), sizes)) * jax.lax.ragged_dot(xs, w3.astype(dt), sizes)
    y = jax.lax.ragged_dot(h, w2.astype(dt), sizes)
    y = y * routing.weights.reshape(-1)[order].astype(dt)[:, None]
    return jnp.zeros_like(x).at[token].add(y)


def experts_fp8(x, routing: Routing, w1, w3, w2):
    """`experts_ragged` with FP8 grouped GEMMs: E4M3 inputs in Fprop, Dgrad and Wgrad, 1x128 activation
    tiles, 128x128 blocks per expert weight (V3 report s.3.3). Same contract as experts_dense."""
    dt = x.dtype
    order, token, sizes = _sorted_layout(routing, w1.shape[0])
    xs = x[token]
    h = jax.nn.silu(grouped_linear(xs, w1, sizes)) * grouped_linear(xs, w3, sizes)
    y = grouped_linear(h, w2, sizes)
    y = y * routing.weights.reshape(-1)[order].astype(dt)[:, None]
    return jnp.zeros_like(x).at[token].add(y)


def _padded_layout(flat: jax.Array, num_experts: int, block: int):
    """Where each assignment (sorted by expert) lands when every expert's group is padded to a
    multiple of `block`; and which expert owns each block. Static sizes: at most n/block + E blocks."""
    n = flat.shape[0]
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=num_experts)
    padded = -(-sizes // block) * block
    starts, pstarts = jnp.cumsum(sizes) - sizes, jnp.cumsum(padded) - padded
    owner = flat[order]
    dest = pstarts[owner] + jnp.arange(n) - starts[owner]
    num_blocks = -(-n // block) + num_experts
    block_expert = jnp.searchsorted(jnp.cumsum(padded), jnp.arange(num_blocks) * block, side="right")
    return order, dest, jnp.minimum(block_expert, num_experts - 1), num_blocks


def experts_blocked(x, routing: Routing, w1, w3, w2, block: int = 128):
    """Dropless like `experts_ragged`, but as batched matmuls over fixed-size blocks of assignments,
    each block owned by one expert (whose weights it gathers). Runs fast where ragged_dot does not
    (XLA:CPU): the FLOPs are those of the top-k experts plus at most one padded block per expert."""
    t, k = routing.experts.shape
    d, dt = x.shape[1], x.dtype
    order, dest, owner, num_blocks = _padded_layout(routing.experts.reshape(-1), w1.shape[0], block)
    token = order // k
    xb = jnp.zeros((num_blocks * block, d), dt).at[dest].set(x[token]).reshape(num_blocks, block, d)
    # Gate and up projections as one matmul of twice the width: fewer, larger batched matmuls.
    g13 = jnp.concatenate([w1, w3], axis=-1).astype(dt)[owner]
    gate_up = jnp.einsum("nbd,ndf->nbf", xb, g13)
    f = w1.shape[-1]
    h = jax.nn.silu(gate_up[..., :f]) * gate_up[..., f:]
    y = jnp.einsum("nbf,nfd->nbd", h, w2.astype(dt)[owner]).reshape(num_blocks * block, d)[dest]
    y = y * routing.weights.reshape(-1)[order].astype(dt)[:, None]
    return jnp.zeros_like(x).at[token].add(y)


# "fp8" is chosen by ModelConfig.fp8, not by moe_impl (it changes the numbers, not only the speed).
EXPERTS = {"dense": experts_dense, "gather": experts_gather, "ragged": experts_ragged, "blocked": experts_blocked,
           "fp8": experts_fp8}


# experts_gather up to this many (token, expert) pairs per expert on average: measured on `small`
# decoding (E=16, K=4), gather beat dense by 7-10% at 16, 32 and 64 pairs.
GATHER_MAX_PAIRS_PER_EXPERT = 4
# Below about a cache's worth of expert weights, reading all experts costs little and dense's one
# batched matmul beats gather's many small ones (per-operation overhead dominates: the tiny preset).
GATHER_MIN_BYTES = 1 << 20


def resolve_moe_impl(cfg: ModelConfig, num_tokens: int | None = None, block: int = 128) -> str:
    """'auto': on accelerators, ragged grouped matmuls. On CPU (XLA:CPU's ragged_dot is slow:
    docs/PERFORMANCE.md): for a few assignments (T*K <= 4E: decoding) on experts big enough that the
    step is bound by reading weights, gather the chosen experts; otherwise whichever of
    dense and blocked does fewer FLOPs for `num_tokens`: dense runs T*E expert rows, blocked T*K
    plus up to one padded block per expert, so dense wins below about block*E/(E-K) tokens
    (decoding batches), blocked above it (training, prefill)."""
    if cfg.moe_impl != "auto":
        return cfg.moe_impl
    if jax.default_backend() != "cpu":
        return "ragged"
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    weight_bytes = 3 * e * cfg.hidden_size * cfg.moe_intermediate_size * 4
    few = num_tokens is not None and num_tokens * k <= GATHER_MAX_PAIRS_PER_EXPERT * e
    if few and weight_bytes >= GATHER_MIN_BYTES:
        return "gather"
    if num_tokens is not None and num_tokens * (e - k) < block * e:
        return "dense"
    return "blocked"


class MoE(nn.Module):
    cfg: ModelConfig

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
            # Callers turn on expert parallelism by setting a mesh with an "expert" axis
            # (`with jax.set_mesh(mesh):`); the result is the same function either way.
            mesh = jax.sharding.get_abstract_mesh()
            if mesh.shape.get("expert", 1) > 1:
                from dsv3_jax.parallel.ep import moe_expert_parallel  # ep imports this module

                local = "fp8" if c.fp8 else resolve_moe_impl(c)
                out = moe_expert_parallel(flat, routing, w1, w3, w2, mesh=mesh, local_impl=local,
                                          fp8_dispatch=c.ep_fp8_dispatch)
            else:
                impl = "fp8" if c.fp8 else resolve_moe_impl(c, flat.shape[0])
                out = EXPERTS[impl](flat, routing, w1, w3, w2)
            out = out.reshape(x.shape)
        if c.n_shared_experts:
            out = out + MLP(d, f * c.n_shared_experts, std, c.fp8, name="shared")(x)
        return out
