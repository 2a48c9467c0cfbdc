"""Backend "mosaic_gpu": MLA decode as a Hopper kernel in Pallas' Mosaic GPU dialect (FlashMLA's design).

CTA (head block, split, b), three warpgroups. The producer (warpgroup 2) TMA-copies the CTA's 64 query rows
once and the split's cache blocks into a ring of `stages` SMEM slots. Consumer warpgroup 0 computes the
scores (64 query rows x block_s keys, K = C then R, wgmma with the cache block as the transposed B
operand) and the online softmax, then publishes P (the cache dtype) and the row rescale factor alpha and
running sum l through shared memory; consumer w accumulates P.V for value dims [w*C/2, (w+1)*C/2), so a
[64, C/2] float32 accumulator fits its registers. Barriers: p_ready (P, alpha, l written) and p_free
(warpgroup 1 has read them) hand the single P tile back and forth; free_bar returns a cache slot to the
producer once both consumers are done with it. The epilogue normalises each half and writes it with its
log-sum-exp.

Unlike the pallas_call kernel, cache rows past a sequence's end inside its last block are not zeroed before
P.V: they must hold finite values (a zero-initialised cache does).

MlaDecodeConfig(interpret=...) runs it in jax's GPU interpreter on the CPU; `interpreter_shims` lists what is
traced differently there (K^T through scratch SMEM, P.V into a fresh accumulator, no layout casts).
Everything else (TMA copies, barriers, the shared P tile, wgmma for both products, masking and softmax) is
the same code.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import backends
from pallas_kernels.interpreter_shims import MosaicShims
from pallas_kernels.mla_decode import plan
from pallas_kernels.mla_decode.flash import finish, online_softmax, step_counts, visible

WGMMA_M = 64  # rows of one Hopper warpgroup MMA; query rows are padded to this
SMEM_BYTES = 227 * 1024  # Hopper's shared memory per block
MOSAIC_SMEM_ALIGN = 1024  # Mosaic GPU aligns every scoped shared-memory buffer to this
# Shared memory Mosaic GPU reserves for cross-warp reductions (default 2048). The kernel reduces only
# along WGMMA rows (within a warp), and the DeepSeek shape (C=512, R=64, block_s=64, 2 stages) needs
# the space: Q 72 KiB + 2 cache blocks 144 KiB + P 8 KiB + alpha/l 1 KiB = 225 KiB of Hopper's 227.
MOSAIC_REDUCTION_SCRATCH = 1024
_PRODUCER_REGISTERS = 40  # the producer only issues copies; the consumers take the registers it gives up
_CONSUMER_REGISTERS = 232
_PRODUCER, _SOFTMAX, _VALUES = 2, 0, 1  # warpgroup indices


def make_plan(q_shape, cache_shape, v_dim: int, config) -> plan.Plan:
    """One 64-row MMA per program: block_h x T query rows, padded to 64."""
    return plan.make_plan(q_shape, cache_shape, v_dim, config, row_cap=WGMMA_M, rows=lambda n: WGMMA_M)


def stages(layout: plan.Plan, config) -> int:
    return max(1, min(config.num_stages, layout.steps))


def smem_bytes(layout: plan.Plan, itemsize: int, num_stages: int) -> int:
    """Q tile, `num_stages` cache blocks, the shared P tile, the float32 rows (alpha, l), reduction scratch
    and barriers, each buffer aligned as Mosaic GPU aligns scoped allocations."""
    align = lambda n: -(-n // MOSAIC_SMEM_ALIGN) * MOSAIC_SMEM_ALIGN
    widths = [layout.v_dim] + ([layout.rope_dim] if layout.rope_dim else [])
    tiles = sum(align(WGMMA_M * w * itemsize) + align(num_stages * layout.block_s * w * itemsize) for w in widths)
    shared = align(WGMMA_M * layout.block_s * itemsize) + align(2 * WGMMA_M * 4) + align(MOSAIC_REDUCTION_SCRATCH)
    barriers = len(widths) * (1 + num_stages) + num_stages + 2
    return tiles + shared + 8 * barriers


def refusal(q_shape, cache_shape, dtype, v_dim: int, config) -> str | None:
    if jnp.dtype(dtype) == jnp.dtype(jnp.uint8):
        # Its wgmma reads K straight from the TMA-copied shared-memory tile in q's dtype; an E4M3 block would
        # need a dequantising pass through registers into a second, bfloat16 tile, for which the 227 KiB are
        # already spent (Q 72 KiB + 2 cache stages 144 KiB at V3's shape).
        return ("mosaic_gpu: reads no packed FP8 cache (wgmma takes K from shared memory as stored; "
                "use backend 'triton', which dequantises each block)")
    layout = make_plan(q_shape, cache_shape, v_dim, config)
    dv, dr = layout.v_dim, layout.rope_dim
    if layout.block_h * layout.sq > WGMMA_M:
        return f"mosaic_gpu: block_h {layout.block_h} x Sq {layout.sq} query rows exceed one {WGMMA_M}-row MMA"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"mosaic_gpu: q and cache must be bfloat16 or float16, got {jnp.dtype(dtype)}"
    if dv % 128 or dv > 512 or dr % 64:
        return (f"mosaic_gpu: needs v_dim a multiple of 128 up to 512 and rope dims a multiple of 64, "
                f"got v_dim {dv}, rope dims {dr}")
    if layout.block_s % 64 or layout.block_s > 256:
        return f"mosaic_gpu: block_s must be a multiple of 64 up to 256, got {layout.block_s}"
    n = stages(layout, config)
    need = smem_bytes(layout, jnp.dtype(dtype).itemsize, n)
    if need > SMEM_BYTES:
        return (f"mosaic_gpu: {need} bytes of shared memory needed (block_s {layout.block_s}, {n} stages), "
                f"more than {SMEM_BYTES}; lower block_s or num_stages")
    return None


# ------------------------------------------------------------------------------------------- the kernel


@dataclasses.dataclass(frozen=True)
class _Static:
    """What every CTA of one launch shares."""

    plan: plan.Plan
    scale2: float
    stages: int
    dtype: object  # of q, the cache and P
    shims: MosaicShims

    @property
    def half(self) -> int:  # value dims per consumer warpgroup
        return self.plan.v_dim // 2

    @property
    def parts(self) -> tuple[tuple[int, int], ...]:  # (first column, width): latent and rope columns of a row
        dv, dr = self.plan.v_dim, self.plan.rope_dim
        return ((0, dv),) + (((dv, dr),) if dr else ())

    @property
    def tiles(self):
        swizzle = 128
        return plgpu.TilingTransform((8, swizzle // jnp.dtype(self.dtype).itemsize)), plgpu.SwizzleTransform(swizzle)


class _Cta(NamedTuple):
    """This CTA's refs and indices."""

    q: object  # [B, HB, 64, D]
    pages: object  # [P, block_s, D]
    table: object  # [B, blocks]
    out: object  # [B, NS, HB, 64, C]
    lse: object  # [B, NS, HB, 64]
    b: object
    hb: object
    split: object
    wg: object
    length: object
    first: object  # first cache block of the split
    n_steps: object
    n_full: object


