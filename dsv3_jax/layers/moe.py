"""DeepSeekMoE: shared experts plus fine-grained routed experts (V3 report s.2.1.2).

Routing: affinities s = sigmoid(x W) (V3) or softmax (V2). A per-expert bias b, moved by the
auxiliary-loss-free balancer, is added ONLY to choose experts; the gate weights are the unbiased
s of the chosen experts, normalised and times the routed scaling factor. Group-limited routing
first keeps the `topk_group` best of `n_group` expert groups.

Routed experts are stored stacked [E, ...]. Equal computations:
- `experts_dense`: every expert on every token, weighted by a [T, E] combine matrix. Wasteful in
  FLOPs, but one large einsum, which XLA:CPU runs faster than ragged_dot at small sizes.
- `experts_ragged`: dropless; sort the T*K assignments by expert and run grouped matmuls
  (`jax.lax.ragged_dot`). The path for accelerators and for many experts.
- `experts_windowed`: dropless; the sorted assignments, each expert's run of rows as 2-D matmuls
  over a fixed window plus overflow chunks, with a hand-written backward. The CPU training path.
- `experts_gather`: dropless; a loop over the few (token, expert) pairs of decoding.
With `ModelConfig.fp8`, whatever `moe_impl` says, `experts_fp8`: the sorted layout of `experts_ragged`
with FP8 grouped GEMMs (E4M3 inputs in Fprop, Dgrad and Wgrad; V3 report s.3.3).
"""
from __future__ import annotations

import functools
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


# `experts_windowed`: each expert's window is this much above the mean rows per expert (T*K/E),
# rounded up to a multiple of WINDOW_ALIGN rows; rows past an expert's window run in chunks of
# OVERFLOW_CHUNK. With loads near balance (the bias balancer's goal) the overflow is a few chunks.
WINDOW_SLACK = 1.125
WINDOW_ALIGN = 32
OVERFLOW_CHUNK = 64


class _Windows(NamedTuple):
    starts: jax.Array  # [E] first sorted row of each expert
    ends: jax.Array  # [E] one past its last row
    chunk_owner: jax.Array  # [C] expert of each overflow chunk (C: a static bound)
    chunk_start: jax.Array  # [C] its first row
    num_chunks: jax.Array  # () how many of the C are real


