"""Loading a Hugging Face checkpoint into shardings on 8 fake CPU devices (conftest's XLA_FLAGS): the
values of the whole load, on the requested shardings, each block read alone from the files, and host
memory bounded well under the model's size."""
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.config import ModelConfig
from dsv3_jax.hf import layout, load_hf_checkpoint, save_hf_checkpoint
from dsv3_jax.model import logical_axes, variable_shapes
from dsv3_jax.ops.linear import Fp8Weight
from dsv3_jax.parallel.mesh import make_mesh, parse_mesh
from dsv3_jax.parallel.rules import param_shardings
from dsv3_jax.safetensors_io import SafetensorsDir, SafetensorsFile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH = "fsdp=4,expert=2"
# hidden 512 split 4 ways is whole 128-blocks (FP8 scales split with it); mlp 384 split 2 ways is not.
CFG = ModelConfig.from_json("tiny").replace(hidden_size=512, intermediate_size=384, moe_intermediate_size=256)


def _random_variables(cfg: ModelConfig) -> dict:
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32) * 0.02, variable_shapes(cfg))


def _shardings(mesh_spec: str):
    mesh = make_mesh(parse_mesh(mesh_spec, 8))
    return lambda cfg: param_shardings(logical_axes(cfg), variable_shapes(cfg), mesh)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    variables, out = _random_variables(CFG), {}
    for weights in ("float32", "fp8"):
        out[weights] = str(tmp_path_factory.mktemp("ckpt") / weights)
        save_hf_checkpoint(CFG, variables, out[weights], weights=weights)
    return out


def _is_fp8(x) -> bool:
    return isinstance(x, Fp8Weight)


@pytest.mark.parametrize("weights,keep_fp8,dtype,mesh", [
    ("float32", False, jnp.float32, MESH), ("fp8", False, jnp.bfloat16, MESH),
    ("fp8", True, jnp.float32, MESH), ("fp8", True, jnp.bfloat16, "fsdp=2,expert=2,tensor=2")])
def test_same_values_on_the_requested_shardings(checkpoints, weights, keep_fp8, dtype, mesh):
    whole_cfg, whole = load_hf_checkpoint(checkpoints[weights], dtype=dtype, keep_fp8=keep_fp8)
    cfg, got = load_hf_checkpoint(checkpoints[weights], dtype=dtype, keep_fp8=keep_fp8, shardings=_shardings(mesh))
    assert cfg == whole_cfg and jax.tree.structure(got) == jax.tree.structure(whole)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(got)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    want = _shardings(mesh)(cfg)
    for leaf, sharding in zip(jax.tree.leaves(got, is_leaf=_is_fp8), jax.tree.leaves(want)):
        assert (leaf.q if _is_fp8(leaf) else leaf).sharding == sharding
    if keep_fp8:  # the scales [E?, out/128, in/128]: split where a side splits into whole blocks
        ffn = got["params"]["layers_1" if mesh == MESH else "layers_0"]["ffn"]
        scale_spec = lambda w: tuple(ffn[w].scale.sharding.spec)
        if mesh == MESH:  # routed w1 [E, 512 / fsdp 4, 256], w2 [E, 256, 512 / fsdp 4]
            assert scale_spec("w1") == ("expert", None, "fsdp") and scale_spec("w2") == ("expert", "fsdp", None)
        else:  # dense w1 [512 / (fsdp 2 x expert 2, ZeRO-3), 384 / tensor 2]: 192 rows are not whole blocks
            assert tuple(ffn["w1"].q.sharding.spec) == (("fsdp", "expert"), "tensor")
            assert scale_spec("w1") == (None, ("fsdp", "expert"))


