"""TPU benchmark of the Pallas TPU kernels (backend "mosaic_tpu"), and the routed experts' grouped matmul two ways.

Kernels, at DeepSeek-V3 shapes (`--small`: tiny ones that compile in seconds):
  - `mla_decode`, BF16 and packed FP8 latent cache: 128 heads, C=512, R=64, batch 64, 4096 cached tokens, T=1 and 2;
  - `fp8_gemm` M=256 K=7168 N=2048; `fp8_grouped_gemm` the same rows over 8 experts;
  - `fp8_weight_gemm` (bf16 x, E4M3 weight held [K, N] as the model holds it: w_layout "kn") at decode rows
    M=8..64; `fp8_grouped_weight_gemm` 64 rows, 8 experts.

On a TPU (jax.devices() are TPUs) each kernel is timed (`--iters` calls dispatched back to back, then one wait;
the median of `--repeats` such runs, divided by the calls), reported as GB/s and TFLOPS against this chip's peaks,
and its output checked against the op's "xla" backend (cos diff, DeepGEMM's and FlashMLA's limits).
`--compile_only` (any host with libtpu) compiles each kernel for the compile-only devices of each generation
(`--generations`, default v5e,v5p,v6e,tpu7x) and prints, per kernel: compiled or the kernel's up-front refusal,
its VMEM (XLA's scoped-memory record on the tpu_custom_call), compile seconds, and a roofline ESTIMATE from our
own count of the bytes a call must move (cache or weights read, q / x read, output written) and its FLOPs
(2*M*N*K; FlashMLA's 2*T*B*S*H*(C+R+C) for MLA), against one device's HBM bandwidth and peak (docs FACTS.md s.7,
`dsv3_jax.plan.CHIPS`; TPU7x shows each of its 2 TensorCores as a device, so a device has half a chip's figures).
The estimate is given at 100% and at 90% of the bandwidth (FlashMLA's decode reaches about 90% of HBM bandwidth
on H800). Nothing is timed in this mode: every time it prints is an estimate.

Inputs are laid out row-major (jax.experimental.layout): TPU's default layout of an array whose last dimension is
not a multiple of 128 lanes (a cache row of 576 bf16 values or 656 bytes) puts another dimension minor, and XLA
then copies the whole array into the kernel's layout before every call. Each kernel is also compiled on default
layouts and that copy's bytes reported (`relayout_bytes`): a cache must be kept in the kernel's layout.

The experts comparison (part of the default compile-only run; `--only experts` alone) compiles the routed
experts' SwiGLU FFN on rows sorted by expert, forward and forward+backward, with its three grouped matmuls done
by megablox as the model runs it (`pallas_kernels.grouped_matmul.gmm`: gmm forward, gmm + tgmm backward, tiles
chosen per call for the target generation, `choose_tiling`; the table lists the forward's), by `jax.lax.ragged_dot`
(XLA's backward), and by megablox with fixed tiles (`--compare_tiles`, each capped at its dimension; 128x128x128
was the model's tiling before it chose per shape), for the `small` preset's and DeepSeek-V3's expert shapes on v5p
and TPU7x (`--expert_generations`); per way: the compiler's FLOPs and bytes accessed (cost_analysis: Pallas
kernels count what they declare), HBM temporaries (memory_analysis), compile seconds, and a roofline ESTIMATE from
those two counts. Always compile-only.

Usage:
  python benchmarks/tpu_kernels.py                       # on a TPU host: time the kernels on this chip
  python benchmarks/tpu_kernels.py --compile_only [--generations v5e,tpu7x] [--only kernels|experts|all]
                                   [--small] [--json] [--json_out FILE] [--filter REGEX] [--no_layout_check]
                                   [--compare_tiles 128x128x128,512x1024x1024]
  python benchmarks/tpu_kernels.py --interpret --small   # CPU: the timing path in jax's TPU interpreter
                                                          # (checks the code; its figures mean nothing)
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib.util
import json
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.layout import Format, Layout
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu.megablox import ops as megablox
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dsv3_jax.config import ModelConfig
from dsv3_jax.plan import CHIPS, topology_devices
from pallas_kernels import fp8_gemm as fg
from pallas_kernels import grouped_matmul
from pallas_kernels.mla_decode import MlaDecodeConfig, fp8_cache, mla_decode
from pallas_kernels.mla_decode import supports as mla_supports
from pallas_kernels.quant import BLOCK, quantize_act, quantize_weight

S = jax.ShapeDtypeStruct
F32, BF16, E4M3 = jnp.float32, jnp.bfloat16, jnp.float8_e4m3fn

TOPOLOGIES = {"v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2", "tpu7x": "tpu7x:2x2x1"}
DEVICE_KINDS = {"TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p", "TPU v5p": "v5p", "TPU v6 lite": "v6e",
                "TPU v6e": "v6e", "TPU7x": "tpu7x"}  # jax's device_kind (as libtpu names it) -> CHIPS key
# Dense FP8 FLOP/s a chip, where its MXU multiplies E4M3 (FACTS.md s.7). Older MXUs take bf16 only (their 8-bit
# floats are e5m2 and e4m3b11fnuz), so the kernels widen E4M3 to bf16 in VMEM and run at the BF16 peak there.
FP8_FLOPS = {"tpu7x": 4614e12}
BANDWIDTH_SHARES = (1.0, 0.9)  # FlashMLA's decode: ~90% of HBM bandwidth on H800
GEMM_DIFF_MAX, MLA_DIFF_MAX = 1e-3, 1e-5  # limits on cos_diff: DeepGEMM's and FlashMLA's tests
EXPERT_GENERATIONS = ("v5p", "tpu7x")

# DeepSeek-V3 shapes.
MLA = dict(batch=64, cache=4096, heads=128, c=512, r=64)
MLA_SQ = (1, 2)  # one query a sequence, and two (MTP's speculative token)
MLA_BLOCK_S = 512  # cache rows a grid step: fewer steps (each costs ~0.35 us of pipeline overhead on TPU)
GEMM = dict(m=256, k=7168, n=2048, experts=8)  # hidden 7168 -> a routed expert's 2048
DECODE_ROWS = (8, 16, 32, 64)
# --small: shapes that compile in about a second each.
SMALL_MLA = dict(batch=2, cache=256, heads=16, c=128, r=64)
SMALL_MLA_BLOCK_S = 128
SMALL_GEMM = dict(m=64, k=512, n=256, experts=4)
SMALL_DECODE_ROWS = (8,)
# The experts: rows a device multiplies = its tokens x top-k (balanced routing; with expert parallelism a device
# receives as many rows as its own tokens sent); experts a device holds = routed experts / expert-parallel ways.
EXPERT_TOKENS = {"small": 2048, "deepseek_v3_671b": 4096}  # small: its CPU batch 8 x 256; V3: 4096 a device
EXPERT_PARALLEL = {"small": 1, "deepseek_v3_671b": 32}  # V3: 256 experts over 32 devices, 8 each
SMALL_EXPERT_TOKENS = 128
COMPARE_TILES = ((512, 1024, 1024),)  # megablox (rows, K, N) tiles compared; each capped at its dimension

_HLO_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "s16": 2,
                 "u16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ the chips


def chip_figures(generation: str) -> dict:
    """One device's peaks: the kernels run on one device, and a TPU7x chip is two devices."""
    chip = CHIPS[generation]
    return dict(name=chip.name, devices_per_chip=chip.devices_per_chip,
                hbm_bytes_per_s=chip.per_device(chip.hbm_bandwidth),
                bf16_flops_per_s=chip.per_device(chip.bf16_flops),
                fp8_flops_per_s=chip.per_device(FP8_FLOPS.get(generation, chip.bf16_flops)),
                fp8_mxu=generation in FP8_FLOPS)


