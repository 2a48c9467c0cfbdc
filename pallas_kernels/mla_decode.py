"""MLA latent-attention decode (FlashMLA-like): absorbed queries against a shared latent cache.

DeepSeek-V2/V3 multi-head latent attention at decode time (V2 report s.2.1.2, "absorb" W_UK into the
query and W_UV into the output): every head's query has been moved into the latent space, so
q = [q_latent (C); q_rope (R)] and one cache row [c_kv (C); k_pe (R)] serves all H heads, as keys
over all C+R dims and, through its first `v_dim` (= C) dims, as values. That is multi-query
attention with head dim C+R = 576 and value dim C = 512, which is why the kernels batch heads (and
the Sq query positions) into the M dimension of one matrix product per cache block.

Letters: B batch, T query positions (Sq), S cache positions, H heads, C latent (v_dim), R rope dims.
Query t of a sequence of length L sits at position L - T + t and sees cache positions <= that
(positions >= L are never valid); a query with nothing to see returns zeros.

Flash-decoding: the cache is cut into `num_splits` contiguous splits of whole blocks of `block_s`
positions; each program runs an online softmax (float32, base 2) over its split for `block_h` heads
x T queries, and returns the split's normalised output and log-sum-exp; `_combine` merges splits
with log-sum-exp weights. Dense caches are viewed as pages of `block_s` rows with an identity
block table, so dense and paged decoding run the same kernels.

Backends: "interpret" and "triton" run `_pallas_kernel` through `pl.pallas_call`; "mosaic_gpu"
runs `_mosaic_kernel` (Hopper: TMA copies of cache blocks, wgmma with 64 query rows as M, a memory
warpgroup feeding two compute warpgroups that share P through shared memory, each owning half of the
value dims; MlaDecodeConfig(interpret=True) runs it in jax's Mosaic GPU interpreter on the CPU); "xla"
runs the plain-jnp references.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.backends import resolve_backend

PAGE_SIZE = 64  # cache rows per page in the paged variant (FlashMLA's block size)
LOG2E = math.log2(math.e)
WGMMA_M = 64  # rows of one Hopper warpgroup MMA; the Mosaic kernel pads query rows to this
FALLBACK_SMS = 132  # H100/H200 SXM, used to size splits when the device does not say
SMEM_BYTES = 227 * 1024  # Hopper's shared memory per block
TRITON_MIN_ROWS = 16  # tl.dot needs M >= 16
MOSAIC_SMEM_ALIGN = 1024  # Mosaic GPU aligns every scoped shared-memory buffer to this
# Shared memory Mosaic GPU reserves for cross-warp reductions (default 2048). The kernel reduces only
# along WGMMA rows (within a warp), and the DeepSeek shape (C=512, R=64, block_s=64, 2 stages) needs
# the space: Q 72 KiB + 2 cache blocks 144 KiB + P 8 KiB + alpha/l 1 KiB = 225 KiB of Hopper's 227.
MOSAIC_REDUCTION_SCRATCH = 1024


@dataclasses.dataclass(frozen=True)
class MlaDecodeConfig:
    """Tuning knobs. None picks a default from the problem shape and backend.

    block_s: cache positions per step (the paged variant requires the page size, 64).
    num_splits: splits of the cache length (flash-decoding); None fills the device's SMs once.
    block_h: heads per program; each program handles block_h * Sq query rows.
    num_stages: pipeline depth (Mosaic GPU: cache blocks in flight in shared memory; Triton: num_stages).
    num_warps: Triton warps per program.
    interpret: backend "mosaic_gpu" only: run the Mosaic GPU kernel in jax's GPU interpreter (on the CPU,
        slowly; for tests) instead of compiling it. True, or a jax `InterpretGPUParams` (e.g. with
        detect_races=True) from jax._src.pallas.mosaic_gpu.interpret.params.
    """

    block_s: int = 64
    num_splits: int | None = None
    block_h: int | None = None
    num_stages: int = 2
    num_warps: int = 8
    interpret: object = False

    def __post_init__(self):
        for name in ("block_s", "num_splits", "block_h", "num_stages", "num_warps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"MlaDecodeConfig.{name} must be a positive int or None, got {value!r}")
        if not isinstance(self.interpret, bool) and type(self.interpret).__name__ != "InterpretGPUParams":
            raise ValueError(f"MlaDecodeConfig.interpret must be a bool or an InterpretGPUParams, "
                             f"got {self.interpret!r}")
        if self.block_s % 8:
            raise ValueError(f"MlaDecodeConfig.block_s must be a multiple of 8, got {self.block_s}")


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static layout of one call: how heads, queries and the cache are cut into programs."""

    batch: int
    sq: int
    heads: int
    dim: int  # C + R
    v_dim: int  # C
    block_s: int
    blocks: int  # cache blocks per sequence (block-table columns)
    block_h: int
    rows: int  # padded query rows per program (M)
    num_splits: int
    steps: int  # cache blocks per split

    @property
    def rope_dim(self) -> int:
        return self.dim - self.v_dim

    @property
    def head_blocks(self) -> int:
        return -(-self.heads // self.block_h)


# ----------------------------------------------------------------------------- references


def mla_decode_reference(q, cache, lengths, *, v_dim: int, softmax_scale: float):
    """Plain-jnp absorbed MLA decode: q [B, T, H, C+R], cache [B, S, C+R], lengths [B] -> [B, T, H, v_dim]."""
    _, sq, _, _ = q.shape
    s_len = cache.shape[1]
    qf, cf = q.astype(jnp.float32), cache.astype(jnp.float32)
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, s_len)
    pos = lengths[:, None] - sq + jnp.arange(sq)[None, :]  # [B, T]
    keys = jnp.arange(s_len)
    valid = keys[None, None, None, :] <= pos[:, :, None, None]  # [B, T, 1, S]
    scores = jnp.einsum("bthd,bsd->bths", qf, cf, precision=lax.Precision.HIGHEST) * softmax_scale
    scores = jnp.where(valid, scores, -jnp.inf)
    peak = scores.max(axis=-1, keepdims=True)
    probs = jnp.exp(scores - jnp.where(jnp.isfinite(peak), peak, 0.0))
    denom = probs.sum(axis=-1, keepdims=True)
    # Rows past a sequence's end may hold anything (even NaN); they must not reach the output.
    values = jnp.where((keys[None, :] < lengths[:, None])[..., None], cf[..., :v_dim], 0.0)
    out = jnp.einsum("bths,bsc->bthc", probs, values, precision=lax.Precision.HIGHEST)
    return (out / jnp.where(denom > 0, denom, 1.0)).astype(q.dtype)


