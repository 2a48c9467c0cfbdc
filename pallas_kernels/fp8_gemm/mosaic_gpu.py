"""Backend "mosaic_gpu": the FP8 GEMM as a Hopper kernel in Pallas' Mosaic GPU dialect.

One CTA per SM walks output tiles (block_m x block_n) in a planar-snake order (a persistent grid). Per tile,
a producer warpgroup streams K blocks of A [128, 128], B [block_n, 128] and their scale vectors into a
`num_stages`-deep ring of SMEM buffers with TMA; two consumer warpgroups (64 rows each) issue FP8 wgmma into
a fresh FP32 register accumulator per K block, wait for it, and promote it into their running accumulator
with the row (A) and column (B) scales: the paper's promotion every 128 of K. The other warpgroup's wgmma
and the producer's TMA overlap each warpgroup's promotion. The epilogue stages each warpgroup's rows in SMEM
and stores them with TMA while the next tile starts.

`Fp8GemmConfig(interpret=True)` runs the kernel on CPU in JAX's GPU interpreter; `interpreter_shims` lists the
constructs traced differently there (layout casts, `plgpu.load`, the transposed B operand). TMA copies, the
barrier protocol of the warp-specialised pipeline, the E4M3 wgmma into an FP32 accumulator, the promotion,
the epilogue and the persistent tile loop all run as written.
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
from pallas_kernels.fp8_gemm import tiles
from pallas_kernels.fp8_gemm.config import Fp8GemmConfig
from pallas_kernels.fp8_gemm.operands import BLOCK_K
from pallas_kernels.interpreter_shims import MosaicShims
from pallas_kernels.quant import E4M3

DEFAULTS = dict(block_m=128, block_n=128, num_stages=4, num_warps=4)
_WG_ROWS = 64  # rows per consumer warpgroup (the wgmma M)
_NUM_CONSUMER_WGS = 2
_PRODUCER_REGISTERS = 40  # the producer only issues TMA copies; the consumers get the registers it gives up
_INTERPRET_SMS = 2  # persistent grid under the GPU interpreter: fewer CTAs than tiles, so the tile loop turns


def config_refusal(config: Fp8GemmConfig) -> str | None:
    if config.block_m != _WG_ROWS * _NUM_CONSUMER_WGS:
        return f"mosaic_gpu: block_m must be {_WG_ROWS * _NUM_CONSUMER_WGS}, got {config.block_m}"
    if config.block_n % 64 or config.block_n > 256:
        return f"mosaic_gpu: block_n must be a multiple of 64 and <= 256, got {config.block_n}"
    return None


@dataclasses.dataclass(frozen=True)
class _Launch:
    """Static facts of one kernel launch: padded sizes, tiles, and how to trace (GPU or interpreter)."""

    mp: int
    np_: int
    kb: int
    cfg: Fp8GemmConfig
    out_dtype: object
    grouped: bool
    shims: MosaicShims

    @property
    def bm(self) -> int:
        return self.cfg.block_m

    @property
    def bn(self) -> int:
        return self.cfg.block_n

    @property
    def n_iters(self) -> int:
        return self.np_ // self.bn

    @property
    def fp8_transforms(self):
        # E4M3 rows of 128 bytes: 128-byte swizzle, (8, 128) tiling, as FP8 wgmma needs (K-major A and B).
        return plgpu.TilingTransform((8, BLOCK_K)), plgpu.SwizzleTransform(128)

    @property
    def out_transforms(self):
        bits = jnp.dtype(self.out_dtype).itemsize * 8
        swizzle = plgpu.find_swizzle(self.bn * bits)
        return plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle)


class _Refs(NamedTuple):
    a: object  # [Mp, Kp] e4m3
    a_scale: object  # [kb, Mp] f32
    b: object  # [(G,) Np, Kp] e4m3
    b_scale: object  # [(G,) kb, Np] f32
    out: object  # [Mp, Np]
    tile_group: object  # [T] int32, expert of each row tile (None: dense)


def gemm(a, a_scale, b, b_scale, *, out_dtype, config: Fp8GemmConfig):
    return tiles.run_dense(functools.partial(_launch, None, None), a, a_scale, b, b_scale, out_dtype, config)


def grouped_gemm(a, a_scale, b, b_scale, group_sizes, *, out_dtype, config: Fp8GemmConfig):
    return tiles.run_grouped(_launch, a, a_scale, b, b_scale, group_sizes, out_dtype, config)


def _num_sms(cfg: Fp8GemmConfig) -> int:
    if cfg.num_sms is not None:
        return cfg.num_sms
    return _INTERPRET_SMS if cfg.interpret else backends.num_sms()


def _launch(tile_group, num_tiles, a, as_t, b, bs_t, out_dtype, cfg: Fp8GemmConfig):
    """Dense (tile_group None) or aligned-grouped GEMM on operands laid out by `tiles`."""
    (mp, kp), np_ = a.shape, b.shape[-2]
    grouped = tile_group is not None
    launch = _Launch(mp=mp, np_=np_, kb=kp // BLOCK_K, cfg=cfg, out_dtype=out_dtype, grouped=grouped,
                     shims=MosaicShims(interpret=cfg.interpret))
    call = plgpu.kernel(
        functools.partial(_kernel, launch),
        out_type=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        grid=(_num_sms(cfg),),
        grid_names=("sm",),
        num_threads=_NUM_CONSUMER_WGS + 1,
        thread_name="wg",
        kernel_name="kernel",  # its name in profiles and exported modules since it was written
        interpret=backends.gpu_interpret_params(cfg.interpret, detect_races=True),
    )
    args = (tile_group, num_tiles, a, as_t, b, bs_t) if grouped else (a, as_t, b, bs_t)
    return call(*args)


def _kernel(launch: _Launch, *refs):
    if launch.grouped:
        tile_group, num_tiles, *refs = refs
        m_iters = num_tiles[0]
    else:
        tile_group, m_iters = None, launch.mp // launch.bm
    r = _Refs(*refs, tile_group=tile_group)
    bm, bn = launch.bm, launch.bn
    b_probe, bs_probe = (r.b.at[0], r.b_scale.at[0]) if launch.grouped else (r.b, r.b_scale)
    ignore = lambda *_, **__: None
    allocs = _producer(launch, ignore, ignore).get_allocations(
        r.a.at[pl.ds(0, bm)], r.a_scale.at[:, pl.ds(0, bm)], b_probe.at[pl.ds(0, bn)], bs_probe.at[:, pl.ds(0, bn)])
    pl.run_scoped(
        functools.partial(_tile_loop, launch, r, m_iters),
        allocs=allocs,
        collective_axes="wg",
        o_smem=plgpu.SMEM((_NUM_CONSUMER_WGS, _WG_ROWS, bn), launch.out_dtype, transforms=launch.out_transforms),
        bt_smem=launch.shims.scratch((_NUM_CONSUMER_WGS, BLOCK_K, bn), E4M3),  # each consumer's B transposed
    )
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _producer(launch: _Launch, body, context):
    """The warp-specialised K pipeline: the producer warpgroup TMA-copies K block k of A, B and their scales
    into a ring slot; each consumer warpgroup runs `body` on it inside `context` (seed, K loop, epilogue)."""
    bm, bn, transforms = launch.bm, launch.bn, launch.fp8_transforms
    return plgpu.emit_pipeline_warp_specialized(
        body,
        grid=(launch.kb,),
        memory_registers=_PRODUCER_REGISTERS,
        in_specs=[
            plgpu.BlockSpec((bm, BLOCK_K), lambda k: (0, k), transforms=transforms),
            plgpu.BlockSpec((1, bm), lambda k: (k, 0)),
            plgpu.BlockSpec((bn, BLOCK_K), lambda k: (0, k), transforms=transforms),
            plgpu.BlockSpec((1, bn), lambda k: (k, 0)),
        ],
        wg_axis="wg",
        num_compute_wgs=_NUM_CONSUMER_WGS,
        max_concurrent_steps=min(launch.cfg.num_stages, launch.kb),
        compute_context=context,
    )


def _tile_loop(launch: _Launch, r: _Refs, m_iters, allocs, o_smem, bt_smem):
    """This CTA's share of the output tiles, in planar-snake order."""
    wg = lax.axis_index("wg")
    wg_rows = pl.ds(wg * _WG_ROWS, _WG_ROWS)
    bm, bn = launch.bm, launch.bn

    @plgpu.nd_loop((m_iters * launch.n_iters,), collective_axes="sm")
    def _tile(info):
        mi, ni = plgpu.planar_snake(info.index[0], (m_iters, launch.n_iters), 1, launch.cfg.grid_tile_width)
        rows, cols = pl.ds(mi * bm, bm), pl.ds(ni * bn, bn)
        b, bs = (r.b.at[r.tile_group[mi]], r.b_scale.at[r.tile_group[mi]]) if launch.grouped else (r.b, r.b_scale)
        body = functools.partial(_consumer, launch, bt_smem, wg, wg_rows)
        context = functools.partial(_epilogue, launch, o_smem, r.out, wg, mi, cols)
        _producer(launch, body, context)(r.a.at[rows], r.a_scale.at[:, rows], b.at[cols], bs.at[:, cols],
                                         allocations=allocs)


