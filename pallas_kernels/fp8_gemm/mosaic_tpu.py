"""Backend "mosaic_tpu": the FP8 GEMMs as Pallas TPU (Mosaic) kernels, for v5e, v5p, v6e and TPU7x.

Grid (M tiles, N tiles, K steps), K innermost and sequential: per step the pipeline copies a [bm, tk] tile of a,
a [bn, tk] tile of b and their scales from HBM into VMEM (`num_stages` buffers each, so the next step's copies
overlap this step's math); the body multiplies each 128-wide K block of the tiles into a fresh f32 partial
product, scales it by a_scale * b_scale and adds it into an f32 accumulator in VMEM scratch (the package's
promotion every 128 of K); the last K step writes the output tile. Both operands stay E4M3 in HBM and in the
copies: the MXU-side format is a per-generation choice made inside VMEM.

Generations (FACTS s.7). TPU7x's MXU multiplies E4M3 itself, so its tiles go to the dot as they are. The MXUs
of v5e, v5p and v6e take bf16 (their 8-bit float formats are e5m2 and e4m3b11fnuz, not E4M3 as DeepSeek's
checkpoints hold it), so the kernel widens each 128-wide K block to bf16 first: exact, every E4M3 value is a
bf16, and the products of two bf16 values are exact in the f32 partial product. The generation comes from
`Fp8GemmConfig.tpu_generation`, else from the target device: the devices of the current mesh (a program built
for TPUs on another host), else the default device; none is a TPU (the TPU interpreter on a CPU host): the bf16
path, which every generation runs.

Scales. Activation scales are per row, so a K block's scales must be a column ([bm, 1]) against the [bm, bn]
partial product. Stored that way ([..., bm, s]), a step's s scales would each fill a 128-lane row in HBM and
VMEM; so the wrapper lays them out with the rows along lanes, regrouped as [K steps, M tiles, s, bm] (s = K
blocks a step; a block of whole trailing dims is legal for any bm), and the body transposes the [s, bm] block
once a step. Column scales of b are rows already ([K steps, s, Np]).

Grouped: the rows come in the package's aligned layout (`tiles.aligned_layout`), so a tile of bm rows belongs
to one group; the expert of each tile and the count of tiles holding rows arrive by scalar prefetch, and b's
block map reads the tile's expert. Tiles past the count compute nothing and map their inputs to the last live
tile's blocks, which the pipeline then does not copy again.

Weight-only (decode): x stays bf16 or f32 and only the weight is E4M3, read [N, K] or, as the model holds it,
[K, N] (`WEIGHT_KN`: [tk, bn] tiles, contracted along their rows; a transposed copy would cost a read and a write
of every weight a step, and XLA may keep the copies alive across layers) (half the bytes of a bf16 weight read per
token); each K block of the weight is widened to x's dtype in VMEM and its partial product is scaled by the
128x128 block's scale alone. On TPU7x a bf16 x meets the E4M3 tile on the MXU as it is. An f32 x multiplies at
HIGHEST precision (f32 products, as the reference's).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import backends
from pallas_kernels.fp8_gemm import tiles
from pallas_kernels.fp8_gemm.config import Fp8GemmConfig
from pallas_kernels.fp8_gemm.operands import BLOCK_K, cdiv

DEFAULTS = dict(block_m=256, block_n=512, block_k=1024, num_stages=2)
FP8_MXU_GENERATION = 7  # TPU7x (Ironwood): the first MXU that takes E4M3 (jax's TpuInfo.is_matmul_supported)
_LANES = 128
_SUBLANE_BYTES = 32  # a VMEM tile is 8 sublanes of 32-bit words: 8 f32 rows, 16 bf16, 32 E4M3
# Scoped VMEM the kernels ask the compiler for: above the 16 MiB it scopes by default before v6e, half of the
# 64 MiB a v5p or TPU7x core has. The default tiles need ~6 MiB; config_refusal refuses tiles that need more.
VMEM_LIMIT_BYTES = 32 * 1024 * 1024


def config_refusal(config: Fp8GemmConfig) -> str | None:
    if config.block_m % _SUBLANE_BYTES:
        return (f"mosaic_tpu: block_m must be a multiple of {_SUBLANE_BYTES} (E4M3 rows of a VMEM tile), "
                f"got {config.block_m}")
    if config.block_n % _LANES:
        return f"mosaic_tpu: block_n must be a multiple of {_LANES} (lanes), got {config.block_n}"
    if config.block_k % BLOCK_K:
        return f"mosaic_tpu: block_k must be a multiple of {BLOCK_K}, got {config.block_k}"
    if config.num_stages not in (1, 2):
        return (f"mosaic_tpu: num_stages must be 1 or 2 (Pallas TPU buffers a pipeline at most twice), "
                f"got {config.num_stages}")
    worst = _vmem_bytes(config.block_m, config.block_n, config.block_k, config.num_stages, 4, 4)
    if worst > VMEM_LIMIT_BYTES:
        return (f"mosaic_tpu: tiles {config.block_m}x{config.block_n}x{config.block_k} with {config.num_stages} "
                f"stages need ~{worst >> 20} MiB of VMEM (f32 input and output), over the kernels' "
                f"{VMEM_LIMIT_BYTES >> 20} MiB")
    return None


def _vmem_bytes(bm: int, bn: int, tk: int, stages: int, x_bytes: int, out_bytes: int) -> int:
    """VMEM of one kernel: pipelined input tiles and scales, the output tile (double-buffered), the f32
    accumulator, and the body's temporaries (a K block's partial product and its scale tile, widened tiles)."""
    s = tk // BLOCK_K
    inputs = stages * (bm * tk * x_bytes + bn * tk + cdiv(s, 8) * 8 * (bm + bn) * 4)
    temporaries = 2 * bm * bn * 4 + (bm + bn) * BLOCK_K * 4 + bm * _LANES * 4
    return inputs + 2 * bm * bn * out_bytes + bm * bn * 4 + temporaries


def target_generation(config: Fp8GemmConfig) -> int | None:
    """The TPU generation the kernel is built for: the config's, else the target device's (None: not a TPU)."""
    if config.tpu_generation is not None:
        return config.tpu_generation
    try:  # reads the current mesh's abstract device first, else the default device
        return pltpu.get_tpu_info().generation
    except ValueError:  # not a TPU: a CPU host running the TPU interpreter
        return None


def fp8_mxu(config: Fp8GemmConfig) -> bool:
    """Whether the dot takes E4M3 tiles as they are (TPU7x and later), not widened to bf16 in VMEM."""
    generation = target_generation(config)
    return generation is not None and generation >= FP8_MXU_GENERATION


# ----------------------------------------------------------------------------------------------- the tiles


class _Plan(NamedTuple):
    """One launch's tiling: rows and columns of an output tile, K blocks a grid step, K steps."""

    bm: int
    bn: int
    s: int
    nk: int

    @property
    def tk(self) -> int:
        return self.s * BLOCK_K