def roofline(nbytes: int, flops: int, chip: dict, peak: str) -> dict:
    """ESTIMATE: max(bytes / bandwidth, FLOPs / peak) at each share of the bandwidth; the bound is whichever
    term is larger at full bandwidth."""
    flops_per_s = chip[f"{peak}_flops_per_s"]
    t_memory, t_compute = nbytes / chip["hbm_bytes_per_s"], flops / flops_per_s
    est = {"peak": peak, "peak_flops_per_s": flops_per_s, "hbm_bytes_per_s": chip["hbm_bytes_per_s"],
           "t_memory_s": t_memory, "t_compute_s": t_compute,
           "bound": "memory" if t_memory >= t_compute else "compute"}
    for share in BANDWIDTH_SHARES:
        t = max(t_memory / share, t_compute)
        key = f"at_{round(100 * share)}pct_bw"
        est[key] = {"time_s": t, "gbps": nbytes / t / 1e9, "tflops": flops / t / 1e12}
    return est


# ------------------------------------------------------------------------------------------ the cases


@dataclasses.dataclass(frozen=True)
class Case:
    kernel: str
    variant: str
    shape: dict
    specs: tuple  # ShapeDtypeStructs of fn's inputs
    fn: Callable
    traffic: dict  # bytes a call must move, by operand (our count from the shapes)
    flops: int
    peak: str  # "bf16" or "fp8": the MXU rate the kernel's products run at (fp8: where the MXU takes E4M3)
    make: Callable  # make(key) -> inputs matching specs (the timed path)
    reference: Callable  # the same op on backend "xla" (plain jnp): the timed output is checked against it
    refusal: str | None = None

    @property
    def label(self) -> str:
        return f"{self.kernel} {self.variant} {' '.join(f'{k}={v}' for k, v in self.shape.items())}"