def mla_decode_paged_reference(q, cache_pages, block_table, lengths, *, v_dim: int, softmax_scale: float):
    """Gather each sequence's pages into a dense cache, then `mla_decode_reference`."""
    num_pages, page, dim = cache_pages.shape
    table = jnp.clip(block_table.astype(jnp.int32), 0, num_pages - 1)
    cache = cache_pages[table].reshape(table.shape[0], table.shape[1] * page, dim)
    return mla_decode_reference(q, cache, lengths, v_dim=v_dim, softmax_scale=softmax_scale)


# ----------------------------------------------------------------------------- shared kernel math


def _step_counts(length, first_block, plan: _Plan):
    """Blocks this split must read, and how many of them every query row sees in full."""
    start = first_block * plan.block_s
    todo = jnp.maximum(length - start, 0)
    n_steps = jnp.minimum((todo + plan.block_s - 1) // plan.block_s, plan.steps)
    # Row t of T sees positions < length - (T - 1 - t); the smallest bound is length - T + 1.
    full = jnp.maximum(length - (plan.sq - 1) - start, 0) // plan.block_s
    return n_steps, jnp.minimum(full, n_steps)


def _visible(rows, keys, length, plan: _Plan):
    """rows, keys: int32 [M, block_s] iotas (keys already absolute). Rows are query-major: row = t * block_h + h."""
    for t in range(1, plan.sq):  # add T - 1 - t(row), with comparisons only (no integer division)
        keys = keys + jnp.where(rows < t * plan.block_h, 1, 0)
    return keys < length


def _online_softmax(s, m_prev, l_prev):
    """One flash step in base 2: s [M, N] scaled scores (-inf where hidden); running max m and sum l [M]."""
    m_new = jnp.maximum(m_prev, s.max(axis=1))
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a row with nothing visible yet stays at zero
    alpha = jnp.exp2(m_prev - m_use)
    p = jnp.exp2(s - lax.broadcast_in_dim(m_use, s.shape, [0]))
    return p, alpha, m_new, l_prev * alpha + p.sum(axis=1)


def _finish(acc, m, denom):
    """Normalised split output and its base-2 log-sum-exp (-inf for a split that saw nothing)."""
    empty = denom == 0.0
    safe = jnp.where(empty, 1.0, denom)
    out = acc / lax.broadcast_in_dim(safe, acc.shape, [0])
    return out, jnp.where(empty, -jnp.inf, m + jnp.log2(safe))


# ----------------------------------------------------------------------------- pallas_call kernel


def _pallas_kernel(table_ref, len_ref, q_ref, pages_ref, o_ref, lse_ref, *, plan: _Plan, scale2: float):
    """Program (b, head block, split). q_ref [M, C+R]; pages_ref [P, block_s, C+R]; o_ref [M, C]; lse_ref [M]."""
    b, split = pl.program_id(0), pl.program_id(2)
    length = len_ref[b]
    first = split * plan.steps
    n_steps, n_full = _step_counts(length, first, plan)
    dv, dr, bs, rows = plan.v_dim, plan.rope_dim, plan.block_s, plan.rows
    dot = functools.partial(lax.dot_general, preferred_element_type=jnp.float32)
    qk = (((1,), (1,)), ((), ()))  # [M, D] x [N, D] -> [M, N]
    q_lat = q_ref[:, pl.ds(0, dv)]
    q_pe = q_ref[:, pl.ds(dv, dr)] if dr else None
    row_iota = lax.broadcasted_iota(jnp.int32, (rows, bs), 0)
    key_iota = lax.broadcasted_iota(jnp.int32, (rows, bs), 1)
    key_vec = lax.broadcasted_iota(jnp.int32, (bs,), 0)

    def step(t, carry, masked):
        acc, m, denom = carry
        page = table_ref[b, first + t]
        k_lat = pages_ref[page, :, pl.ds(0, dv)]  # [block_s, C]; also the values
        s = dot(q_lat, k_lat, qk)
        if dr:
            s = s + dot(q_pe, pages_ref[page, :, pl.ds(dv, dr)], qk)
        s = s * scale2
        if masked:
            base = (first + t) * bs
            s = jnp.where(_visible(row_iota, key_iota + base, length, plan), s, -jnp.inf)
            # Rows past the end may be garbage (NaN): 0 * NaN would leak through the P.V product.
            k_lat = jnp.where((key_vec + base < length)[:, None], k_lat, jnp.zeros_like(k_lat))
        p, alpha, m, denom = _online_softmax(s, m, denom)
        acc = acc * alpha[:, None] + dot(p.astype(k_lat.dtype), k_lat, (((1,), (0,)), ((), ())))
        return acc, m, denom

    carry = (
        jnp.zeros((rows, dv), jnp.float32),
        jnp.full((rows,), -jnp.inf, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
    carry = lax.fori_loop(n_full, n_steps, functools.partial(step, masked=True), carry)
    out, lse2 = _finish(*carry)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse2


def _run_pallas(q_blocks, pages, table, lengths, plan: _Plan, scale2: float, out_dtype, backend: str, config):
    """q_blocks [B, HB, M, D] -> (o [B, NS, HB, M, C], lse2 [B, NS, HB, M])."""
    b, hb, rows, dim = q_blocks.shape
    ns, dv = plan.num_splits, plan.v_dim
    compiler_params = None
    if backend == "triton":
        from jax.experimental.pallas import triton as pltriton

        compiler_params = pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)
    whole = lambda x: pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)  # noqa: E731
    return pl.pallas_call(
        functools.partial(_pallas_kernel, plan=plan, scale2=scale2),
        grid=(b, hb, ns),
        in_specs=[
            whole(table),
            whole(lengths),
            pl.BlockSpec((None, None, rows, dim), lambda i, h, s: (i, h, 0, 0)),
            whole(pages),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, dv), lambda i, h, s: (i, s, h, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda i, h, s: (i, s, h, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, ns, hb, rows, dv), out_dtype),
            jax.ShapeDtypeStruct((b, ns, hb, rows), jnp.float32),
        ],
        interpret=backend == "interpret",
        compiler_params=compiler_params,
        name="mla_decode",
    )(table, lengths, q_blocks, pages)


