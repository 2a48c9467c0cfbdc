"""Backend "mosaic_tpu": MLA decode as a Pallas TPU (Mosaic) kernel, dense or paged, BF16 or packed FP8 cache.

Grid (b, head block, split, step). The block table and the lengths are scalar-prefetch operands (SMEM), so the
BlockSpec index map of the cache names the page of step `step` of the split, and Pallas' pipeline streams one
page a step into VMEM while the previous one is computed on. Steps past a sequence's end map to the page of its
last block again, and a page whose index does not change is not copied again, so they cost no HBM traffic.

A program keeps all block_h x T query rows of its head block (V3's 128 heads x 2 queries: one program a
sequence, each cache page read from HBM once) and runs the online softmax over its split in float32 VMEM scratch
(acc [M, C], running max and sum [M, 1]); the last step writes the split's normalised output and base-2
log-sum-exp, merged across splits by `plan.decode_pages`. Cache rows past a sequence's end inside its last
block are zeroed before P.V: they may hold anything, and 0 * NaN would leak.

An FP8 cache (`fp8_cache`, uint8 rows) is dequantised in VMEM: each 128-byte tile of E4M3 codes is bitcast to
float8_e4m3fn and times its float32 scale, whose 4 bytes are put together with integer shifts; the bfloat16 rope
values are interleaved byte pairs, separated with one exact 0/1/256 selection matmul (Mosaic has no strided lane
loads of 8-bit data). Keys are then in q's dtype, so both cache formats share the rest of the kernel.

MlaDecodeConfig(interpret=pltpu.InterpretParams()) runs the kernel in jax's TPU interpreter on the CPU.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import backends
from pallas_kernels.mla_decode import fp8_cache, plan, sparse
from pallas_kernels.mla_decode.flash import step_counts, visible

READS_FP8_CACHE = True

LANES = 128  # a vreg's lanes: the latent part of a row must be whole lane tiles (and FP8 scale tiles)
ROW_ALIGN = 16  # query rows are padded to a bfloat16 sublane tile
# Query rows (block_h x T) of one program by default: V3's 128 heads x 2 queries, so one program reads each
# cache page once per sequence (decode is bound by HBM reads, and a second head block would double them).
ROW_CAP = 256
# TensorCores one grid is spread over (v4 and v5p megacore; other chips run a device's grid on one core): the
# default number of splits fills them when batch x head blocks are fewer.
GRID_CORES = 2
# The smallest default scoped-VMEM limit of the generations (v5e, 16 MiB): a call whose buffers fit runs
# everywhere without raising vmem_limit_bytes.
VMEM_BYTES = 16 * 1024 * 1024
# Scalar prefetch lives in SMEM (1 MiB a core from v4 on); the table and lengths get at most half of it.
SMEM_TABLE_BYTES = 512 * 1024
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def make_plan(q_shape, cache_shape, v_dim: int, config) -> plan.Plan:
    """block_h x T rows up to ROW_CAP, padded to ROW_ALIGN; splits by default only to fill GRID_CORES."""
    pad = lambda n: -(-n // ROW_ALIGN) * ROW_ALIGN
    cut = functools.partial(plan.make_plan, q_shape, cache_shape, v_dim, row_cap=ROW_CAP, rows=pad)
    if config.num_splits:
        return cut(config)
    one = cut(dataclasses.replace(config, num_splits=1))
    return cut(dataclasses.replace(config, num_splits=-(-GRID_CORES // (one.batch * one.head_blocks))))


def _tile(rows: int, cols: int, itemsize: int) -> int:
    """VMEM bytes of a [rows, cols] buffer in Mosaic's (8 x 32 bits, 128) tiles."""
    sublanes = 8 * 4 // itemsize
    return -(-rows // sublanes) * sublanes * -(-cols // LANES) * LANES * itemsize


def vmem_bytes(layout: plan.Plan, page_width: int, page_itemsize: int, q_itemsize: int, out_itemsize: int) -> int:
    """VMEM of double-buffered q, page and output blocks and the float32 scratch, in whole tiles: a bound on
    what Mosaic reserves for the kernel (the compile tests read that from XLA and hold it to this)."""
    rows = layout.rows
    buffers = (_tile(rows, layout.dim, q_itemsize) + _tile(layout.block_s, page_width, page_itemsize)
               + _tile(rows, layout.v_dim, out_itemsize) + _tile(rows, 1, 4))
    return 2 * buffers + _tile(rows, layout.v_dim, 4) + 2 * _tile(rows, 1, 4)


def refusal(q_shape, cache_shape, dtype, v_dim: int, config) -> str | None:
    layout = make_plan(q_shape, cache_shape, v_dim, config)
    dtype = jnp.dtype(dtype)
    fp8 = dtype == fp8_cache.FP8_CACHE_DTYPE
    if not fp8 and dtype not in _DTYPES:
        return f"mosaic_tpu: q and cache must be float32 or bfloat16 (or a packed FP8 cache), got {dtype}"
    if layout.v_dim % LANES:
        return f"mosaic_tpu: v_dim must be a multiple of {LANES} (whole lane tiles), got {layout.v_dim}"
    sublanes = 8 * 4 // dtype.itemsize  # a page block must be whole sublane tiles of the cache dtype
    if layout.block_s % sublanes:
        return f"mosaic_tpu: block_s must be a multiple of {sublanes} for a {dtype} cache, got {layout.block_s}"
    table = 4 * (layout.batch * layout.num_splits * layout.steps + layout.batch)
    if table > SMEM_TABLE_BYTES:
        return (f"mosaic_tpu: the block table and lengths take {table} bytes of SMEM, more than {SMEM_TABLE_BYTES}; "
                f"raise block_s or cut the batch")
    # An FP8 cache computes in q's dtype, unknown here: count it at 4 bytes (the most it can be).
    q_item = 4 if fp8 else dtype.itemsize
    need = vmem_bytes(layout, cache_shape[-1], dtype.itemsize, q_item, 4)
    if need > VMEM_BYTES:
        return (f"mosaic_tpu: {need} bytes of VMEM needed (block_s {layout.block_s}, {layout.rows} query rows), "
                f"more than {VMEM_BYTES}; lower block_s or block_h")
    return None


# ------------------------------------------------------------------------------------------- the kernel


@dataclasses.dataclass(frozen=True)
class _Static:
    plan: plan.Plan
    scale2: float
    fp8: bool
    dtype: object  # of q and of the keys the kernel multiplies (an FP8 cache is dequantised to it)


def _fp8_scales(page_ref, static: _Static):
    """The float32 scale of each 128-value tile of the rows, [block_s, 1] each, from its 4 little-endian bytes."""
    at_scales, _ = fp8_cache.offsets(static.plan.v_dim)
    raw = page_ref[:, pl.ds(at_scales, 4 * fp8_cache.tiles(static.plan.v_dim))].astype(jnp.int32)
    scales = []
    for k in range(fp8_cache.tiles(static.plan.v_dim)):
        bits = raw[:, 4 * k : 4 * k + 1]
        for byte in range(1, 4):
            bits = bits | (raw[:, 4 * k + byte : 4 * k + byte + 1] << (8 * byte))
        scales.append(lax.bitcast_convert_type(bits, jnp.float32))
    return scales


def _fp8_rope(page_ref, static: _Static):
    """[block_s, R] bfloat16 rope values from their byte pairs (low byte first).

    A 0/1/256 matrix gathers each pair into low + 256 * high on the MXU: bytes are exact in bfloat16 and the
    products and sums are exact in its float32 accumulator, so the 16 bits come back unchanged.
    """
    dr = static.plan.rope_dim
    _, at_rope = fp8_cache.offsets(static.plan.v_dim)
    pairs = page_ref[:, pl.ds(at_rope, 2 * dr)].astype(jnp.int32).astype(jnp.float32).astype(jnp.bfloat16)
    byte = lax.broadcasted_iota(jnp.int32, (2 * dr, dr), 0)
    value = lax.broadcasted_iota(jnp.int32, (2 * dr, dr), 1)
    gather = jnp.where(byte == 2 * value, 1.0, jnp.where(byte == 2 * value + 1, 256.0, 0.0)).astype(jnp.bfloat16)
    halves = lax.dot_general(pairs, gather, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return lax.bitcast_convert_type(halves.astype(jnp.int32) << 16, jnp.float32)


def _keys(page_ref, static: _Static):
    """This step's cache block as (latent [block_s, C], rope [block_s, R] or None) in the compute dtype."""
    dv, dr = static.plan.v_dim, static.plan.rope_dim
    if not static.fp8:
        return page_ref[:, pl.ds(0, dv)], (page_ref[:, pl.ds(dv, dr)] if dr else None)
    tiles = []
    for k, scale in enumerate(_fp8_scales(page_ref, static)):
        codes = lax.bitcast_convert_type(page_ref[:, pl.ds(k * LANES, LANES)], jnp.float8_e4m3fn)
        tiles.append((codes.astype(jnp.float32) * scale).astype(static.dtype))
    latent = tiles[0] if len(tiles) == 1 else jnp.concatenate(tiles, axis=1)
    return latent, (_fp8_rope(page_ref, static).astype(static.dtype) if dr else None)


_dot = functools.partial(lax.dot_general, preferred_element_type=jnp.float32)


def _scores(q_ref, k_lat, k_pe, static: _Static):
    """Base-2 scaled scores [M, N] of the query rows against a block's keys (latent, then rope)."""
    dv, dr = static.plan.v_dim, static.plan.rope_dim
    qk = (((1,), (1,)), ((), ()))  # [M, D] x [N, D] -> [M, N]
    s = _dot(q_ref[:, pl.ds(0, dv)], k_lat, qk)
    if dr:
        s = s + _dot(q_ref[:, pl.ds(dv, dr)], k_pe, qk)
    return s * static.scale2


def _accumulate(s, k_lat, acc_ref, m_ref, l_ref):
    """Scores s [M, N] (-inf where hidden) and values k_lat [N, C] into the running softmax. The running max and
    sum are [M, 1] columns, the layout in which Mosaic keeps a row reduction (a 1-D vector would be relaid out
    each step)."""
    m_prev = m_ref[...]
    m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a row with nothing visible yet stays at zero
    alpha = jnp.exp2(m_prev - m_use)
    p = jnp.exp2(s - m_use)
    l_ref[...] = l_ref[...] * alpha + p.sum(axis=1, keepdims=True)
    m_ref[...] = m_new
    acc_ref[...] = acc_ref[...] * alpha + _dot(p.astype(k_lat.dtype), k_lat, (((1,), (0,)), ((), ())))


def _step(static: _Static, refs, length, block, *, masked: bool):
    """One cache block into the running softmax."""
    q_ref, page_ref, acc_ref, m_ref, l_ref = refs
    layout = static.plan
    bs = layout.block_s
    k_lat, k_pe = _keys(page_ref, static)
    s = _scores(q_ref, k_lat, k_pe, static)
    if masked:
        base = block * bs
        rows = lax.broadcasted_iota(jnp.int32, s.shape, 0)
        s = jnp.where(visible(rows, lax.broadcasted_iota(jnp.int32, s.shape, 1) + base, length, layout), s, -jnp.inf)
        inside = lax.broadcasted_iota(jnp.int32, (bs, 1), 0) + base < length
        k_lat = jnp.where(inside, k_lat, jnp.zeros_like(k_lat))
    _accumulate(s, k_lat, acc_ref, m_ref, l_ref)


def _kernel(table_ref, len_ref, q_ref, page_ref, o_ref, lse_ref, acc_ref, m_ref, l_ref, *, static: _Static):
    """Program (b, head block, split), step j. table_ref [B * cols], len_ref [B] (SMEM); q_ref [M, C+R];
    page_ref [block_s, C+R] (or [block_s, bytes] uint8); o_ref [M, C]; lse_ref [M, 1]; scratch acc_ref [M, C],
    m_ref and l_ref [M, 1] float32."""
    del table_ref  # read by the index maps
    b, split, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    length = len_ref[b]
    first = split * static.plan.steps
    n_steps, n_full = step_counts(length, first, static.plan)

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)
        m_ref[...] = jnp.full_like(m_ref, -jnp.inf)
        l_ref[...] = jnp.zeros_like(l_ref)

    refs = (q_ref, page_ref, acc_ref, m_ref, l_ref)
    step = functools.partial(_step, static, refs, length, first + j)
    pl.when(j < n_full)(functools.partial(step, masked=False))
    pl.when((j >= n_full) & (j < n_steps))(functools.partial(step, masked=True))

    @pl.when(j == static.plan.steps - 1)
    def _finish():
        denom = l_ref[...]
        empty = denom == 0.0
        safe = jnp.where(empty, 1.0, denom)
        o_ref[...] = (acc_ref[...] / safe).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(empty, -jnp.inf, m_ref[...] + jnp.log2(safe))


def _page_map(layout: plan.Plan, cols: int):
    """Index map of the cache pages: step j of split s reads block s * steps + j through the table, held at the
    sequence's last block once past it (the pipeline skips a copy whose block index did not change)."""
    def index(b, h, s, j, table_ref, len_ref):
        del h
        last = jnp.maximum((len_ref[b] + layout.block_s - 1) // layout.block_s - 1, 0)
        return table_ref[b * cols + jnp.minimum(s * layout.steps + j, last)], 0, 0

    return index


def interpret_params(config):
    """A config's `interpret` -> pallas_call's: a pltpu.InterpretParams runs jax's TPU interpreter."""
    return config.interpret if backends.is_tpu_interpret_params(config.interpret) else False


def run(q_blocks, pages, table, lengths, layout: plan.Plan, scale2: float, out_dtype, *, config):
    """q_blocks [B, HB, M, D] -> (o [B, NS, HB, M, C], lse2 [B, NS, HB, M])."""
    b, hb, rows, dim = q_blocks.shape
    ns, dv, cols = layout.num_splits, layout.v_dim, table.shape[1]
    # Only an FP8 cache lets q be another float (float16): compute and write in float32 then, which every
    # generation lowers; the caller casts the result back to q's dtype.
    q_blocks = q_blocks if q_blocks.dtype in _DTYPES else q_blocks.astype(jnp.float32)
    out_dtype = out_dtype if jnp.dtype(out_dtype) in _DTYPES else jnp.float32
    fp8 = pages.dtype == fp8_cache.FP8_CACHE_DTYPE
    static = _Static(plan=layout, scale2=scale2, fp8=fp8, dtype=q_blocks.dtype)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, hb, ns, layout.steps),
        in_specs=[
            pl.BlockSpec((None, None, rows, dim), lambda i, h, s, j, *_: (i, h, 0, 0)),
            pl.BlockSpec((None, layout.block_s, pages.shape[-1]), _page_map(layout, cols)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, dv), lambda i, h, s, j, *_: (i, s, h, 0, 0)),
            pl.BlockSpec((None, None, None, rows, 1), lambda i, h, s, j, *_: (i, s, h, 0, 0)),
        ],
        scratch_shapes=[pltpu.VMEM((rows, dv), jnp.float32), pltpu.VMEM((rows, 1), jnp.float32),
                        pltpu.VMEM((rows, 1), jnp.float32)],
    )
    o, lse = pl.pallas_call(
        functools.partial(_kernel, static=static),
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct((b, ns, hb, rows, dv), out_dtype),
            jax.ShapeDtypeStruct((b, ns, hb, rows, 1), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret_params(config),
        name="mla_decode",
    )(table.reshape(-1), lengths, q_blocks, pages)
    return o, lse[..., 0]


decode = functools.partial(plan.decode, make_plan=make_plan, run=run)


# ------------------------------------------------------------------------ sparse decode (DSA; `sparse`)
#
# Program (query, head block, split), step j: block j of the split's slots. Where the rows are 32 bits wide
# (a float32 cache), they are copied from HBM (memory_space ANY) one DMA a row, the row numbers read from the
# scalar-prefetched slots in SMEM, into a double buffer in VMEM: block j + 1's copies are started before
# block j is computed on. A bfloat16 or packed FP8 row shares its 32-bit sublane words with its neighbours in
# TPU's tiled HBM layout, and Mosaic copies no part of a word ("offsets along tiled dimensions must be aligned
# to tiles"); those rows are gathered by XLA (only the K rows of each query, [B T, slots, W]) and streamed
# block by block by Pallas' pipeline. Either way a slot with no row (-1) has score -inf and its row zeroed.


def sparse_dma(dtype) -> bool:
    """Whether the sparse kernel copies its rows from HBM itself (rows of 32-bit values) or takes them gathered."""
    return jnp.dtype(dtype).itemsize == 4


def sparse_refusal(q_shape, rows_shape, topk: int, dtype, v_dim: int, config) -> str | None:
    q_virtual, cache_virtual = sparse.virtual_shapes(q_shape, topk, rows_shape[-1])
    reason = refusal(q_virtual, cache_virtual, dtype, v_dim, config)
    if reason:
        return reason
    layout = make_plan(q_virtual, cache_virtual, v_dim, config)
    slots = 4 * layout.batch * layout.num_splits * layout.steps * layout.block_s
    if slots > SMEM_TABLE_BYTES:
        return (f"mosaic_tpu: the slots of the sparse decode take {slots} bytes of SMEM, more than "
                f"{SMEM_TABLE_BYTES}; cut the batch or the query positions")
    return None


def _sparse_copies(idx_ref, rows_hbm, buf, sem, first: int, slot, *, block_s: int, wait: bool):
    """Start (or wait for) the one-row DMAs of block slots idx_ref[first : first + block_s] into buf[slot]."""
    def each(r, carry):
        row = idx_ref[first + r]

        @pl.when(row >= 0)
        def _copy():
            copy = pltpu.make_async_copy(rows_hbm.at[pl.ds(jnp.maximum(row, 0), 1)], buf.at[slot, pl.ds(r, 1)],
                                         sem.at[slot])
            if wait:
                copy.wait()
            else:
                copy.start()

        return carry

    lax.fori_loop(0, block_s, each, 0)


def _sparse_step(static: _Static, refs, valid_row, valid_col):
    """One block of slots into the running softmax; valid_row [1, block_s] and valid_col [block_s, 1] bool."""
    q_ref, rows_ref, acc_ref, m_ref, l_ref = refs
    k_lat, k_pe = _keys(rows_ref, static)
    s = jnp.where(valid_row, _scores(q_ref, k_lat, k_pe, static), -jnp.inf)
    _accumulate(s, jnp.where(valid_col, k_lat, jnp.zeros_like(k_lat)), acc_ref, m_ref, l_ref)


def _sparse_kernel(idx_ref, q_ref, row_ref, col_ref, rows_ref, o_ref, lse_ref, *scratch, static: _Static,
                   dma: bool):
    """Program (n, head block, split), step j. idx_ref [N * slots] (SMEM); q_ref [M, C+R]; row_ref [1, block_s]
    and col_ref [block_s, 1] the block's slots; rows_ref: the rows in HBM [R, W] (dma) or this block's gathered
    rows [block_s, W]; o_ref [M, C]; lse_ref [M, 1]; scratch (dma: buffers [2, block_s, W], 2 DMA semaphores),
    acc [M, C], running max and sum [M, 1] float32."""
    n, split, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    layout = static.plan
    bs, steps = layout.block_s, layout.steps
    acc_ref, m_ref, l_ref = scratch[-3:]
    base = n * (layout.num_splits * steps * bs) + split * steps * bs  # this split's first slot in idx_ref
    if dma:
        buf, sem = scratch[:2]
        copies = functools.partial(_sparse_copies, idx_ref, rows_ref, buf, sem, block_s=bs)

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)
        m_ref[...] = jnp.full_like(m_ref, -jnp.inf)
        l_ref[...] = jnp.zeros_like(l_ref)
        if dma:
            copies(base, 0, wait=False)

    if dma:
        slot = j % 2

        @pl.when(j + 1 < steps)
        def _prefetch():
            copies(base + (j + 1) * bs, 1 - slot, wait=False)

        copies(base + j * bs, slot, wait=True)
        rows_ref = buf.at[slot]
    refs = (q_ref, rows_ref, acc_ref, m_ref, l_ref)
    _sparse_step(static, refs, row_ref[...] >= 0, col_ref[...] >= 0)

    @pl.when(j == steps - 1)
    def _finish():
        denom = l_ref[...]
        empty = denom == 0.0
        safe = jnp.where(empty, 1.0, denom)
        o_ref[...] = (acc_ref[...] / safe).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(empty, -jnp.inf, m_ref[...] + jnp.log2(safe))


