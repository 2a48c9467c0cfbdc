"""Block-scaled FP8 GEMM with FP32 promotion every 128 of K (DeepSeek-V3 report s.3.3, DeepGEMM's recipe).

    out[M, N] = dequant(a) @ dequant(b).T,  a: e4m3 [M, K] with float32 scales [M, ceil(K/128)] (1x128 tiles),
                                            b: e4m3 [N, K] with float32 scales [ceil(N/128), ceil(K/128)] (128x128).

Hopper's tensor cores keep only ~14 fraction bits while they accumulate FP8 products, so a long K loses
up to ~2% (paper s.3.1). The fix, and the contract of every backend here: within one 128-wide K block the
raw e4m3 products are accumulated by the MMA; the block's partial sum is then multiplied by
a_scale[m, kblock] * b_scale[nblock, kblock] and added into an FP32 accumulator ("promotion").

Backends (see `backends.py`): "xla" is `fp8_gemm_reference` (plain jnp, the promotion written out as a
scan over K blocks); "interpret" and "triton" share one Pallas kernel body (a grid over output tiles, a
loop over K blocks); "mosaic_gpu" is a Hopper kernel (TMA copies driven by a producer warpgroup, two
consumer warpgroups issuing FP8 wgmma, a multi-stage pipelined K loop, a persistent grid);
`Fp8GemmConfig(interpret=True)` runs that kernel on CPU in JAX's GPU interpreter (tests only).

The grouped variant (MoE experts, rows sorted by expert) copies each group's rows into a layout where no
tile of `block_m` rows straddles two groups (DeepGEMM's "contiguous" layout, aligned here by the wrapper),
runs the same kernels with the tile's expert weight, and gathers the rows back.

`fp8_linear` / `fp8_grouped_linear` are the differentiable entries for training (custom VJP: Fprop, Dgrad
and Wgrad all run on E4M3 inputs).

Letters: M rows (tokens), N output features, K contraction, G groups (experts); kb = ceil(K/128).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.backends import resolve_backend
from pallas_kernels.quant import BLOCK, E4M3, quantize_act, quantize_weight

BLOCK_K = BLOCK  # promotion interval == scale block along K
_H100_SMS = 132  # SM count assumed when lowering for a GPU from a machine without one (H100/H200 SXM)
_WG_ROWS = 64  # rows per consumer warpgroup in the Mosaic kernel (the wgmma M)
_NUM_CONSUMER_WGS = 2


# --------------------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class Fp8GemmConfig:
    """Tile sizes and pipelining; `None` fields take the backend's default (see `default_config`).

    block_m / block_n: output tile. Mosaic GPU: block_m must be 128 (two consumer warpgroups of 64 rows),
      block_n a multiple of 64 up to 256 (each warpgroup keeps two 64 x block_n FP32 accumulators live).
    num_stages: K blocks in flight (Mosaic: SMEM buffers of the TMA pipeline; Triton: software pipelining).
    num_warps: Triton only.
    grid_tile_width: Mosaic only, width of the L2-friendly "planar snake" tile order.
    num_sms: Mosaic only, size of the persistent grid; default the device's SM count (132 off-GPU), or
      `_INTERPRET_SMS` under `interpret` (the interpreter simulates the CTAs one after another).
    interpret: Mosaic only, a test switch: run the Hopper kernel on CPU in JAX's GPU interpreter (TMA,
      barriers, warpgroups and wgmma simulated; see `_mosaic_gemm` for the three spots where the traced
      kernel differs). Slow: for small shapes in tests. The interpreter runs the three warpgroups as
      concurrent XLA:CPU computations blocking on each other's barriers: with fewer than three threads in
      the CPU client (max(cores, CPU devices)) it deadlocks.
    """

    block_m: int | None = None
    block_n: int | None = None
    num_stages: int | None = None
    num_warps: int | None = None
    grid_tile_width: int = 8
    num_sms: int | None = None
    interpret: bool = False

    def __post_init__(self):
        for name in ("block_m", "block_n", "num_stages", "num_warps", "grid_tile_width", "num_sms"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v <= 0):
                raise ValueError(f"Fp8GemmConfig.{name} must be a positive int, got {v!r}")
        if not isinstance(self.interpret, bool):
            raise ValueError(f"Fp8GemmConfig.interpret must be a bool, got {self.interpret!r}")


_DEFAULTS = {
    "interpret": dict(block_m=128, block_n=128, num_stages=1, num_warps=4),
    "triton": dict(block_m=64, block_n=128, num_stages=4, num_warps=4),
    "mosaic_gpu": dict(block_m=128, block_n=128, num_stages=4, num_warps=4),
    "xla": dict(block_m=128, block_n=128, num_stages=1, num_warps=4),
}


def default_config(backend: str, config: Fp8GemmConfig | None = None) -> Fp8GemmConfig:
    """`config` with its unset fields filled from the defaults of a concrete `backend`."""
    config = config or Fp8GemmConfig()
    fill = {k: v for k, v in _DEFAULTS[backend].items() if getattr(config, k) is None}
    config = dataclasses.replace(config, **fill)
    if config.interpret and backend != "mosaic_gpu":
        raise ValueError(f"Fp8GemmConfig.interpret runs the mosaic_gpu kernel in JAX's GPU interpreter; "
                         f"it needs backend='mosaic_gpu', got {backend!r}")
    if backend == "mosaic_gpu":
        if config.block_m != _WG_ROWS * _NUM_CONSUMER_WGS:
            raise ValueError(f"mosaic_gpu: block_m must be {_WG_ROWS * _NUM_CONSUMER_WGS}, got {config.block_m}")
        if config.block_n % 64 or config.block_n > 256:
            raise ValueError(f"mosaic_gpu: block_n must be a multiple of 64 and <= 256, got {config.block_n}")
    elif backend == "triton":
        for name in ("block_m", "block_n"):
            v = getattr(config, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"triton: {name} must be a power of two >= 16, got {v}")
    return config


# ----------------------------------------------------------------------------------------- validation


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_operands(fn: str, a, a_scale, b, b_scale, grouped: bool) -> None:
    _check(a.ndim == 2, f"{fn}: a must be [M, K], got shape {a.shape}")
    _check(a.dtype == E4M3, f"{fn}: a must be float8_e4m3fn, got {a.dtype}")
    _check(b.dtype == E4M3, f"{fn}: b must be float8_e4m3fn, got {b.dtype}")
    m, k = a.shape
    kb = _cdiv(k, BLOCK_K)
    want_b = "[G, N, K]" if grouped else "[N, K]"
    _check(b.ndim == (3 if grouped else 2), f"{fn}: b must be {want_b}, got shape {b.shape}")
    _check(b.shape[-1] == k, f"{fn}: K of a {a.shape} and b {b.shape} differ ({k} vs {b.shape[-1]})")
    _check(a_scale.dtype == jnp.float32, f"{fn}: a_scale must be float32, got {a_scale.dtype}")
    _check(b_scale.dtype == jnp.float32, f"{fn}: b_scale must be float32, got {b_scale.dtype}")
    _check(a_scale.shape == (m, kb), f"{fn}: a {a.shape} needs a_scale of shape {(m, kb)}, got {a_scale.shape}")
    want = (*b.shape[:-2], _cdiv(b.shape[-2], BLOCK), kb)
    _check(b_scale.shape == want, f"{fn}: b {b.shape} needs b_scale of shape {want}, got {b_scale.shape}")


# ------------------------------------------------------------------------------------------ reference


def _k_blocks(x: jax.Array) -> jax.Array:
    """[R, K] e4m3 -> [kb, R, 128] float32 (exact: every e4m3 value is an f32), K zero-padded."""
    r, k = x.shape
    kb = _cdiv(k, BLOCK_K)
    xp = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, kb * BLOCK_K - k)))
    return xp.reshape(r, kb, BLOCK_K).transpose(1, 0, 2)


def _column_scales(b_scale: jax.Array, n: int) -> jax.Array:
    """[..., nb, kb] block scales -> [..., kb, n]: the scale of every output column, per K block."""
    return jnp.swapaxes(jnp.repeat(b_scale, BLOCK, axis=-2)[..., :n, :], -1, -2)


def _promote(acc, part, sa, sb):
    """One promotion step: scale a K block's raw partial sums and add them to the FP32 accumulator."""
    return acc + part * (sa[:, None] * sb[None, :])


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def fp8_gemm_reference(a, a_scale, b, b_scale, *, out_dtype=jnp.bfloat16) -> jax.Array:
    """dequant(a) @ dequant(b).T with FP32 promotion every 128 of K, in plain jnp (a scan over K blocks)."""
    _check_operands("fp8_gemm_reference", a, a_scale, b, b_scale, grouped=False)
    m, n = a.shape[0], b.shape[0]

    def step(acc, blk):
        ak, bk, sa, sb = blk  # [M, 128], [N, 128], [M], [N]
        part = lax.dot_general(ak, bk, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST,
                               preferred_element_type=jnp.float32)
        return _promote(acc, part, sa, sb), None

    blocks = (_k_blocks(a), _k_blocks(b), a_scale.T, _column_scales(b_scale, n))
    acc, _ = lax.scan(step, jnp.zeros((m, n), jnp.float32), blocks)
    return acc.astype(out_dtype)