def _windows(sizes: jax.Array, cap: int, chunk: int, n: int) -> _Windows:
    """Expert e owns sorted rows [starts[e], ends[e]); its first `cap` rows form its window, the
    rest are cut into overflow chunks of `chunk` rows (at most n/chunk + E of them)."""
    e = sizes.shape[0]
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    per_expert = -(-jnp.maximum(sizes - cap, 0) // chunk)
    last = jnp.cumsum(per_expert)
    i = jnp.arange(-(-n // chunk) + e)
    owner = jnp.minimum(jnp.searchsorted(last, i, side="right"), e - 1)
    first = starts[owner] + cap + (i - (last - per_expert)[owner]) * chunk
    return _Windows(starts, ends, owner, first, last[-1])


def _swiglu(x, w13, w2):
    """One expert on a window of rows: (output, the gate/up pre-activations kept for backward)."""
    gu = x @ w13
    g, u = jnp.split(gu, 2, axis=-1)
    return (jax.nn.silu(g) * u) @ w2, gu


def _swiglu_bwd(x, gu, dy, w13, w2):
    """Gradients of `_swiglu` for a window whose dy is zero on rows it does not own."""
    g, u = jnp.split(gu, 2, axis=-1)
    sig = jax.nn.sigmoid(g)
    silu = g * sig
    dh = dy @ w2.T
    dgu = jnp.concatenate([dh * u * sig * (1 + g * (1 - sig)), dh * silu], axis=-1)
    return dgu @ w13.T, x.T @ dgu, (silu * u).T @ dy


def _rows(a, start, size):
    return jax.lax.dynamic_slice_in_dim(a, start, size)


def _put(a, rows, start, keep=None):
    """Write `rows` at `start`; where `keep` is False, leave what was there."""
    if keep is not None:
        rows = jnp.where(keep, rows, _rows(a, start, rows.shape[0]))
    return jax.lax.dynamic_update_slice_in_dim(a, rows, start, 0)


def _overflow(w: _Windows, j, size):
    """Expert, first row and [size, 1] mask of its own rows for overflow chunk j."""
    o, at = w.chunk_owner[j], w.chunk_start[j]
    return o, at, (at + jnp.arange(size) < w.ends[o])[:, None]


def _windowed_fwd(xs, w13, w2, sizes, cap, chunk):
    """Windows are written in expert order: the rows of a window past its expert's end belong to
    later experts, whose windows start there and overwrite them (the last one's fall in the padding
    rows). Overflow chunks come after and keep the rows they do not own."""
    w = _windows(sizes, cap, chunk, xs.shape[0] - cap)
    ys = jnp.zeros((xs.shape[0], w2.shape[2]), xs.dtype)
    gus = jnp.zeros((xs.shape[0], w13.shape[2]), xs.dtype)
    for e in range(w13.shape[0]):
        y, gu = _swiglu(_rows(xs, w.starts[e], cap), w13[e], w2[e])
        ys, gus = _put(ys, y, w.starts[e]), _put(gus, gu, w.starts[e])

    def body(carry):
        j, ys, gus = carry
        o, at, own = _overflow(w, j, chunk)
        y, gu = _swiglu(_rows(xs, at, chunk), w13[o], w2[o])
        return j + 1, _put(ys, y, at, own), _put(gus, gu, at, own)

    _, ys, gus = jax.lax.while_loop(lambda c: c[0] < w.num_chunks, body, (0, ys, gus))
    return ys, gus


def _windowed_bwd(xs, gus, dys, w13, w2, sizes, cap, chunk):
    w = _windows(sizes, cap, chunk, xs.shape[0] - cap)
    dxs = jnp.zeros_like(xs)
    dw13, dw2 = [], []
    for e in range(w13.shape[0]):
        s = w.starts[e]
        dy = jnp.where((jnp.arange(cap) < sizes[e])[:, None], _rows(dys, s, cap), 0)
        dx, d13, d2 = _swiglu_bwd(_rows(xs, s, cap), _rows(gus, s, cap), dy, w13[e], w2[e])
        dxs = _put(dxs, dx, s)
        dw13.append(d13)
        dw2.append(d2)

    def body(carry):
        j, dxs, dw13, dw2 = carry
        o, at, own = _overflow(w, j, chunk)
        dy = jnp.where(own, _rows(dys, at, chunk), 0)
        dx, d13, d2 = _swiglu_bwd(_rows(xs, at, chunk), _rows(gus, at, chunk), dy, w13[o], w2[o])
        return j + 1, _put(dxs, dx, at, own), dw13.at[o].add(d13), dw2.at[o].add(d2)

    init = (0, dxs, jnp.stack(dw13), jnp.stack(dw2))
    return jax.lax.while_loop(lambda c: c[0] < w.num_chunks, body, init)[1:]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _windowed_ffn(xs, w13, w2, sizes, cap, chunk):
    return _windowed_fwd(xs, w13, w2, sizes, cap, chunk)[0]


def _windowed_ffn_fwd(xs, w13, w2, sizes, cap, chunk):
    ys, gus = _windowed_fwd(xs, w13, w2, sizes, cap, chunk)
    return ys, (xs, gus, w13, w2, sizes)


def _windowed_ffn_bwd(cap, chunk, res, dys):
    xs, gus, w13, w2, sizes = res
    return (*_windowed_bwd(xs, gus, dys, w13, w2, sizes, cap, chunk), None)


_windowed_ffn.defvjp(_windowed_ffn_fwd, _windowed_ffn_bwd)


def _vary_like(w, like):
    """Inside shard_map, `w` cast to vary over the mesh axes `like` varies over: the hand-written
    backward's weight gradients vary with the tokens, and this cast's own transpose sums them."""
    missing = jax.typeof(like).manual_axis_type.varying - jax.typeof(w).manual_axis_type.varying
    return jax.lax.pcast(w, tuple(sorted(missing)), to="varying") if missing else w


def window_rows(num_assignments: int, num_experts: int) -> int:
    mean = WINDOW_SLACK * num_assignments / num_experts
    return max(WINDOW_ALIGN, -(-int(mean) // WINDOW_ALIGN) * WINDOW_ALIGN)


def experts_windowed(x, routing: Routing, w1, w3, w2):
    """Dropless like `experts_ragged`, as 2-D matmuls, which XLA:CPU runs ~2x faster than batched
    ones of the same size (docs/PERFORMANCE.md): the assignments sorted by expert, each expert
    runs its SwiGLU on a fixed window of rows from its first (rows past its end are masked out),
    and the rows past its window in a loop of overflow chunks (as many as the loads need). The
    backward is written out (custom_vjp) so that it is 2-D matmuls over the same windows too.
    Same contract as experts_dense."""
    t, k = routing.experts.shape
    e, dt = w1.shape[0], x.dtype
    cap = window_rows(t * k, e)
    chunk = min(OVERFLOW_CHUNK, cap)
    order, token, sizes = _sorted_layout(routing, e)
    # `cap` rows past the end (copies of token 0; their outputs get gate 0 and are dropped), so that
    # no window or chunk is clamped back into the array.
    xs = x[jnp.concatenate([token, jnp.zeros((cap,), token.dtype)])]
    w13 = _vary_like(jnp.concatenate([w1, w3], axis=-1).astype(dt), xs)
    y = _windowed_ffn(xs, w13, _vary_like(jnp.asarray(w2, dt), xs), sizes, cap, chunk)
    gates = jnp.concatenate([routing.weights.reshape(-1)[order].astype(dt), jnp.zeros((cap,), dt)])
    to = jnp.concatenate([token, jnp.full((cap,), t, token.dtype)])  # out of range: dropped
    return jnp.zeros_like(x).at[to].add(y * gates[:, None], mode="drop")


# "fp8" is chosen by ModelConfig.fp8, not by moe_impl (it changes the numbers, not only the speed).
EXPERTS = {"dense": experts_dense, "gather": experts_gather, "ragged": experts_ragged, "windowed": experts_windowed,
           "fp8": experts_fp8}


# experts_gather up to this many (token, expert) pairs per expert on average: measured on `small`
# decoding (E=16, K=4), gather beat dense by 7-10% at 16, 32 and 64 pairs.
GATHER_MAX_PAIRS_PER_EXPERT = 4
# Below about a cache's worth of expert weights, reading all experts costs little and dense's one
# batched matmul beats gather's many small ones (per-operation overhead dominates: the tiny preset).
GATHER_MIN_BYTES = 1 << 20
# Dense below this many tokens. Measured on `small` (E=16, K=4): a prefill (forward only) of 128,
# 256 and 512 tokens ran 1.6x, 1.6x and 1.07x faster dense (windowed pays fixed costs: the sort,
# slicing 48 expert matrices), 1024 tokens 1.16x faster windowed; a training step's fwd+bwd is
# faster windowed from 64 tokens (dense's backward runs every expert on every token).
DENSE_MAX_TOKENS = 512


def resolve_moe_impl(cfg: ModelConfig, num_tokens: int | None = None) -> str:
    """'auto': on accelerators, ragged grouped matmuls. On CPU (XLA:CPU's ragged_dot is slow:
    docs/PERFORMANCE.md): for a few assignments (T*K <= 4E: decoding) on experts big enough that the
    step is bound by reading weights, gather the chosen experts; below DENSE_MAX_TOKENS tokens
    (decoding batches, short prompts) dense's one batched matmul; above it (training, prefill, and
    expert parallelism, where `num_tokens` is not known here) the windowed 2-D matmuls."""
    if cfg.moe_impl != "auto":
        return cfg.moe_impl
    if jax.default_backend() != "cpu":
        return "ragged"
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    weight_bytes = 3 * e * cfg.hidden_size * cfg.moe_intermediate_size * 4
    few = num_tokens is not None and num_tokens * k <= GATHER_MAX_PAIRS_PER_EXPERT * e
    if few and weight_bytes >= GATHER_MIN_BYTES:
        return "gather"
    if num_tokens is not None and num_tokens < DENSE_MAX_TOKENS:
        return "dense"
    return "windowed"


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