def _bytes(shape, dtype) -> int:
    return math.prod(shape) * jnp.dtype(dtype).itemsize


def mla_case(dims: dict, sq: int, fp8: bool, block_s: int, interpret) -> Case:
    b, s, h, c, r = (dims[k] for k in ("batch", "cache", "heads", "c", "r"))
    width, dtype = (fp8_cache.row_bytes(c, r), jnp.uint8) if fp8 else (c + r, BF16)
    config = MlaDecodeConfig(block_s=block_s, interpret=interpret)
    specs = (S((b, sq, h, c + r), BF16), S((b, s, width), dtype), S((b,), jnp.int32))
    op = functools.partial(mla_decode, v_dim=c, softmax_scale=(c + r) ** -0.5)
    fn = functools.partial(op, backend="mosaic_tpu", config=config)
    traffic = {"cache": _bytes(specs[1].shape, dtype), "q": _bytes(specs[0].shape, BF16),
               "out": _bytes((b, sq, h, c), BF16)}

    @jax.jit
    def make(key):
        kq, kc = jax.random.split(key)
        rows = jax.random.normal(kc, (b, s, c + r), F32)
        cache = fp8_cache.quantize_rows(rows, c) if fp8 else rows.astype(BF16)
        return jax.random.normal(kq, specs[0].shape, F32).astype(BF16), cache, jnp.full((b,), s, jnp.int32)

    refusal = mla_supports(specs[0].shape, specs[1].shape, dtype, v_dim=c, backend="mosaic_tpu", config=config)
    return Case("mla_decode", "fp8_cache" if fp8 else "bf16_cache", dict(batch=b, cache=s, heads=h, sq=sq, c=c, r=r,
                block_s=block_s), specs, fn, traffic, 2 * sq * b * s * h * (c + r + c), "bf16", make,
                functools.partial(op, backend="xla"), refusal)


def _scale_shapes(m: int, n: int, k: int) -> tuple[tuple, tuple]:
    """a's 1x128 tile scales [M, kb], b's 128x128 block scales [nb, kb]."""
    return (m, _cdiv(k, BLOCK)), (_cdiv(n, BLOCK), _cdiv(k, BLOCK))


def _even_sizes(m: int, g: int) -> jax.Array:
    return jnp.asarray([m // g + (i < m % g) for i in range(g)], jnp.int32)


def gemm_case(m: int, n: int, k: int, experts: int, weight_only: bool, interpret) -> Case:
    """Dense (experts 0) or grouped FP8 GEMM; weight_only: bf16 x and E4M3 weight (the decode GEMM), the weight
    [(G,) K, N] as the model's `Fp8Weight` holds it (w_layout "kn")."""
    config = fg.Fp8GemmConfig(interpret=interpret)
    a_scale, b_scale = _scale_shapes(m, n, k)
    lead = (experts,) if experts else ()
    w_specs = (S((*lead, *((k, n) if weight_only else (n, k))), E4M3), S((*lead, *b_scale), F32))
    x_specs = (S((m, k), BF16),) if weight_only else (S((m, k), E4M3), S(a_scale, F32))
    specs = x_specs + w_specs + ((S((experts,), jnp.int32),) if experts else ())
    name = f"fp8{'_grouped' if experts else ''}{'_weight' if weight_only else ''}_gemm"
    layout = {"w_layout": "kn"} if weight_only else {}
    fn = functools.partial(getattr(fg, name), backend="mosaic_tpu", config=config, **layout)
    traffic = {"x": sum(_bytes(s.shape, s.dtype) for s in x_specs),
               "weight": sum(_bytes(s.shape, s.dtype) for s in w_specs), "out": _bytes((m, n), BF16)}

    @jax.jit
    def make(key):
        kx, kw = jax.random.split(key)
        x = jax.random.normal(kx, (m, k), F32)
        w, ws = jax.vmap(quantize_weight)(jax.random.normal(kw, (experts or 1, n, k), F32))
        w = jnp.swapaxes(w, 1, 2) if weight_only else w
        w, ws = (w, ws) if experts else (w[0], ws[0])
        xs = (x.astype(BF16),) if weight_only else quantize_act(x)
        return (*xs, w, ws, *((_even_sizes(m, experts),) if experts else ()))

    refusal = fg.supports((m, k), (*lead, n, k), backend="mosaic_tpu", config=config, weight_only=weight_only)
    shape = dict(m=m, n=n, k=k, **({"experts": experts} if experts else {}))
    return Case(name, "weight_only" if weight_only else "e4m3_x_e4m3", shape, specs, fn, traffic, 2 * m * n * k,
                "bf16" if weight_only else "fp8", make, functools.partial(getattr(fg, name), backend="xla", **layout),
                refusal)


def kernel_cases(small: bool, interpret=False) -> list[Case]:
    mla, g = (SMALL_MLA, SMALL_GEMM) if small else (MLA, GEMM)
    block_s = SMALL_MLA_BLOCK_S if small else MLA_BLOCK_S
    cases = [mla_case(mla, sq, fp8, block_s, interpret) for fp8 in (False, True) for sq in MLA_SQ]
    cases += [gemm_case(g["m"], g["n"], g["k"], 0, False, interpret),
              gemm_case(g["m"], g["n"], g["k"], g["experts"], False, interpret)]
    cases += [gemm_case(m, g["n"], g["k"], 0, True, interpret) for m in (SMALL_DECODE_ROWS if small else DECODE_ROWS)]
    decode_rows = (SMALL_DECODE_ROWS if small else DECODE_ROWS)[-1]
    cases.append(gemm_case(decode_rows, g["n"], g["k"], g["experts"], True, interpret))
    return cases


# ------------------------------------------------------------------------------------------ compiling


def _mesh(devices) -> Mesh:
    return Mesh(np.asarray(devices[:1]), ("d",))


def _row_major(spec: S, sharding) -> S:
    """spec placed on `sharding` in row-major layout (arrays of rank >= 2; a vector has one layout anyway)."""
    if len(spec.shape) < 2:
        return S(spec.shape, spec.dtype, sharding=sharding)
    layout = Layout(major_to_minor=tuple(range(len(spec.shape))))
    return S(spec.shape, spec.dtype, sharding=Format(layout, sharding))


def _mapped(fn: Callable, mesh: Mesh) -> Callable:
    """A Pallas TPU call is not partitioned by the compiler: it runs inside a shard_map, whole on one device."""
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False))


