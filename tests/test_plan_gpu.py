"""Compile-only GPU plans (`python -m dsv3_jax.plan --target h100:8`): the real train and decode steps compiled
for one node of 8 H100s by the CUDA compiler on this CPU host, their memory against a count made here.

The target descriptions and the parsing of `--target` need no CUDA and always run; the compiles need the CUDA
build of jaxlib (`pip install "jax[cuda12]==0.10.2"`, ~5.5 GB), which CI does not install: they are skipped
where it is missing."""
from __future__ import annotations

import dataclasses
import json
import math
import re

import jax
import pytest

from dsv3_jax import gpu_targets, plan
from dsv3_jax.config import ModelConfig
from dsv3_jax.model import logical_axes, variable_shapes
from dsv3_jax.ops import dispatch
from dsv3_jax.parallel.mesh import make_mesh
from dsv3_jax.parallel.rules import param_shardings
from dsv3_jax.runtime import Runtime
from dsv3_jax.train.step import OptimConfig, init_state, state_shardings

TARGET = "h100:8"
MESH = {"data": 1, "fsdp": 8, "expert": 1, "tensor": 1}
BATCH, SEQ, CONTEXT = 8, 32, 256
needs_cuda = pytest.mark.skipif(not gpu_targets.cuda_installed(),
                                reason="compile-only GPU plans need the CUDA build of jaxlib, which is not installed "
                                       "(CI leaves it out): pip install 'jax[cuda12]==0.10.2'")


# ---- without CUDA: the targets --------------------------------------------------------------------
@pytest.mark.parametrize("target, nodes, gpus, topology", [("h100:8", 1, 8, "1x1x8"), ("h200:8", 1, 8, "1x1x8"),
                                                           ("h800:32x8", 32, 8, "32x1x8"), ("h100:4", 1, 4, "1x1x4")])
def test_targets_parse(target, nodes, gpus, topology):
    cluster = gpu_targets.parse_target(target)
    assert (cluster.nodes, cluster.gpus_per_node, cluster.devices, cluster.topology) == \
        (nodes, gpus, nodes * gpus, topology)
    chip = plan.chip_of(target)
    assert chip.platform == "gpu" and chip.usable_hbm_bytes == int(0.8 * chip.hbm_bytes)


@pytest.mark.parametrize("target", ["h100:9", "h100:2x4", "h100:0", "h900:8", "h100", "h100:x8"])
def test_bad_gpu_targets_are_plan_errors(target):
    with pytest.raises(plan.PlanError, match="--target"):
        plan.chip_of(target)


def test_facts_follow_facts_md():
    """FACTS.md s.7: H100 and H800 share compute and memory, H800's NVLink is 400 GB/s; H200 has more, faster HBM."""
    h100, h200, h800 = (gpu_targets.CARDS[k] for k in ("h100", "h200", "h800"))
    assert h100.bf16_flops == h200.bf16_flops == h800.bf16_flops == 989e12
    assert (h100.memory_bytes, h100.memory_bandwidth) == (h800.memory_bytes, h800.memory_bandwidth)
    assert (h100.nvlink_bandwidth, h800.nvlink_bandwidth, h200.memory_bandwidth) == (900e9, 400e9, 4.8e12)
    assert h100.sm is h200.sm is h800.sm is gpu_targets.HOPPER


def test_target_config_text_carries_the_facts():
    text = gpu_targets.target_config_text(gpu_targets.CARDS["h800"])
    fields = dict(re.findall(r"^\s*(\w+): (.+)$", text, flags=re.M))
    assert fields["core_count"] == "132" and fields["shared_memory_per_block_optin"] == str(227 * 1024)
    assert fields["device_memory_size"] == str(80 << 30) and fields["memory_bandwidth"] == str(int(3.35e12))
    assert fields["major"] == "9" and fields["platform_name"] == '"CUDA"'
    assert fields["device_description_str"] == '"NVIDIA H800"'
    assert text.count("{") == text.count("}")


def test_cuda_missing_is_a_plan_error(monkeypatch):
    monkeypatch.setattr(gpu_targets, "cuda_installed", lambda: False)
    with pytest.raises(plan.PlanError, match=re.escape("pip install 'jax[cuda12]")):
        plan.topology_devices(TARGET)


# ---- with CUDA: the compiles ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def devices():
    return plan.topology_devices(TARGET)


def _setup(cfg: ModelConfig, **changes) -> plan.Setup:
    setup = plan.Setup(cfg, TARGET, MESH, BATCH, SEQ, Runtime(dtype="bfloat16", platform="gpu"), OptimConfig())
    return dataclasses.replace(setup, **changes)


@pytest.fixture(scope="module")
def reports(devices):
    tiny = ModelConfig.from_json("tiny")
    return {"train": plan.plan(_setup(tiny), devices),
            "decode": plan.plan(_setup(tiny, mode="decode", context=CONTEXT), devices)}


def _shard_bytes(abstract, shardings, total: bool = True):
    """Bytes of each leaf's shard on one device (GPU memory holds arrays untiled, element by element): their
    sum, or the tree of them."""
    sizes = jax.tree_util.tree_map(lambda a, s: math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize,
                                   abstract, shardings)
    return sum(jax.tree_util.tree_leaves(sizes)) if total else sizes


