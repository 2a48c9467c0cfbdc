"""GPU benchmark of the Pallas kernels against their published anchors (docs FACTS.md s.5) and against XLA.

Measures, in one run on one GPU:
  - limits of this card: a device-to-device copy bandwidth (y = x + 1 over a 2 GiB uint32 buffer, read +
    write counted) and a BF16 matmul peak (8192^3, XLA); the MLA GB/s figures are also given as a fraction
    of the measured bandwidth, and the two limits give the roofline ridge that says which MLA shape is
    memory-bound;
  - `fp8_gemm` TFLOPS (2MNK / t) on DeepGEMM's 18 shapes (M in 64, 128, 4096 x DeepSeek-V3's six (N, K)
    layers) for the kernel backend(s) (default "mosaic_gpu"; `--triton` adds "triton"), beside DeepGEMM's
    published H800 figures and XLA's own FP8 dot on the same shapes (see `XLA_FP8_DOT`);
  - `mla_decode` GB/s and TFLOPS (FlashMLA's formulas) on FlashMLA's shapes (batch 128, cache 4096 and 8192,
    128 heads, C=512, R=64, bf16, Sq 1 and 2, every sequence full), beside FlashMLA's published figures and
    the "xla" reference backend on the same shapes.

Timing: the L2 cache is defeated by rotating copies of the inputs: one jitted call runs the kernel once on
each of R distinct copies (R - 1 other copies, >= `--rotate_mb` MB, pass through L2 between two uses of a
copy; an H100 has a 50 MB L2), and R is also raised until a call holds ~`--min_call_ms` of GPU work. After
a compile call and warm-up calls, the median of `--iters` timed calls (jax.block_until_ready) is taken; the
median of a call with the same arguments and a trivial body (host dispatch + sync) is subtracted (never more
than half the call; `overhead_frac` in the JSON, `*` in the table when it is over 20%), and the result is
divided by R. Every kernel output is checked against a float32 reference with DeepGEMM's / FlashMLA's
measure, diff = 1 - 2 sum(xy) / sum(x^2 + y^2) (limits 1e-3 / 1e-5). Each case runs under a try and a
timeout (`--case_timeout_s`; it can only interrupt Python, so a case still blocked 60 s later, e.g. on a hung
kernel, makes a watchdog print the report so far and exit with status 3), so one failing kernel is reported with
its error and the rest still run. A case its backend does not take (the op's `supports(...)`, asked up front) is
reported as not supported, with the reason, and not run. Kernels run first, then the baselines; `--budget_s`
(default 450 s) bounds the whole run, later cases being reported as skipped. Sizing: estimated (not yet
measured) at 3-5 minutes on an H200, most of it compiling.

Usage:
  python benchmarks/gpu_kernels.py [--only gemm|mla] [--backend mosaic_gpu[,triton,...]] [--triton] [--json]
                                   [--json_out FILE] [--mla_heads 128,16] [--filter REGEX]
  python benchmarks/gpu_kernels.py --dry_run [--lower_cuda]   # CPU: every case's shapes through the wrappers
                                                            # (jax.eval_shape on the real shapes; --lower_cuda
                                                            # also exports each for CUDA), one tiny case of
                                                            # each kernel through "interpret", and the whole
                                                            # timing and reporting path on it
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import gc
import json
import math
import os
import re
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
from jax import lax

from pallas_kernels.backends import BACKENDS
from pallas_kernels.fp8_gemm import fp8_gemm
from pallas_kernels.fp8_gemm import supports as gemm_supports
from pallas_kernels.mla_decode import mla_decode
from pallas_kernels.mla_decode import supports as mla_supports
from pallas_kernels.quant import BLOCK, E4M3, dequantize_act, dequantize_weight, quantize_act, quantize_weight

S = jax.ShapeDtypeStruct
F32, BF16 = jnp.float32, jnp.bfloat16
MB = 1 << 20

# ------------------------------------------------------------------------ published figures and targets

DEEPGEMM_SOURCE = ("DeepGEMM README, 'Performance' table of normal (dense) GEMMs, H800 SXM5; TFLOPS = 2MNK/t with "
                   "the L2 cache flushed (copied from docs/FACTS.md s.5)")
GEMM_M = (64, 128, 4096)
GEMM_NK = (  # (layer of DeepSeek-V3, N, K)
    ("q_a+kv_a fused", 2112, 7168),
    ("q_b", 24576, 1536),
    ("kv_b", 32768, 512),
    ("o_proj", 7168, 16384),
    ("expert gate+up", 4096, 7168),
    ("expert down", 7168, 2048),
)
DEEPGEMM_TFLOPS = {  # M -> TFLOPS in the order of GEMM_NK
    64: (206, 289, 219, 336, 287, 295),
    128: (352, 535, 358, 645, 533, 510),
    4096: (1127, 1212, 775, 1520, 1410, 1168),
}
FLASHMLA_SOURCE = ("FlashMLA README, H800 SXM5, BF16, paged KV (block 64), h_kv 1, head dims 576/512; benchmarked "
                   "with batch 128, cache 4096-32768, h_q 16-128, s_q 1-2 (copied from docs/FACTS.md s.5)")
FLASHMLA_GBPS = 3000.0  # memory-bound
FLASHMLA_TFLOPS = (580.0, 660.0)  # compute-bound
MLA_BATCH, MLA_HEADS, MLA_C, MLA_R = 128, 128, 512, 64
MLA_CACHE, MLA_SQ = (4096, 8192), (1, 2)
MLA_SCALE = 192 ** -0.5  # DeepSeek-V3's softmax scale (qk_nope 128 + qk_rope 64), unchanged by absorption

TARGET_GEMM_TFLOPS, TARGET_GEMM_M = 1200.0, 4096
TARGET_MLA_GBPS = 3000.0  # when memory-bound
GEMM_DIFF_MAX, MLA_DIFF_MAX = 1e-3, 1e-5  # DeepGEMM's and FlashMLA's tests

XLA_FP8_DOT = ("XLA FP8 dot: lax.dot_general(e4m3 [M,K], e4m3 [N,K], contracting K, preferred_element_type=f32) * "
               "one per-tensor f32 scale -> bf16. XLA has no block-scaled FP8 dot, so this is the most XLA can do "
               "on the tensor cores (cuBLASLt FP8 on Hopper when its GEMM rewriter takes it; the compiled targets "
               "are listed): a ceiling for FP8 throughput, with coarser scaling than the kernel's 1x128 / 128x128 "
               "blocks, not the same math")
MLA_XLA = ("MLA 'xla' backend: mla_decode_reference (plain jnp, f32 HIGHEST einsums over the whole cache); its "
           "GB/s and TFLOPS use FlashMLA's formulas, not what it really moves")

# Nominal H100/H200 SXM limits: used only to size R before anything is measured and to stand in for the
# measured limits when those fail; never in a reported ratio.
NOMINAL_BF16_FLOPS, NOMINAL_BW = 989e12, 4.8e12
MEM_CAP_BYTES = 16 << 30  # device memory the R copies (inputs + outputs) of one case may take


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def gemm_flops(m: int, n: int, k: int) -> int:
    return 2 * m * n * k


def gemm_bytes(m: int, n: int, k: int) -> int:
    """e4m3 A and B, f32 scales (A 1x128, B 128x128), bf16 out."""
    kb = _cdiv(k, BLOCK)
    return m * k + n * k + 2 * m * n + 4 * (m * kb + _cdiv(n, BLOCK) * kb)


def mla_flops(batch: int, cache: int, heads: int, sq: int, c: int = MLA_C, r: int = MLA_R) -> int:
    """FlashMLA's count, 2 * s_q * sum(len) * h_q * (576 + 512), with every sequence full (sum(len) = B * S)."""
    return 2 * sq * batch * cache * heads * (c + r + c)