def compile_on(fn: Callable, specs, devices, row_major: bool = True):
    """(compiled, seconds): fn compiled for one device of `devices`, inputs row-major or in default layouts."""
    mesh = _mesh(devices)
    sharding = NamedSharding(mesh, P())
    args = [_row_major(s, sharding) if row_major else S(s.shape, s.dtype, sharding=sharding) for s in specs]
    t = time.perf_counter()
    compiled = _mapped(fn, mesh).lower(*args).compile()
    return compiled, time.perf_counter() - t


def kernel_vmem(hlo: str) -> tuple[int, int]:
    """(VMEM bytes, Pallas calls): the scoped memory (space 1: VMEM) XLA reserves for each tpu_custom_call."""
    total, calls = 0, 0
    for line in hlo.splitlines():
        if 'custom_call_target="tpu_custom_call"' not in line:
            continue
        calls += 1
        used = re.search(r'"used_scoped_memory_configs":\[(.*?)\]', line)
        for space, size in re.findall(r'"memory_space":"(\d+)","offset":"\d+","size":"(\d+)"', used.group(1) if used
                                      else ""):
            total += int(size) if space == "1" else 0
    return total, calls


def parameter_copy_bytes(hlo: str) -> int:
    """Bytes of the entry computation's `copy` ops of its parameters: relayouts before the kernel."""
    entry = hlo[hlo.find("\nENTRY "):]
    params = set(re.findall(r"%([\w.\-]+) = \S+ parameter\(\d+\)", entry))
    total = 0
    for dtype, dims, operand in re.findall(r"= (\w+)\[([\d,]*)\]\{[^}]*\} copy\(%([\w.\-]+)\)", entry):
        if operand in params:
            total += math.prod(int(d) for d in dims.split(",") if d) * _HLO_ITEMSIZE.get(dtype, 4)
    return total


def _costs(compiled) -> dict:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0))}


def base_record(case: Case, chip: dict) -> dict:
    """The case's counts and roofline estimate on `chip`; status "refused" where the kernel refuses it up front."""
    total = sum(case.traffic.values())
    rec = dict(kernel=case.kernel, variant=case.variant, shape=case.shape, label=case.label,
               status="refused" if case.refusal else "pending", refusal=case.refusal, error=None, bytes=total,
               bytes_by_operand=case.traffic, flops=case.flops, flop_per_byte=case.flops / total)
    rec["estimate"] = roofline(total, case.flops, chip, case.peak)
    return rec


def compile_case(case: Case, devices, chip: dict, layout_check: bool) -> dict:
    rec = base_record(case, chip)
    if case.refusal:
        return rec
    try:
        compiled, seconds = compile_on(case.fn, case.specs, devices)
        hlo = compiled.as_text()
        vmem, calls = kernel_vmem(hlo)
        rec.update(status="compiled", compile_s=seconds, vmem_bytes=vmem, kernel_calls=calls,
                   hbm_temp_bytes=compiled.memory_analysis().temp_size_in_bytes,
                   compiler_costs=_costs(compiled), relayout_bytes=None)
        if layout_check:
            default, _ = compile_on(case.fn, case.specs, devices, row_major=False)
            rec["relayout_bytes"] = parameter_copy_bytes(default.as_text())
            rec["default_layout_hbm_temp_bytes"] = default.memory_analysis().temp_size_in_bytes
    except Exception as e:  # noqa: BLE001 - one kernel that fails to compile must not stop the others
        rec.update(status="error", error=f"{type(e).__name__}: {e}".splitlines()[0][:500])
    return rec


