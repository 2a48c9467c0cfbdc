"""benchmarks/plan_vs_maxtext.py without compiling: how it reads MaxText's and our plan's output, the
commands it builds, the side-by-side table, and the one line (exit 2) where MaxText is not installed."""
import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest

from dsv3_jax.config import ModelConfig
from dsv3_jax.costmodel import train_flops_per_token

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "plan_vs_maxtext.py"
_spec = importlib.util.spec_from_file_location("plan_vs_maxtext_bench", _PATH)
pvm = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = pvm
_spec.loader.exec_module(pvm)

GIB = 1 << 30
HBM = round(95.74 * GIB)
# The tail of a MaxText 0.2.4 train_compile run (numbers from its 4-layer V2-Lite compile on v5p-8), with
# the cost dict cut short: it holds hundreds of keys, 'flops' among them.
MAXTEXT_OK = "\n".join([
    "Jitting and compilation complete!",
    "Finished train_compile.py successfully!",
    "Cost analysis: {'utilization3{}': 185.0, 'bytes accessed': 72138039296.0, 'flops': 10268668067840.0, "
    "'transcendentals': 1787006976.0, 'optimal_seconds': -31.95}",
    "Memory analysis: CompiledMemoryStats(generated_code_size_in_bytes=88887296, argument_size_in_bytes=6765310976, "
    "output_size_in_bytes=6765235264, alias_size_in_bytes=6765229056, temp_size_in_bytes=6749156800, "
    "host_generated_code_size_in_bytes=0, host_argument_size_in_bytes=0, host_output_size_in_bytes=0, "
    "host_alias_size_in_bytes=0, host_temp_size_in_bytes=0)",
])
# A refusal as libtpu words it (the plan reads the same sentence: dsv3_jax.plan.oom_bytes).
MAXTEXT_OOM = "\n".join([
    "Jitting and compiling train step...",
    "jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory "
    "space hbm. Used 120.50G of 95.74G hbm. Exceeded hbm capacity by 24.76G.",
    "Program hbm requirement 100.25G: ... required for HLO temporaries (100.25G) exceeds available HBM (95.74G)",
])


def _args(*argv):
    return pvm._parser().parse_args(list(argv))


def test_reads_maxtext_memory_and_flops():
    r = pvm.parse_maxtext(MAXTEXT_OK, HBM)
    b = r["per_device_bytes"]
    assert (b["arguments"], b["temporaries"], b["outputs"], b["alias"]) == (6765310976, 6749156800, 6765235264,
                                                                           6765229056)
    assert b["total"] == 6765310976 + 6749156800 + 6765235264 - 6765229056  # aliased outputs counted once
    assert r["fits"] and not r["refused_by_compiler"]
    assert r["compiled_flops_per_device"] == 10268668067840.0
    assert not pvm.parse_maxtext(MAXTEXT_OK, 10 * GIB)["fits"]  # 12.6 GiB against 10


def test_reads_maxtext_refusal():
    r = pvm.parse_maxtext(MAXTEXT_OOM, HBM)
    assert r["refused_by_compiler"] and not r["fits"]
    assert r["per_device_bytes"]["temporaries"] == round(100.25 * GIB)
    assert r["hbm_bytes"] == round(95.74 * GIB)
    with pytest.raises(ValueError):
        pvm.parse_maxtext("Traceback ...\nValueError: Keys ['base_num_decoder_layers'] are overridden", HBM)


def test_reads_our_plan_json():
    line = json.dumps({"devices": 4, "fits": True, "compile_s": 70.0, "hbm_bytes": HBM,
                       "compiled_flops_per_device": 3.2e13,
                       "per_device_bytes": {"arguments": 100, "temporaries": 50, "outputs": 100, "alias": 96,
                                            "total": 154}})
    r = pvm.parse_ours("some warning\n" + line + "\n")
    assert r["per_device_bytes"]["total"] == 154 and r["compiled_flops_per_device"] == 3.2e13
    refused = json.dumps({"fits": False, "refused_by_compiler": True, "hbm_bytes": HBM, "compiled_flops_per_device":
                          None, "per_device_bytes": {"arguments": None, "temporaries": 7, "outputs": None,
                                                     "total": None}})
    assert pvm.parse_ours(refused)["per_device_bytes"]["temporaries"] == 7
    with pytest.raises(ValueError):
        pvm.parse_ours("no json here")


def test_topology_names():
    # MaxText counts TensorCores on v5p and Ironwood, chips on v5e/v6e (its accelerator_to_spec_map).
    assert pvm.maxtext_topology("v5p:2x2x1") == ("v5p-8", 4)
    assert pvm.maxtext_topology("v5p:4x4x8") == ("v5p-256", 128)
    assert pvm.maxtext_topology("v5e:4x4") == ("v5e-16", 16)
    assert pvm.maxtext_topology("v6e:2x2") == ("v6e-4", 4)
    assert pvm.maxtext_topology("tpu7x:2x2x1") == ("tpu7x-8", 8)
    for bad in ("h100:8", "v5p", "v5p:2xx"):
        with pytest.raises(pvm.BenchError):
            pvm.maxtext_topology(bad)


