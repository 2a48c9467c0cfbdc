"""The routed experts' SwiGLU FFN over a routing: one signature, four dropless variants.

    fn(x [T, D], gates [T, K] float32, ids [T, K] int32, w1 [E, D, F], w3 [E, D, F], w2 [E, F, D]) -> [T, D]

y_t = sum_k gates[t, k] * SwiGLU_{ids[t, k]}(x_t). All variants compute this function (tests check
every one against `dense`, gradients included); `dispatch` picks one per platform and shape.
- `dense`: every expert on every token, weighted by a [T, E] combine matrix: FLOPs wasted, but one
  batched matmul (few, large operations).
- `ragged`: the T*K assignments sorted by expert, grouped matmuls; the grouped matmul is an argument
  (`jax.lax.ragged_dot`, or the FP8 grouped GEMMs: the FP8 path is this one with another matmul; with 8-bit
  weights, `ops.linear.Fp8Weight`s, the grouped weight-only FP8 GEMM, which takes them as they are).
- `windowed`: the sorted assignments, each expert's rows as 2-D matmuls over a fixed window plus
  overflow chunks, with a hand-written backward (2-D matmuls there too).
- `gather`: a loop over the few (token, expert) pairs of decoding, reading only the chosen experts.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dsv3_jax.ops.linear import GroupedMatmul, ragged_matmul
from dsv3_jax.ops.registry import Registry

ExpertsFn = Callable[..., jax.Array]
# The variants' names, declared once; dispatch and the runtime use these constants.
DENSE, GATHER, RAGGED, WINDOWED = "dense", "gather", "ragged", "windowed"
EXPERTS: Registry[ExpertsFn] = Registry("experts", reference=DENSE)


@EXPERTS.register(DENSE)
def experts_dense(x, gates, ids, w1, w3, w2):
    t, e = x.shape[0], w1.shape[0]
    combine = jnp.zeros((t, e), jnp.float32).at[jnp.arange(t)[:, None], ids].add(gates)
    dt = x.dtype
    # Batched over experts, the weights' leading axis: [E, D, F] is read as stored, where a
    # "td,edf->tef" contraction makes XLA re-lay every weight out on each call.
    xe = jnp.broadcast_to(x, (e, *x.shape))
    h = jax.nn.silu(jnp.einsum("etd,edf->etf", xe, w1.astype(dt))) * jnp.einsum("etd,edf->etf", xe, w3.astype(dt))
    h = h * combine.T.astype(dt)[..., None]
    return jnp.einsum("etf,efd->td", h, w2.astype(dt))


def _sorted_layout(ids: jax.Array, num_experts: int):
    """The T*K assignments sorted by expert: their order, source tokens and per-expert counts [E]."""
    k = ids.shape[1]
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return order, order // k, sizes


@EXPERTS.register(GATHER)
def experts_gather(x, gates, ids, w1, w3, w2):
    """The T*K pairs sorted by expert, each run as three matrix-vector products; an expert's weights
    are sliced out once per run of its pairs. Reads only the chosen experts, where dense reads all E:
    for decoding, where a step is bound by reading weights. A loop: one small program whatever T*K."""
    t, k = ids.shape
    dt = x.dtype
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    experts, token, weights = flat[order], order // k, gates.reshape(-1)[order].astype(dt)
    load = lambda e: tuple(jax.lax.dynamic_index_in_dim(m, e, keepdims=False).astype(dt) for m in (w1, w3, w2))

    def pair(i, carry):
        y, current, w = carry
        e = experts[i]
        w = jax.lax.cond(e != current, lambda: load(e), lambda: w)
        xi = jax.lax.dynamic_index_in_dim(x, token[i], keepdims=False)
        h = jax.nn.silu(xi @ w[0]) * (xi @ w[1])
        return y.at[token[i]].add(weights[i] * (h @ w[2])), e, w

    return jax.lax.fori_loop(0, t * k, pair, (jnp.zeros_like(x), experts[0], load(experts[0])))[0]


@EXPERTS.register(RAGGED)
def experts_ragged(x, gates, ids, w1, w3, w2, gmm: GroupedMatmul = ragged_matmul):
    """Grouped matmuls over the assignments sorted by expert; `gmm` runs them."""
    dt = x.dtype
    order, token, sizes = _sorted_layout(ids, w1.shape[0])
    xs = x[token]
    h = jax.nn.silu(gmm(xs, w1, sizes)) * gmm(xs, w3, sizes)
    y = gmm(h, w2, sizes) * gates.reshape(-1)[order].astype(dt)[:, None]
    return jnp.zeros_like(x).at[token].add(y)


# `windowed`: each expert's window is this much above the mean rows per expert (T*K/E), rounded up
# to a multiple of WINDOW_ALIGN rows; rows past an expert's window run in chunks of OVERFLOW_CHUNK.
# With loads near balance (the bias balancer's goal) the overflow is a few chunks.
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


@EXPERTS.register(WINDOWED)
def experts_windowed(x, gates, ids, w1, w3, w2):
    """The assignments sorted by expert; each expert runs its SwiGLU on a fixed window of rows from
    its first (rows past its end are masked out), and the rows past its window in a loop of overflow
    chunks (as many as the loads need). The backward is written out (custom_vjp) so that it is 2-D
    matmuls over the same windows too."""
    t, k = ids.shape
    e, dt = w1.shape[0], x.dtype
    cap = window_rows(t * k, e)
    chunk = min(OVERFLOW_CHUNK, cap)
    order, token, sizes = _sorted_layout(ids, e)
    # `cap` rows past the end (copies of token 0; their outputs get gate 0 and are dropped), so that
    # no window or chunk is clamped back into the array.
    xs = x[jnp.concatenate([token, jnp.zeros((cap,), token.dtype)])]
    w13 = _vary_like(jnp.concatenate([w1, w3], axis=-1).astype(dt), xs)
    y = _windowed_ffn(xs, w13, _vary_like(jnp.asarray(w2, dt), xs), sizes, cap, chunk)
    gate = jnp.concatenate([gates.reshape(-1)[order].astype(dt), jnp.zeros((cap,), dt)])
    to = jnp.concatenate([token, jnp.full((cap,), t, token.dtype)])  # out of range: dropped
    return jnp.zeros_like(x).at[to].add(y * gate[:, None], mode="drop")