def mla_bytes(batch: int, cache: int, heads: int, sq: int, c: int = MLA_C, r: int = MLA_R, itemsize: int = 2) -> int:
    """FlashMLA's count, (sum(len) * 576 + b * s_q * h_q * (576 + 512)) * 2: cache and q read, out written."""
    return (batch * cache * (c + r) + batch * sq * heads * (c + r + c)) * itemsize


def _nbytes(specs) -> int:
    return sum(math.prod(s.shape) * jnp.dtype(s.dtype).itemsize for s in specs)


@jax.jit
def cos_diff(x, y):
    """DeepGEMM's / FlashMLA's accuracy measure: 1 - 2 sum(xy) / sum(x^2 + y^2) (0 when equal)."""
    x, y = x.astype(F32), y.astype(F32)
    return 1.0 - 2.0 * jnp.sum(x * y) / jnp.maximum(jnp.sum(x * x + y * y), 1e-12)


# ----------------------------------------------------------------------------------------------- cases


@dataclasses.dataclass
class Case:
    kind: str  # "gemm" or "mla"
    backend: str  # a kernel backend, or "xla_fp8_dot" (GEMM baseline) / "xla" (MLA reference backend)
    shape: dict
    flops: int
    bytes: int
    specs: tuple  # ShapeDtypeStructs of fn's inputs
    out_spec: S
    fn: Callable  # the timed call
    make: Callable  # make(key) -> inputs matching specs
    check: Callable | None = None  # check(inputs, out) -> reference output, compared with cos_diff
    diff_max: float | None = None
    published: dict = dataclasses.field(default_factory=dict)
    baseline: bool = False
    refusal: str | None = None  # why the backend does not take this case (its op's `supports`); not run then

    @property
    def in_bytes(self) -> int:
        return _nbytes(self.specs)

    @property
    def out_bytes(self) -> int:
        return _nbytes([self.out_spec])

    def label(self) -> str:
        return f"{self.kind} {' '.join(f'{k}={v}' for k, v in self.shape.items() if k != 'layer')} [{self.backend}]"


def _dot_nt(x, y, **kw):
    return lax.dot_general(x, y, (((1,), (1,)), ((), ())), preferred_element_type=F32, **kw)


def _gemm_make(m: int, n: int, k: int):
    @jax.jit
    def make(key):
        ka, kb = jax.random.split(key)
        return (*quantize_act(jax.random.normal(ka, (m, k), F32)),
                *quantize_weight(jax.random.normal(kb, (n, k), F32)))

    return make


@jax.jit
def _gemm_reference(a, a_scale, b, b_scale):
    return _dot_nt(dequantize_act(a, a_scale), dequantize_weight(b, b_scale), precision=lax.Precision.HIGHEST)


def xla_fp8_dot(a, b, scale):
    """The XLA baseline (see XLA_FP8_DOT)."""
    return (_dot_nt(a, b) * scale).astype(BF16)