def test_commands_for_both_sides(tmp_path):
    args = _args("--layers", "4", "--per_device_batch", "8", "--maxtext_arg", "scan_layers=false",
                 "--maxtext_python", "/venv/bin/python")
    args.maxtext_model = "deepseek2-16b"
    mt = pvm.maxtext_command(args, "/site/maxtext", "v5p-8", "/tmp/out")
    assert mt[:4] == ["/venv/bin/python", "-m", "maxtext.trainers.pre_train.train_compile",
                      "/site/maxtext/configs/base.yml"]
    for item in ("model_name=deepseek2-16b", "compile_topology=v5p-8", "compile_topology_num_slices=1",
                 "per_device_batch_size=8", "max_target_length=4096", "remat_policy=full",
                 "override_model_config=true", "base_num_decoder_layers=4", "scan_layers=false"):
        assert item in mt
    config = pvm.our_config("deepseek_v2_lite_16b", 4, str(tmp_path))
    cfg = ModelConfig.from_json(config)
    assert cfg.num_layers == 4 and cfg.differences(ModelConfig.from_json("deepseek_v2_lite_16b")) == ["num_layers"]
    ours = pvm.our_command(args, config, 4)
    assert ours[1:3] == ["-m", "dsv3_jax.plan"] and ours[-1] != "--mesh"
    for flag, value in (("--batch", "32"), ("--seq", "4096"), ("--remat", "full"), ("--moments", "float32"),
                        ("--target", "v5p:2x2x1")):
        assert ours[ours.index(flag) + 1] == value
    with pytest.raises(pvm.BenchError):
        pvm.our_config("deepseek_v2_lite_16b", 1, str(tmp_path))  # no MoE layer left
    with pytest.raises(pvm.BenchError):
        pvm.maxtext_command(_args("--maxtext_arg", "scan_layers"), "/p", "v5p-8", "/o")


def test_counted_once_is_one_layer_a_stack():
    cfg = ModelConfig.from_json("deepseek_v2_lite_16b")
    once = pvm.counted_once(cfg)
    assert (once.num_layers, once.first_k_dense) == (2, 1)  # one dense layer, one MoE layer
    assert pvm.counted_once(cfg.replace(first_k_dense=3)).num_layers == 2
    assert pvm.counted_once(cfg.replace(first_k_dense=0)).num_layers == 1


def test_side_by_side_table():
    args = _args("--layers", "4")
    args.maxtext_model = "deepseek2-16b"
    setup = pvm._setup(args, {"version": "0.2.4", "package": "/p"})
    cfg = ModelConfig.from_json("deepseek_v2_lite_16b").replace(num_layers=4)
    model, once = train_flops_per_token(cfg, 4096), train_flops_per_token(cfg.replace(num_layers=2), 4096)
    assert setup["model_flops_per_token"] == model and setup["model_once_flops_per_token"] == once
    assert setup["devices"] == 4 and setup["scan_layers"]
    mt = {**pvm.parse_maxtext(MAXTEXT_OK, HBM), "wall_s": 300.0}
    mt.update(pvm.per_token(mt, 4096, setup, scanned=True))
    per = 10268668067840.0 / 4096
    assert mt["compiled_flops_per_token"] == pytest.approx(per)
    assert mt["compiled_over_model"] == pytest.approx(per / once)  # scanned: against one layer a stack
    assert mt["estimated_flops_per_token"] == pytest.approx(per / once * model)
    unrolled = pvm.per_token(mt, 4096, setup, scanned=False)
    assert unrolled["compiled_over_model"] == pytest.approx(per / model)
    assert unrolled["estimated_flops_per_token"] == pytest.approx(per)
    refused = {**pvm.parse_maxtext(MAXTEXT_OOM, HBM), "wall_s": 60.0, "compile_s": None}
    refused.update(pvm.per_token(refused, 4096, setup, scanned=True))
    text = pvm.format_side_by_side({"setup": setup, "maxtext": mt, "ours": refused})
    assert "MaxText 0.2.4" in text and "12.59 GiB" in text  # MaxText's total
    assert "100.25 GiB (refused)" in text and "NO (of 95.74 GiB)" in text
    assert f"{per / once:.2f}x *" in text and "counts a loop's body once" in text
    over = {**mt, "fits": False, "hbm_bytes": mt["per_device_bytes"]["total"] - (5 << 20)}  # 5 MiB too big
    assert "NO (5.00 MiB over 12.58 GiB)" in pvm.format_side_by_side({"setup": setup, "maxtext": over, "ours": None})
    assert "(not run)" in pvm.format_side_by_side({"setup": setup, "maxtext": mt, "ours": None})


def test_unrolled_on_both_sides():
    args = _args("--noscan_layers", "--maxtext_python", "/py")
    args.maxtext_model = "deepseek2-16b"
    assert "scan_layers=false" in pvm.maxtext_command(args, "/p", "v5p-8", "/o")
    assert pvm.our_command(args, "deepseek_v2_lite_16b", 4)[-1] == "--noscan_layers"
    scanned = _args("--maxtext_python", "/py")
    scanned.maxtext_model = "deepseek2-16b"
    assert not any(a.startswith("scan_layers") for a in pvm.maxtext_command(scanned, "/p", "v5p-8", "/o"))
    assert "--noscan_layers" not in pvm.our_command(scanned, "deepseek_v2_lite_16b", 4)


def test_missing_maxtext_is_one_line_and_exit_2(tmp_path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = pvm.main(["--maxtext_python", str(tmp_path / "no-python"), "--layers", "4"])
    assert rc == 2
    lines = out.getvalue().strip().splitlines()
    assert len(lines) == 1 and 'pip install "maxtext[tpu]==0.2.4"' in lines[0]
    # A Python without MaxText is treated the same (this test's own Python has none).
    if importlib.util.find_spec("maxtext") is None:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert pvm.main(["--maxtext_python", sys.executable]) == 2
        assert "MaxText is not installed" in out.getvalue()