# -------------------------------------------------------------------------------------------- timing


def time_case(case: Case, devices, chip: dict, iters: int, repeats: int) -> dict:
    """Measured on `devices[0]`: `iters` calls dispatched back to back then one wait (host dispatch overlaps the
    device), the median over `repeats` runs, divided by iters. Inputs in row-major layout, as compiled."""
    rec = base_record(case, chip)
    if case.refusal:
        return rec
    try:
        mesh = _mesh(devices)
        sharding = NamedSharding(mesh, P())
        specs = [_row_major(s, sharding) for s in case.specs]
        inputs = [jax.device_put(x, s.sharding) for x, s in zip(case.make(jax.random.key(0)), specs)]
        fn = _mapped(case.fn, mesh)
        t = time.perf_counter()
        jax.block_until_ready(fn(*inputs))
        rec["compile_s"] = time.perf_counter() - t
        runs = []
        for _ in range(repeats):
            t = time.perf_counter()
            out = [fn(*inputs) for _ in range(iters)]
            jax.block_until_ready(out)
            runs.append((time.perf_counter() - t) / iters)
        seconds = statistics.median(runs)
        peak = rec["estimate"]["peak_flops_per_s"]
        diff = float(cos_diff(out[0], jax.jit(case.reference)(*inputs)))
        rec.update(status="measured", time_s=seconds, iters=iters, repeats=repeats, diff=diff,
                   accurate=diff <= (MLA_DIFF_MAX if case.kernel == "mla_decode" else GEMM_DIFF_MAX),
                   gbps=rec["bytes"] / seconds / 1e9, tflops=case.flops / seconds / 1e12,
                   frac_of_peak_bw=rec["bytes"] / seconds / chip["hbm_bytes_per_s"],
                   frac_of_peak_flops=case.flops / seconds / peak)
    except Exception as e:  # noqa: BLE001
        rec.update(status="error", error=f"{type(e).__name__}: {e}".splitlines()[0][:500])
    return rec


@jax.jit
def cos_diff(x, y):
    """DeepGEMM's / FlashMLA's accuracy measure: 1 - 2 sum(xy) / sum(x^2 + y^2) (0 when equal)."""
    x, y = x.astype(F32), y.astype(F32)
    return 1.0 - 2.0 * jnp.sum(x * y) / jnp.maximum(jnp.sum(x * x + y * y), 1e-12)


# ------------------------------------------------------------------------------------------- experts


def expert_shapes(small: bool) -> list[dict]:
    """Per device: rows (tokens x top-k), local experts, hidden D, expert intermediate F; --small: the small
    preset alone, on fewer tokens."""
    shapes = []
    for preset in ("small",) if small else tuple(EXPERT_TOKENS):
        cfg = ModelConfig.from_json(preset)
        tokens = SMALL_EXPERT_TOKENS if small else EXPERT_TOKENS[preset]
        shapes.append(dict(preset=preset, tokens=tokens, expert_parallel=EXPERT_PARALLEL[preset],
                           rows=tokens * cfg.num_experts_per_tok,
                           experts=cfg.n_routed_experts // EXPERT_PARALLEL[preset],
                           d=cfg.hidden_size, f=cfg.moe_intermediate_size))
    return shapes


def _megablox_tiled(x, w, sizes, tiling):
    """megablox's gmm (and its tgmm backward) with the given tile; rows all inside the groups."""
    return megablox.gmm(x, w, sizes, x.dtype, tiling, None, None, False, False)


def _megablox_chosen(chosen: list) -> Callable:
    """The model's megablox call (tiles chosen per call for the target generation), noting the forward's tiles
    (the backward's gmm and tgmm choose for their own shapes)."""

    def gmm(x, w, sizes):
        tiling = grouped_matmul.default_tiling(x.dtype)  # what gmm uses when given none
        chosen.append("x".join(map(str, tiling(_cdiv(x.shape[0], grouped_matmul.TILE) * grouped_matmul.TILE,
                                               x.shape[1], w.shape[2]))))
        return grouped_matmul.gmm(x, w, sizes, tiling=tiling)

    return gmm


def expert_ways(shape: dict, compare_tiles=COMPARE_TILES, chosen: list | None = None) -> dict[str, Callable]:
    ways = {"megablox": _megablox_chosen([] if chosen is None else chosen), "ragged_dot": lax.ragged_dot}
    for tm, tk, tn in compare_tiles:
        tiles = (min(tm, shape["rows"]), min(tk, shape["d"], shape["f"]), min(tn, shape["d"], shape["f"]))
        ways[f"megablox_tiles_{'x'.join(map(str, tiles))}"] = functools.partial(_megablox_tiled, tiling=tiles)
    return ways


