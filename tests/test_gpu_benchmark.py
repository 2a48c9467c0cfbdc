"""The GPU kernel benchmark's dry run (CPU): every case, the FLOP / byte formulas, the timing and reporting path.

`benchmarks/gpu_kernels.py` is loaded from its path and its `main(argv)` run in-process once (module fixture).
"""
import contextlib
import importlib.util
import io
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_kernels.py"
_spec = importlib.util.spec_from_file_location("gpu_kernels_bench", _PATH)
gk = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = gk  # dataclasses look the module up while the class is built
_spec.loader.exec_module(gk)

# DeepGEMM's shapes and figures (docs/FACTS.md s.5), written out again here rather than read from the script.
GEMM_SHAPES = {(m, n, k) for m in (64, 128, 4096) for n, k in
               [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]}
MLA_SHAPES = {(128, s, 128, sq) for s in (4096, 8192) for sq in (1, 2)}


@pytest.fixture(scope="module")
def dry():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rep = gk.main(["--dry_run", "--json"])
    return rep, out.getvalue()


def test_dry_run_prints_one_json_object(dry):
    rep, printed = dry
    got = json.loads(printed)  # the whole of stdout is the JSON object
    assert got["dry_run"] is True and got["failures"] == 0
    assert got["card"] == jax.devices()[0].device_kind and got["jax_version"] == jax.__version__
    assert got["date"][:4].isdigit() and got["wall_s"] > 0
    assert len(got["gemm"]) == 36 and len(got["mla"]) == 8  # 18 + 4 shapes x (kernel, XLA baseline)
    assert got["published"]["deepgemm"]["tflops"]["4096"]["7168x16384"] == 1520


def test_dry_run_covers_every_shape(dry):
    rep, _ = dry
    for backend in ("mosaic_gpu", "xla_fp8_dot"):
        recs = [r for r in rep["gemm"] if r["backend"] == backend]
        assert {(r["m"], r["n"], r["k"]) for r in recs} == GEMM_SHAPES and len(recs) == 18
        assert all(r["status"] == "shape_ok" and r["time_s"] is None for r in recs)
    for backend in ("mosaic_gpu", "xla"):
        recs = [r for r in rep["mla"] if r["backend"] == backend]
        assert {(r["batch"], r["cache"], r["heads"], r["sq"]) for r in recs} == MLA_SHAPES and len(recs) == 4
        assert all(r["status"] == "shape_ok" and (r["c"], r["r"]) == (512, 64) for r in recs)
    assert all(r["flops"] == 2 * r["m"] * r["n"] * r["k"] for r in rep["gemm"])
    targets = {(r["m"], r["n"], r["k"]): r.get("target_tflops") for r in rep["gemm"] if r["backend"] == "mosaic_gpu"}
    assert all((t == 1200.0) == (s[0] == 4096) for s, t in targets.items())


def test_flop_and_byte_formulas_by_hand(dry):
    rep, _ = dry
    g = next(r for r in rep["gemm"] if (r["m"], r["n"], r["k"], r["backend"]) == (4096, 7168, 16384, "mosaic_gpu"))
    assert g["flops"] == 2 * 4096 * 7168 * 16384 == 962_072_674_304
    # e4m3 A + e4m3 B + bf16 out + f32 scales (A: 4096 x 128, B: 56 x 128)
    assert g["bytes"] == 67_108_864 + 117_440_512 + 58_720_256 + 4 * (524_288 + 7_168) == 245_395_456
    assert g["deepgemm_h800_tflops"] == 1520
    m = next(r for r in rep["mla"] if (r["cache"], r["sq"], r["backend"]) == (4096, 1, "mosaic_gpu"))
    # FlashMLA: FLOPs = 2 s_q sum(len) h_q (576 + 512); bytes = (sum(len) 576 + b s_q h_q (576 + 512)) * 2
    assert m["flops"] == 2 * 1 * (128 * 4096) * 128 * 1088 == 146_028_888_064
    assert m["bytes"] == (524_288 * 576 + 128 * 1 * 128 * 1088) * 2 == 639_631_360
    assert m["flop_per_byte"] == pytest.approx(146_028_888_064 / 639_631_360)


