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

A packed FP8 cache (`fp8_cache`: uint8 rows of E4M3 tiles, their float32 scales and the bfloat16 rope values)
is copied as bytes into the ring and dequantised by the consumers into one tile in q's dtype, which the same
wgmma then read: each consumer converts the latent columns of its own P.V half (E4M3 -> float32 x the tile's
scale), warpgroup 0 also the rope values, and warpgroup 1 signals its half with half_ready. A cache slot is
free once converted, so the converted tile is one of the `num_stages` blocks in flight and the ring holds the
others (at least one): at V3's shape (C=512, R=64, block_s=64, 2 stages) that is Q 72 KiB + one packed block
41 KiB + the converted block 72 KiB + the rope selection matrix 16 KiB + P 8 KiB + alpha/l and reduction
scratch 2 KiB = 211 KiB of Hopper's 227 (`smem_bytes`; a second packed slot would need 252). Register values
have no byte-level reinterpretation in Mosaic GPU (bitcasts keep the width) and shared memory has none the
interpreter runs, so the float32 scales are put together from their bytes with shifts and a masked row sum,
and each bfloat16 rope value from its byte pair by one exact wgmma against a 0/1/256 selection matrix (bytes
are exact in bfloat16, low + 256 * high in the float32 accumulator; `mosaic_tpu` does the same on the MXU).

Unlike the pallas_call kernel, cache rows past a sequence's end inside its last block are not zeroed before
P.V: they must hold finite values (a zero-initialised cache does, in either format).

MlaDecodeConfig(interpret=...) runs it in jax's GPU interpreter on the CPU; `interpreter_shims` lists what is
traced differently there (K^T through scratch SMEM, P.V into a fresh accumulator, no layout casts, the rope
selection's register operand through scratch SMEM). Everything else (TMA copies, barriers, the shared P tile,
the FP8 dequantisation, wgmma for both products, masking and softmax) is the same code.
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
from pallas_kernels.mla_decode import fp8_cache, plan
from pallas_kernels.mla_decode.flash import finish, online_softmax, step_counts, visible
from pallas_kernels.quant import BLOCK

READS_FP8_CACHE = True

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
# A packed row's pieces are TMA-copied, and TMA needs global strides and box rows in whole 16 bytes: the row
# (C + C/32 + 2R bytes) and its C/32 scale bytes are for C a multiple of 512 (and even R); P.V halves of at most
# 256 columns (one wgmma's N) cap C at 512. So an FP8 cache is read at C = 512 only (V3's).
FP8_V_DIM = 4 * BLOCK
FP8_ROPE_CHUNK = 64  # rope values a selection wgmma assembles (K = 128 bytes, N = 64)
_TMA_BOX = 256  # elements a TMA copy takes along one dimension


def make_plan(q_shape, cache_shape, v_dim: int, config) -> plan.Plan:
    """One 64-row MMA per program: block_h x T query rows, padded to 64."""
    return plan.make_plan(q_shape, cache_shape, v_dim, config, row_cap=WGMMA_M, rows=lambda n: WGMMA_M)


def stages(layout: plan.Plan, config) -> int:
    return max(1, min(config.num_stages, layout.steps))


def ring_slots(num_stages: int, fp8: bool) -> int:
    """TMA ring slots: all the stages, or for an FP8 cache all but the converted tile (at least one)."""
    return max(1, num_stages - 1) if fp8 else num_stages