def _swiglu(gmm, xs, w1, w3, w2, sizes):
    """The routed experts on rows sorted by expert (dsv3_jax.ops.experts.experts_ragged's matmuls)."""
    return gmm(jax.nn.silu(gmm(xs, w1, sizes)) * gmm(xs, w3, sizes), w2, sizes)


def _train(gmm, xs, w1, w3, w2, sizes, dy):
    """y and the cotangents of xs and the three weights (y returned: a training step needs it for the loss, and
    a forward left unused would be dropped from the count)."""
    y, vjp = jax.vjp(lambda *a: _swiglu(gmm, *a, sizes), xs, w1, w3, w2)
    return y, *vjp(dy)


def expert_records(generation: str, shape: dict, compare_tiles=COMPARE_TILES) -> list[dict]:
    devices = topology_devices(TOPOLOGIES[generation])
    chip = chip_figures(generation)
    m, g, d, f = shape["rows"], shape["experts"], shape["d"], shape["f"]
    specs = (S((m, d), BF16), S((g, d, f), BF16), S((g, d, f), BF16), S((g, f, d), BF16), S((g,), jnp.int32))
    phases = {"forward": (_swiglu, specs, 3 * 2 * m * d * f),  # three grouped matmuls
              "forward+backward": (_train, (*specs, S((m, d), BF16)), 9 * 2 * m * d * f)}  # + dgrad + wgrad
    records = []
    chosen = []
    for way, gmm in expert_ways(shape, compare_tiles, chosen).items():
        for phase, (body, args, ideal) in phases.items():
            chosen.clear()
            rec = dict(generation=generation, **shape, way=way, phase=phase, ideal_flops=ideal, status="pending",
                       error=None, tiles=way.removeprefix("megablox_tiles_") if way.startswith("megablox_") else None)
            try:
                compiled, seconds = compile_on(functools.partial(body, gmm), args, devices, row_major=False)
                costs = _costs(compiled)
                if way == "megablox":
                    rec["tiles"] = ",".join(sorted(set(chosen)))
                rec.update(status="compiled", compile_s=seconds, **costs, flops_vs_ideal=costs["flops"] / ideal,
                           hbm_temp_bytes=compiled.memory_analysis().temp_size_in_bytes,
                           estimate=roofline(costs["bytes_accessed"], max(costs["flops"], ideal), chip, "bf16"))
            except Exception as e:  # noqa: BLE001
                rec.update(status="error", error=f"{type(e).__name__}: {e}".splitlines()[0][:500])
            _log(f"  experts {generation} {shape['preset']} {way} {phase}: {rec['status']}")
            records.append(rec)
    return records


# ----------------------------------------------------------------------------------------- reporting


def _fmt(v, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)


def _table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(x) for x in col) for col in zip(headers, *cells)]
    line = lambda row: "| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |"
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def _case_text(r: dict) -> str:
    s = r["shape"]
    if r["kernel"] == "mla_decode":
        return f"mla_decode {r['variant'].replace('_cache', '')} B={s['batch']} S={s['cache']} H={s['heads']} " \
               f"T={s['sq']}"
    experts = f" G={s['experts']}" if "experts" in s else ""
    return f"{r['kernel']} M={s['m']} N={s['n']} K={s['k']}{experts}"


def kernel_table(records: list[dict], measured: bool) -> str:
    headers = ["kernel", "status", "VMEM MiB", "compile s", "MB moved", "GFLOP", "FLOP/B", "bound",
               "EST us @100% BW", "EST us @90% BW", "EST GB/s @90%", "EST TFLOPS @90%"]
    headers += ["measured us", "GB/s", "TFLOPS", "% peak BW", "% peak FLOPs", "diff"] if measured else [
        "relayout MB"]
    rows = []
    for r in records:
        e = r["estimate"]
        e100, e90 = e["at_100pct_bw"], e["at_90pct_bw"]
        row = [_case_text(r), r["status"], _fmt(r.get("vmem_bytes") and r["vmem_bytes"] / 2**20, ".2f"),
               _fmt(r.get("compile_s"), ".1f"), _fmt(r["bytes"] / 1e6, ".2f"), _fmt(r["flops"] / 1e9, ".2f"),
               _fmt(r["flop_per_byte"], ".0f"), e["bound"], _fmt(e100["time_s"] * 1e6, ".1f"),
               _fmt(e90["time_s"] * 1e6, ".1f"), _fmt(e90["gbps"], ".0f"), _fmt(e90["tflops"], ".1f")]
        if measured:
            ok = r["status"] == "measured"
            row += [_fmt(r["time_s"] * 1e6, ".1f") if ok else "-", _fmt(r.get("gbps"), ".0f"),
                    _fmt(r.get("tflops"), ".1f"), *(_fmt(100 * r[key], ".0f") if ok else "-"
                                                    for key in ("frac_of_peak_bw", "frac_of_peak_flops")),
                    _fmt(r.get("diff"), ".1e") + ("" if r.get("accurate", True) else " WRONG")]
        else:
            row.append(_fmt(r["relayout_bytes"] / 1e6, ".1f") if r.get("relayout_bytes") is not None else "-")
        rows.append(row)
    return _table(headers, rows)


