"""Expert parallelism (EP): routed experts spread over a mesh axis, tokens moved by all-to-all.

DeepSeek-V3 trains with EP 64 (report s.3.2): each device holds E/n of the routed experts and
its own slice of the tokens; every (token, chosen expert) assignment is dispatched to the device
that holds the expert, computed there, and sent back to be combined with the gate weights. Here
that is one explicit `jax.shard_map` whose two collectives are written out:

  sender    x [Tl, D], routing [Tl, K] -> send buffer [n, A, D], A = Tl*K  --all_to_all-->
  receiver  [n, A, D] rows for its El = E/n local experts -> expert outputs [n, A, D]  --all_to_all-->
  sender    [n, A, D] -> per assignment gather -> sum over K with the gate weights -> [Tl, D]

What travels per device and direction: the activations [n, A, D] (FP8 E4M3 plus [n, A, D/128]
float32 scales with `fp8_dispatch`, as the paper dispatches; the combine then returns in bfloat16)
and, on dispatch only, the local expert id of every slot [n, A] int32 (-1: empty slot).

Dropless, so exact: the buffer for each destination holds A = Tl*K rows, the worst case where all
of a device's assignments choose experts on one device, so no assignment is ever dropped and the
result equals the local expert function run on one device. (`route` picks K distinct experts, so Tl*min(K, El)
rows would also do; Tl*K keeps any routing exact, repeated experts included.) The price is memory
and receiver FLOPs: send and receive buffers are n times the rows actually routed (n*Tl*K*D
elements each), and the receiver's expert matmuls run over all n*A slots, because shapes are
static. At DeepSeek-V3's scale (n = 64, Tl = 4096, K = 8, D = 7168, one byte per FP8 value) one
buffer would be ~15 GB. Capacity-limited EP (GShard and many trainers since) sizes the buffers
by a capacity factor over the mean load and drops the overflow; DeepSeek's DeepEP drops nothing
but exchanges counts first and sends only what is routed (a ragged all-to-all, which XLA:CPU
lacks). We favour exactness, which the tests check against the dense reference, including
adversarial routing.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels.quant import BLOCK, E4M3, E4M3_MAX, MIN_AMAX

# Mesh axes over which tokens are split, in the order the mesh lists them.
TOKEN_AXES = ("data", "fsdp", "expert")
EXPERT_AXIS = "expert"
# The experts' function: (x [T, D], gates [T, K], expert ids [T, K], w1, w3, w2) -> [T, D]
# (`dsv3_jax.ops.experts` holds the variants).
LocalExperts = Callable[..., jax.Array]


def expert_axis_size(mesh, axis: str = EXPERT_AXIS) -> int:
    """How many devices the experts are split over in `mesh` (1: no expert parallelism)."""
    return mesh.shape.get(axis, 1)


def default_token_axes(mesh, names: Sequence[str] = TOKEN_AXES) -> tuple[str, ...]:
    return tuple(a for a in mesh.axis_names if a in names)


# ---- FP8 rows: per-token 1x128 tiles (report s.3.3), for the dispatch -----------------------------
def quantize_rows(x: jax.Array, *, block: int = BLOCK):
    """x [..., D] -> (E4M3 [..., D], float32 scales [..., ceil(D/block)]); scale = amax / 448."""
    d = x.shape[-1]
    nb = -(-d // block)
    xp = jnp.pad(x.astype(jnp.float32), [(0, 0)] * (x.ndim - 1) + [(0, nb * block - d)])
    tiles = xp.reshape(*x.shape[:-1], nb, block)
    scale = jnp.maximum(jnp.abs(tiles).max(-1), MIN_AMAX) / E4M3_MAX
    q = jnp.clip(tiles / scale[..., None], -E4M3_MAX, E4M3_MAX).astype(E4M3)
    return q.reshape(xp.shape)[..., :d], scale


def dequantize_rows(q: jax.Array, scale: jax.Array, dtype=jnp.float32, *, block: int = BLOCK):
    """Inverse of `quantize_rows`."""
    d, nb = q.shape[-1], scale.shape[-1]
    if nb != -(-d // block):
        raise ValueError(f"dequantize_rows: rows of width {d} need {-(-d // block)} scales, got {nb}")
    full = jnp.repeat(scale.astype(jnp.float32), block, axis=-1)[..., :d]
    return (q.astype(jnp.float32) * full).astype(dtype)


def _all_to_all(x: jax.Array, axis: str) -> jax.Array:
    """[n, ...] -> [n, ...]: slot j goes to device j of `axis`; slot j of the result came from it."""
    return jax.lax.all_to_all(x, axis, 0, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _all_to_all_fp8(x: jax.Array, axis: str) -> jax.Array:
    q, scale = quantize_rows(x)
    return dequantize_rows(_all_to_all(q, axis), _all_to_all(scale, axis), x.dtype)


def _all_to_all_fp8_fwd(x, axis):
    return _all_to_all_fp8(x, axis), None


def _all_to_all_fp8_bwd(axis, _, g):
    # Straight-through: rounding to E4M3 is treated as identity, and the gradient returns in its
    # own precision (the all-to-all with split = concat = 0 is its own transpose).
    return (_all_to_all(g, axis),)


_all_to_all_fp8.defvjp(_all_to_all_fp8_fwd, _all_to_all_fp8_bwd)


# ---- the EP layer -------------------------------------------------------------------------------
def _layout(experts: jax.Array, num_local: int, n: int):
    """expert ids [Tl, K] -> per assignment: destination device, slot there, local expert id."""
    flat = experts.reshape(-1)
    dest, local = flat // num_local, flat % num_local
    # Slot = how many earlier assignments of this device go to the same destination.
    onehot = (dest[:, None] == jnp.arange(n)).astype(jnp.int32)
    slot = jnp.take_along_axis(jnp.cumsum(onehot, axis=0) - 1, dest[:, None], axis=1)[:, 0]
    return dest, slot, local


def _ep_body(x, gates, ids, w1, w3, w2, *, axis: str, n: int, fp8: bool, local: LocalExperts):
    """Per device: x [Tl, D], gates/ids [Tl, K] (global ids), w* [El, ...] -> [Tl, D]."""
    tl, k = ids.shape
    d, dt, num_local = x.shape[1], x.dtype, w1.shape[0]
    a = tl * k  # worst case per destination: every assignment of this device goes there
    with jax.named_scope("ep_layout"):
        dest, slot, local_id = _layout(ids, num_local, n)
        token = jnp.arange(a) // k
        send = jnp.zeros((n, a, d), dt).at[dest, slot].set(x[token])
        send_ids = jnp.full((n, a), -1, jnp.int32).at[dest, slot].set(local_id)
    with jax.named_scope("ep_dispatch"):
        recv = _all_to_all_fp8(send, axis) if fp8 else _all_to_all(send, axis)
        recv_ids = _all_to_all(send_ids, axis).reshape(-1, 1)
    with jax.named_scope("ep_experts"):
        # Each received slot is one assignment (K = 1) with gate 1, or 0 for an empty slot (its
        # output is zero). Gates are applied on the sender. Empty slots, most of the buffer, are
        # spread over the local experts, so that none of them gets a skewed load.
        valid = recv_ids >= 0
        spread = jnp.arange(recv_ids.shape[0])[:, None] % num_local
        y = local(recv.reshape(n * a, d), valid.astype(jnp.float32), jnp.where(valid, recv_ids, spread),
                  w1, w3, w2).reshape(n, a, d)
    with jax.named_scope("ep_combine"):
        back = _all_to_all(y.astype(jnp.bfloat16), axis).astype(dt) if fp8 else _all_to_all(y, axis)
        per_assignment = back[dest, slot].reshape(tl, k, d)
        return jnp.einsum("tkd,tk->td", per_assignment, gates.astype(dt))


# ---- the ragged exchange: only the routed rows travel (accelerators) ------------------------------
def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name: str) -> jax.Array:
    """`jax.lax.ragged_all_to_all`'s result built from all-gathers, for platforms that lack the collective
    (XLA:CPU): every device's operand and offsets gathered, each received slice copied where the sender
    says. Same values and gradients; n times the traffic. Tests run the ragged EP layout through it."""
    del recv_sizes  # implied by the senders' sizes
    me = jax.lax.axis_index(axis_name)
    operands = jax.lax.all_gather(operand, axis_name)  # [n, N, ...]
    starts = jax.lax.all_gather(input_offsets, axis_name)[:, me]  # what each source sends me: from,
    sizes = jax.lax.all_gather(send_sizes, axis_name)[:, me]  # how many,
    lands = jax.lax.all_gather(output_offsets, axis_name)[:, me]  # and where it lands here
    row = jnp.arange(output.shape[0])
    result = output
    for i in range(operands.shape[0]):
        inside = (row >= lands[i]) & (row < lands[i] + sizes[i])
        src = jnp.clip(starts[i] + row - lands[i], 0, operand.shape[0] - 1)
        mask = inside.reshape(-1, *([1] * (operand.ndim - 1)))
        result = jnp.where(mask, operands[i][src], result)
    return result


def _exclusive_cumsum(x: jax.Array, axis: int = -1) -> jax.Array:
    return jnp.cumsum(x, axis=axis) - x


def _ep_body_ragged(x, gates, ids, w1, w3, w2, *, axis: str, n: int, local: LocalExperts, exchange):
    """`_ep_body` with a ragged exchange (DeepEP's scheme): assignments sorted by expert, the per-destination
    counts exchanged first, then only the routed rows sent (`exchange` is jax.lax.ragged_all_to_all or its
    emulation). The receive buffer is still sized for the worst case (n x Tl x K rows, static shapes), but
    the links carry Tl x K rows a device each way, not n times that."""
    tl, k = ids.shape
    d, num_local = x.shape[1], w1.shape[0]
    a = tl * k
    with jax.named_scope("ep_layout"):
        flat = ids.reshape(-1)
        order = jnp.argsort(flat, stable=True)  # by destination, then by local expert there
        dest = flat[order] // num_local
        rows = x[order // k]
        send_sizes = jnp.sum(dest[:, None] == jnp.arange(n), axis=0).astype(jnp.int32)  # [n]
        table = jax.lax.all_gather(send_sizes, axis)  # [n sources, n destinations]
        me = jax.lax.axis_index(axis)
        input_offsets = _exclusive_cumsum(send_sizes)
        recv_sizes = table[:, me]
        # Where my rows land on each destination: after those of the sources before me.
        output_offsets = jnp.sum(jnp.where(jnp.arange(n)[:, None] < me, table, 0), axis=0).astype(jnp.int32)
        recv_offsets = _exclusive_cumsum(recv_sizes)  # where each source's rows start here
        # Where my returning rows sat in each source's sorted send buffer.
        back_offsets = _exclusive_cumsum(table, axis=1)[:, me]
    # The receive buffers vary over the token shards like the rows they receive: the collective's result
    # takes its buffer's type, and an invariant buffer would have every use of the result cast to varying,
    # whose backward sums a cotangent over the shards in every slice. No gradient flows into a buffer.
    varying = tuple(sorted(jax.typeof(x).mat.varying))
    buffer = lambda *shape_fill: jax.lax.stop_gradient(
        jax.lax.pcast(jnp.full(*shape_fill), varying, to="varying") if varying else jnp.full(*shape_fill))
    with jax.named_scope("ep_dispatch"):
        recv = exchange(rows, buffer((n * a, d), 0, x.dtype), input_offsets, send_sizes, output_offsets,
                        recv_sizes, axis_name=axis)
        recv_ids = exchange((flat[order] % num_local)[:, None], buffer((n * a, 1), -1, jnp.int32), input_offsets,
                            send_sizes, output_offsets, recv_sizes, axis_name=axis)
    with jax.named_scope("ep_experts"):
        valid = (jnp.arange(n * a) < jnp.sum(recv_sizes))[:, None]
        spread = jnp.arange(n * a)[:, None] % num_local
        y = local(recv, valid.astype(jnp.float32), jnp.where(valid, recv_ids, spread), w1, w3, w2)
    with jax.named_scope("ep_combine"):
        back = exchange(y, buffer((a, d), 0, y.dtype), recv_offsets, recv_sizes, back_offsets, send_sizes,
                        axis_name=axis)
        # A gather, not a scatter into zeros: zeros are the same on every device, and a scatter's
        # backward would sum their (unused) gradient over the token shards in every slice.
        per_assignment = back[jnp.argsort(order)].reshape(tl, k, d)
        return jnp.einsum("tkd,tk->td", per_assignment, gates.astype(x.dtype))


def in_token_chunks(fn, chunks: int, x, gates, ids) -> jax.Array:
    """fn(x, gates, ids) over `chunks` slices of the rows in turn, each slice recomputed for the backward:
    the same result, the buffers of one slice alive at a time. Row r goes to slice r % chunks, so
    contiguous rows split evenly."""
    if chunks <= 1:
        return fn(x, gates, ids)
    split = lambda a: a.reshape(a.shape[0] // chunks, chunks, *a.shape[1:]).swapaxes(0, 1)
    out = jax.lax.map(jax.checkpoint(lambda xs: fn(*xs)), (split(x), split(gates), split(ids)))
    return out.swapaxes(0, 1).reshape(x.shape)


def _chunked_body(x, gates, ids, w1, w3, w2, *, chunks: int, exchange, fp8: bool, **kw):
    """The EP body over `chunks` slices of this device's tokens. The loop runs inside the shard_map, so the
    expert weights cross its boundary once a layer: gathered once, their gradients summed once, not in
    every slice."""
    # The weights are the same on every token shard (invariant); used inside the slice loop, jax would
    # sum their gradients over those shards in every slice. Marked varying here, the sum happens once.
    # (A weight may be a pytree: 8-bit values and their scales, `ops.linear.Fp8Weight`; its leaves vary alike.)
    missing = tuple(sorted(set(jax.typeof(x).mat.varying) - set(jax.typeof(jax.tree.leaves(w1)[0]).mat.varying)))
    if missing and chunks > 1:
        w1, w3, w2 = jax.lax.pcast((w1, w3, w2), missing, to="varying")
    if exchange is None:
        body = lambda xc, gc, ic: _ep_body(xc, gc, ic, w1, w3, w2, fp8=fp8, **kw)
    else:
        body = lambda xc, gc, ic: _ep_body_ragged(xc, gc, ic, w1, w3, w2, exchange=exchange, **kw)
    return in_token_chunks(body, chunks, x, gates, ids)


def _pad_tokens(shards: int, *arrays):
    """Zero rows appended so that the token count divides by `shards` (zero gates: no effect)."""
    pad = -arrays[0].shape[0] % shards
    return tuple(jnp.pad(a, ((0, pad), (0, 0))) for a in arrays) if pad else arrays


def expert_parallel(x: jax.Array, gates: jax.Array, ids: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array,
                    *, mesh, local: LocalExperts, expert_axis: str = EXPERT_AXIS,
                    token_axes: Sequence[str] | None = None, fp8_dispatch: bool = False,
                    check_vma: bool = True, chunks: int = 1, exchange=None) -> jax.Array:
    """What `local(x, gates, ids, w1, w3, w2)` computes, with the experts split over `expert_axis` of
    `mesh` (a Mesh or AbstractMesh). x [T, D]; gates, ids [T, K]; w1, w3 [E, D, F]; w2 [E, F, D].

    Tokens and routing are split over `token_axes` (default: the mesh's data, fsdp and expert
    axes), which must include `expert_axis`: each expert-axis device dispatches its own tokens.
    T need not divide by their size: zero tokens with zero gates pad it, then are cut off.
    `check_vma` off for a local function whose collectives-free body jax's varying-axes check
    refuses (the FP8 grouped GEMM reference scans with an accumulator created unvarying).
    `chunks` > 1 sends each device's tokens in that many slices, one slice's buffers alive at a time
    (`in_token_chunks`); the device's token count must divide by it. `exchange`: None sends the padded
    dropless buffers by all-to-all (`_ep_body`, every platform); `jax.lax.ragged_all_to_all` (GPU, TPU) or
    `emulated_ragged_all_to_all` sends only the routed rows (`_ep_body_ragged`; FP8 dispatch is the
    padded path's).
    """
    if exchange is not None and fp8_dispatch:
        raise ValueError("expert_parallel: FP8 dispatch is sent by the padded all-to-all; pass exchange=None")
    token_axes = default_token_axes(mesh) if token_axes is None else tuple(token_axes)
    if expert_axis not in token_axes:
        raise ValueError(f"expert_parallel: token_axes {token_axes} must include the expert axis "
                         f"{expert_axis!r} (each expert-axis device dispatches its own tokens)")
    missing = [a for a in token_axes if a not in mesh.axis_names]
    if missing:
        raise ValueError(f"expert_parallel: axes {missing} are not in the mesh {mesh.axis_names}")
    n, e = mesh.shape[expert_axis], w1.shape[0]
    if e % n:
        raise ValueError(f"expert_parallel: {e} experts do not split over {n} devices of {expert_axis!r}")
    t = x.shape[0]
    shards = 1
    for a in token_axes:
        shards *= mesh.shape[a]
    x, gates, ids = _pad_tokens(shards, x, gates, ids.astype(jnp.int32))
    tok, ex = P(token_axes, None), P(expert_axis, None, None)
    if (x.shape[0] // shards) % chunks:
        raise ValueError(f"expert_parallel: {x.shape[0] // shards} tokens a device do not split into {chunks} chunks")
    body = functools.partial(_chunked_body, chunks=chunks, exchange=exchange, axis=expert_axis, n=n, fp8=fp8_dispatch,
                             local=local)
    out = jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, ex, ex, ex), out_specs=tok,
                        check_vma=check_vma)(x, gates, ids, w1, w3, w2)
    return out[:t]


def data_parallel(x: jax.Array, gates: jax.Array, ids: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array,
                  *, mesh, local: LocalExperts, check_vma: bool = True) -> jax.Array:
    """What `local(x, gates, ids, w1, w3, w2)` computes, each device running it on its own tokens (split
    over the mesh's data, fsdp and expert axes) with every expert's weights: for a local function the
    compiler cannot partition itself (a Pallas call). The weights enter whole (an FSDP gather, as the
    compiler would make for a matmul); their gradients are summed over the devices."""
    axes = tuple(a for a in default_token_axes(mesh) if mesh.shape[a] > 1)
    if not axes:
        return local(x, gates, ids, w1, w3, w2)
    t = x.shape[0]
    x, gates, ids = _pad_tokens(math.prod(mesh.shape[a] for a in axes), x, gates, ids.astype(jnp.int32))
    tok, whole = P(axes, None), P()
    out = jax.shard_map(local, mesh=mesh, in_specs=(tok, tok, tok, whole, whole, whole), out_specs=tok,
                        check_vma=check_vma)(x, gates, ids, w1, w3, w2)
    return out[:t]