class _Smem(NamedTuple):
    q: list  # per part [64, width]
    k: list  # per part [stages, block_s, width]
    p: object  # [64, block_s]
    stats: object  # [2, 64] f32: alpha and l of the current step
    kt: list  # per part [width, block_s], interpreter only
    q_bar: object
    k_bar: list
    free_bar: object
    p_ready: object
    p_free: object


_ROW_LAYOUT = plgpu.Layout.WGMMA.reduce(1)


def run(q_blocks, pages, table, lengths, layout: plan.Plan, scale2: float, out_dtype, *, config):
    """q_blocks [B, HB, 64, D] -> (o [B, NS, HB, 64, C], lse2 [B, NS, HB, 64])."""
    b, hb, rows, _ = q_blocks.shape
    ns, dv = layout.num_splits, layout.v_dim
    interpret = backends.gpu_interpret_params(config.interpret, detect_races=False)
    static = _Static(plan=layout, scale2=scale2, stages=stages(layout, config), dtype=q_blocks.dtype,
                     shims=MosaicShims(interpret=interpret is not None))
    kernel = plgpu.kernel(
        functools.partial(_kernel, static),
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


decode = functools.partial(plan.decode, make_plan=make_plan, run=run)


def _kernel(static: _Static, q_ref, pages_ref, table_ref, len_ref, o_ref, lse_ref):
    hb, split, b = lax.axis_index("hb"), lax.axis_index("split"), lax.axis_index("b")
    wg = lax.axis_index("wg")
    length = len_ref[b]
    first = split * static.plan.steps
    n_steps, n_full = step_counts(length, first, static.plan)
    cta = _Cta(q_ref, pages_ref, table_ref, o_ref, lse_ref, b, hb, split, wg, length, first, n_steps, n_full)
    pl.run_scoped(functools.partial(_warpgroups, static, cta), *_scratch(static), collective_axes="wg")


def _scratch(static: _Static) -> list:
    """The shared memory and barriers of one CTA, in `_Smem` order."""
    dtype, tiles, bs, n, widths = static.dtype, static.tiles, static.plan.block_s, static.stages, static.parts
    return [
        [plgpu.SMEM((WGMMA_M, width), dtype, transforms=tiles) for _, width in widths],
        [plgpu.SMEM((n, bs, width), dtype, transforms=tiles) for _, width in widths],
        plgpu.SMEM((WGMMA_M, bs), dtype, transforms=tiles),
        plgpu.SMEM((2, WGMMA_M), jnp.float32),
        [static.shims.scratch((width, bs), dtype) for _, width in widths],
        plgpu.Barrier(num_barriers=len(widths)),
        [plgpu.Barrier(num_barriers=n) for _ in widths],
        plgpu.Barrier(num_arrivals=2, num_barriers=n),
        plgpu.Barrier(),
        plgpu.Barrier(),
    ]


def _warpgroups(static: _Static, cta: _Cta, *refs):
    smem = _Smem(*refs)
    pl.when(cta.wg == _PRODUCER)(functools.partial(_producer, static, cta, smem))
    pl.when(cta.wg == _SOFTMAX)(functools.partial(_softmax_consumer, static, cta, smem))
    pl.when(cta.wg == _VALUES)(functools.partial(_value_consumer, static, cta, smem))


# ---------------------------------------------------------------------------- producer (TMA copies)


def _copy_block(static: _Static, cta: _Cta, smem: _Smem, j, slot):
    """Cache block j of the split (through the block table) into ring slot `slot`."""
    page = cta.table[cta.b, cta.first + j]
    for i, (lo, width) in enumerate(static.parts):
        plgpu.copy_gmem_to_smem(cta.pages.at[page, :, pl.ds(lo, width)], smem.k[i].at[slot], smem.k_bar[i].at[slot])


def _producer(static: _Static, cta: _Cta, smem: _Smem):
    plgpu.set_max_registers(_PRODUCER_REGISTERS, action="decrease")
    for i, (lo, width) in enumerate(static.parts):
        plgpu.copy_gmem_to_smem(cta.q.at[cta.b, cta.hb, :, pl.ds(lo, width)], smem.q[i], smem.q_bar.at[i])
    for j in range(static.stages):
        pl.when(j < cta.n_steps)(functools.partial(_copy_block, static, cta, smem, j, j))

    def refill(j, _):
        slot = lax.rem(j, static.stages)
        plgpu.barrier_wait(smem.free_bar.at[slot])  # both consumers are done with step j - stages
        _copy_block(static, cta, smem, j, slot)

    lax.fori_loop(static.stages, jnp.maximum(cta.n_steps, static.stages), refill, None)


def _release(static: _Static, cta: _Cta, smem: _Smem, t, slot):
    """Hand the slot back, but only if a refill will wait for it (every barrier phase gets observed)."""
    pl.when(t + static.stages < cta.n_steps)(lambda: plgpu.barrier_arrive(smem.free_bar.at[slot]))


# ------------------------------------------------------------------- consumers (MMA and softmax)


def _scores(static: _Static, smem: _Smem, slot):
    """S = Q K^T for the block in `slot`, over the latent then the rope columns: [64, block_s] float32."""
    def mma(s_ref):
        for i in range(len(static.parts)):
            k_t = static.shims.transposed(smem.k[i].at[slot], smem.kt[i])
            plgpu.wgmma(s_ref, smem.q[i], k_t)
        return s_ref[...]

    return pl.run_scoped(mma, plgpu.ACC((WGMMA_M, static.plan.block_s), jnp.float32)) * static.scale2


def _softmax_step(static: _Static, cta: _Cta, smem: _Smem, t, carry, masked: bool):
    acc, m, denom = carry
    shims, bs = static.shims, static.plan.block_s
    slot = lax.rem(t, static.stages)
    for i in range(len(static.parts)):
        plgpu.barrier_wait(smem.k_bar[i].at[slot])
    s = _scores(static, smem, slot)
    if masked:  # iotas made here, not hoisted: two [64, block_s] int32 arrays cost 64 registers
        rows = shims.iota(s.shape, 0, plgpu.Layout.WGMMA)
        keys = shims.iota(s.shape, 1, plgpu.Layout.WGMMA) + (cta.first + t) * bs
        s = jnp.where(visible(rows, keys, cta.length, static.plan), s, -jnp.inf)
    p, alpha, m, denom = online_softmax(s, m, denom)
    pl.when(t > 0)(lambda: plgpu.barrier_wait(smem.p_free))  # warpgroup 1 is done with step t - 1
    smem.p[...] = p.astype(static.dtype)
    smem.stats.at[0][...] = alpha
    smem.stats.at[1][...] = denom
    plgpu.commit_smem()  # make P visible to the tensor cores (async proxy) of both warpgroups
    plgpu.barrier_arrive(smem.p_ready)
    acc = shims.mma_accumulate(acc * lax.broadcast_in_dim(alpha, acc.shape, [0]), smem.p,
                               smem.k[0].at[slot, :, pl.ds(0, static.half)])
    _release(static, cta, smem, t, slot)
    return acc, m, denom


def _softmax_consumer(static: _Static, cta: _Cta, smem: _Smem):
    """Warpgroup 0: scores, online softmax, P published; P.V for the first half of the value dims."""
    plgpu.set_max_registers(_CONSUMER_REGISTERS, action="increase")
    for i in range(len(static.parts)):
        plgpu.barrier_wait(smem.q_bar.at[i])
    step = functools.partial(_softmax_step, static, cta, smem)
    carry = (
        static.shims.layout_cast(jnp.zeros((WGMMA_M, static.half), jnp.float32), plgpu.Layout.WGMMA),
        static.shims.layout_cast(jnp.full((WGMMA_M,), -jnp.inf, jnp.float32), _ROW_LAYOUT),
        static.shims.layout_cast(jnp.zeros((WGMMA_M,), jnp.float32), _ROW_LAYOUT),
    )
    carry = lax.fori_loop(0, cta.n_full, functools.partial(step, masked=False), carry)
    carry = lax.fori_loop(cta.n_full, cta.n_steps, functools.partial(step, masked=True), carry)
    cta.lse.at[cta.b, cta.split, cta.hb][...] = _epilogue(static, cta, 0, *carry)


def _value_step(static: _Static, cta: _Cta, smem: _Smem, t, carry):
    acc, _ = carry
    shims = static.shims
    slot = lax.rem(t, static.stages)
    plgpu.barrier_wait(smem.k_bar[0].at[slot])  # this warpgroup reads only the latent part (the values)
    plgpu.barrier_wait(smem.p_ready)
    alpha = shims.layout_cast(smem.stats.at[0][...], _ROW_LAYOUT)
    denom = shims.layout_cast(smem.stats.at[1][...], _ROW_LAYOUT)
    acc = shims.mma_accumulate(acc * lax.broadcast_in_dim(alpha, acc.shape, [0]), smem.p,
                               smem.k[0].at[slot, :, pl.ds(static.half, static.half)])
    pl.when(t + 1 < cta.n_steps)(lambda: plgpu.barrier_arrive(smem.p_free))
    _release(static, cta, smem, t, slot)
    return acc, denom


def _value_consumer(static: _Static, cta: _Cta, smem: _Smem):
    """Warpgroup 1: P.V for the second half of the value dims, with warpgroup 0's P, alpha and l."""
    plgpu.set_max_registers(_CONSUMER_REGISTERS, action="increase")
    carry = (
        static.shims.layout_cast(jnp.zeros((WGMMA_M, static.half), jnp.float32), plgpu.Layout.WGMMA),
        static.shims.layout_cast(jnp.zeros((WGMMA_M,), jnp.float32), _ROW_LAYOUT),
    )
    acc, denom = lax.fori_loop(0, cta.n_steps, functools.partial(_value_step, static, cta, smem), carry)
    _epilogue(static, cta, 1, acc, denom, denom)


# -------------------------------------------------------------------------------------------- epilogue


def _epilogue(static: _Static, cta: _Cta, w: int, acc, m, denom):
    """Write warpgroup w's normalised half of the split output; return the split's base-2 log-sum-exp."""
    out, lse2 = finish(acc, m, denom)
    cta.out.at[cta.b, cta.split, cta.hb, :, pl.ds(w * static.half, static.half)][...] = out.astype(cta.out.dtype)
    return lse2