def _group_ids(group_sizes: jax.Array, m: int) -> jax.Array:
    """Group of every row; G for the rows past sum(group_sizes)."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    return jnp.searchsorted(ends, jnp.arange(m, dtype=jnp.int32), side="right").astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def fp8_grouped_gemm_reference(a, a_scale, b, b_scale, group_sizes, *, out_dtype=jnp.bfloat16) -> jax.Array:
    """Row r of group g: dequant(a)[r] @ dequant(b[g]).T, promoted every 128 of K; rows past the groups -> 0."""
    _check_operands("fp8_grouped_gemm_reference", a, a_scale, b, b_scale, grouped=True)
    m, (g, n, _) = a.shape[0], b.shape
    gid = _group_ids(group_sizes, m)
    valid = gid < g

    def step(acc, blk):
        ak, bk, sa, sb = blk  # [M, 128], [G, N, 128], [M], [G, N]
        part = lax.ragged_dot(ak, jnp.swapaxes(bk, 1, 2), group_sizes.astype(jnp.int32),
                              precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
        rows_sb = sb[jnp.minimum(gid, g - 1)]  # [M, N]: each row's expert column scales
        return acc + part * (sa[:, None] * rows_sb), None

    bk = jax.vmap(_k_blocks, out_axes=1)(b)  # [kb, G, N, 128]
    blocks = (_k_blocks(a), bk, a_scale.T, jnp.moveaxis(_column_scales(b_scale, n), 1, 0))
    acc, _ = lax.scan(step, jnp.zeros((m, n), jnp.float32), blocks)
    return jnp.where(valid[:, None], acc, 0.0).astype(out_dtype)


# ------------------------------------------------------------- Pallas kernel body (interpret, triton)


def _promoted_tile(a_ref, as_ref, b_ref, bs_ref, k_blocks: int, upcast: bool, group=None) -> jax.Array:
    """FP32 [bm, bn] tile from a_ref [bm, Kp] e4m3, as_ref [kb, bm], b_ref [(G,) bn, Kp] e4m3, bs_ref [(G,) kb, bn].

    `group` picks the expert when b_ref / bs_ref carry a leading G axis (indexed per load: Triton takes
    one indexer per ref access).
    """
    g = () if group is None else (group,)
    bm, bn = a_ref.shape[0], b_ref.shape[-2]

    def step(kk, acc):
        cols = pl.ds(pl.multiple_of(kk * BLOCK_K, BLOCK_K), BLOCK_K)
        ak, bk = a_ref[:, cols], b_ref[(*g, slice(None), cols)]  # [bm, 128], [bn, 128] e4m3
        kwargs = {}
        if upcast:  # XLA:CPU has no FP8 dot; the f32 products of two e4m3 values are exact
            ak, bk = ak.astype(jnp.float32), bk.astype(jnp.float32)
            kwargs = dict(precision=lax.Precision.HIGHEST)
        part = lax.dot_general(ak, bk, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32, **kwargs)
        return _promote(acc, part, as_ref[kk, :], bs_ref[(*g, kk, slice(None))])

    return lax.fori_loop(0, k_blocks, step, jnp.zeros((bm, bn), jnp.float32))


def _gemm_kernel(a_ref, as_ref, b_ref, bs_ref, o_ref, *, k_blocks: int, upcast: bool):
    # a_ref [bm, Kp] e4m3, as_ref [kb, bm] f32, b_ref [bn, Kp] e4m3, bs_ref [kb, bn] f32, o_ref [bm, bn]
    o_ref[...] = _promoted_tile(a_ref, as_ref, b_ref, bs_ref, k_blocks, upcast).astype(o_ref.dtype)


def _grouped_kernel(tg_ref, nt_ref, a_ref, as_ref, b_ref, bs_ref, o_ref, *, k_blocks: int, upcast: bool):
    # tg_ref [T] int32 expert of each row tile, nt_ref [1] int32 tiles in use; a_ref [bm, Kp], as_ref [kb, bm],
    # b_ref [G, bn, Kp] e4m3, bs_ref [G, kb, bn], o_ref [bm, bn]. Tiles past nt_ref[0] hold no rows: skipped.
    i = pl.program_id(0)

    @pl.when(i < nt_ref[0])
    def _():
        tile = _promoted_tile(a_ref, as_ref, b_ref, bs_ref, k_blocks, upcast, group=tg_ref[i])
        o_ref[...] = tile.astype(o_ref.dtype)


def _compiler_params(backend: str, cfg: Fp8GemmConfig) -> dict:
    if backend != "triton":
        return {}
    from jax.experimental.pallas import triton as pltriton

    return dict(compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages))


def _pallas_gemm(a, as_t, b, bs_t, out_dtype, backend: str, cfg: Fp8GemmConfig):
    # a [Mp, Kp], as_t [kb, Mp], b [Np, Kp], bs_t [kb, Np]; Mp, Np multiples of the tile.
    (mp, kp), np_ = a.shape, b.shape[0]
    bm, bn, kb = cfg.block_m, cfg.block_n, kp // BLOCK_K
    kernel = functools.partial(_gemm_kernel, k_blocks=kb, upcast=backend == "interpret")
    return pl.pallas_call(
        kernel,
        grid=(mp // bm, np_ // bn),
        in_specs=[
            pl.BlockSpec((bm, kp), lambda i, j: (i, 0)),
            pl.BlockSpec((kb, bm), lambda i, j: (0, i)),
            pl.BlockSpec((bn, kp), lambda i, j: (j, 0)),
            pl.BlockSpec((kb, bn), lambda i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        interpret=backend == "interpret",
        name="fp8_gemm",
        **_compiler_params(backend, cfg),
    )(a, as_t, b, bs_t)


def _pallas_grouped_gemm(tile_group, num_tiles, a, as_t, b, bs_t, out_dtype, backend: str, cfg: Fp8GemmConfig):
    # a [T*bm, Kp] aligned rows, as_t [kb, T*bm], b [G, Np, Kp], bs_t [G, kb, Np], tile_group [T], num_tiles [1].
    (mp, kp), (g, np_, _) = a.shape, b.shape
    bm, bn, kb = cfg.block_m, cfg.block_n, kp // BLOCK_K
    t = tile_group.shape[0]
    kernel = functools.partial(_grouped_kernel, k_blocks=kb, upcast=backend == "interpret")
    return pl.pallas_call(
        kernel,
        grid=(mp // bm, np_ // bn),
        in_specs=[
            pl.BlockSpec((t,), lambda i, j: (0,)),
            pl.BlockSpec((1,), lambda i, j: (0,)),
            pl.BlockSpec((bm, kp), lambda i, j: (i, 0)),
            pl.BlockSpec((kb, bm), lambda i, j: (0, i)),
            pl.BlockSpec((g, bn, kp), lambda i, j: (0, j, 0)),
            pl.BlockSpec((g, kb, bn), lambda i, j: (0, 0, j)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        interpret=backend == "interpret",
        name="fp8_grouped_gemm",
        **_compiler_params(backend, cfg),
    )(tile_group, num_tiles, a, as_t, b, bs_t)


# ------------------------------------------------------------------------ Mosaic GPU (Hopper) kernel


_INTERPRET_SMS = 2  # persistent grid under the GPU interpreter: fewer CTAs than tiles, so the tile loop turns


def _num_sms(cfg: Fp8GemmConfig) -> int:
    if cfg.num_sms is not None:
        return cfg.num_sms
    if cfg.interpret:
        return _INTERPRET_SMS
    device = jax.devices()[0]
    return getattr(device, "core_count", _H100_SMS) if device.platform == "gpu" else _H100_SMS


def _gpu_interpreter():
    """JAX's GPU interpreter for Mosaic GPU kernels (private in jax 0.10: `jax._src.pallas.mosaic_gpu.interpret`).

    Uninitialised SMEM reads as NaN, and unsynchronised accesses between warpgroups and TMA copies are
    recorded (`jax._src.pallas.mosaic_gpu.interpret.gpu_callbacks.get_races()`; the tests check it).
    """
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError as e:  # pragma: no cover - depends on the installed jax
        raise NotImplementedError(f"Fp8GemmConfig.interpret needs JAX's Mosaic GPU interpreter: {e}") from e
    return InterpretGPUParams(detect_races=True, uninitialized_memory="nan")


def _mosaic_gemm(a, as_t, b, bs_t, out_dtype, cfg: Fp8GemmConfig, tile_group=None, num_tiles=None):
    """Dense (tile_group None) or aligned-grouped FP8 GEMM on Hopper via Pallas Mosaic GPU.

    One CTA per SM walks output tiles (block_m x block_n) in a planar-snake order. Per tile, a producer
    warpgroup streams K blocks of A [128, 128], B [block_n, 128] and their scale vectors into a
    `num_stages`-deep ring of SMEM buffers with TMA; two consumer warpgroups (64 rows each) issue FP8
    wgmma into a fresh FP32 register accumulator per K block, wait for it, and promote it into their
    running accumulator with the row (A) and column (B) scales: the paper's promotion every 128 of K.
    The other warpgroup's wgmma and the producer's TMA overlap each warpgroup's promotion.

    `cfg.interpret` runs the kernel on CPU in JAX's GPU interpreter (jax 0.10.2), which cannot run three of
    its constructs; they are traced differently there, and only there (the CUDA lowering is unchanged):
      - `plgpu.load` (Mosaic GPU's own load primitive, used for the scale vectors): the interpreter has no
        rule for it and re-binds it on a buffer key, failing `_load_abstract_eval`. A plain ref read instead.
      - `plgpu.layout_cast`: bound as is, it has no CPU lowering ("MLIR translation rule for primitive
        'layout_cast' not found for platform cpu"). Registers have no layout there: dropped.
      - the transposed (K-major) B operand of FP8 wgmma, `plgpu.transpose_ref(b_s, (1, 0))`: the
        interpreter's wgmma reads operands through index transforms only ("'TransposeTransform' object has
        no attribute 'indices'"). Each consumer warpgroup copies B [bn, 128] transposed into its own SMEM
        buffer [128, bn] and passes that.
    TMA copies, the barrier protocol of the warp-specialised pipeline, the E4M3 wgmma into an FP32
    accumulator, the promotion, the epilogue and the persistent tile loop all run as written.
    """
    import jax.experimental.pallas.mosaic_gpu as plgpu

    (mp, kp) = a.shape
    np_ = b.shape[-2]
    bm, bn, kb = cfg.block_m, cfg.block_n, kp // BLOCK_K
    n_iters = np_ // bn
    grouped = tile_group is not None
    interpret = cfg.interpret
    # E4M3 rows of 128 bytes: 128-byte swizzle, (8, 128) tiling, as FP8 wgmma needs (K-major A and B).
    fp8_transforms = (plgpu.TilingTransform((8, BLOCK_K)), plgpu.SwizzleTransform(128))
    out_bits = jnp.dtype(out_dtype).itemsize * 8
    out_swizzle = plgpu.find_swizzle(bn * out_bits)
    out_transforms = (plgpu.TilingTransform((8, out_swizzle * 8 // out_bits)), plgpu.SwizzleTransform(out_swizzle))
    # Interpreter only: each consumer warpgroup's copy of B transposed (see the docstring).
    scratch = dict(bt_smem=plgpu.SMEM((_NUM_CONSUMER_WGS, BLOCK_K, bn), E4M3)) if interpret else {}

    def cast(x, layout):  # a register layout; none under the interpreter
        return x if interpret else plgpu.layout_cast(x, layout)

    def load(ref, layout):  # SMEM -> registers in `layout`; a plain read under the interpreter
        return ref[...] if interpret else plgpu.load(ref, (), layout=layout)

    def pipeline(body, context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(kb,),
            memory_registers=40,
            in_specs=[
                plgpu.BlockSpec((bm, BLOCK_K), lambda k: (0, k), transforms=fp8_transforms),
                plgpu.BlockSpec((1, bm), lambda k: (k, 0)),
                plgpu.BlockSpec((bn, BLOCK_K), lambda k: (0, k), transforms=fp8_transforms),
                plgpu.BlockSpec((1, bn), lambda k: (k, 0)),
            ],
            wg_axis="wg",
            num_compute_wgs=_NUM_CONSUMER_WGS,
            max_concurrent_steps=min(cfg.num_stages, kb),
            compute_context=context,
        )

    def kernel(*refs):
        if grouped:
            tg_g, nt_g, a_g, as_g, b_g, bs_g, o_g = refs
            m_iters = nt_g[0]
        else:
            a_g, as_g, b_g, bs_g, o_g = refs
            m_iters = mp // bm
        ignore = lambda *_, **__: None
        b_probe, bs_probe = (b_g.at[0], bs_g.at[0]) if grouped else (b_g, bs_g)
        allocs = pipeline(ignore, ignore).get_allocations(
            a_g.at[pl.ds(0, bm)], as_g.at[:, pl.ds(0, bm)], b_probe.at[pl.ds(0, bn)], bs_probe.at[:, pl.ds(0, bn)])

        @functools.partial(pl.run_scoped, allocs=allocs, collective_axes="wg",
                           o_smem=plgpu.SMEM((_NUM_CONSUMER_WGS, _WG_ROWS, bn), out_dtype, transforms=out_transforms),
                           **scratch)
        def _scope(allocs, o_smem, bt_smem=None):
            wg = lax.axis_index("wg")
            wg_rows = pl.ds(wg * _WG_ROWS, _WG_ROWS)

            @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
            def _tiles(info):
                mi, ni = plgpu.planar_snake(info.index[0], (m_iters, n_iters), 1, cfg.grid_tile_width)
                rows, cols = pl.ds(mi * bm, bm), pl.ds(ni * bn, bn)
                b_t, bs_t_ = (b_g.at[tg_g[mi]], bs_g.at[tg_g[mi]]) if grouped else (b_g, bs_g)

                def context(run):
                    acc = run(cast(jnp.zeros((_WG_ROWS, bn), jnp.float32), plgpu.Layout.WGMMA))
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # this warpgroup's previous tile is out
                    o_smem[wg] = acc.astype(out_dtype)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(o_smem.at[wg], o_g.at[pl.ds(mi * bm + wg * _WG_ROWS, _WG_ROWS), cols])

                def body(_, a_s, as_s, b_s, bs_s, acc):
                    # a_s [bm, 128] e4m3, as_s [1, bm] f32, b_s [bn, 128] e4m3, bs_s [1, bn] f32
                    def mma(part_ref):
                        if interpret:
                            bt_smem[wg] = b_s[...].T
                            b_kn = bt_smem.at[wg]
                        else:
                            b_kn = plgpu.transpose_ref(b_s, (1, 0))
                        plgpu.wgmma(part_ref, a_s.at[wg_rows], b_kn)
                        return part_ref[...]  # waits for this K block's wgmma

                    part = pl.run_scoped(mma, plgpu.ACC((_WG_ROWS, bn), jnp.float32))
                    sa = load(as_s.at[0, wg_rows], plgpu.Layout.WGMMA.reduce(1))
                    sb = load(bs_s.at[0], plgpu.Layout.WGMMA.reduce(0))
                    sa = lax.broadcast_in_dim(sa, (_WG_ROWS, bn), (0,))
                    sb = lax.broadcast_in_dim(sb, (_WG_ROWS, bn), (1,))
                    return acc + part * (sa * sb)

                pipeline(body, context)(a_g.at[rows], as_g.at[:, rows], b_t.at[cols], bs_t_.at[:, cols],
                                        allocations=allocs)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    call = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        grid=(_num_sms(cfg),),
        grid_names=("sm",),
        num_threads=_NUM_CONSUMER_WGS + 1,
        thread_name="wg",
        **(dict(interpret=_gpu_interpreter()) if interpret else {}),
    )
    args = (tile_group, num_tiles, a, as_t, b, bs_t) if grouped else (a, as_t, b, bs_t)
    return call(*args)


# ---------------------------------------------------------------------------------------- wrappers


def _pad_rows(x: jax.Array, rows: int) -> jax.Array:
    return jnp.pad(x, ((0, rows - x.shape[0]),) + ((0, 0),) * (x.ndim - 1))


def _pad_k(x: jax.Array) -> jax.Array:
    return jnp.pad(x, ((0, 0),) * (x.ndim - 1) + ((0, -x.shape[-1] % BLOCK_K),))


@functools.partial(jax.jit, static_argnames=("out_dtype", "backend", "config"))
def _fp8_gemm(a, a_scale, b, b_scale, *, out_dtype, backend: str, config: Fp8GemmConfig):
    if backend == "xla":
        return fp8_gemm_reference(a, a_scale, b, b_scale, out_dtype=out_dtype)
    (m, _), n = a.shape, b.shape[0]
    mp, np_ = _cdiv(m, config.block_m) * config.block_m, _cdiv(n, config.block_n) * config.block_n
    a_p, b_p = _pad_rows(_pad_k(a), mp), _pad_rows(_pad_k(b), np_)
    as_t = _pad_rows(a_scale, mp).T  # [kb, Mp]
    bs_t = jnp.pad(_column_scales(b_scale, n), ((0, 0), (0, np_ - n)))  # [kb, Np]
    if backend == "mosaic_gpu":
        out = _mosaic_gemm(a_p, as_t, b_p, bs_t, out_dtype, config)
    else:
        out = _pallas_gemm(a_p, as_t, b_p, bs_t, out_dtype, backend, config)
    return out[:m, :n]


def fp8_gemm(a, a_scale, b, b_scale, *, out_dtype=jnp.bfloat16, backend: str = "auto",
             config: Fp8GemmConfig | None = None) -> jax.Array:
    """dequant(a) @ dequant(b).T -> [M, N], promoted to FP32 every 128 of K. Any M, N, K.

    a: e4m3 [M, K], a_scale: f32 [M, ceil(K/128)]; b: e4m3 [N, K], b_scale: f32 [ceil(N/128), ceil(K/128)]
    (`quant.quantize_act` and `quant.quantize_weight` produce these).
    """
    _check_operands("fp8_gemm", a, a_scale, b, b_scale, grouped=False)
    backend = resolve_backend(backend)
    return _fp8_gemm(a, a_scale, b, b_scale, out_dtype=jnp.dtype(out_dtype), backend=backend,
                     config=default_config(backend, config))


def _aligned_layout(group_sizes: jax.Array, m: int, g: int, bm: int):
    """Where each row goes when every group starts on a `bm`-row tile boundary.

    Returns dest [M] (row index in the aligned layout; out of range for rows past the groups),
    tile_group [T] (expert of each aligned tile), num_tiles [1] (tiles holding rows) and T, a static
    bound: each non-empty group adds at most one partial tile, and there are at most min(G, M) of them.
    """
    t = (m + min(g, m) * (bm - 1)) // bm
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    padded = (sizes + bm - 1) // bm * bm
    pends = jnp.cumsum(padded)
    rows = jnp.arange(m, dtype=jnp.int32)
    gid = _group_ids(sizes, m)
    gc = jnp.minimum(gid, g - 1)
    dest = jnp.where(gid < g, (pends - padded)[gc] + rows - (ends - sizes)[gc], t * bm)
    tile_starts = jnp.arange(t, dtype=jnp.int32) * bm
    tile_group = jnp.minimum(jnp.searchsorted(pends, tile_starts, side="right"), g - 1).astype(jnp.int32)
    num_tiles = (pends[-1:] // bm).astype(jnp.int32)
    return dest, tile_group, num_tiles, t


@functools.partial(jax.jit, static_argnames=("out_dtype", "backend", "config"))
def _fp8_grouped_gemm(a, a_scale, b, b_scale, group_sizes, *, out_dtype, backend: str, config: Fp8GemmConfig):
    if backend == "xla":
        return fp8_grouped_gemm_reference(a, a_scale, b, b_scale, group_sizes, out_dtype=out_dtype)
    (m, _), (g, n, _) = a.shape, b.shape
    bm, bn = config.block_m, config.block_n
    dest, tile_group, num_tiles, t = _aligned_layout(group_sizes, m, g, bm)
    mp, np_ = t * bm, _cdiv(n, bn) * bn
    a_p = jnp.zeros((mp, a.shape[1]), a.dtype).at[dest].set(a, mode="drop")
    a_p = _pad_k(a_p)
    as_t = jnp.zeros((mp, a_scale.shape[1]), jnp.float32).at[dest].set(a_scale, mode="drop").T
    b_p = jnp.pad(_pad_k(b), ((0, 0), (0, np_ - n), (0, 0)))
    bs_t = jnp.pad(_column_scales(b_scale, n), ((0, 0), (0, 0), (0, np_ - n)))  # [G, kb, Np]
    if backend == "mosaic_gpu":
        out = _mosaic_gemm(a_p, as_t, b_p, bs_t, out_dtype, config, tile_group, num_tiles)
    else:
        out = _pallas_grouped_gemm(tile_group, num_tiles, a_p, as_t, b_p, bs_t, out_dtype, backend, config)
    return jnp.take(out[:, :n], dest, axis=0, mode="fill", fill_value=0)


def fp8_grouped_gemm(a, a_scale, b, b_scale, group_sizes, *, out_dtype=jnp.bfloat16, backend: str = "auto",
                     config: Fp8GemmConfig | None = None) -> jax.Array:
    """Grouped (MoE) FP8 GEMM: rows of `a` sorted by group; row r of group g gets dequant(a)[r] @ dequant(b[g]).T.

    a: e4m3 [M, K], a_scale [M, ceil(K/128)]; b: e4m3 [G, N, K], b_scale [G, ceil(N/128), ceil(K/128)];
    group_sizes: int [G], summing to <= M (rows past the sum come out as zeros). Returns [M, N].
    """
    _check_operands("fp8_grouped_gemm", a, a_scale, b, b_scale, grouped=True)
    _check(group_sizes.shape == (b.shape[0],),
           f"fp8_grouped_gemm: b {b.shape} needs group_sizes of shape {(b.shape[0],)}, got {group_sizes.shape}")
    _check(jnp.issubdtype(group_sizes.dtype, jnp.integer),
           f"fp8_grouped_gemm: group_sizes must be integers, got {group_sizes.dtype}")
    backend = resolve_backend(backend)
    return _fp8_grouped_gemm(a, a_scale, b, b_scale, group_sizes, out_dtype=jnp.dtype(out_dtype),
                             backend=backend, config=default_config(backend, config))


# ----------------------------------------------------------------------------- differentiable entries


def _quantize_weight_kn(w: jax.Array):
    """w [K, N] -> e4m3 [N, K] and scales [ceil(N/128), ceil(K/128)]: the GEMM's B for Fprop.

    128x128 blocks are the same set whichever way the matrix is read, so the transpose of this pair
    is the [K, N] quantisation Dgrad needs: one quantisation serves both (as DeepSeek does).
    """
    return quantize_weight(w.T)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fp8_linear(x, w, backend):
    return _fp8_linear_fwd(x, w, backend)[0]


def _fp8_linear_fwd(x, w, backend):
    xq, xs = quantize_act(x)
    wq, ws = _quantize_weight_kn(w)
    y = fp8_gemm(xq, xs, wq, ws, out_dtype=x.dtype, backend=backend)
    # Wgrad reads x along M: keep it in E4M3 as 1x128 tiles of x.T (per channel, 128 tokens).
    xtq, xts = quantize_act(x.T)
    return y, (xtq, xts, wq, ws, jnp.zeros((0,), w.dtype))


def _fp8_linear_bwd(backend, res, dy):
    xtq, xts, wq, ws, w_like = res
    gq, gs = quantize_act(dy)  # Dgrad's A: 1x128 tiles along N
    dx = fp8_gemm(gq, gs, wq.T, ws.T, out_dtype=jnp.float32, backend=backend)  # [M, K]
    gtq, gts = quantize_weight(dy.T)  # Wgrad's B: 128x128 blocks of dy.T [N, M]
    dw = fp8_gemm(xtq, xts, gtq, gts, out_dtype=jnp.float32, backend=backend)  # [K, N]
    return dx.astype(dy.dtype), dw.astype(w_like.dtype)


_fp8_linear.defvjp(_fp8_linear_fwd, _fp8_linear_bwd)


def fp8_linear(x: jax.Array, w: jax.Array, *, backend: str = "auto") -> jax.Array:
    """x [M, K] @ w [K, N] with every GEMM of training in FP8 (DeepSeek-V3 report s.3.3). Differentiable.

    w is the full-precision master weight in this project's [in, out] layout. Forward (Fprop): x per 1x128
    tile, w per 128x128 block. Backward: Dgrad = dy (1x128 tiles) @ w (the forward's blocks, transposed);
    Wgrad = x.T (1x128 tiles along M) @ dy (128x128 blocks). Output in x.dtype; grads in x.dtype, w.dtype.
    """
    _check(x.ndim == 2 and w.ndim == 2 and x.shape[1] == w.shape[0],
           f"fp8_linear: x must be [M, K] and w [K, N], got x {x.shape} and w {w.shape}")
    return _fp8_linear(x, w, resolve_backend(backend))


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def fp8_kgrouped_gemm_reference(a, a_scale, b, b_scale, group_sizes, *, out_dtype=jnp.float32) -> jax.Array:
    """Wgrad of grouped layers: out[g] = dequant(a)[:, rows of g] @ dequant(b)[:, rows of g].T -> [G, K, N].

    a: e4m3 [K, M] (1x128 tiles along M), b: e4m3 [N, M] (128x128 blocks); the contraction runs over the
    rows of one group, promoted every 128 of M. Groups must start on 128-row boundaries, so that no scale
    tile mixes two experts (`_aligned_layout` with bm = 128 gives that layout).
    """
    (k, m), n, g = a.shape, b.shape[0], group_sizes.shape[0]
    tile_group = _group_ids(group_sizes, m)[::BLOCK_K]  # expert of each 128-row block (G past the end)

    def step(acc, blk):
        ak, bk, sa, sb, gi = blk  # [K, 128], [N, 128], [K], [N], group
        part = lax.dot_general(ak, bk, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST,
                               preferred_element_type=jnp.float32)
        upd = _promote(acc[jnp.minimum(gi, g - 1)], part, sa, sb)
        return lax.cond(gi < g, lambda: acc.at[gi].set(upd), lambda: acc), None

    blocks = (_k_blocks(a), _k_blocks(b), a_scale.T, _column_scales(b_scale, n), tile_group)
    acc, _ = lax.scan(step, jnp.zeros((g, k, n), jnp.float32), blocks)
    return acc.astype(out_dtype)


def _quantize_experts(w: jax.Array):
    return jax.vmap(_quantize_weight_kn)(w)  # [G, N, K] e4m3, [G, nb, kb]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fp8_grouped_linear(x, w, group_sizes, backend):
    return _fp8_grouped_linear_fwd(x, w, group_sizes, backend)[0]


def _fp8_grouped_linear_fwd(x, w, group_sizes, backend):
    xq, xs = quantize_act(x)
    wq, ws = _quantize_experts(w)
    y = fp8_grouped_gemm(xq, xs, wq, ws, group_sizes, out_dtype=x.dtype, backend=backend)
    return y, (x, wq, ws, group_sizes, jnp.zeros((0,), w.dtype))


def _fp8_grouped_linear_bwd(backend, res, dy):
    x, wq, ws, group_sizes, w_like = res
    m, g = x.shape[0], group_sizes.shape[0]
    gq, gs = quantize_act(dy)
    dx = fp8_grouped_gemm(gq, gs, jnp.swapaxes(wq, 1, 2), jnp.swapaxes(ws, 1, 2), group_sizes,
                          out_dtype=jnp.float32, backend=backend)
    # Wgrad: rows moved so each expert starts on a 128-row tile; then no tile along M mixes two experts.
    dest, _, _, t = _aligned_layout(group_sizes, m, g, BLOCK_K)
    aligned = lambda v: jnp.zeros((t * BLOCK_K, v.shape[1]), jnp.float32).at[dest].set(v, mode="drop")
    padded_sizes = (group_sizes.astype(jnp.int32) + BLOCK_K - 1) // BLOCK_K * BLOCK_K
    xtq, xts = quantize_act(aligned(x).T)
    gtq, gts = quantize_weight(aligned(dy).T)
    dw = fp8_kgrouped_gemm_reference(xtq, xts, gtq, gts, padded_sizes)
    return dx.astype(x.dtype), dw.astype(w_like.dtype), None


_fp8_grouped_linear.defvjp(_fp8_grouped_linear_fwd, _fp8_grouped_linear_bwd)


def fp8_grouped_linear(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, backend: str = "auto") -> jax.Array:
    """MoE experts in FP8: row r of group g gets x[r] @ w[g]; x [M, K] sorted by expert, w [G, K, N].

    Differentiable in x and w (the grouped counterpart of `fp8_linear`); rows past sum(group_sizes) give 0.
    Wgrad runs in plain jnp (`fp8_kgrouped_gemm_reference`), whatever the backend.
    """
    _check(x.ndim == 2 and w.ndim == 3 and x.shape[1] == w.shape[1],
           f"fp8_grouped_linear: x must be [M, K] and w [G, K, N], got x {x.shape} and w {w.shape}")
    _check(group_sizes.shape == (w.shape[0],),
           f"fp8_grouped_linear: w {w.shape} needs group_sizes of shape {(w.shape[0],)}, got {group_sizes.shape}")
    return _fp8_grouped_linear(x, w, group_sizes, resolve_backend(backend))
