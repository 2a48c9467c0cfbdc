"""benchmarks/sparse_attention.py --quick runs end to end: every figure present and sane, and the sparse op
equal to its masked-dense reference on the benchmark's selections."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import sparse_attention as bench  # noqa: E402


def test_quick_benchmark_reports_every_figure(capsys):
    out = bench.main(["--quick", "--json"])
    assert set(out["prefill"]) == set(bench.QUICK["prefill"]) and set(out["decode"]) == set(bench.QUICK["decode"])
    for row in (*out["prefill"].values(), *out["decode"].values()):
        assert row["dense_tokens_per_s"] > 0 and row["dsa_tokens_per_s"] > 0
        assert abs(row["speedup"] - row["dsa_tokens_per_s"] / row["dense_tokens_per_s"]) < 1e-9
    b = out["cache_bytes_per_token"]
    assert b["dsa"] - b["dense"] == 4 * 32 * 4  # 4 layers x index_head_dim 32 float32 keys
    assert out["max_abs_diff_vs_masked_dense"] < 1e-5
    assert '"max_abs_diff_vs_masked_dense"' in capsys.readouterr().out.splitlines()[-1]


def test_bfloat16_indexer_keys_halve_their_bytes():
    """--index_cache bfloat16: the latent caches float32, DSA's indexer keys bfloat16 (the engine's --index_cache)."""
    out = bench.main(["--prefill", "", "--decode", "512", "--new", "2", "--repeats", "1", "--check", "2",
                      "--index_cache", "bfloat16"])
    assert out["cache"] == "float32" and out["index_cache"] == "bfloat16"
    assert out["cache_bytes_per_token"]["dsa"] - out["cache_bytes_per_token"]["dense"] == 4 * 32 * 2
    assert out["decode"][512]["dsa_tokens_per_s"] > 0


def test_indexer_layouts_times_both(capsys):
    out = bench.main(["--indexer_layouts", "1x512,16x512", "--json"])["indexer_layouts"]
    assert set(out) == {"1x512", "16x512"}
    assert all(row["rows_ms"] > 0 and row["transposed_ms"] > 0 for row in out.values())
    assert '"indexer_layouts"' in capsys.readouterr().out.splitlines()[-1]


def test_top_k_times_every_variant_and_they_agree(capsys):
    out = bench.main(["--top_k", "1x2048,8x1024", "--json"])["top_k"]
    assert set(out) == {"1x2048", "8x1024"}
    for row in out.values():
        assert row["same_indices"] is True
        assert {"xla_ms", "cpu_kernel_ms"} <= set(row) and all(row[n] > 0 for n in ("xla_ms", "cpu_kernel_ms"))
    assert '"top_k"' in capsys.readouterr().out.splitlines()[-1]