def test_standins_ran_and_were_checked(dry):
    rep, _ = dry
    assert {(r["kind"], r["backend"]) for r in rep["standin"]} == {
        ("gemm", "interpret"), ("gemm", "xla_fp8_dot"), ("mla", "interpret"), ("mla", "xla")}
    for r in rep["standin"]:
        assert r["status"] == "ok", r["error"]
        assert r["time_s"] > 0 and r["copies"] == 2 and r["iters"] == 2
        assert r["tflops"] == pytest.approx(r["flops"] / r["time_s"] / 1e12)
        assert r["gbps"] == pytest.approx(r["bytes"] / r["time_s"] / 1e9)
        if r["backend"] != "xla":  # each kernel's output against its float32 reference
            assert r["accurate"] is True and 0 <= r["diff"] < (1e-3 if r["kind"] == "gemm" else 1e-5)
    kernel = next(r for r in rep["standin"] if (r["kind"], r["backend"]) == ("gemm", "interpret"))
    assert kernel["vs_xla"] is not None and kernel["vs_xla"] > 0
    assert any(t.startswith("dot(") for r in rep["standin"] for t in r.get("xla_compiled_to", []))


def test_table_text(dry):
    rep, _ = dry
    text = gk.format_report(rep)
    assert "DRY RUN" in text and "total wall time" in text and "Failures:" not in text
    row = next(line for line in text.splitlines() if line.startswith("| 4096 |  7168 | 16384 |"))
    assert "1520" in row and ">=1200: not measured" in row
    assert sum(line.startswith("| 128 |") for line in text.splitlines()) == 4  # the MLA rows
    assert "FlashMLA" in text and "DeepGEMM" in text
    # The stand-ins go through the same tables with measured figures (the real rows only have "-").
    cells = [c.strip() for c in next(line for line in text.splitlines() if line.startswith("| 64 | 256 | 384 |"))
             .split("|")[1:-1]]
    assert cells[3] == "stand-in" and float(cells[4].rstrip("*")) > 0 and float(cells[5].rstrip("*")) > 0
    assert float(cells[-1]) < 1e-3  # the interpret kernel's diff
    cells = [c.strip() for c in next(line for line in text.splitlines() if line.startswith("| 2 | 128 |")).split("|")]
    assert float(cells[7].rstrip("*")) > 0  # interpret GB/s


def test_one_failing_case_is_reported_and_the_rest_still_run():
    good = gk.gemm_case(64, 128, 256, "xla_fp8_dot")
    bad = gk.gemm_case(64, 128, 256, "interpret")
    bad.fn = lambda *x: (_ for _ in ()).throw(RuntimeError("kernel exploded"))

    def slow_make(key):
        time.sleep(60)  # interrupted by the case timeout
        return good.make(key)

    slow = gk.gemm_case(64, 128, 256, "triton")
    slow.make = slow_make
    opts = gk.Opts(iters=1, warmup=0, rotate_bytes=1, min_call_s=0.0, max_copies=2, case_timeout_s=3.0)
    recs = gk.run_cases([bad, slow, good], opts, {}, time.perf_counter() + 60, False, [])
    assert [r["status"] for r in recs] == ["error", "timeout", "ok"]
    assert "kernel exploded" in recs[0]["error"] and "timed out" in recs[1]["error"]
    assert recs[2]["tflops"] > 0 and recs[2]["diff"] < 1e-3
    skipped = gk.run_cases([good], opts, {}, time.perf_counter(), False, [])  # no budget left
    assert skipped[0]["status"] == "skipped"
    gk.annotate(recs, {})
    assert "Failures:" in gk.format_report(dict(
        peaks=dict(bw_bytes_per_s=None, bf16_flops_per_s=None, roundtrip_s=None, errors=[]), dry_run=False,
        card="x", platform="gpu", date="d", jax_version="v", jaxlib_version="v", gemm=recs, mla=[], standin=[],
        args=dict(backends=["interpret"]), wall_s=1.0))