# ----------------------------------------------------------------------------- Mosaic GPU kernel


def _mosaic_smem_bytes(plan: _Plan, itemsize: int, stages: int) -> int:
    """Q tile, `stages` cache blocks, the shared P tile, the float32 rows (alpha, l), reduction scratch and
    barriers, each buffer aligned as Mosaic GPU aligns scoped allocations."""
    align = lambda n: -(-n // MOSAIC_SMEM_ALIGN) * MOSAIC_SMEM_ALIGN  # noqa: E731
    widths = [plan.v_dim] + ([plan.rope_dim] if plan.rope_dim else [])
    tiles = sum(align(WGMMA_M * w * itemsize) + align(stages * plan.block_s * w * itemsize) for w in widths)
    shared = align(WGMMA_M * plan.block_s * itemsize) + align(2 * WGMMA_M * 4) + align(MOSAIC_REDUCTION_SCRATCH)
    barriers = len(widths) * (1 + stages) + stages + 2
    return tiles + shared + 8 * barriers


def _interpret_params(interpret):
    """MlaDecodeConfig.interpret -> the `interpret=` argument of `plgpu.kernel` (None: compile for the GPU)."""
    if not interpret:
        return None
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # jax's private GPU interpreter

    return interpret if isinstance(interpret, InterpretGPUParams) else InterpretGPUParams()


def _mosaic_kernel(q_ref, pages_ref, table_ref, len_ref, o_ref, lse_ref, *, plan: _Plan, scale2: float, stages: int,
                   interpret: bool):
    """CTA (head block, split, b); warpgroup 0 forms scores and softmax, warpgroups 0 and 1 share P.V, 2 copies.

    q_ref [B, HB, 64, D]; pages_ref [P, block_s, D]; table_ref [B, blocks]; len_ref [B];
    o_ref [B, NS, HB, 64, C]; lse_ref [B, NS, HB, 64]. As in FlashMLA, warpgroup 0 computes the scores
    (64 query rows x block_s keys, K = C then R, wgmma with the cache block as the transposed B operand)
    and the online softmax, then publishes P (bfloat16) and the row rescale factor alpha and running
    sum l through shared memory; warpgroup w accumulates P.V for value dims [w*C/2, (w+1)*C/2), so a
    [64, C/2] float32 accumulator fits its registers. Barriers: p_ready (P, alpha, l written) and p_free
    (warpgroup 1 has read them) hand the single P tile back and forth; free_bar returns a cache slot
    to the memory warpgroup once both compute warpgroups are done with it.

    Unlike the Pallas kernel, cache rows past a sequence's end inside its last block are not zeroed
    before P.V: they must hold finite values (a zero-initialised cache does).

    interpret=True builds the variant that jax's Mosaic GPU interpreter (CPU) can run: that interpreter
    has no transposed wgmma operand, no pre-initialised accumulator (pl.run_state) and no layout casts,
    so (only there) K^T is materialised in a scratch shared-memory tile, P.V goes into a fresh
    accumulator added to the carried one, and layout hints are dropped. Everything else (TMA copies,
    barriers, the shared P tile, wgmma for both products, masking and softmax) is the same code.
    """
    import jax.experimental.pallas.mosaic_gpu as plgpu

    dtype = q_ref.dtype
    dv, dr, bs = plan.v_dim, plan.rope_dim, plan.block_s
    half = dv // 2
    hb, split, b = lax.axis_index("hb"), lax.axis_index("split"), lax.axis_index("b")
    wg = lax.axis_index("wg")
    length = len_ref[b]
    first = split * plan.steps
    n_steps, n_full = _step_counts(length, first, plan)
    swizzle = 128
    tiles = (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle))
    parts = [(0, dv)] + ([(dv, dr)] if dr else [])  # latent and rope columns of a row
    row_layout = plgpu.Layout.WGMMA.reduce(1)

    def layout(x, new_layout):  # the interpreter has no lowering for layout casts (pure hints)
        return x if interpret else plgpu.layout_cast(x, new_layout)

    def iota(shape, dim):
        if interpret:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)

    def pv(acc, p_smem, v_smem):
        """acc + P.V on the tensor cores; on the GPU accumulated in place (the acc registers seed the wgmma)."""
        def mma(acc_ref):
            plgpu.wgmma(acc_ref, p_smem, v_smem)

        if not interpret:
            return pl.run_state(mma)(plgpu.ACC.init(acc))

        def fresh(acc_ref):
            mma(acc_ref)
            return acc_ref[...]

        return acc + pl.run_scoped(fresh, plgpu.ACC(acc.shape, jnp.float32))

    def scoped(q_smem, k_smem, p_smem, stats_smem, kt_smem, q_bar, k_bar, free_bar, p_ready, p_free):
        def copy_block(j, slot):
            page = table_ref[b, first + j]
            for i, (lo, width) in enumerate(parts):
                plgpu.copy_gmem_to_smem(
                    pages_ref.at[page, :, pl.ds(lo, width)], k_smem[i].at[slot], k_bar[i].at[slot]
                )

        @pl.when(wg == 2)
        def _memory_warpgroup():
            plgpu.set_max_registers(40, action="decrease")
            for i, (lo, width) in enumerate(parts):
                plgpu.copy_gmem_to_smem(q_ref.at[b, hb, :, pl.ds(lo, width)], q_smem[i], q_bar.at[i])
            for j in range(stages):
                pl.when(j < n_steps)(functools.partial(copy_block, j, j))

            def refill(j, _):
                slot = lax.rem(j, stages)
                plgpu.barrier_wait(free_bar.at[slot])  # both compute warpgroups are done with step j - stages
                copy_block(j, slot)

            lax.fori_loop(stages, jnp.maximum(n_steps, stages), refill, None)

        def release(t, slot):
            """Hand the slot back, but only if a refill will wait for it (every barrier phase gets observed)."""
            pl.when(t + stages < n_steps)(lambda: plgpu.barrier_arrive(free_bar.at[slot]))

        def finish(w, acc, m, denom):
            out, lse2 = _finish(acc, m, denom)
            o_ref.at[b, split, hb, :, pl.ds(w * half, half)][...] = out.astype(o_ref.dtype)
            return lse2

        @pl.when(wg == 0)
        def _softmax_warpgroup():
            plgpu.set_max_registers(232, action="increase")
            for i in range(len(parts)):
                plgpu.barrier_wait(q_bar.at[i])

            def step(t, carry, masked):
                acc, m, denom = carry
                slot = lax.rem(t, stages)
                for i in range(len(parts)):
                    plgpu.barrier_wait(k_bar[i].at[slot])

                def scores(s_ref):
                    for i in range(len(parts)):
                        k_block = k_smem[i].at[slot]
                        if interpret:  # K^T through shared memory (the GPU reads K transposed directly)
                            kt_smem[i][...] = k_block[...].T
                            k_t = kt_smem[i]
                        else:
                            k_t = plgpu.transpose_ref(k_block, (1, 0))
                        plgpu.wgmma(s_ref, q_smem[i], k_t)
                    return s_ref[...]

                s = pl.run_scoped(scores, plgpu.ACC((WGMMA_M, bs), jnp.float32)) * scale2
                if masked:  # iotas made here, not hoisted: two [64, block_s] int32 arrays cost 64 registers
                    rows = iota(s.shape, 0)
                    keys = iota(s.shape, 1) + (first + t) * bs
                    s = jnp.where(_visible(rows, keys, length, plan), s, -jnp.inf)
                p, alpha, m, denom = _online_softmax(s, m, denom)
                pl.when(t > 0)(lambda: plgpu.barrier_wait(p_free))  # warpgroup 1 is done with step t - 1
                p_smem[...] = p.astype(dtype)
                stats_smem.at[0][...] = alpha
                stats_smem.at[1][...] = denom
                plgpu.commit_smem()  # make P visible to the tensor cores (async proxy) of both warpgroups
                plgpu.barrier_arrive(p_ready)
                acc = pv(acc * lax.broadcast_in_dim(alpha, acc.shape, [0]), p_smem,
                         k_smem[0].at[slot, :, pl.ds(0, half)])
                release(t, slot)
                return acc, m, denom

            carry = (
                layout(jnp.zeros((WGMMA_M, half), jnp.float32), plgpu.Layout.WGMMA),
                layout(jnp.full((WGMMA_M,), -jnp.inf, jnp.float32), row_layout),
                layout(jnp.zeros((WGMMA_M,), jnp.float32), row_layout),
            )
            carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
            carry = lax.fori_loop(n_full, n_steps, functools.partial(step, masked=True), carry)
            lse_ref.at[b, split, hb][...] = finish(0, *carry)

        @pl.when(wg == 1)
        def _value_warpgroup():
            plgpu.set_max_registers(232, action="increase")

            def step(t, carry):
                acc, _ = carry
                slot = lax.rem(t, stages)
                plgpu.barrier_wait(k_bar[0].at[slot])  # this warpgroup reads only the latent part (the values)
                plgpu.barrier_wait(p_ready)
                alpha = layout(stats_smem.at[0][...], row_layout)
                denom = layout(stats_smem.at[1][...], row_layout)
                acc = pv(acc * lax.broadcast_in_dim(alpha, acc.shape, [0]), p_smem,
                         k_smem[0].at[slot, :, pl.ds(half, half)])
                pl.when(t + 1 < n_steps)(lambda: plgpu.barrier_arrive(p_free))
                release(t, slot)
                return acc, denom

            carry = (
                layout(jnp.zeros((WGMMA_M, half), jnp.float32), plgpu.Layout.WGMMA),
                layout(jnp.zeros((WGMMA_M,), jnp.float32), row_layout),
            )
            acc, denom = lax.fori_loop(0, n_steps, step, carry)
            finish(1, acc, denom, denom)

    pl.run_scoped(
        scoped,
        [plgpu.SMEM((WGMMA_M, width), dtype, transforms=tiles) for _, width in parts],
        [plgpu.SMEM((stages, bs, width), dtype, transforms=tiles) for _, width in parts],
        plgpu.SMEM((WGMMA_M, bs), dtype, transforms=tiles),
        plgpu.SMEM((2, WGMMA_M), jnp.float32),  # alpha and l of the current step, for warpgroup 1
        [plgpu.SMEM((width, bs), dtype) for _, width in parts] if interpret else [],
        plgpu.Barrier(num_barriers=len(parts)),
        [plgpu.Barrier(num_barriers=stages) for _ in parts],
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        plgpu.Barrier(),
        plgpu.Barrier(),
        collective_axes="wg",
    )