def _plan(config: Fp8GemmConfig, m: int, n: int, k: int, x_dtype, out_dtype) -> _Plan:
    """Fewer rows than block_m make one tile of whole VMEM tiles (decode: a few tokens, not block_m of padding),
    and likewise fewer columns than block_n. K is cut into the fewest steps of at most block_k, spread evenly:
    K pads by less than a 128-block a step."""
    rows = max(_SUBLANE_BYTES // jnp.dtype(x_dtype).itemsize, _SUBLANE_BYTES // jnp.dtype(out_dtype).itemsize)
    bm = config.block_m if m > config.block_m else cdiv(m, rows) * rows
    bn = min(config.block_n, cdiv(n, _LANES) * _LANES)
    kb = cdiv(k, BLOCK_K)
    nk = cdiv(kb, config.block_k // BLOCK_K)
    return _Plan(bm=bm, bn=bn, s=cdiv(kb, nk), nk=nk)


def _compiler_params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"),
                                vmem_limit_bytes=VMEM_LIMIT_BYTES)


def _interpret(config: Fp8GemmConfig):
    return config.interpret if backends.is_tpu_interpret_params(config.interpret) else False


# ----------------------------------------------------------------------------------------------- the body


def _block_dot(ak: jax.Array, bk: jax.Array, *, fp8_mxu: bool, b_kn: bool) -> jax.Array:
    """[bm, 128] x [bn, 128] ([128, bn] with b_kn) -> [bm, bn] f32, one K block's raw products. ak: E4M3, bf16 or
    f32; bk: E4M3."""
    precision = None
    if ak.dtype == jnp.float32:  # weight-only with an f32 x: f32 products, as the reference's
        bk, precision = bk.astype(jnp.float32), lax.Precision.HIGHEST
    elif not fp8_mxu:  # no E4M3 on this MXU: widen to bf16 in VMEM (exact for E4M3 values)
        ak, bk = ak.astype(jnp.bfloat16), bk.astype(jnp.bfloat16)
    return lax.dot_general(ak, bk, (((1,), (0 if b_kn else 1,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def _kernel(*refs, steps: int, scaled: bool, grouped: bool, fp8_mxu: bool, b_kn: bool):
    # [tile_group [T], num_tiles [1] (SMEM, grouped only)], a_ref [bm, tk], [as_ref [s, bm] f32 (scaled only)],
    # b_ref [bn, tk] e4m3 ([tk, bn] with b_kn), bs_ref [s, bn] f32, o_ref [bm, bn], acc_ref [bm, bn] f32 (scratch)
    if grouped:
        _, num_tiles, *refs = refs
    a_ref, as_ref, b_ref, bs_ref, o_ref, acc_ref = refs if scaled else (refs[0], None, *refs[1:])
    k = pl.program_id(2)
    live = pl.program_id(0) < num_tiles[0] if grouped else True

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(live)
    def _():
        sa = None if as_ref is None else as_ref[...].T  # [bm, s]: each K block's row scales as a column
        for j in range(steps):
            cols = slice(j * BLOCK_K, (j + 1) * BLOCK_K)
            bk = b_ref[cols, :] if b_kn else b_ref[:, cols]
            part = _block_dot(a_ref[:, cols], bk, fp8_mxu=fp8_mxu, b_kn=b_kn)
            sb = bs_ref[j:j + 1, :]  # [1, bn]
            acc_ref[...] += part * (sb if sa is None else sa[:, j:j + 1] * sb)

    @pl.when(jnp.logical_and(k == pl.num_programs(2) - 1, live))
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


# --------------------------------------------------------------------------------------------- the launch


@dataclasses.dataclass(frozen=True)
class _Launch:
    """A launch's tiling and padded output size."""

    plan: _Plan
    mp: int
    np_: int
    cfg: Fp8GemmConfig

    @property
    def grid(self) -> tuple[int, int, int]:
        return self.mp // self.plan.bm, self.np_ // self.plan.bn, self.plan.nk

    def spec(self, block, index_map):
        """A pipelined input's BlockSpec; `num_stages` 1: single-buffered (no copy overlaps the math; saves VMEM)."""
        if self.cfg.num_stages == 2:
            return pl.BlockSpec(block, index_map)
        return pl.BlockSpec(block, index_map, pipeline_mode=pl.Buffered(self.cfg.num_stages))


def _row_scales(as_t: jax.Array, p: _Plan) -> jax.Array:
    """[Kp/128, Mp] -> [nk, Mp/bm, s, bm]: one grid step's scales are whole trailing dims, legal for any bm."""
    mp = as_t.shape[1]
    return as_t.reshape(p.nk, p.s, mp // p.bm, p.bm).transpose(0, 2, 1, 3)


def _dense(a, as_t, b, bs_t, out_dtype, cfg: Fp8GemmConfig, *, plan: _Plan, b_kn: bool = False):
    """a [Mp, Kp], as_t [Kp/128, Mp] (None: weight-only), b [Np, Kp] e4m3 ([Kp, Np] with b_kn), bs_t [Kp/128, Np]
    -> [Mp, Np]."""
    (mp, _), np_ = a.shape, b.shape[-1 if b_kn else 0]
    launch = _Launch(plan, mp, np_, cfg)
    p = plan
    scaled = as_t is not None
    in_specs = [launch.spec((p.bm, p.tk), lambda i, j, k: (i, k))]
    args = [a]
    if scaled:
        in_specs.append(launch.spec((None, None, p.s, p.bm), lambda i, j, k: (k, i, 0, 0)))
        args.append(_row_scales(as_t, p))
    if b_kn:
        b_spec = launch.spec((p.tk, p.bn), lambda i, j, k: (k, j))
    else:
        b_spec = launch.spec((p.bn, p.tk), lambda i, j, k: (j, k))
    in_specs += [b_spec,
                 launch.spec((None, p.s, p.bn), lambda i, j, k: (k, 0, j))]
    args += [b, bs_t.reshape(p.nk, p.s, np_)]
    call = pl.pallas_call(
        functools.partial(_kernel, steps=p.s, scaled=scaled, grouped=False, fp8_mxu=fp8_mxu(cfg), b_kn=b_kn),
        grid=launch.grid,
        in_specs=in_specs,
        out_specs=pl.BlockSpec((p.bm, p.bn), lambda i, j, k: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        scratch_shapes=[pltpu.VMEM((p.bm, p.bn), jnp.float32)],
        compiler_params=_compiler_params(),
        interpret=_interpret(cfg),
        name="fp8_gemm_tpu" if scaled else "fp8_weight_gemm_tpu",
    )
    return call(*args)


def _grouped(tile_group, num_tiles, a, as_t, b, bs_t, out_dtype, cfg: Fp8GemmConfig, *, plan: _Plan,
             b_kn: bool = False):
    """Aligned rows a [T*bm, Kp], as_t [Kp/128, T*bm] (None: weight-only), b [G, Np, Kp] ([G, Kp, Np] with b_kn),
    bs_t [G, Kp/128, Np]; tile_group [T] int32 (expert of each row tile), num_tiles [1] int32 (tiles holding rows)
    -> [T*bm, Np]."""
    (mp, _), g, np_ = a.shape, b.shape[0], b.shape[-1 if b_kn else 1]
    launch = _Launch(plan, mp, np_, cfg)
    p = plan
    _, nj, nk = launch.grid
    scaled = as_t is not None

    def live(i, j, k, nt):
        """Past the tiles holding rows: the last live tile's last blocks, already in VMEM (no copy)."""
        dead = i >= nt[0]
        return (jnp.where(dead, jnp.maximum(nt[0] - 1, 0), i), jnp.where(dead, nj - 1, j),
                jnp.where(dead, nk - 1, k))

    def a_map(i, j, k, tg, nt):
        i, _, k = live(i, j, k, nt)
        return i, k

    def as_map(i, j, k, tg, nt):
        i, _, k = live(i, j, k, nt)
        return k, i, 0, 0

    def b_map(i, j, k, tg, nt):
        i, j, k = live(i, j, k, nt)
        return (tg[i], k, j) if b_kn else (tg[i], j, k)

    def bs_map(i, j, k, tg, nt):
        i, j, k = live(i, j, k, nt)
        return tg[i], k, 0, j

    in_specs = [launch.spec((p.bm, p.tk), a_map)]
    args = [a]
    if scaled:
        in_specs.append(launch.spec((None, None, p.s, p.bm), as_map))
        args.append(_row_scales(as_t, p))
    b_block = (None, p.tk, p.bn) if b_kn else (None, p.bn, p.tk)
    in_specs += [launch.spec(b_block, b_map), launch.spec((None, None, p.s, p.bn), bs_map)]
    args += [b, bs_t.reshape(g, p.nk, p.s, np_)]
    # Dead tiles keep their own output block (left unwritten, dropped by the gather back): mapping it onto a
    # live one would let a second TensorCore (v5p megacore) write back a stale buffer over it.
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=launch.grid,
        in_specs=in_specs,
        out_specs=pl.BlockSpec((p.bm, p.bn), lambda i, j, k, tg, nt: (i, j)),
        scratch_shapes=[pltpu.VMEM((p.bm, p.bn), jnp.float32)],
    )
    call = pl.pallas_call(
        functools.partial(_kernel, steps=p.s, scaled=scaled, grouped=True, fp8_mxu=fp8_mxu(cfg), b_kn=b_kn),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        compiler_params=_compiler_params(),
        interpret=_interpret(cfg),
        name="fp8_grouped_gemm_tpu" if scaled else "fp8_grouped_weight_gemm_tpu",
    )
    return call(tile_group, num_tiles, *args)


# ------------------------------------------------------------------------------------------ the interface


def _tiled(config: Fp8GemmConfig, a, n: int, out_dtype) -> tuple[Fp8GemmConfig, _Plan]:
    plan = _plan(config, a.shape[0], n, a.shape[1], a.dtype, out_dtype)
    return dataclasses.replace(config, block_m=plan.bm, block_n=plan.bn), plan


def gemm(a, a_scale, b, b_scale, *, out_dtype, config: Fp8GemmConfig):
    cfg, plan = _tiled(config, a, b.shape[-2], out_dtype)
    kernel = functools.partial(_dense, plan=plan)
    return tiles.run_dense(kernel, a, a_scale, b, b_scale, out_dtype, cfg, k_multiple=plan.tk)


def grouped_gemm(a, a_scale, b, b_scale, group_sizes, *, out_dtype, config: Fp8GemmConfig):
    cfg, plan = _tiled(config, a, b.shape[-2], out_dtype)
    kernel = functools.partial(_grouped, plan=plan)
    return tiles.run_grouped(kernel, a, a_scale, b, b_scale, group_sizes, out_dtype, cfg, k_multiple=plan.tk)


# The weight-only GEMMs also read w as the model holds it, [(G,) K, N]: tiles of [tk, bn], no copy of the weight.
WEIGHT_KN = True


def weight_gemm(x, w, w_scale, *, out_dtype, config: Fp8GemmConfig, w_layout: str = "nk"):
    kn = w_layout == "kn"
    cfg, plan = _tiled(config, x, w.shape[-1 if kn else -2], out_dtype)
    kernel = functools.partial(_dense, plan=plan, b_kn=kn)
    return tiles.run_dense(kernel, x, None, w, w_scale, out_dtype, cfg, k_multiple=plan.tk, b_kn=kn)


def grouped_weight_gemm(x, w, w_scale, group_sizes, *, out_dtype, config: Fp8GemmConfig, w_layout: str = "nk"):
    kn = w_layout == "kn"
    cfg, plan = _tiled(config, x, w.shape[-1 if kn else -2], out_dtype)
    kernel = functools.partial(_grouped, plan=plan, b_kn=kn)
    return tiles.run_grouped(kernel, x, None, w, w_scale, group_sizes, out_dtype, cfg, k_multiple=plan.tk, b_kn=kn)