def experts_table(records: list[dict]) -> str:
    headers = ["gen", "preset", "rows x D x F, G", "way", "fwd tiles", "phase", "status", "compiler GFLOP", "/ ideal",
               "compiler GB", "HBM temp MiB", "compile s", "EST ms", "bound"]
    rows = []
    for r in records:
        ok = r["status"] == "compiled"
        e = r.get("estimate") or {}
        rows.append([r["generation"], r["preset"], f"{r['rows']}x{r['d']}x{r['f']}, {r['experts']}", r["way"],
                     r.get("tiles") or "-", r["phase"], r["status"],
                     _fmt(ok and r["flops"] / 1e9, ".1f") if ok else "-",
                     _fmt(r.get("flops_vs_ideal"), ".2f"), _fmt(ok and r["bytes_accessed"] / 1e9, ".2f") if ok else "-",
                     _fmt(ok and r["hbm_temp_bytes"] / 2**20, ".0f") if ok else "-", _fmt(r.get("compile_s"), ".1f"),
                     _fmt(e and e["at_100pct_bw"]["time_s"] * 1e3, ".2f") if e else "-", e.get("bound", "-")])
    return _table(headers, rows)


def format_report(rep: dict) -> str:
    measured = rep["mode"] != "compile_only"
    out = [f"TPU kernel benchmark, mode {rep['mode']}{' (--small shapes)' if rep['small'] else ''}; "
           f"jax {rep['jax_version']}, {rep['date']}"]
    if rep["mode"] == "interpret":
        out.append("INTERPRET: jax's TPU interpreter on this host; the times check the code path and mean nothing.")
    if not measured:
        out.append("COMPILE-ONLY: nothing ran on a TPU. Every time, GB/s and TFLOPS below is a roofline ESTIMATE "
                   "from our own byte and FLOP counts and the published peaks (one device).")
    for gen, g in rep["generations"].items():
        c = g["chip"]
        out += ["", f"{gen} ({c['name']}; one device: HBM {c['hbm_bytes_per_s'] / 1e9:.0f} GB/s, BF16 "
                f"{c['bf16_flops_per_s'] / 1e12:.0f} TFLOPS, FP8 {c['fp8_flops_per_s'] / 1e12:.0f} TFLOPS"
                f"{'' if c['fp8_mxu'] else ' (no E4M3 MXU: BF16 rate)'})", kernel_table(g["kernels"], measured)]
        problems = [r for r in g["kernels"] if r["status"] in ("refused", "error")]
        out += [f"  {_case_text(r)}: {r['status']}: {r['refusal'] or r['error']}" for r in problems]
    if rep["experts"]:
        out += ["", "Routed experts' SwiGLU (3 grouped matmuls), compile-only: the compiler's FLOPs and bytes "
                "(cost_analysis), ideal FLOPs = 6*rows*D*F forward, 18*rows*D*F forward+backward; EST = roofline "
                "ESTIMATE from those counts at 100% bandwidth, BF16 peak", experts_table(rep["experts"])]
        out += [f"  {r['generation']} {r['preset']} {r['way']} {r['phase']}: {r['error']}"
                for r in rep["experts"] if r["status"] == "error"]
    out += ["", f"total wall time: {rep['wall_s']:.1f} s"]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--compile_only", action="store_true", help="compile for compile-only TPU devices (libtpu)")
    p.add_argument("--interpret", action="store_true", help="time in jax's TPU interpreter on this host (a check)")
    p.add_argument("--generations", default=",".join(TOPOLOGIES), help="compile-only: comma-separated")
    p.add_argument("--expert_generations", default=",".join(EXPERT_GENERATIONS))
    p.add_argument("--chip", default="", help="the chip's peaks to report against (default: from device_kind; "
                   "--interpret: v5e)")
    p.add_argument("--only", choices=("kernels", "experts", "all"), default="all")
    p.add_argument("--compare_tiles", default=",".join("x".join(map(str, t)) for t in COMPARE_TILES),
                   help="experts: megablox tilings (rows x K x N) to compare with the chosen ones, comma-separated")
    p.add_argument("--small", action="store_true", help="tiny shapes (tests)")
    p.add_argument("--filter", default="", help="only kernel cases whose label matches this regex")
    p.add_argument("--no_layout_check", action="store_true", help="skip the default-layout compile of each kernel")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    p.add_argument("--json_out", default="", help="also write the JSON object to this file")
    a = p.parse_args(argv)
    for name, value in (("--generations", a.generations), ("--expert_generations", a.expert_generations),
                        ("--chip", a.chip)):
        bad = [g for g in value.split(",") if g and g not in TOPOLOGIES]
        if bad:
            p.error(f"{name}: unknown {bad}; valid: {', '.join(TOPOLOGIES)}")
    a.generations = [g for g in a.generations.split(",") if g]
    a.expert_generations = [g for g in a.expert_generations.split(",") if g]
    try:
        a.compare_tiles = [tuple(int(v) for v in t.split("x")) for t in a.compare_tiles.split(",") if t]
    except ValueError:
        p.error(f"--compare_tiles: expected tilings like 128x128x128, got {a.compare_tiles!r}")
    if any(len(t) != 3 or min(t) <= 0 for t in a.compare_tiles):
        p.error(f"--compare_tiles: each tiling is three positive sizes, rows x K x N; got {a.compare_tiles}")
    if a.compile_only and a.interpret:
        p.error("--compile_only and --interpret exclude each other")
    re.compile(a.filter)
    return a