def _run_mosaic(q_blocks, pages, table, lengths, plan: _Plan, scale2: float, out_dtype, config):
    import jax.experimental.pallas.mosaic_gpu as plgpu

    b, hb, rows, _ = q_blocks.shape
    ns, dv = plan.num_splits, plan.v_dim
    stages = max(1, min(config.num_stages, plan.steps))
    interpret = _interpret_params(config.interpret)
    kernel = plgpu.kernel(
        functools.partial(_mosaic_kernel, plan=plan, scale2=scale2, stages=stages, interpret=interpret is not None),
        out_type=(
            jax.ShapeDtypeStruct((b, ns, hb, rows, dv), out_dtype),
            jax.ShapeDtypeStruct((b, ns, hb, rows), jnp.float32),
        ),
        # Head blocks vary fastest, so the CTAs reading one sequence's cache run together (L2 reuse).
        grid=(hb, ns, b),
        grid_names=("hb", "split", "b"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=MOSAIC_REDUCTION_SCRATCH),
        interpret=interpret,
    )
    return kernel(q_blocks, pages, table, lengths)


# ----------------------------------------------------------------------------- planning and glue


def _device_sms() -> int:
    return getattr(jax.devices()[0], "core_count", None) or FALLBACK_SMS


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _make_plan(q_shape, dim, v_dim, block_s, blocks, backend, config) -> _Plan:
    batch, sq, heads, _ = q_shape
    if backend == "mosaic_gpu":
        block_h = config.block_h or min(heads, max(1, WGMMA_M // sq))
        rows = WGMMA_M
        if block_h * sq > WGMMA_M:
            raise ValueError(f"mosaic_gpu: block_h {block_h} x Sq {sq} query rows exceed one {WGMMA_M}-row MMA")
    else:
        cap = 32 if backend == "triton" else WGMMA_M
        block_h = config.block_h or min(heads, max(1, cap // sq))
        rows = _next_pow2(max(TRITON_MIN_ROWS, block_h * sq))
    head_blocks = -(-heads // block_h)
    splits = config.num_splits or -(-_device_sms() // (batch * head_blocks))
    steps = -(-blocks // max(1, min(splits, blocks)))
    return _Plan(
        batch=batch, sq=sq, heads=heads, dim=dim, v_dim=v_dim, block_s=block_s, blocks=blocks,
        block_h=block_h, rows=rows, num_splits=-(-blocks // steps), steps=steps,
    )


def _to_blocks(q, plan: _Plan):
    """q [B, T, H, D] -> [B, HB, M, D]; within a program, rows are query-major (row = t * block_h + h)."""
    b, sq, h, d = q.shape
    hb, bh = plan.head_blocks, plan.block_h
    q = jnp.pad(q, ((0, 0), (0, 0), (0, hb * bh - h), (0, 0)))
    q = q.reshape(b, sq, hb, bh, d).transpose(0, 2, 1, 3, 4).reshape(b, hb, sq * bh, d)
    return jnp.pad(q, ((0, 0), (0, 0), (0, plan.rows - sq * bh), (0, 0)))


def _from_blocks(out, plan: _Plan):
    """[B, HB, M, C] -> [B, T, H, C]."""
    b, hb, _, c = out.shape
    out = out[:, :, : plan.sq * plan.block_h].reshape(b, hb, plan.sq, plan.block_h, c)
    return out.transpose(0, 2, 1, 3, 4).reshape(b, plan.sq, hb * plan.block_h, c)[:, :, : plan.heads]


def _combine(o, lse2):
    """Merge splits: o [B, NS, HB, M, C] (each split normalised), lse2 [B, NS, HB, M] base-2 log-sum-exp."""
    if o.shape[1] == 1:
        return o[:, 0]
    peak = lse2.max(axis=1, keepdims=True)
    weight = jnp.exp2(lse2 - jnp.where(jnp.isfinite(peak), peak, 0.0))  # 0 for empty splits
    total = weight.sum(axis=1)
    out = (weight[..., None] * o.astype(jnp.float32)).sum(axis=1)
    return out / jnp.where(total > 0, total, 1.0)[..., None]


def _check_backend_limits(plan: _Plan, dtype, backend: str, config) -> None:
    dv, dr = plan.v_dim, plan.rope_dim
    if backend == "triton":
        for name, value in (("v_dim", dv), ("rope dims (last dim - v_dim)", dr), ("block_s", plan.block_s)):
            if value and value != _next_pow2(value):
                raise ValueError(f"triton: {name} must be a power of two, got {value}")
    if backend == "mosaic_gpu":
        if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            raise ValueError(f"mosaic_gpu: q and cache must be bfloat16 or float16, got {jnp.dtype(dtype)}")
        if dv % 128 or dv > 512 or dr % 64:
            raise ValueError(f"mosaic_gpu: needs v_dim a multiple of 128 up to 512 and rope dims a multiple of 64, "
                             f"got v_dim {dv}, rope dims {dr}")
        if plan.block_s % 64 or plan.block_s > 256:
            raise ValueError(f"mosaic_gpu: block_s must be a multiple of 64 up to 256, got {plan.block_s}")
        stages = max(1, min(config.num_stages, plan.steps))
        need = _mosaic_smem_bytes(plan, jnp.dtype(dtype).itemsize, stages)
        if need > SMEM_BYTES:
            raise ValueError(f"mosaic_gpu: {need} bytes of shared memory needed (block_s {plan.block_s}, "
                             f"{stages} stages), more than {SMEM_BYTES}; lower block_s or num_stages")


def _decode_pages(q, pages, table, lengths, *, v_dim, softmax_scale, backend, config):
    """Shared path of both public functions: pages [P, block_s, D], table [B, blocks] -> [B, T, H, v_dim]."""
    num_pages, block_s, dim = pages.shape
    plan = _make_plan(q.shape, dim, v_dim, block_s, table.shape[1], backend, config)
    _check_backend_limits(plan, q.dtype, backend, config)
    table = jnp.clip(table.astype(jnp.int32), 0, num_pages - 1)
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, plan.blocks * block_s)
    if plan.num_splits * plan.steps > plan.blocks:  # the last split may run past the table: pad it
        table = jnp.pad(table, ((0, 0), (0, plan.num_splits * plan.steps - plan.blocks)))
    out_dtype = q.dtype if plan.num_splits == 1 else jnp.float32
    scale2 = float(softmax_scale) * LOG2E  # scores in base 2, so the kernels use exp2
    q_blocks = _to_blocks(q, plan)
    if backend == "mosaic_gpu":
        o, lse2 = _run_mosaic(q_blocks, pages, table, lengths, plan, scale2, out_dtype, config)
    else:
        o, lse2 = _run_pallas(q_blocks, pages, table, lengths, plan, scale2, out_dtype, backend, config)
    return _from_blocks(_combine(o, lse2), plan).astype(q.dtype)


# ----------------------------------------------------------------------------- validation and public API


def _shape_error(fn: str, message: str, **shapes) -> ValueError:
    listed = ", ".join(f"{k} {tuple(v)}" for k, v in shapes.items())
    return ValueError(f"{fn}: {message} ({listed})")


def _validate_common(fn, q, cache_like, lengths, v_dim, softmax_scale, backend, config):
    if q.ndim != 4:
        raise _shape_error(fn, "q must be [B, Sq, H, C+R]", q=q.shape)
    if cache_like.shape[-1] != q.shape[-1]:
        raise _shape_error(fn, f"cache last dim {cache_like.shape[-1]} != q last dim {q.shape[-1]}",
                           q=q.shape, cache=cache_like.shape)
    if lengths.shape != (q.shape[0],):
        raise _shape_error(fn, f"lengths must be [B] = [{q.shape[0]}]", lengths=lengths.shape, q=q.shape)
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"{fn}: lengths must be integers, got {lengths.dtype}")
    if not isinstance(v_dim, int) or not 0 < v_dim <= q.shape[-1]:
        raise ValueError(f"{fn}: v_dim must be an int in [1, C+R = {q.shape[-1]}], got {v_dim!r}")
    if not isinstance(softmax_scale, (int, float)) or not softmax_scale > 0:
        raise ValueError(f"{fn}: softmax_scale must be a positive Python number, got {softmax_scale!r}")
    for name, x in (("q", q), ("cache", cache_like)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{fn}: {name} must be floating point, got {x.dtype}")
    if q.dtype != cache_like.dtype:
        raise ValueError(f"{fn}: q dtype {q.dtype} != cache dtype {cache_like.dtype}")
    if config is not None and not isinstance(config, MlaDecodeConfig):
        raise ValueError(f"{fn}: config must be an MlaDecodeConfig or None, got {type(config).__name__}")
    backend, config = resolve_backend(backend), config or MlaDecodeConfig()
    if config.interpret is not False and backend != "mosaic_gpu":
        raise ValueError(f"{fn}: config.interpret applies to backend 'mosaic_gpu' only, got backend {backend!r}")
    return backend, config


@functools.partial(jax.jit, static_argnames=("v_dim", "softmax_scale", "backend", "config"))
def mla_decode(q, cache, lengths, *, v_dim: int, softmax_scale: float, backend: str = "auto",
               config: MlaDecodeConfig | None = None):
    """Absorbed MLA decode: q [B, Sq, H, C+R], cache [B, S, C+R], lengths [B] -> [B, Sq, H, v_dim] (q.dtype).

    Lengths are clipped to [0, S]. If S is not a multiple of config.block_s the cache is padded (a
    copy); keep S a multiple of block_s on the fast path.
    """
    backend, config = _validate_common("mla_decode", q, cache, lengths, v_dim, softmax_scale, backend, config)
    if cache.ndim != 3 or cache.shape[0] != q.shape[0]:
        raise _shape_error("mla_decode", "cache must be [B, S, C+R] with the batch of q", q=q.shape,
                           cache=cache.shape)
    if backend == "xla":
        return mla_decode_reference(q, cache, lengths, v_dim=v_dim, softmax_scale=softmax_scale)
    b, s_len, dim = cache.shape
    bs = config.block_s
    blocks = max(1, -(-s_len // bs))
    if blocks * bs != s_len:
        cache = jnp.pad(cache, ((0, 0), (0, blocks * bs - s_len), (0, 0)))
    pages = cache.reshape(b * blocks, bs, dim)
    table = jnp.arange(b * blocks, dtype=jnp.int32).reshape(b, blocks)
    return _decode_pages(q, pages, table, jnp.minimum(lengths, s_len), v_dim=v_dim,
                         softmax_scale=softmax_scale, backend=backend, config=config)


@functools.partial(jax.jit, static_argnames=("v_dim", "softmax_scale", "backend", "config"))
def mla_decode_paged(q, cache_pages, block_table, lengths, *, v_dim: int, softmax_scale: float,
                     backend: str = "auto", config: MlaDecodeConfig | None = None):
    """Paged absorbed MLA decode: cache_pages [P, 64, C+R]; block_table [B, max_blocks] maps a
    sequence's logical block j (positions 64j .. 64j+63) to a physical page. -> [B, Sq, H, v_dim].

    Table entries past a sequence's last block are never read; entries are clipped to [0, P).
    """
    fn = "mla_decode_paged"
    backend, config = _validate_common(fn, q, cache_pages, lengths, v_dim, softmax_scale, backend, config)
    if cache_pages.ndim != 3 or cache_pages.shape[1] != PAGE_SIZE:
        raise _shape_error(fn, f"cache_pages must be [P, {PAGE_SIZE}, C+R]", cache_pages=cache_pages.shape)
    if block_table.ndim != 2 or block_table.shape[0] != q.shape[0]:
        raise _shape_error(fn, "block_table must be [B, max_blocks]", block_table=block_table.shape, q=q.shape)
    if not jnp.issubdtype(block_table.dtype, jnp.integer):
        raise ValueError(f"{fn}: block_table must be integers, got {block_table.dtype}")
    if config.block_s != PAGE_SIZE:
        raise ValueError(f"{fn}: config.block_s must equal the page size {PAGE_SIZE}, got {config.block_s}")
    if backend == "xla":
        return mla_decode_paged_reference(q, cache_pages, block_table, lengths, v_dim=v_dim,
                                          softmax_scale=softmax_scale)
    return _decode_pages(q, cache_pages, block_table, lengths, v_dim=v_dim, softmax_scale=softmax_scale,
                         backend=backend, config=config)