def _xla_dot_make(m: int, n: int, k: int):
    @jax.jit
    def make(key):
        ka, kb = jax.random.split(key)
        a = jax.random.normal(ka, (m, k), F32).astype(E4M3)
        b = jax.random.normal(kb, (n, k), F32).astype(E4M3)
        return a, b, jnp.asarray(1.0 / 64.0, F32)

    return make


@jax.jit
def _xla_dot_reference(a, b, scale):
    return _dot_nt(a.astype(F32), b.astype(F32), precision=lax.Precision.HIGHEST) * scale


def gemm_case(m: int, n: int, k: int, backend: str, layer: str = "", published: float | None = None) -> Case:
    shape = dict(m=m, n=n, k=k, layer=layer)
    pub = {"deepgemm_h800_tflops": published} if published is not None else {}
    if m == TARGET_GEMM_M:
        pub["target_tflops"] = TARGET_GEMM_TFLOPS
    if backend == "xla_fp8_dot":
        specs = (S((m, k), E4M3), S((n, k), E4M3), S((), F32))
        return Case("gemm", backend, shape, gemm_flops(m, n, k), _nbytes(specs) + 2 * m * n, specs,
                    S((m, n), BF16), xla_fp8_dot, _xla_dot_make(m, n, k), _xla_dot_reference, GEMM_DIFF_MAX,
                    pub, baseline=True)
    kb, nb = _cdiv(k, BLOCK), _cdiv(n, BLOCK)
    specs = (S((m, k), E4M3), S((m, kb), F32), S((n, k), E4M3), S((nb, kb), F32))
    return Case("gemm", backend, shape, gemm_flops(m, n, k), gemm_bytes(m, n, k), specs, S((m, n), BF16),
                functools.partial(fp8_gemm, backend=backend), _gemm_make(m, n, k), _gemm_reference,
                GEMM_DIFF_MAX, pub, refusal=gemm_supports((m, k), (n, k), backend=backend))


def _mla_make(batch: int, cache: int, heads: int, sq: int, c: int, r: int):
    @jax.jit
    def make(key):
        kq, kc = jax.random.split(key)
        q = jax.random.normal(kq, (batch, sq, heads, c + r), F32).astype(BF16)
        kv = jax.random.normal(kc, (batch, cache, c + r), F32).astype(BF16)
        return q, kv, jnp.full((batch,), cache, jnp.int32)

    return make


def mla_case(batch: int, cache: int, heads: int, sq: int, backend: str, c: int = MLA_C, r: int = MLA_R) -> Case:
    shape = dict(batch=batch, cache=cache, heads=heads, sq=sq, c=c, r=r)
    specs = (S((batch, sq, heads, c + r), BF16), S((batch, cache, c + r), BF16), S((batch,), jnp.int32))
    fn = functools.partial(mla_decode, v_dim=c, softmax_scale=MLA_SCALE, backend=backend)
    baseline = backend == "xla"
    check = None if baseline else functools.partial(mla_decode, v_dim=c, softmax_scale=MLA_SCALE, backend="xla")
    pub = {"flashmla_h800_gbps": FLASHMLA_GBPS, "flashmla_h800_tflops": list(FLASHMLA_TFLOPS),
           "target_gbps_when_memory_bound": TARGET_MLA_GBPS}
    flops, nbytes = mla_flops(batch, cache, heads, sq, c, r), mla_bytes(batch, cache, heads, sq, c, r)
    return Case("mla", backend, shape, flops, nbytes, specs, S((batch, sq, heads, c), BF16), fn,
                _mla_make(batch, cache, heads, sq, c, r), check, None if baseline else MLA_DIFF_MAX, pub,
                baseline=baseline,
                refusal=mla_supports(specs[0].shape, specs[1].shape, BF16, v_dim=c, backend=backend))


def gemm_cases(backends, xla: bool = True) -> list[Case]:
    cases = []
    for m in GEMM_M:
        for i, (layer, n, k) in enumerate(GEMM_NK):
            for b in [*backends, *(["xla_fp8_dot"] if xla else [])]:
                cases.append(gemm_case(m, n, k, b, layer, DEEPGEMM_TFLOPS[m][i]))
    return cases


def mla_cases(backends, xla: bool = True, heads=(MLA_HEADS,)) -> list[Case]:
    names = [b for b in backends if b != "xla"] + (["xla"] if xla or "xla" in backends else [])
    return [mla_case(MLA_BATCH, s, h, sq, b) for h in heads for s in MLA_CACHE for sq in MLA_SQ for b in names]


def standin_cases() -> list[Case]:
    """Tiny cases run for real in the dry run: each kernel through "interpret", and the two baselines."""
    return [gemm_case(64, 256, 384, "interpret", "stand-in"), gemm_case(64, 256, 384, "xla_fp8_dot", "stand-in"),
            mla_case(2, 128, 4, 2, "interpret", c=64, r=32), mla_case(2, 128, 4, 2, "xla", c=64, r=32)]


# ---------------------------------------------------------------------------------------------- timing


class CaseTimeout(Exception):
    pass