def train_count(cfg: ModelConfig, mesh) -> int:
    """The train step's arguments per device from shapes and shardings alone: the f32 parameters, AdamW's two
    moments (each sharded like its parameter) and the counters, plus the batch's int32 token windows."""
    optim = OptimConfig()
    state = _shard_bytes(jax.eval_shape(lambda: init_state(cfg, optim, 0)), state_shardings(cfg, optim, mesh))
    return state + BATCH // 8 * (SEQ + 1 + cfg.mtp_depth) * 4


def decode_count(cfg: ModelConfig, mesh, slots: int) -> int:
    """The plain decode step's arguments per device: every weight but the MTP module's in bf16, sharded by the
    model's rules (jit drops the arguments a program does not read, and plain decoding reads no MTP weight);
    wkv_b's two absorbed halves per layer ([H, C, N] and [H, V, C]), replicated; each layer's latent cache
    [B x slots, C + R] in bf16, its rows split over the 8 devices (the per-row counters are a few bytes)."""
    shapes = variable_shapes(cfg)
    bf16 = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, jax.numpy.bfloat16), shapes)
    sizes = _shard_bytes(bf16, param_shardings(logical_axes(cfg), shapes, mesh), total=False)
    weights = sum(size for path, size in jax.tree_util.tree_leaves_with_path(sizes)
                  if not any(getattr(k, "key", "").startswith("mtp_") for k in path))
    absorbed = cfg.num_layers * cfg.num_heads * cfg.kv_lora_rank * (cfg.qk_nope_head_dim + cfg.v_head_dim) * 2
    caches = cfg.num_layers * BATCH * slots * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2 // 8
    return weights + absorbed + caches


@needs_cuda
def test_devices_are_the_cards(devices):
    assert len(devices) == 8 and {d.platform for d in devices} == {"gpu"}
    assert {d.device_kind for d in devices} == {"NVIDIA H100 80GB HBM3"}
    # Per-platform choices follow the target's devices: Hopper resolves "auto" to the Mosaic GPU kernels.
    with jax.set_mesh(make_mesh(MESH, devices=devices)):
        assert dispatch.kernel_backend(Runtime()) == "mosaic_gpu"
        assert dispatch.platform(Runtime()) == "gpu"
        assert dispatch.experts_variant(Runtime(), ModelConfig.from_json("tiny"), 64) == "ragged"


@needs_cuda
@pytest.mark.parametrize("mode", ["train", "decode"])
def test_tiny_fits_and_arguments_match_count(reports, devices, mode):
    r = reports[mode]
    assert json.loads(json.dumps(r))["target"] == TARGET and r["chip"] == "H100 SXM" and r["devices"] == 8
    assert r["fits"] and r["compile_s"] > 0 and r["hbm_bytes"] == int(0.8 * 80 * 2**30)
    b = r["per_device_bytes"]
    assert b["total"] == b["arguments"] + b["temporaries"] + b["outputs"] - b["alias"] <= r["hbm_bytes"]
    assert b["alias"] >= 0.9 * b["outputs"] > 0  # the state is donated
    cfg, mesh = ModelConfig.from_json("tiny"), make_mesh(MESH, devices=devices)
    setup = _setup(cfg, mode=mode, context=CONTEXT)
    count = train_count(cfg, mesh) if mode == "train" else decode_count(cfg, mesh, plan.cache_slots(setup, 0))
    assert b["arguments"] == pytest.approx(count, rel=0.25)


@needs_cuda
def test_flops_from_the_compiled_gpu_module(reports):
    """The CUDA plugin's compile-only executables report no cost analysis; the plan reads the optimised GPU
    module's with XLA's HLO cost analysis: as on TPU, more than the cost model's count (MTP, the masked
    attention half, the experts' dense weight gradients), and an estimate from the H100's published peaks."""
    train, decode = reports["train"], reports["decode"]
    assert train["compiled_flops_per_device"] > train["model_flops_per_device"] > 0
    assert 0 < train["estimated_mfu"] <= 1 and train["estimated_step_s"] >= train["compute_s"] > 0
    assert train["compute_s"] == pytest.approx(train["compiled_flops_per_device"] / 989e12)
    assert decode["compiled_bytes_accessed_per_device"] > 0
    assert decode["estimated_step_s"] == pytest.approx(decode["compiled_bytes_accessed_per_device"] / 3.35e12)


@needs_cuda
def test_decode_compiles_the_mosaic_gpu_kernel(devices):
    """With latent dims the Mosaic GPU MLA decode kernel takes (C a multiple of 128, R of 64), the decode
    step carries it: the kernel goes through the same compile."""
    cfg = ModelConfig.from_json("tiny").replace(kv_lora_rank=128, qk_rope_head_dim=64)
    compiled, _ = plan.compile_decode(_setup(cfg, mode="decode", context=CONTEXT), devices)
    kernels = re.findall(r'custom_call_target="(mosaic_gpu[^"]*)"', compiled.as_text())
    assert len(kernels) == cfg.num_layers