def _sparse_run(q_blocks, rows, slots, layout: plan.Plan, scale2: float, out_dtype, *, config):
    """q_blocks [N, HB, M, D], rows [R, W], slots [N, NS steps block_s] -> (o [N, NS, HB, M, C], lse2 [N, NS,
    HB, M])."""
    n, hb, m, dim = q_blocks.shape
    ns, dv, bs, steps = layout.num_splits, layout.v_dim, layout.block_s, layout.steps
    q_blocks = q_blocks if q_blocks.dtype in _DTYPES else q_blocks.astype(jnp.float32)
    out_dtype = out_dtype if jnp.dtype(out_dtype) in _DTYPES else jnp.float32
    static = _Static(plan=layout, scale2=scale2, fp8=rows.dtype == fp8_cache.FP8_CACHE_DTYPE, dtype=q_blocks.dtype)
    dma, width, blocks = sparse_dma(rows.dtype), rows.shape[-1], ns * steps
    block_of = lambda i, s, j: (i, s * steps + j, 0, 0)
    if dma:
        rows_spec = pl.BlockSpec(memory_space=pl.ANY)
        scratch = [pltpu.VMEM((2, bs, width), rows.dtype), pltpu.SemaphoreType.DMA((2,))]
    else:
        rows = rows[jnp.maximum(slots, 0)].reshape(n, blocks, bs, width)  # only the selected rows
        rows_spec = pl.BlockSpec((None, None, bs, width), lambda i, h, s, j, *_: block_of(i, s, j))
        scratch = []
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(n, hb, ns, steps),
        in_specs=[
            pl.BlockSpec((None, None, m, dim), lambda i, h, s, j, *_: (i, h, 0, 0)),
            pl.BlockSpec((None, None, 1, bs), lambda i, h, s, j, *_: block_of(i, s, j)),
            pl.BlockSpec((None, None, bs, 1), lambda i, h, s, j, *_: block_of(i, s, j)),
            rows_spec,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, m, dv), lambda i, h, s, j, *_: (i, s, h, 0, 0)),
            pl.BlockSpec((None, None, None, m, 1), lambda i, h, s, j, *_: (i, s, h, 0, 0)),
        ],
        scratch_shapes=[*scratch, pltpu.VMEM((m, dv), jnp.float32), pltpu.VMEM((m, 1), jnp.float32),
                        pltpu.VMEM((m, 1), jnp.float32)],
    )
    o, lse = pl.pallas_call(
        functools.partial(_sparse_kernel, static=static, dma=dma),
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct((n, ns, hb, m, dv), out_dtype),
            jax.ShapeDtypeStruct((n, ns, hb, m, 1), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret_params(config),
        name="mla_decode_sparse",
    )(slots.reshape(-1), q_blocks, slots.reshape(n, blocks, 1, bs), slots.reshape(n, blocks, bs, 1), rows)
    return o, lse[..., 0]


sparse_decode = functools.partial(sparse.decode_rows, make_plan=make_plan, run=_sparse_run)