def _consumer(launch: _Launch, bt_smem, wg, wg_rows, _, a_s, as_s, b_s, bs_s, acc):
    """One K block for one consumer warpgroup: its 64 rows' raw FP8 product, promoted into `acc` [64, bn].

    a_s [bm, 128] e4m3, as_s [1, bm] f32, b_s [bn, 128] e4m3, bs_s [1, bn] f32 (SMEM slots of the ring).
    """
    shims, bn = launch.shims, launch.bn

    def mma(part_ref):
        plgpu.wgmma(part_ref, a_s.at[wg_rows], shims.transposed(b_s, bt_smem, wg))
        return part_ref[...]  # waits for this K block's wgmma

    part = pl.run_scoped(mma, plgpu.ACC((_WG_ROWS, bn), jnp.float32))
    sa = shims.load(as_s.at[0, wg_rows], plgpu.Layout.WGMMA.reduce(1))
    sb = shims.load(bs_s.at[0], plgpu.Layout.WGMMA.reduce(0))
    sa = lax.broadcast_in_dim(sa, (_WG_ROWS, bn), (0,))
    sb = lax.broadcast_in_dim(sb, (_WG_ROWS, bn), (1,))
    return acc + part * (sa * sb)


def _epilogue(launch: _Launch, o_smem, out, wg, mi, cols, run):
    """Seed the accumulator, `run` the K loop, then stage this warpgroup's rows in SMEM and TMA them out."""
    acc = run(launch.shims.layout_cast(jnp.zeros((_WG_ROWS, launch.bn), jnp.float32), plgpu.Layout.WGMMA))
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # this warpgroup's previous tile is out
    o_smem[wg] = acc.astype(launch.out_dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem.at[wg], out.at[pl.ds(mi * launch.bm + wg * _WG_ROWS, _WG_ROWS), cols])