def test_a_case_its_backend_refuses_is_reported_and_not_run():
    case = gk.mla_case(2, 128, 4, 2, "mosaic_gpu", c=64, r=32)  # Mosaic GPU needs v_dim a multiple of 128
    assert case.refusal and "v_dim a multiple of 128" in case.refusal
    case.make = lambda key: (_ for _ in ()).throw(AssertionError("a refused case must not run"))
    opts = gk.Opts(iters=1, warmup=0, rotate_bytes=1, min_call_s=0.0, max_copies=2, case_timeout_s=30.0)
    recs = gk.run_cases([case], opts, {}, time.perf_counter() + 60, False, [])
    assert recs[0]["status"] == "unsupported" and recs[0]["error"] == case.refusal
    gk.annotate(recs, {})
    text = gk.format_report(dict(
        peaks=dict(bw_bytes_per_s=None, bf16_flops_per_s=None, roundtrip_s=None, errors=[]), dry_run=False,
        card="x", platform="gpu", date="d", jax_version="v", jaxlib_version="v", gemm=[], mla=recs, standin=[],
        args=dict(backends=["mosaic_gpu"]), wall_s=1.0))
    assert "Not supported (not run):" in text and case.refusal in text and "Failures:" not in text
    assert "N/A" in next(line for line in text.splitlines() if line.startswith("| 2 | 128 |"))
    assert gk.mla_case(2, 128, 4, 2, "interpret", c=64, r=32).refusal is None


def test_watchdog_reports_a_hung_case_then_exits():
    fired, codes = [], []
    dog = gk.Watchdog(0.0, fired.append, exit_fn=codes.append)
    dog.start()
    dog.arm("gemm m=1 [stuck]", 0.2)
    dog.join(timeout=10)
    assert fired == ["gemm m=1 [stuck]"] and codes == [3] and not dog.is_alive()
    calm = gk.Watchdog(0.0, fired.append, exit_fn=codes.append)
    calm.start()
    calm.arm("x", 0.2)
    calm.disarm()
    time.sleep(0.4)
    calm.stop()
    calm.join(timeout=10)
    assert fired == ["gemm m=1 [stuck]"] and not calm.is_alive()


def test_copies_rotate_past_l2_and_respect_the_cap():
    case = gk.gemm_case(64, 2112, 7168, "mosaic_gpu")
    peaks = {"bf16_flops_per_s": 800e12, "bw_bytes_per_s": 4e12}
    r = gk.num_copies(case, gk.Opts(min_call_s=0.0, max_copies=1000), peaks)
    assert (r - 1) * case.in_bytes >= 256 << 20 > (r - 2) * case.in_bytes  # just enough to flush L2
    assert gk.num_copies(case, gk.Opts(max_copies=8), peaks) == 8
    big = gk.mla_case(128, 8192, 128, 2, "mosaic_gpu")
    assert gk.num_copies(big, gk.Opts(min_call_s=1.0, max_copies=1000), peaks) * (
        big.in_bytes + big.out_bytes) <= gk.MEM_CAP_BYTES


def test_arguments():
    with pytest.raises(SystemExit):
        gk.parse_args(["--backend", "cuda_magic"])
    a = gk.parse_args(["--backend", "mosaic_gpu", "--triton", "--mla_heads", "128,16"])
    assert a.backends == ["mosaic_gpu", "triton"] and a.heads == (128, 16)
    if jax.devices()[0].platform != "gpu":
        with pytest.raises(SystemExit, match="dry_run"):
            gk.main([])
    assert math.isclose(float(gk.cos_diff(jnp.ones(4), jnp.ones(4))), 0.0, abs_tol=1e-7)
    assert float(gk.cos_diff(jnp.ones(4), -jnp.ones(4))) == pytest.approx(2.0)