def smem_bytes(layout: plan.Plan, itemsize: int, num_stages: int, *, fp8: bool = False) -> int:
    """Q tile, the cache blocks (`num_stages` in the compute dtype; FP8: the packed ring and one converted tile
    and the rope selection matrix), the shared P tile, the float32 rows (alpha, l), reduction scratch and
    barriers, each buffer aligned as Mosaic GPU aligns scoped allocations."""
    align = lambda n: -(-n // MOSAIC_SMEM_ALIGN) * MOSAIC_SMEM_ALIGN
    bs, dv, dr = layout.block_s, layout.v_dim, layout.rope_dim
    widths = [dv] + ([dr] if dr else [])
    ring, tiles = ring_slots(num_stages, fp8), (1 if fp8 else num_stages)
    total = sum(align(WGMMA_M * w * itemsize) + align(tiles * bs * w * itemsize) for w in widths)
    total += align(WGMMA_M * bs * itemsize) + align(2 * WGMMA_M * 4) + align(MOSAIC_REDUCTION_SCRATCH)
    if not fp8:
        return total + 8 * (len(widths) * (1 + num_stages) + num_stages + 2)
    total += align(ring * bs * dv) + align(ring * bs * 4 * fp8_cache.tiles(dv))
    if dr:
        total += align(ring * bs * 2 * dr) + align(2 * FP8_ROPE_CHUNK * FP8_ROPE_CHUNK * itemsize)
    return total + 8 * (len(widths) + 2 * ring + 3)


def refusal(q_shape, cache_shape, dtype, v_dim: int, config) -> str | None:
    layout = make_plan(q_shape, cache_shape, v_dim, config)
    dv, dr = layout.v_dim, layout.rope_dim
    fp8 = jnp.dtype(dtype) == fp8_cache.FP8_CACHE_DTYPE
    if layout.block_h * layout.sq > WGMMA_M:
        return f"mosaic_gpu: block_h {layout.block_h} x Sq {layout.sq} query rows exceed one {WGMMA_M}-row MMA"
    if fp8:
        if dv != FP8_V_DIM or dr % FP8_ROPE_CHUNK or 2 * dr > _TMA_BOX:
            return (f"mosaic_gpu: an FP8 cache needs v_dim {FP8_V_DIM} (TMA copies whole 16-byte units of "
                    f"its rows and scales) and rope dims 0, 64 or 128, got v_dim {dv}, rope dims {dr}")
    elif jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"mosaic_gpu: q and cache must be bfloat16 or float16, got {jnp.dtype(dtype)}"
    elif dv % 128 or dv > 512 or dr % 64:
        return (f"mosaic_gpu: needs v_dim a multiple of 128 up to 512 and rope dims a multiple of 64, "
                f"got v_dim {dv}, rope dims {dr}")
    if layout.block_s % 64 or layout.block_s > 256:
        return f"mosaic_gpu: block_s must be a multiple of 64 up to 256, got {layout.block_s}"
    n = stages(layout, config)
    need = smem_bytes(layout, 2 if fp8 else jnp.dtype(dtype).itemsize, n, fp8=fp8)
    if need > SMEM_BYTES:
        packed = f", an FP8 cache: {ring_slots(n, fp8)} packed + 1 converted" if fp8 else ""
        return (f"mosaic_gpu: {need} bytes of shared memory needed (block_s {layout.block_s}, {n} stages{packed}), "
                f"more than {SMEM_BYTES}; lower block_s or num_stages")
    return None


# ------------------------------------------------------------------------------------------- the kernel


@dataclasses.dataclass(frozen=True)
class _Static:
    """What every CTA of one launch shares."""

    plan: plan.Plan
    scale2: float
    stages: int  # TMA ring slots
    dtype: object  # of q, P and the keys the wgmma read (an FP8 cache is dequantised to it)
    fp8: bool
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

    def tile_slot(self, slot):
        """Where the wgmma find ring slot `slot`'s keys: in the slot itself, or (FP8) in the one converted tile."""
        return 0 if self.fp8 else slot


class _Cta(NamedTuple):
    """This CTA's refs and indices."""

    q: object  # [B, HB, 64, D]
    pages: object  # [P, block_s, D] (FP8: uint8 [P, block_s, row bytes])
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


class _Packed(NamedTuple):
    """The FP8 ring (uint8) and what the dequantisation needs besides."""

    latent: object  # [stages, C/128, block_s, 128]: one TMA box per scale tile
    scales: object  # [stages, block_s, 4 C/128]
    rope: object  # [stages, block_s, 2 R] or None
    select: object  # [128, 64] in the compute dtype: byte pairs -> bits (`_rope_selection`), or None
    a_scratch: object  # [64, 128], interpreter only
    half_ready: object  # warpgroup 1 has converted its half of the block


class _Smem(NamedTuple):
    q: list  # per part [64, width]
    k: list  # per part [stages, block_s, width] (FP8: [1, block_s, width], the converted tile)
    p: object  # [64, block_s]
    stats: object  # [2, 64] f32: alpha and l of the current step
    kt: list  # per part [width, block_s], interpreter only
    q_bar: object
    k_bar: list  # per part [stages] (FP8: one, every copy of a slot arrives on it)
    free_bar: object
    p_ready: object
    p_free: object
    packed: object  # _Packed, or None for a cache in the compute dtype


_ROW_LAYOUT = plgpu.Layout.WGMMA.reduce(1)


def run(q_blocks, pages, table, lengths, layout: plan.Plan, scale2: float, out_dtype, *, config):
    """q_blocks [B, HB, 64, D] -> (o [B, NS, HB, 64, C], lse2 [B, NS, HB, 64])."""
    b, hb, rows, _ = q_blocks.shape
    ns, dv = layout.num_splits, layout.v_dim
    fp8 = pages.dtype == fp8_cache.FP8_CACHE_DTYPE
    # An FP8 cache lets q be any float: the wgmma take bfloat16 or float16, so others compute in bfloat16.
    if fp8 and q_blocks.dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        q_blocks = q_blocks.astype(jnp.bfloat16)
    interpret = backends.gpu_interpret_params(config.interpret, detect_races=False)
    n = stages(layout, config)
    static = _Static(plan=layout, scale2=scale2, stages=ring_slots(n, fp8), dtype=q_blocks.dtype, fp8=fp8,
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


def _packed_scratch(static: _Static) -> _Packed:
    """The FP8 ring and its helpers; rope buffers only if the rows have rope values."""
    bs, n, dv, dr = static.plan.block_s, static.stages, static.plan.v_dim, static.plan.rope_dim
    t = fp8_cache.tiles(dv)
    return _Packed(
        latent=plgpu.SMEM((n, t, bs, BLOCK), jnp.uint8),
        scales=plgpu.SMEM((n, bs, 4 * t), jnp.uint8),
        rope=plgpu.SMEM((n, bs, 2 * dr), jnp.uint8) if dr else None,
        select=plgpu.SMEM((2 * FP8_ROPE_CHUNK, FP8_ROPE_CHUNK), static.dtype, transforms=static.tiles) if dr else None,
        a_scratch=static.shims.scratch((WGMMA_M, 2 * FP8_ROPE_CHUNK), static.dtype) if dr else None,
        half_ready=plgpu.Barrier(),
    )


def _scratch(static: _Static) -> list:
    """The shared memory and barriers of one CTA, in `_Smem` order."""
    dtype, tiles, bs, n, widths = static.dtype, static.tiles, static.plan.block_s, static.stages, static.parts
    k_slots = 1 if static.fp8 else n
    if static.fp8:  # every TMA copy of a slot (latent tiles, scales, rope bytes) arrives on one barrier
        copies = fp8_cache.tiles(static.plan.v_dim) + 1 + (1 if static.plan.rope_dim else 0)
        k_bar = [plgpu.Barrier(num_arrivals=copies, num_barriers=n)]
    else:
        k_bar = [plgpu.Barrier(num_barriers=n) for _ in widths]
    return [
        [plgpu.SMEM((WGMMA_M, width), dtype, transforms=tiles) for _, width in widths],
        [plgpu.SMEM((k_slots, bs, width), dtype, transforms=tiles) for _, width in widths],
        plgpu.SMEM((WGMMA_M, bs), dtype, transforms=tiles),
        plgpu.SMEM((2, WGMMA_M), jnp.float32),
        [static.shims.scratch((width, bs), dtype) for _, width in widths],
        plgpu.Barrier(num_barriers=len(widths)),
        k_bar,
        plgpu.Barrier(num_arrivals=2, num_barriers=n),
        plgpu.Barrier(),
        plgpu.Barrier(),
        _packed_scratch(static) if static.fp8 else None,
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
    if not static.fp8:
        for i, (lo, width) in enumerate(static.parts):
            plgpu.copy_gmem_to_smem(cta.pages.at[page, :, pl.ds(lo, width)], smem.k[i].at[slot], smem.k_bar[i].at[slot])
        return
    # Bytes as stored; a TMA box is at most 256 bytes wide, so the latent goes one 128-value scale tile a copy.
    packed, bar, dv = smem.packed, smem.k_bar[0].at[slot], static.plan.v_dim
    at_scales, at_rope = fp8_cache.offsets(dv)
    for t in range(fp8_cache.tiles(dv)):
        plgpu.copy_gmem_to_smem(cta.pages.at[page, :, pl.ds(t * BLOCK, BLOCK)], packed.latent.at[slot, t], bar)
    plgpu.copy_gmem_to_smem(cta.pages.at[page, :, pl.ds(at_scales, at_rope - at_scales)], packed.scales.at[slot], bar)
    if packed.rope is not None:
        plgpu.copy_gmem_to_smem(cta.pages.at[page, :, pl.ds(at_rope, 2 * static.plan.rope_dim)],
                                packed.rope.at[slot], bar)


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


# ------------------------------------------------------------------- FP8: dequantising a packed block


def _rope_selection(static: _Static, smem: _Smem):
    """Write the [128, 64] matrix that takes 128 bytes (64 little-endian byte pairs, as exact small floats) to
    the 64 values low + 256 * high: one 1 and one 256 per column."""
    shape, layout = smem.packed.select.shape, plgpu.Layout.WGMMA
    byte, value = static.shims.iota(shape, 0, layout), static.shims.iota(shape, 1, layout)
    select = jnp.where(byte == 2 * value, 1.0, jnp.where(byte == 2 * value + 1, 256.0, 0.0))
    smem.packed.select[...] = select.astype(static.dtype)
    plgpu.commit_smem()  # for this warpgroup's wgmma (the async proxy)


def _tile_scales(static: _Static, scales_ref, tiles):
    """{tile: its float32 scale per row, [64] in the WGMMA row layout} for 64 rows of scale bytes [64, 4 T].
    Each float is put together from its 4 little-endian bytes: shifted into place, masked to its tile, and summed
    along the row (the bytes' bits are disjoint, so the sum is their OR)."""
    layout = plgpu.Layout.WGMMA
    raw = static.shims.load(scales_ref, layout).astype(jnp.uint32)
    column = static.shims.iota(raw.shape, 1, layout)
    words = raw << ((column & 3) * 8).astype(jnp.uint32)
    out = {}
    for t in tiles:
        bits = jnp.where((column >= 4 * t) & (column < 4 * t + 4), words, jnp.zeros_like(words)).sum(axis=1)
        out[t] = lax.bitcast_convert_type(bits, jnp.float32)
    return out


def _dequantize_latent(static: _Static, smem: _Smem, slot, rows, tiles):
    """Latent columns of `tiles` (128 values each), rows `rows` (64) of ring slot `slot`, into the converted tile:
    E4M3 codes -> float32 x the row's tile scale -> the compute dtype; 64 columns at a time (registers)."""
    packed, layout, chunk = smem.packed, plgpu.Layout.WGMMA, BLOCK // 2
    scales = _tile_scales(static, packed.scales.at[slot, rows], tiles)
    for t in tiles:
        scale = lax.broadcast_in_dim(scales[t], (WGMMA_M, chunk), [0])
        for c in range(0, BLOCK, chunk):
            codes = static.shims.load(packed.latent.at[slot, t, rows, pl.ds(c, chunk)], layout, optimized=False)
            values = lax.bitcast_convert_type(codes, jnp.float8_e4m3fn).astype(jnp.float32) * scale
            smem.k[0].at[0, rows, pl.ds(t * BLOCK + c, chunk)][...] = values.astype(static.dtype)


def _dequantize_rope(static: _Static, smem: _Smem, slot, rows):
    """Rope values of rows `rows` (64) of ring slot `slot` into the converted tile, 64 at a time: their 128 bytes
    (exact in the compute dtype) times the selection matrix give each value's 16 bits, exactly, in float32."""
    packed, layout, width = smem.packed, plgpu.Layout.WGMMA, FP8_ROPE_CHUNK
    for c in range(0, static.plan.rope_dim, width):
        pairs = static.shims.load(packed.rope.at[slot, rows, pl.ds(2 * c, 2 * width)], layout, optimized=False)
        pairs = pairs.astype(jnp.float32).astype(static.dtype)

        def select(acc_ref, pairs=pairs):
            static.shims.wgmma_registers(acc_ref, pairs, packed.select, packed.a_scratch)
            return acc_ref[...]

        halves = pl.run_scoped(select, plgpu.ACC((WGMMA_M, width), jnp.float32))
        bits = halves.astype(jnp.int32) << 16  # a bfloat16 is the high half of a float32
        values = lax.bitcast_convert_type(bits, jnp.float32).astype(static.dtype)
        smem.k[1].at[0, rows, pl.ds(c, width)][...] = values


def _dequantize(static: _Static, smem: _Smem, slot, w: int):
    """Warpgroup w's share of packed block `slot`: the latent tiles of its P.V half, and (w = 0) the rope values.
    Made visible to the tensor cores before anyone is told."""
    per_half = fp8_cache.tiles(static.plan.v_dim) // 2
    tiles = range(w * per_half, (w + 1) * per_half)
    for r in range(0, static.plan.block_s, WGMMA_M):
        rows = pl.ds(r, WGMMA_M)
        _dequantize_latent(static, smem, slot, rows, tiles)
        if w == _SOFTMAX and static.plan.rope_dim:
            _dequantize_rope(static, smem, slot, rows)
    plgpu.commit_smem()


# ------------------------------------------------------------------- consumers (MMA and softmax)


def _scores(static: _Static, smem: _Smem, slot):
    """S = Q K^T for the block in `slot`, over the latent then the rope columns: [64, block_s] float32."""
    def mma(s_ref):
        for i in range(len(static.parts)):
            k_t = static.shims.transposed(smem.k[i].at[static.tile_slot(slot)], smem.kt[i])
            plgpu.wgmma(s_ref, smem.q[i], k_t)
        return s_ref[...]

    return pl.run_scoped(mma, plgpu.ACC((WGMMA_M, static.plan.block_s), jnp.float32)) * static.scale2


def _wait_block(static: _Static, cta: _Cta, smem: _Smem, t, slot, w: int):
    """Until warpgroup w may read step t's keys: the copies have landed, and for an FP8 cache the block is
    converted (this warpgroup's part by itself; warpgroup 0 reads warpgroup 1's half too)."""
    if not static.fp8:
        for i in range(len(static.parts) if w == _SOFTMAX else 1):  # warpgroup 1 reads only the values
            plgpu.barrier_wait(smem.k_bar[i].at[slot])
        return
    plgpu.barrier_wait(smem.k_bar[0].at[slot])
    _dequantize(static, smem, slot, w)
    if w == _VALUES:
        plgpu.barrier_arrive(smem.packed.half_ready)
    _release(static, cta, smem, t, slot)  # converted: the ring slot may be refilled
    if w == _SOFTMAX:
        plgpu.barrier_wait(smem.packed.half_ready)


def _softmax_step(static: _Static, cta: _Cta, smem: _Smem, t, carry, masked: bool):
    acc, m, denom = carry
    shims, bs = static.shims, static.plan.block_s
    slot = lax.rem(t, static.stages)
    _wait_block(static, cta, smem, t, slot, _SOFTMAX)
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
                               smem.k[0].at[static.tile_slot(slot), :, pl.ds(0, static.half)])
    if not static.fp8:
        _release(static, cta, smem, t, slot)
    return acc, m, denom


def _softmax_consumer(static: _Static, cta: _Cta, smem: _Smem):
    """Warpgroup 0: scores, online softmax, P published; P.V for the first half of the value dims."""
    plgpu.set_max_registers(_CONSUMER_REGISTERS, action="increase")
    if static.fp8 and static.plan.rope_dim:
        _rope_selection(static, smem)
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
    _wait_block(static, cta, smem, t, slot, _VALUES)
    plgpu.barrier_wait(smem.p_ready)
    alpha = shims.layout_cast(smem.stats.at[0][...], _ROW_LAYOUT)
    denom = shims.layout_cast(smem.stats.at[1][...], _ROW_LAYOUT)
    acc = shims.mma_accumulate(acc * lax.broadcast_in_dim(alpha, acc.shape, [0]), smem.p,
                               smem.k[0].at[static.tile_slot(slot), :, pl.ds(static.half, static.half)])
    pl.when(t + 1 < cta.n_steps)(lambda: plgpu.barrier_arrive(smem.p_free))
    if not static.fp8:
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