@contextlib.contextmanager
def _alarm(seconds: float):
    """Raise CaseTimeout in the main thread after `seconds` (when Python regains control)."""
    if seconds <= 0 or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise CaseTimeout(f"timed out after {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _median_time(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@dataclasses.dataclass
class Opts:
    iters: int = 10
    warmup: int = 2
    rotate_bytes: int = 256 * MB
    min_call_s: float = 2e-3
    max_copies: int = 64
    case_timeout_s: float = 90.0
    budget_s: float = 450.0
    lower_cuda: bool = False


def measure_peaks(bw_bytes: int, mm_n: int, iters: int) -> dict:
    """Copy bandwidth (read + write of a uint32 buffer), BF16 matmul peak and a trivial call's round trip."""
    peaks = {"bw_bytes_per_s": None, "bf16_flops_per_s": None, "roundtrip_s": None, "errors": []}
    try:
        x = jnp.arange(bw_bytes // 4, dtype=jnp.uint32)
        copy = jax.jit(lambda v: v + jnp.uint32(1))
        jax.block_until_ready(copy(x))
        t = _median_time(lambda: copy(x), iters)
        peaks.update(bw_bytes_per_s=2 * x.size * 4 / t, bw_buffer_bytes=int(x.size * 4))
        x.delete()
    except Exception as e:  # noqa: BLE001 - reported
        peaks["errors"].append(f"bandwidth: {type(e).__name__}: {e}"[:2000])
    try:
        ka, kb = jax.random.split(jax.random.key(0))
        a = jax.random.normal(ka, (mm_n, mm_n), F32).astype(BF16)
        b = jax.random.normal(kb, (mm_n, mm_n), F32).astype(BF16)
        mm = jax.jit(lambda u, v: u @ v)
        jax.block_until_ready(mm(a, b))
        peaks.update(bf16_flops_per_s=2 * mm_n ** 3 / _median_time(lambda: mm(a, b), iters), bf16_matmul_n=mm_n)
    except Exception as e:  # noqa: BLE001
        peaks["errors"].append(f"bf16 matmul: {type(e).__name__}: {e}"[:2000])
    try:
        tiny = jax.jit(lambda v: v + 1)
        one = jnp.ones((), F32)
        jax.block_until_ready(tiny(one))
        peaks["roundtrip_s"] = _median_time(lambda: tiny(one), max(iters, 10))
    except Exception as e:  # noqa: BLE001
        peaks["errors"].append(f"roundtrip: {type(e).__name__}: {e}"[:2000])
    return peaks


def _limits(peaks: dict) -> tuple[float, float]:
    return peaks.get("bf16_flops_per_s") or NOMINAL_BF16_FLOPS, peaks.get("bw_bytes_per_s") or NOMINAL_BW


def num_copies(case: Case, opts: Opts, peaks: dict) -> int:
    """R: enough copies that R - 1 of them exceed `rotate_bytes`, and that one call holds ~min_call_s of work."""
    flops_per_s, bw = _limits(peaks)
    if case.kind == "gemm":
        flops_per_s *= 2  # FP8 tensor cores: twice BF16
    est = max(case.flops / flops_per_s, case.bytes / bw, 1e-6)
    r = max(1 + _cdiv(opts.rotate_bytes, case.in_bytes), math.ceil(opts.min_call_s / est), 2)
    return max(1, min(r, opts.max_copies, MEM_CAP_BYTES // (case.in_bytes + case.out_bytes)))


def base_record(case: Case) -> dict:
    return dict(kind=case.kind, backend=case.backend, baseline=case.baseline, **case.shape,
                flops=case.flops, bytes=case.bytes, **case.published, status="pending", error=None, time_s=None,
                time_raw_s=None, tflops=None, gbps=None, diff=None, accurate=None, copies=None, iters=None,
                compile_s=None, overhead_frac=None)


def time_case(case: Case, opts: Opts, peaks: dict, rec: dict) -> None:
    """Fill `rec` with the timing of `case` (R rotating copies per call; see the module docstring)."""
    r = num_copies(case, opts, peaks)
    inputs = [case.make(jax.random.key(i)) for i in range(r)]
    got = [(tuple(x.shape), jnp.dtype(x.dtype)) for x in inputs[0]]
    want = [(tuple(s.shape), jnp.dtype(s.dtype)) for s in case.specs]
    if got != want:
        raise AssertionError(f"inputs {got} do not match the case's specs {want}")
    run = jax.jit(lambda xs: [case.fn(*x) for x in xs])
    idle = jax.jit(lambda xs: xs[-1][-1] + jnp.ones((), xs[-1][-1].dtype))
    t = time.perf_counter()
    outs = jax.block_until_ready(run(inputs))
    rec["compile_s"] = time.perf_counter() - t
    out = outs[0]
    if (tuple(out.shape), jnp.dtype(out.dtype)) != (tuple(case.out_spec.shape), jnp.dtype(case.out_spec.dtype)):
        raise AssertionError(f"output {out.shape} {out.dtype} is not {case.out_spec.shape} {case.out_spec.dtype}")
    del outs
    for _ in range(opts.warmup):
        jax.block_until_ready(run(inputs))
    raw = _median_time(lambda: run(inputs), opts.iters)
    jax.block_until_ready(idle(inputs))
    overhead = _median_time(lambda: idle(inputs), opts.iters)
    per = max(raw - overhead, 0.5 * raw) / r
    rec.update(copies=r, iters=opts.iters, time_raw_s=raw / r, time_s=per, overhead_frac=overhead / raw,
               tflops=case.flops / per / 1e12, gbps=case.bytes / per / 1e9)
    if case.check is not None:
        rec["diff"] = float(cos_diff(out, case.check(*inputs[0])))
        rec["accurate"] = bool(rec["diff"] <= case.diff_max)
    if case.backend == "xla_fp8_dot":
        rec["xla_compiled_to"] = compiled_targets(case)
    for leaf in jax.tree.leaves((inputs, out)):
        leaf.delete()


def compiled_targets(case: Case) -> list[str]:
    """Custom-call targets and fusion kinds of `case.fn` as XLA compiled it (what the XLA baseline really is)."""
    text = jax.jit(case.fn).lower(*case.specs).compile().as_text() or ""
    found = set(re.findall(r'custom_call_target="([^"]+)"', text))
    found |= set(re.findall(r'"kind":"(__[\w$]+)"', text))
    types = dict(re.findall(r"(%[\w.\-]+) = (\w+)\[", text))
    for x, y in re.findall(r" dot\((%[\w.\-]+), (%[\w.\-]+)\)", text):  # XLA's own dots, with operand types
        found.add(f"dot({types.get(x, '?')}, {types.get(y, '?')})")
    return sorted(found)


_CUDA_TARGETS = ("mosaic_gpu_v2", "__gpu$xla.gpu.triton", "triton_kernel_call_ffi")


def check_shapes(case: Case, lower_cuda: bool, rec: dict) -> None:
    """Dry run of a real-size case: its shapes and dtypes through the wrappers (no data), optionally lowered."""
    out = jax.eval_shape(case.fn, *case.specs)
    if (tuple(out.shape), jnp.dtype(out.dtype)) != (tuple(case.out_spec.shape), jnp.dtype(case.out_spec.dtype)):
        raise AssertionError(f"output {out.shape} {out.dtype} is not {case.out_spec.shape} {case.out_spec.dtype}")
    rec["status"] = "shape_ok"
    if lower_cuda:
        checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in _CUDA_TARGETS]
        jax.export.export(jax.jit(case.fn), platforms=["cuda"], disabled_checks=checks)(*case.specs)
        rec["status"] = "lowered_ok"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Watchdog(threading.Thread):
    """Last resort for a case that never returns (a hung GPU kernel blocks the device and every later case; the
    in-thread timeout cannot interrupt a blocking wait): print the report so far, with that case marked "hung",
    and end the process (exit status 3). Rerun the rest with --filter."""

    def __init__(self, grace_s: float, on_fire: Callable[[str], None], exit_fn: Callable[[int], None] = os._exit):
        super().__init__(daemon=True)
        self.grace_s, self.on_fire, self.exit_fn = grace_s, on_fire, exit_fn
        self.deadline, self.label, self.stopped = None, "", False

    def arm(self, label: str, limit_s: float) -> None:
        self.label, self.deadline = label, time.perf_counter() + limit_s + self.grace_s

    def disarm(self) -> None:
        self.deadline = None

    def stop(self) -> None:
        self.deadline, self.stopped = None, True

    def run(self) -> None:
        while not self.stopped:
            time.sleep(0.1)
            if self.deadline is not None and time.perf_counter() > self.deadline:
                self.on_fire(self.label)
                self.exit_fn(3)
                return


def run_cases(cases: list[Case], opts: Opts, peaks: dict, deadline: float, dry: bool, records: list[dict],
              watchdog: Watchdog | None = None) -> list[dict]:
    """Run (or, dry, shape-check) every case; append one record per case to `records` as it starts."""
    for case in cases:
        rec = base_record(case)
        records.append(rec)
        if case.refusal:
            rec.update(status="unsupported", error=case.refusal)
            _log(f"  {case.label()}: not supported: {case.refusal}")
            continue
        left = deadline - time.perf_counter()
        if left < 5:
            rec.update(status="skipped", error=f"the run's budget of {opts.budget_s:.0f} s was spent")
            _log(f"  {case.label()}: skipped (budget spent)")
            continue
        t = time.perf_counter()
        limit = min(opts.case_timeout_s, left)
        if watchdog is not None:
            watchdog.arm(case.label(), limit)
        try:
            with _alarm(limit):
                if dry:
                    check_shapes(case, opts.lower_cuda, rec)
                else:
                    time_case(case, opts, peaks, rec)
                    rec["status"] = "ok"
        except CaseTimeout as e:
            rec.update(status="timeout", error=str(e))
        except Exception as e:  # noqa: BLE001 - one failing kernel must not stop the others
            rec.update(status="error", error=f"{type(e).__name__}: {e}"[:2000])
        finally:
            if watchdog is not None:
                watchdog.disarm()
        if rec["status"] != "ok" and not dry:
            gc.collect()  # a failed case's device buffers may sit in reference cycles (a full collect is slow)
        what = rec["status"] if rec["status"] != "ok" else (
            f"{rec['tflops']:.1f} TFLOPS, {rec['gbps']:.0f} GB/s, diff {_fmt(rec['diff'], '.1e')}")
        error = f"\n    {rec['error'].splitlines()[0]}" if rec["error"] else ""
        _log(f"  {case.label()}: {what} ({time.perf_counter() - t:.1f} s){error}")
    return records


# ------------------------------------------------------------------------------------------- reporting


def _fmt(v, spec: str = "n") -> str:
    """spec "n": whole numbers from 10 up, three significant digits below (stand-in and small figures)."""
    if v is None:
        return "-"
    if spec == "n":
        return f"{v:.0f}" if abs(v) >= 10 else f"{v:.3g}"
    return format(v, spec)


FAILED = ("error", "timeout", "skipped", "hung")
_MARK = {"error": "ERR", "timeout": "TIMEOUT", "skipped": "SKIP", "hung": "HUNG", "pending": "?", "shape_ok": "-",
         "lowered_ok": "-", "unsupported": "N/A"}


def _cell(rec: dict | None, key: str, spec: str = "n") -> str:
    if rec is None:
        return ""
    if rec["status"] != "ok":
        return _MARK.get(rec["status"], rec["status"])
    s = _fmt(rec[key], spec)
    if rec.get("overhead_frac") is not None and rec["overhead_frac"] > 0.2:
        s += "*"
    if rec.get("accurate") is False:
        s += " WRONG"
    return s


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def _shape_key(r: dict) -> tuple:
    keys = ("m", "n", "k") if r["kind"] == "gemm" else ("batch", "cache", "heads", "sq", "c", "r")
    return (r["kind"], *(r[k] for k in keys))


def annotate(records: list[dict], peaks: dict) -> None:
    """Derived figures on every record: ratios to the published and XLA figures, roofline bound, targets."""
    flops_per_s, bw = _limits(peaks)
    base = {_shape_key(r): r for r in records if r["baseline"]}
    for r in records:
        ok, other = r["status"] == "ok", base.get(_shape_key(r))
        r["vs_xla"] = (r["tflops"] / other["tflops"] if ok and not r["baseline"] and other
                       and other["status"] == "ok" else None)
        if r["kind"] == "gemm":
            pub = r.get("deepgemm_h800_tflops")
            r["vs_deepgemm"] = r["tflops"] / pub if ok and pub else None
            r["meets_target"] = (r["tflops"] >= r["target_tflops"] if ok and "target_tflops" in r
                                 and not r["baseline"] else None)
        else:
            r["flop_per_byte"] = r["flops"] / r["bytes"]
            r["bound"] = "memory" if r["flop_per_byte"] < flops_per_s / bw else "compute"
            r["frac_of_peak_bw"] = r["gbps"] * 1e9 / bw if ok else None
            r["meets_target"] = r["gbps"] >= TARGET_MLA_GBPS if ok and not r["baseline"] else None
            r["target_applies"] = r["bound"] == "memory"  # the GB/s target is for memory-bound shapes


def _by_shape(records: list[dict], keys: tuple[str, ...]) -> dict:
    shapes: dict = {}
    for r in records:
        shapes.setdefault(tuple(r[k] for k in keys), {})[r["backend"]] = r
    return shapes


def _target(rec: dict | None, spec: str) -> str:
    verdict = "not measured" if not rec or rec["meets_target"] is None else (
        "PASS" if rec["meets_target"] else "MISS")
    return f"{spec}: {verdict}"


def gemm_table(records: list[dict], backends: list[str]) -> str:
    primary = backends[0] if backends else None
    headers = ["M", "N", "K", "layer", *[f"{b} TFLOPS" for b in backends], "XLA FP8 dot TFLOPS",
               "DeepGEMM H800", f"{primary}/DeepGEMM", f"{primary}/XLA", f"target (M={TARGET_GEMM_M})", "diff"]
    rows = []
    for (m, n, k, layer), got in _by_shape(records, ("m", "n", "k", "layer")).items():
        main, xla = got.get(primary), got.get("xla_fp8_dot")
        pub = next(iter(got.values())).get("deepgemm_h800_tflops")
        target = _target(main, f">={TARGET_GEMM_TFLOPS:.0f}") if m == TARGET_GEMM_M else ""
        rows.append([m, n, k, layer, *[_cell(got.get(b), "tflops") for b in backends], _cell(xla, "tflops"),
                     _fmt(pub), _fmt(main and main["vs_deepgemm"], ".2f"), _fmt(main and main["vs_xla"], ".2f"),
                     target, _cell(main, "diff", ".1e")])
    return _table(headers, rows)


def mla_table(records: list[dict], backends: list[str]) -> str:
    kernels = [b for b in backends if b != "xla"]
    primary = kernels[0] if kernels else None
    headers = ["B", "S", "H", "Sq", "FLOP/B", "bound"]
    for b in kernels:
        headers += [f"{b} GB/s", "% of BW", f"{b} TFLOPS"]
    headers += ["xla GB/s", "xla TFLOPS", f"{primary}/xla", "FlashMLA H800", "target", "diff"]
    rows = []
    for (bsz, s, h, sq), got in _by_shape(records, ("batch", "cache", "heads", "sq")).items():
        any_rec, main, xla = next(iter(got.values())), got.get(primary), got.get("xla")
        row = [bsz, s, h, sq, f"{any_rec['flop_per_byte']:.0f}", any_rec["bound"]]
        for b in kernels:
            rec = got.get(b)
            row += [_cell(rec, "gbps"), _fmt(rec and rec["frac_of_peak_bw"] and 100 * rec["frac_of_peak_bw"]),
                    _cell(rec, "tflops")]
        target = _target(main, f">={TARGET_MLA_GBPS:.0f} GB/s")
        if any_rec["bound"] == "memory":
            ref = f"{FLASHMLA_GBPS:.0f} GB/s"
        else:
            ref, target = f"{FLASHMLA_TFLOPS[0]:.0f}-{FLASHMLA_TFLOPS[1]:.0f} TFLOPS", target + " (n/a: compute-bound)"
        row += [_cell(xla, "gbps"), _cell(xla, "tflops"), _fmt(main and main["vs_xla"], ".2f"), ref, target,
                _cell(main, "diff", ".1e")]
        rows.append(row)
    return _table(headers, rows)


def _shape_text(r: dict) -> str:
    return f"{r['kind']} {' '.join(str(r[k]) for k in ('m', 'n', 'k', 'batch', 'cache', 'heads', 'sq') if k in r)}"


def format_report(rep: dict) -> str:
    p = rep["peaks"]
    dry = f" (DRY RUN: real shapes checked, not timed; stand-ins timed on {rep['platform']})" if rep["dry_run"] else ""
    out = [f"GPU kernel benchmark{dry}",
           f"card: {rep['card']} ({rep['platform']}), date {rep['date']}, jax {rep['jax_version']}, "
           f"jaxlib {rep['jaxlib_version']}",
           f"measured copy bandwidth: {_fmt(p['bw_bytes_per_s'] and p['bw_bytes_per_s'] / 1e9)} GB/s; "
           f"bf16 matmul peak: {_fmt(p['bf16_flops_per_s'] and p['bf16_flops_per_s'] / 1e12, '.1f')} TFLOPS; "
           f"trivial call round trip: {_fmt(p['roundtrip_s'] and p['roundtrip_s'] * 1e6, '.0f')} us",
           *[f"  peak measurement failed: {e}" for e in p["errors"]]]
    if rep["gemm"]:
        out += ["", f"FP8 GEMM, TFLOPS = 2MNK/t (target at M={TARGET_GEMM_M}: >= {TARGET_GEMM_TFLOPS:.0f})",
                gemm_table(rep["gemm"], rep["args"]["backends"]),
                f"DeepGEMM: {DEEPGEMM_SOURCE}", XLA_FP8_DOT + "."]
        compiled = {tuple(r["xla_compiled_to"]) for r in rep["gemm"] + rep["standin"] if r.get("xla_compiled_to")}
        out += [f"  XLA compiled the FP8 dot to: {', '.join(sorted({t for c in compiled for t in c})) or '-'}"]
    if rep["mla"]:
        flops_per_s, bw = _limits(p)
        out += ["", f"MLA decode (FlashMLA formulas; ridge = bf16 peak / bandwidth = {flops_per_s / bw:.0f} FLOP/B; "
                f"target >= {TARGET_MLA_GBPS:.0f} GB/s when memory-bound)",
                mla_table(rep["mla"], rep["args"]["backends"]), f"FlashMLA: {FLASHMLA_SOURCE}", MLA_XLA + "."]
    if rep["standin"]:  # dry run: the same tables, on tiny cases really run (interpret backend, CPU)
        gemm = [r for r in rep["standin"] if r["kind"] == "gemm"]
        mla = [r for r in rep["standin"] if r["kind"] == "mla"]
        out += ["", "Stand-in cases, really run (dry run: tiny shapes, interpret backend; checks the timing and "
                "reporting path, the figures mean nothing)"]
        out += [gemm_table(gemm, ["interpret"])] if gemm else []
        out += [mla_table(mla, ["interpret"])] if mla else []
    failures = [r for r in rep["gemm"] + rep["mla"] + rep["standin"] if r["status"] in FAILED]
    if failures:
        out += ["", "Failures:"] + [f"  {_shape_text(r)} [{r['backend']}]: {r['status']}: {r['error']}"
                                    for r in failures]
    refused = [r for r in rep["gemm"] + rep["mla"] if r["status"] == "unsupported"]
    if refused:
        out += ["", "Not supported (not run):"] + [f"  {_shape_text(r)} [{r['backend']}]: {r['error']}"
                                                  for r in refused]
    out += ["", "* = host overhead over 20% of the timed call; WRONG = diff over the reference's limit; "
            "ERR/TIMEOUT/SKIP: see Failures; N/A: see Not supported", f"total wall time: {rep['wall_s']:.1f} s"]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--dry_run", action="store_true", help="CPU check of every case's shapes and of the code paths")
    p.add_argument("--lower_cuda", action="store_true", help="dry run: also export every case for CUDA")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    p.add_argument("--json_out", default="", help="also write the JSON object to this file")
    p.add_argument("--only", choices=("gemm", "mla", "all"), default="all")
    p.add_argument("--backend", default="mosaic_gpu", help="comma-separated kernel backends (default mosaic_gpu)")
    p.add_argument("--triton", action="store_true", help="also run the 'triton' backend")
    p.add_argument("--no_xla", action="store_true", help="skip the XLA baselines")
    p.add_argument("--mla_heads", default=str(MLA_HEADS), help="comma-separated h_q values (default 128)")
    p.add_argument("--filter", default="", help="only the cases whose label (as printed) matches this regex")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rotate_mb", type=int, default=256)
    p.add_argument("--min_call_ms", type=float, default=2.0)
    p.add_argument("--max_copies", type=int, default=64)
    p.add_argument("--case_timeout_s", type=float, default=90.0)
    p.add_argument("--budget_s", type=float, default=450.0, help="whole-run budget; later cases are skipped")
    a = p.parse_args(argv)
    a.backends = [b for b in a.backend.split(",") if b] + (["triton"] if a.triton else [])
    a.backends = list(dict.fromkeys(a.backends))
    bad = [b for b in a.backends if b not in BACKENDS]
    if bad or not a.backends:
        p.error(f"--backend: unknown {bad or a.backend!r}; valid: {', '.join(BACKENDS)}")
    a.heads = tuple(int(h) for h in a.mla_heads.split(","))
    try:
        re.compile(a.filter)
    except re.error as e:
        p.error(f"--filter: {e}")
    return a


def finish(rep: dict, gemm: list[Case], mla: list[Case], done: list[dict], standin: list[dict], t0: float) -> dict:
    """Put the records in table order (GEMM, MLA, then stand-ins), add the derived figures, count failures."""
    at = {(r["kind"], r["backend"], _shape_key(r)): r for r in done}
    for kind, cases in (("gemm", gemm), ("mla", mla)):
        rep[kind] = [at[k] for k in ((c.kind, c.backend, _shape_key(base_record(c))) for c in cases) if k in at]
    rep["standin"] = standin
    annotate(rep["gemm"] + rep["mla"], rep["peaks"])
    annotate(rep["standin"], rep["peaks"])
    rep["failures"] = sum(r["status"] in FAILED for r in rep["gemm"] + rep["mla"] + rep["standin"])
    rep["wall_s"] = time.perf_counter() - t0
    return rep


def main(argv=None) -> dict:
    a = parse_args(argv)
    t0 = time.perf_counter()
    dev = jax.devices()[0]
    if dev.platform != "gpu" and not a.dry_run:
        raise SystemExit(f"no GPU here ({dev.platform}: {dev.device_kind}); run with --dry_run")
    opts = Opts(iters=a.iters, warmup=a.warmup, rotate_bytes=a.rotate_mb * MB, min_call_s=a.min_call_ms / 1e3,
                max_copies=a.max_copies, case_timeout_s=a.case_timeout_s, budget_s=a.budget_s,
                lower_cuda=a.lower_cuda)
    deadline = t0 + opts.budget_s
    def show(rep: dict) -> None:
        text = format_report(rep)  # always built, so that the dry run exercises it
        print(json.dumps(rep) if a.json else text, flush=True)
        if a.json_out:
            Path(a.json_out).write_text(json.dumps(rep, indent=1))
    if a.dry_run:
        _log("measuring the limits (small stand-in sizes)")
        peaks = measure_peaks(4 * MB, 256, 3)
    else:
        _log("measuring the limits: copy bandwidth, bf16 matmul peak")
        peaks = measure_peaks(2 << 30, 8192, 20)
    keep = lambda cases: [c for c in cases if re.search(a.filter, c.label())]
    gemm = keep(gemm_cases(a.backends, not a.no_xla)) if a.only in ("gemm", "all") else []
    mla = keep(mla_cases(a.backends, not a.no_xla, a.heads)) if a.only in ("mla", "all") else []
    deepgemm = {str(m): dict(zip([f"{n}x{k}" for _, n, k in GEMM_NK], v)) for m, v in DEEPGEMM_TFLOPS.items()}
    rep = dict(card=dev.device_kind, platform=dev.platform,
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               jax_version=jax.__version__, jaxlib_version=jaxlib.__version__, dry_run=a.dry_run,
               args=dict(backends=a.backends, only=a.only, xla=not a.no_xla, heads=list(a.heads), filter=a.filter,
                         **dataclasses.asdict(opts)),
               peaks=peaks,
               published=dict(deepgemm=dict(source=DEEPGEMM_SOURCE, tflops=deepgemm),
                              flashmla=dict(source=FLASHMLA_SOURCE, memory_bound_gbps=FLASHMLA_GBPS,
                                            compute_bound_tflops=list(FLASHMLA_TFLOPS))),
               targets=dict(gemm_tflops_at_m4096=TARGET_GEMM_TFLOPS, mla_gbps_when_memory_bound=TARGET_MLA_GBPS),
               baselines=dict(gemm=XLA_FP8_DOT, mla=MLA_XLA))
    done: list[dict] = []

    def hung(label: str) -> None:
        if done and done[-1]["status"] == "pending":
            done[-1].update(status="hung", error=f"no return within {opts.case_timeout_s:.0f} s + grace; the run "
                                                 "stopped here (rerun the rest with --filter)")
        show(finish(rep, gemm, mla, done, [], t0))

    watchdog = Watchdog(60.0, hung)
    watchdog.start()
    _log(f"{'checking shapes of' if a.dry_run else 'timing'} {len(gemm)} GEMM and {len(mla)} MLA cases")
    # Kernels first, then the baselines (MLA's are cheaper): if the budget runs out, a baseline is what is lost.
    order = [c for c in gemm + mla if not c.baseline] + [c for c in mla + gemm if c.baseline]
    run_cases(order, opts, peaks, deadline, a.dry_run, done, watchdog)
    standin: list[dict] = []
    if a.dry_run:
        _log("running the stand-in cases (interpret backend and baselines, tiny shapes)")
        tiny = dataclasses.replace(opts, iters=2, warmup=1, rotate_bytes=1, min_call_s=0.0, max_copies=2)
        run_cases([c for c in standin_cases() if a.only == "all" or c.kind == a.only], tiny, peaks, deadline,
                  False, standin, watchdog)
    watchdog.stop()
    finish(rep, gemm, mla, done, standin, t0)
    show(rep)
    _log(f"total wall time: {rep['wall_s']:.1f} s; {rep['failures']} case(s) failed")
    return rep


if __name__ == "__main__":
    report = main()
    sys.exit(1 if report["dry_run"] and report["failures"] else 0)
