"""The TPU kernel benchmark's compile-only path on tiny shapes (`--small`), for v5e: the JSON it prints, our byte
and FLOP counts by hand, the roofline estimate's arithmetic, and the experts comparison's compiler counts.

`benchmarks/tpu_kernels.py` is loaded from its path and its `main(argv)` run in-process once (module fixture).
"""
import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "tpu_kernels.py"
_spec = importlib.util.spec_from_file_location("tpu_kernels_bench", _PATH)
tk = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = tk  # dataclasses look the module up while the class is built
_spec.loader.exec_module(tk)

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="compile-only TPU devices need libtpu: pip install 'jax[tpu]==0.10.2'")
# Published v5e figures (docs/FACTS.md s.7), written out again rather than read from the script.
V5E_BW, V5E_BF16 = 819e9, 197e12


@pytest.fixture(scope="module")
def report():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rep = tk.main(["--compile_only", "--generations", "v5e", "--expert_generations", "v5e", "--small", "--json"])
    return rep, out.getvalue()


def _kernel(rep, label_start: str) -> dict:
    (found,) = [r for r in rep["generations"]["v5e"]["kernels"] if r["label"].startswith(label_start)]
    return found


@needs_libtpu
def test_prints_one_json_object_with_every_kernel_compiled(report):
    rep, printed = report
    assert json.loads(printed) == json.loads(json.dumps(rep))  # the whole of stdout is the JSON object
    assert rep["mode"] == "compile_only" and rep["small"] and list(rep["generations"]) == ["v5e"]
    records = rep["generations"]["v5e"]["kernels"]
    kernels = [r["kernel"] for r in records]
    assert kernels == ["mla_decode"] * 4 + ["fp8_gemm", "fp8_grouped_gemm", "fp8_weight_gemm",
                                             "fp8_grouped_weight_gemm"]
    for r in records:
        assert r["status"] == "compiled" and r["refusal"] is None and r["error"] is None, r
        assert r["kernel_calls"] == 1 and r["vmem_bytes"] > 0 and r["compile_s"] > 0
        assert r["bytes"] == sum(r["bytes_by_operand"].values()) > 0 and r["flops"] > 0
    assert "COMPILE-ONLY: nothing ran on a TPU" in tk.format_report(rep)


@needs_libtpu
def test_byte_and_flop_counts_by_hand(report):
    rep, _ = report
    # MLA, B=2, S=256, H=16, C=128, R=64: bf16 rows of 192 values; packed FP8 rows of 128 + 4 + 128 bytes.
    bf16 = _kernel(rep, "mla_decode bf16_cache batch=2 cache=256 heads=16 sq=2")
    assert bf16["bytes_by_operand"] == {"cache": 2 * 256 * 192 * 2, "q": 2 * 2 * 16 * 192 * 2,
                                        "out": 2 * 2 * 16 * 128 * 2}
    assert bf16["flops"] == 2 * 2 * 2 * 256 * 16 * (192 + 128)
    fp8 = _kernel(rep, "mla_decode fp8_cache batch=2 cache=256 heads=16 sq=1")
    assert fp8["bytes_by_operand"]["cache"] == 2 * 256 * 260
    # E4M3 a [64, 512] with 1x128 f32 scales, E4M3 b [256, 512] with 128x128 scales, bf16 out [64, 256].
    gemm = _kernel(rep, "fp8_gemm ")
    assert gemm["bytes_by_operand"] == {"x": 64 * 512 + 64 * 4 * 4, "weight": 256 * 512 + 2 * 4 * 4,
                                        "out": 64 * 256 * 2}
    assert gemm["flops"] == 2 * 64 * 256 * 512
    grouped = _kernel(rep, "fp8_grouped_weight_gemm ")  # bf16 x; all 4 experts' weights read
    assert grouped["bytes_by_operand"] == {"x": 8 * 512 * 2, "weight": 4 * (256 * 512 + 2 * 4 * 4), "out": 8 * 256 * 2}


@needs_libtpu
def test_estimate_is_bytes_over_bandwidth_or_flops_over_peak(report):
    rep, _ = report
    chip = rep["generations"]["v5e"]["chip"]
    assert (chip["hbm_bytes_per_s"], chip["bf16_flops_per_s"]) == (V5E_BW, V5E_BF16)
    assert chip["fp8_flops_per_s"] == V5E_BF16 and not chip["fp8_mxu"]  # E4M3 is widened to bf16 before TPU7x
    for r in rep["generations"]["v5e"]["kernels"]:
        e = r["estimate"]
        t_mem, t_flop = r["bytes"] / V5E_BW, r["flops"] / V5E_BF16
        assert e["t_memory_s"] == pytest.approx(t_mem) and e["t_compute_s"] == pytest.approx(t_flop)
        assert e["bound"] == ("memory" if t_mem >= t_flop else "compute")
        assert e["at_100pct_bw"]["time_s"] == pytest.approx(max(t_mem, t_flop))
        assert e["at_90pct_bw"]["time_s"] == pytest.approx(max(t_mem / 0.9, t_flop))
        assert e["at_90pct_bw"]["gbps"] == pytest.approx(r["bytes"] / e["at_90pct_bw"]["time_s"] / 1e9)
        assert e["at_90pct_bw"]["tflops"] == pytest.approx(r["flops"] / e["at_90pct_bw"]["time_s"] / 1e12)


@needs_libtpu
def test_default_layout_of_a_cache_row_is_copied_before_the_kernel(report):
    """A row of 192 bf16 values is not whole 128-lane tiles: TPU's default layout puts S minor, and XLA relayouts
    the whole cache before the kernel; row-major inputs compile without that copy."""
    rep, _ = report
    mla = _kernel(rep, "mla_decode bf16_cache batch=2 cache=256 heads=16 sq=1")
    assert mla["relayout_bytes"] >= mla["bytes_by_operand"]["cache"]
    assert _kernel(rep, "fp8_gemm ")["relayout_bytes"] < 64 * 512  # E4M3 rows of 512: whole lane tiles, no copy


@needs_libtpu
def test_experts_compiler_counts(report):
    rep, _ = report
    got = {(r["way"], r["phase"]): r for r in rep["experts"]}
    assert {way for way, _ in got} == {"megablox", "ragged_dot", "megablox_tiles_512x128x128"}
    for r in got.values():
        assert r["status"] == "compiled" and r["preset"] == "small" and (r["d"], r["f"], r["experts"]) == (256, 128, 16)
        assert r["ideal_flops"] == (3 if r["phase"] == "forward" else 9) * 2 * r["rows"] * 256 * 128
        assert r["bytes_accessed"] > 0 and r["compile_s"] > 0 and r["hbm_temp_bytes"] >= 0
    # megablox declares its FLOPs (gmm and tgmm): the compiler's count is the ideal one, forward and backward;
    # XLA's ragged_dot backward computes the weight gradient over every expert's rows.
    assert got["megablox", "forward+backward"]["flops_vs_ideal"] == pytest.approx(1.0, abs=0.05)
    assert got["ragged_dot", "forward+backward"]["flops_vs_ideal"] > 2


def test_chip_figures_are_per_device():
    ironwood = tk.chip_figures("tpu7x")  # two TensorCores, each its own device
    assert ironwood["devices_per_chip"] == 2 and ironwood["fp8_mxu"]
    assert (ironwood["hbm_bytes_per_s"], ironwood["bf16_flops_per_s"], ironwood["fp8_flops_per_s"]) == (
        7370e9 / 2, 2307e12 / 2, 4614e12 / 2)
    with pytest.raises(SystemExit):
        tk.parse_args(["--compile_only", "--generations", "v4"])