def _at(tree, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


@pytest.mark.parametrize("weights,keep_fp8", [("float32", False), ("fp8", False), ("fp8", True)])
def test_each_block_is_read_alone(checkpoints, weights, keep_fp8, monkeypatch):
    """Every read returns at most one device's block, and per tensor the reads add up to its bytes
    once: devices holding the same block (here the expert axis replicates the dense weights) share
    one read, so nothing is read once per device."""
    reads: list[tuple[str, int]] = []
    read = SafetensorsFile.read
    monkeypatch.setattr(SafetensorsFile, "read", lambda self, name, *a: reads.append(
        (name, (x := read(self, name, *a)).nbytes)) or x)
    monkeypatch.setattr(SafetensorsFile, "get", lambda *a: pytest.fail("a whole tensor was mapped"))
    cfg, _ = load_hf_checkpoint(checkpoints[weights], keep_fp8=keep_fp8, shardings=_shardings(MESH))
    files, want, shapes = SafetensorsDir(checkpoints[weights]), _shardings(MESH)(cfg), variable_shapes(cfg)
    shared = 0  # tensors of which several devices hold the same block
    for entry in layout(cfg):
        sharding, shape = _at(want, entry.path), _at(shapes, entry.path).shape
        sizes, itemsize = [n for r, n in reads if r == entry.name], files.dtype(entry.name).itemsize
        assert sum(sizes) == math.prod(files.shape(entry.name)) * itemsize, entry.name
        assert max(sizes) <= math.prod(sharding.shard_shape(shape)) * itemsize, entry.name
        blocks = {str(index) for index in sharding.devices_indices_map(shape).values()}
        shared += len(blocks) < len(sharding.device_set)
        scale = entry.name.replace(".weight", ".weight_scale_inv")
        if weights == "fp8" and entry.fp8:
            # every block's scale read; twice or more only where shards split a 128-block (ZeRO-3 spreads
            # weights finer than their logical axes), at most once per distinct shard
            got, once = sum(n for r, n in reads if r == scale), math.prod(files.shape(scale)) * 4
            assert once <= got <= once * len(blocks), scale
    assert shared > 0


# Host memory is measured as the peak resident set of a fresh process during the load (VmHWM, reset
# just before it: ru_maxrss would carry the forking pytest process's peak across exec), less the
# resident set before it and less what the devices hold at the end (the fake devices' buffers are
# host memory). tracemalloc would miss most of it: XLA allocates device buffers itself, except that it
# adopts a numpy buffer that happens to be 64-byte aligned, so what tracemalloc counts depends on
# the allocator. RSS counts everything, mapped checkpoint pages included (which is why
# `SafetensorsFile.read` maps a tensor only while it copies a block out).
_MEASURE = r"""
import json, os, re, sys
import jax
from dsv3_jax.hf import load_hf_checkpoint, read_hf_config
from dsv3_jax.hf_config import config_from_hf
from dsv3_jax.model import logical_axes, variable_shapes
from dsv3_jax.parallel.mesh import make_mesh, parse_mesh
from dsv3_jax.parallel.rules import param_shardings

path, sharded = sys.argv[1], sys.argv[2] == "sharded"
mesh = make_mesh(parse_mesh(sys.argv[3], 8))
shardings = lambda cfg: param_shardings(logical_axes(cfg), variable_shapes(cfg), mesh)
shardings(config_from_hf(read_hf_config(path)))  # traced once before measuring
status = lambda key: int(re.search(key + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) << 10
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak resident set restarts from the current one (Linux >= 4.0)
before = status("VmRSS")
if sharded:
    _, variables = load_hf_checkpoint(path, shardings=shardings)
else:  # the way to the same shardings without them: load whole, then place
    cfg, whole = load_hf_checkpoint(path)
    variables = jax.block_until_ready(jax.device_put(whole, shardings(cfg)))
    del whole
peak = status("VmHWM")
held = sum(s.data.nbytes for x in jax.tree.leaves(variables) for s in x.addressable_shards)
print(json.dumps({"before": before, "peak": peak, "held": held}))
"""


def _extra_host_bytes(path: str, mode: str) -> int:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    out = subprocess.run([sys.executable, "-c", _MEASURE, path, mode, MESH], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    return m["peak"] - m["before"] - m["held"]


def test_host_memory_stays_well_under_the_model(tmp_path):
    # 214 MiB of float32 weights, 90% of them the routed experts of two MoE layers (layer 1 and MTP);
    # the largest leaf (one layer's w1, [16, 512, 1024]) is 32 MiB. The sharded load holds one
    # leaf's blocks at a time (jax places them together), a load of the whole the whole model.
    cfg = CFG.replace(n_routed_experts=16, moe_intermediate_size=1024, intermediate_size=1024)
    variables = _random_variables(cfg)
    model_bytes = sum(x.nbytes for x in jax.tree.leaves(variables))
    save_hf_checkpoint(cfg, variables, str(tmp_path / "ckpt"))
    del variables
    bound = model_bytes // 3 + (32 << 20)
    sharded = _extra_host_bytes(str(tmp_path / "ckpt"), "sharded")
    whole = _extra_host_bytes(str(tmp_path / "ckpt"), "whole")
    print(f"model {model_bytes / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB; host memory beyond the devices' "
          f"parts: sharded load {sharded / 2**20:.0f} MiB, whole load then placed {whole / 2**20:.0f} MiB")
    assert sharded < bound < whole