def _tpu_chip(a) -> tuple[str, list]:
    """The chip to time on: this host's TPUs, or the CPU under the TPU interpreter (reported against --chip)."""
    devices = jax.devices()
    if a.interpret:
        return a.chip or "v5e", devices
    if devices[0].platform != "tpu":
        raise SystemExit(f"no TPU here ({devices[0].platform}: {devices[0].device_kind}); run with --compile_only "
                         "(libtpu) or --interpret")
    chip = a.chip or DEVICE_KINDS.get(devices[0].device_kind)
    if chip is None:
        raise SystemExit(f"unknown TPU {devices[0].device_kind!r}; name its peaks with --chip "
                         f"({', '.join(TOPOLOGIES)})")
    return chip, devices


def main(argv=None) -> dict:
    a = parse_args(argv)
    t0 = time.perf_counter()
    if a.compile_only and importlib.util.find_spec("libtpu") is None:
        raise SystemExit("--compile_only needs libtpu: pip install 'jax[tpu]==0.10.2'")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling drives no chip: no lock to wait for
    rep = dict(mode="compile_only" if a.compile_only else ("interpret" if a.interpret else "measured"),
               small=a.small, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               jax_version=jax.__version__, bandwidth_shares=list(BANDWIDTH_SHARES),
               args=dict(generations=a.generations, expert_generations=a.expert_generations, only=a.only,
                         compare_tiles=["x".join(map(str, t)) for t in a.compare_tiles],
                         filter=a.filter, layout_check=not a.no_layout_check),
               generations={}, experts=[])
    interpret = pltpu.InterpretParams() if a.interpret else False
    cases = [c for c in kernel_cases(a.small, interpret) if re.search(a.filter, c.label)]
    if a.only in ("kernels", "all"):
        if a.compile_only:
            for gen in a.generations:
                devices, chip = topology_devices(TOPOLOGIES[gen]), chip_figures(gen)
                records = []
                for case in cases:
                    records.append(compile_case(case, devices, chip, not a.no_layout_check))
                    _log(f"  {gen} {case.label}: {records[-1]['status']}")
                rep["generations"][gen] = dict(topology=TOPOLOGIES[gen], chip=chip, kernels=records)
        else:
            gen, devices = _tpu_chip(a)
            chip = chip_figures(gen)
            records = []
            for case in cases:
                records.append(time_case(case, devices, chip, a.iters, a.repeats))
                _log(f"  {case.label}: {records[-1]['status']}")
            rep["generations"][gen] = dict(device_kind=devices[0].device_kind, chip=chip, kernels=records)
    if a.only in ("experts", "all") and (a.compile_only or a.only == "experts"):
        if importlib.util.find_spec("libtpu") is None:
            raise SystemExit("the experts comparison compiles for compile-only TPU devices: it needs libtpu")
        for gen in a.expert_generations:
            for shape in expert_shapes(a.small):
                rep["experts"] += expert_records(gen, shape, a.compare_tiles)
    rep["wall_s"] = time.perf_counter() - t0
    text = format_report(rep)
    print(json.dumps(rep) if a.json else text, flush=True)
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(rep, indent=1))
    return rep


if __name__ == "__main__":
    report = main()
    failed = [r for g in report["generations"].values() for r in g["kernels"]
              if r["status"] == "error" or r.get("accurate") is False]
    sys.exit(1 if failed or any(r["status"] == "error" for r in report["experts"]) else 0)
