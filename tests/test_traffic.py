"""Node-limited routing traffic (ISCA 2025 s.4) and the per-mesh-axis communication estimates
(`dsv3_jax.costmodel`, `--routing` and `--mesh_comm`)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dsv3_jax import costmodel as cm
from dsv3_jax.config import ModelConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AXES = ("data", "fsdp", "expert", "tensor")


@pytest.fixture(scope="module")
def small():
    return ModelConfig.from_json("small")  # 16 experts, 4 groups of 4, topk_group 2, top-4


@pytest.fixture(scope="module")
def v3():
    return ModelConfig.from_json("deepseek_v3_671b")


# ---- counting on hand-made routings -------------------------------------------------------------
def test_counts_hand_made_routing(small):
    experts = np.array([
        [0, 1, 4, 5],      # nodes {0, 1}; home 0 -> reached 2, remote 1
        [0, 4, 8, 12],     # nodes {0, 1, 2, 3}; home 3 -> reached 4, remote 3
        [4, 5, 6, 7],      # node {1}; home 0 -> reached 1, remote 1 (one copy for four experts)
        [8, 9, 10, 11],    # node {2}; home 2 -> reached 1, remote 0
    ])
    r = cm.cross_node_traffic(experts, np.array([0, 3, 0, 2]), small, hidden=10)
    assert r["tokens"] == 4
    assert r["mean_nodes_reached"] == pytest.approx((2 + 4 + 1 + 1) / 4)
    assert r["max_nodes_reached"] == 4
    assert r["mean_remote_nodes"] == pytest.approx((1 + 3 + 1 + 0) / 4)
    assert r["max_remote_nodes"] == 3
    assert r["dispatch_bytes_per_token"] == pytest.approx(5 / 4 * 10 * 1)
    assert r["combine_bytes_per_token"] == pytest.approx(5 / 4 * 10 * 2)


def test_bytes_follow_hidden_and_widths(v3):
    experts = np.array([[0, 32, 64, 96, 128, 160, 192, 224]])  # one expert on each of the 8 nodes
    r = cm.cross_node_traffic(experts, np.array([5]), v3, dispatch_bytes=2, combine_bytes=4)
    assert (r["max_nodes_reached"], r["max_remote_nodes"]) == (8, 7)  # the home node is free
    assert r["dispatch_bytes_per_token"] == 7 * v3.hidden_size * 2
    assert r["combine_bytes_per_token"] == 7 * v3.hidden_size * 4


def test_rejects_bad_inputs(small):
    with pytest.raises(ValueError, match="expert ids"):
        cm.cross_node_traffic(np.array([[0, 16]]), np.array([0]), small)
    with pytest.raises(ValueError, match="home nodes"):
        cm.cross_node_traffic(np.array([[0, 1]]), np.array([4]), small)
    with pytest.raises(ValueError, match="token_node"):
        cm.cross_node_traffic(np.array([[0, 1]]), np.array([0, 1]), small)


# ---- the limit bounds nodes reached ---------------------------------------------------------------
@pytest.mark.parametrize("name", ["small", "deepseek_v3_671b"])
def test_limit_bounds_nodes_and_lifting_raises_mean(name):
    cfg = ModelConfig.from_json(name)
    r = cm.compare_node_limit(cfg, tokens=256, seed=1)
    lim, free = r["limited"], r["unlimited"]
    assert lim["max_nodes_reached"] <= cfg.topk_group
    assert lim["max_remote_nodes"] <= cfg.topk_group
    assert free["max_nodes_reached"] > cfg.topk_group  # random routing does cross the bound unlimited
    assert free["mean_nodes_reached"] > lim["mean_nodes_reached"]
    assert free["mean_remote_nodes"] > lim["mean_remote_nodes"]
    assert r["reduction"]["dispatch_bytes_per_token"] > 1.0
    assert r["paper_bound_t"] == {"limited": min(cfg.num_experts_per_tok, cfg.topk_group),
                                  "unlimited": min(cfg.num_experts_per_tok, cfg.n_group)}


def test_v3_paper_bound(v3):
    r = cm.compare_node_limit(v3, tokens=128)
    assert r["paper_bound_t"] == {"limited": 4, "unlimited": 8}  # the paper's 8t -> 4t
    assert r["nodes"] == 8 and r["experts_per_node"] == 32


# ---- the command ----------------------------------------------------------------------------------
PAPER_KEYS = {"models", "ep_tpot"}  # the plain `--json` contract; each traffic flag adds one key


def _run(*args):
    out = subprocess.run([sys.executable, "-m", "dsv3_jax.costmodel", *args], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120, check=True)
    return out.stdout


def test_command_json_parses():
    out = json.loads(_run("--config", "small", "--routing", "--tokens", "128", "--json"))
    assert set(out) == PAPER_KEYS | {"routing"}
    r = out["routing"]
    assert r["config"] == "small" and r["tokens"] == 128
    assert r["limited"]["max_nodes_reached"] <= 2


def test_mesh_comm_command_json_parses():
    out = json.loads(_run("--config", "small", "--mesh_comm", "data=2,expert=4", "--json"))
    assert set(out) == PAPER_KEYS | {"mesh_comm"}
    (row,) = out["mesh_comm"]["rows"]
    assert row["devices"] == 8 and set(row["bytes_per_device"]) == set(AXES)
    assert row["bytes_per_device"]["fsdp"] == 0 and row["bytes_per_device"]["expert"] > 0


def test_mesh_comm_text_follows_the_paper_tables(capsys):
    cm.main(["--config", "small", "--mesh_comm", "data=8", "--mesh_comm", "expert=8"])
    text = capsys.readouterr().out
    assert text.index("EP decode limit") < text.index("mesh_axis_comm_bytes")
    rows = {line.split()[0]: line.split()[2:] for line in text.splitlines() if line.startswith(("data=", "expert="))}
    # README "Scaling out": data=8 all-reduces 73.7 MB of f32 gradients; expert=8 sends 35.2 MB.
    assert rows["data=8"] == ["73.7", "0.0", "0.0", "0.0", "73.7"]
    assert rows["expert=8"] == ["0.0", "0.0", "35.2", "0.0", "35.2"]
    assert "Node-limited routing" not in text  # --routing not asked for


def test_act_dtype_flag_scales_tensor_traffic(capsys):
    sections = {}
    for dtype in ("float32", "bfloat16"):
        cm.main(["--config", "small", "--mesh_comm", "tensor=2", "--act_dtype", dtype, "--json"])
        sections[dtype] = json.loads(capsys.readouterr().out)["mesh_comm"]
    assert sections["bfloat16"]["act_dtype"] == "bfloat16"
    f32, bf16 = (sections[d]["rows"][0]["bytes_per_device"]["tensor"] for d in ("float32", "bfloat16"))
    assert bf16 == pytest.approx(f32 / 2)


def test_bad_mesh_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        cm.main(["--config", "small", "--mesh_comm", "data:2"])
    assert "axis=size" in capsys.readouterr().err


# ---- per-axis communication estimates -------------------------------------------------------------
def test_single_device_and_size_one_axes_move_nothing(small):
    assert cm.mesh_axis_comm_bytes(small, 8, 256, {}) == dict.fromkeys(AXES, 0.0)
    for axis in AXES:
        b = cm.mesh_axis_comm_bytes(small, 8, 256, {axis: 4})
        assert b[axis] > 0
        assert all(b[other] == 0 for other in AXES if other != axis)


def test_data_and_fsdp_scale_with_parameters(small):
    grads = small.total_params * 4  # float32 gradients
    assert cm.mesh_axis_comm_bytes(small, 8, 256, {"data": 2})["data"] == pytest.approx(grads)
    assert cm.mesh_axis_comm_bytes(small, 8, 256, {"data": 8})["data"] == pytest.approx(2 * 7 / 8 * grads)
    assert cm.mesh_axis_comm_bytes(small, 8, 256, {"fsdp": 4})["fsdp"] == pytest.approx(3 * 3 / 4 * grads)
    # Sharding over fsdp shrinks what each device all-reduces over data.
    both = cm.mesh_axis_comm_bytes(small, 8, 256, {"data": 2, "fsdp": 4})
    assert both["data"] == pytest.approx(grads / 4)
    # Parameter traffic does not depend on the batch.
    assert cm.mesh_axis_comm_bytes(small, 64, 256, {"data": 2})["data"] == pytest.approx(grads)


def test_tensor_and_expert_scale_with_tokens(small):
    t2 = cm.mesh_axis_comm_bytes(small, 8, 256, {"tensor": 2})["tensor"]
    assert t2 == pytest.approx((4 + 1) * 4 * 2 * 0.5 * 8 * 256 * 256 * 4)  # 5 blocks, f32 activations
    assert cm.mesh_axis_comm_bytes(small, 16, 256, {"tensor": 2})["tensor"] == pytest.approx(2 * t2)
    # Splitting the batch over data halves each device's tensor traffic.
    assert cm.mesh_axis_comm_bytes(small, 8, 256, {"tensor": 2, "data": 2})["tensor"] == pytest.approx(t2 / 2)
    e1 = cm.mesh_axis_comm_bytes(small, 8, 256, {"expert": 4})["expert"]
    e2 = cm.mesh_axis_comm_bytes(small, 16, 256, {"expert": 4})["expert"]
    a2a = (3 + 1) * 2 * 0.75 * (8 * 256 / 4) * 4 * 256 * 3  # MoE blocks incl. MTP, K = 4, FP8 + BF16
    assert e2 - e1 == pytest.approx(a2a)  # the all-to-all grows with tokens, the gradient part does not


def test_expert_axis_shards_expert_weights(v3):
    # On V3 routed experts are ~98% of the weights: EP cuts the data-parallel gradient traffic.
    plain = cm.mesh_axis_comm_bytes(v3, 16, 4096, {"data": 2})["data"]
    ep = cm.mesh_axis_comm_bytes(v3, 16, 4096, {"data": 2, "expert": 8})["data"]
    assert ep < plain / 5


def test_mesh_validation(small):
    with pytest.raises(ValueError, match="unknown mesh axes"):
        cm.mesh_axis_comm_bytes(small, 8, 256, {"pipeline": 2})
    with pytest.raises(ValueError, match="positive integer"):
        cm.mesh_axis_comm_bytes(small, 8, 256, {"data": 0})
    with pytest.raises(ValueError, match="does not split"):
        cm.mesh_axis_comm_bytes(small, 8, 256, {"data": 2, "expert": 8})
    with pytest.raises(ValueError, match="axis=size"):
        cm.mesh_comm_report(small, 8, 256, ["data:2"])
