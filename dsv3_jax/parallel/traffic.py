"""Cross-node traffic of MoE routing, and estimated per-axis communication of a training step.

Node-limited routing (ISCA 2025 "Insights into DeepSeek-V3" s.4; V3 report s.2.1.2 and s.3.2).
Expert group g lives on node g: `n_group` groups = nodes, so expert e sits on node
`e // experts_per_group` (V3: 256 experts, 8 nodes of 32). A token lives on its home node. As in
DeepEP, the token's hidden vector crosses InfiniBand ONCE per distinct remote node that holds any
of its chosen experts, then fans out inside that node over NVLink; experts on the home node cost no
IB traffic. So per token and MoE layer, with R = number of distinct remote nodes:

    dispatch bytes = R * hidden * dispatch_bytes      (FP8: 1 byte a value)
    combine bytes  = R * hidden * combine_bytes       (BF16: 2 bytes a value)

"Nodes reached" counts every node holding a chosen expert, the home node included; R excludes the
home node. The paper's "each token reaches at most 4 nodes, IB traffic 8t -> 4t" (t = one token to
one node) is a bound on nodes reached: with `topk_group` = 4 a token reaches <= 4 nodes, so R <= 4.
Without the limit a top-8 token can reach all 8 nodes; one of them is then its home, so R <= 7 in
this count, and the paper's 8t is the bound that ignores the home node.

`compare_node_limit` measures this with random router weights and hidden states: expert choices of
a random router are nearly independent, so it shows what the limit bounds, not the traffic of a
trained router (whose choices may correlate and reach fewer nodes).
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.parallel.mesh import MESH_AXES

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Random router: logits x @ W have this std (sigmoid scores spread over ~0.1..0.9), and the
# selection-only bias this std (the balancer moves it by ~1e-3 a step, so it drifts to ~1e-2..1e-1).
LOGIT_STD = 1.0
BIAS_STD = 0.05


# ---- counting ------------------------------------------------------------------------------------
def expert_node(experts, cfg: ModelConfig) -> np.ndarray:
    """Node of each expert id: group g on node g."""
    return np.asarray(experts) // cfg.experts_per_group


def nodes_touched(experts, cfg: ModelConfig) -> np.ndarray:
    """experts [T, K] -> [T, nodes] bool: which nodes hold at least one of the token's experts."""
    experts = np.asarray(experts)
    if experts.ndim != 2:
        raise ValueError(f"experts must be [T, K], got shape {experts.shape}")
    if experts.size and (experts.min() < 0 or experts.max() >= cfg.n_routed_experts):
        raise ValueError(f"expert ids must be in 0..{cfg.n_routed_experts - 1}")
    touched = np.zeros((experts.shape[0], cfg.n_group), bool)
    np.put_along_axis(touched, expert_node(experts, cfg), True, axis=1)
    return touched


def cross_node_traffic(experts, token_node, cfg: ModelConfig, hidden: int | None = None,
                       dispatch_bytes: int = 1, combine_bytes: int = 2) -> dict:
    """Per-token node counts and IB bytes (per MoE layer) of a routing.

    experts [T, K] chosen expert ids; token_node [T] each token's home node. Bytes count one copy
    of the hidden vector per distinct remote node (see the module docstring)."""
    touched = nodes_touched(experts, cfg)
    if touched.shape[0] == 0:
        raise ValueError("no tokens to count")
    home = np.asarray(token_node)
    if home.shape != (touched.shape[0],):
        raise ValueError(f"token_node must be [T] = [{touched.shape[0]}], got shape {home.shape}")
    if home.size and (home.min() < 0 or home.max() >= cfg.n_group):
        raise ValueError(f"home nodes must be in 0..{cfg.n_group - 1}")
    hidden = cfg.hidden_size if hidden is None else hidden
    reached = touched.sum(-1)
    remote = reached - touched[np.arange(len(home)), home]
    return {
        "tokens": int(len(home)),
        "mean_nodes_reached": float(reached.mean()),
        "max_nodes_reached": int(reached.max()),
        "mean_remote_nodes": float(remote.mean()),
        "max_remote_nodes": int(remote.max()),
        "dispatch_bytes_per_token": float(remote.mean() * hidden * dispatch_bytes),
        "combine_bytes_per_token": float(remote.mean() * hidden * combine_bytes),
    }


# ---- measuring the limit -------------------------------------------------------------------------
def random_routing(cfg: ModelConfig, tokens: int, seed: int = 0) -> np.ndarray:
    """Expert ids [tokens, K] that `route` picks for random hidden states, router and bias."""
    from dsv3_jax.layers.moe import route  # an analysis tool calling the layer, not a primitive

    kx, kw, kb = jax.random.split(jax.random.PRNGKey(seed), 3)
    d, e = cfg.hidden_size, cfg.n_routed_experts
    x = jax.random.normal(kx, (tokens, d), jnp.float32)
    router = jax.random.normal(kw, (d, e), jnp.float32) * (LOGIT_STD / np.sqrt(d))
    bias = jax.random.normal(kb, (e,), jnp.float32) * BIAS_STD
    return np.asarray(jax.jit(route, static_argnums=3)(x, router, bias, cfg).experts)


def paper_bound_t(cfg: ModelConfig, limited: bool) -> int:
    """The paper's bound on IB traffic per token, in t: the number of nodes a token can reach."""
    return min(cfg.num_experts_per_tok, cfg.topk_group if limited else cfg.n_group)


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def compare_node_limit(cfg: ModelConfig, tokens: int = 4096, seed: int = 0) -> dict:
    """Route the same random tokens with the config's `topk_group` and with the limit lifted."""
    if cfg.n_routed_experts == 0:
        raise ValueError(f"config {cfg.name!r} has no routed experts")
    home = np.arange(tokens) % cfg.n_group  # tokens spread evenly over the nodes
    limited = cross_node_traffic(random_routing(cfg, tokens, seed), home, cfg)
    free_cfg = cfg.replace(topk_group=cfg.n_group)
    unlimited = cross_node_traffic(random_routing(free_cfg, tokens, seed), home, free_cfg)
    return {
        "config": cfg.name, "tokens": tokens, "seed": seed, "nodes": cfg.n_group,
        "experts_per_node": cfg.experts_per_group, "top_k": cfg.num_experts_per_tok,
        "topk_group": cfg.topk_group, "hidden": cfg.hidden_size,
        "limited": limited, "unlimited": unlimited,
        "reduction": {k: _ratio(unlimited[k], limited[k]) for k in
                      ("mean_nodes_reached", "mean_remote_nodes", "dispatch_bytes_per_token",
                       "combine_bytes_per_token")},
        "paper_bound_t": {"limited": paper_bound_t(cfg, True), "unlimited": paper_bound_t(cfg, False)},
    }


# ---- per-axis communication of a training step (estimates) --------------------------------------
def _ring(n: int) -> float:
    return (n - 1) / n


def routed_expert_params(cfg: ModelConfig) -> int:
    """Routed-expert weights of the main model and the MTP blocks (the part sharded over `expert`)."""
    if cfg.n_routed_experts == 0:
        return 0
    blocks = cfg.num_moe_layers + cfg.mtp_depth
    return blocks * cfg.n_routed_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size


def mesh_sizes(mesh_shape: Mapping[str, int]) -> dict[str, int]:
    """All four axes, missing ones as 1; rejects unknown names and non-positive sizes."""
    unknown = sorted(set(mesh_shape) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"unknown mesh axes {unknown}; the axes are {list(MESH_AXES)}")
    sizes = {a: mesh_shape.get(a, 1) for a in MESH_AXES}
    for axis, n in sizes.items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"mesh axis {axis} = {n!r}: must be a positive integer")
    return sizes


def mesh_axis_comm_bytes(cfg: ModelConfig, batch: int, seq: int, mesh_shape: Mapping[str, int], *,
                         grad_bytes: int = 4, param_bytes: int = 4, act_bytes: int | None = None,
                         dispatch_bytes: int = 1, combine_bytes: int = 2) -> dict[str, float]:
    """Estimated bytes ONE device sends over each mesh axis in one training step (forward and
    backward of `batch` x `seq` tokens, no gradient accumulation). Back-of-envelope, not measured.

    Assumed layout: the batch is split over data, fsdp and expert (T_dev = batch*seq/(n_d n_f n_e)
    tokens a device); routed experts are split over expert, every weight over fsdp and tensor.
    P = cfg.total_params (main model + MTP), P_exp = routed expert weights, P_rest = P - P_exp.
    A ring collective over n devices sends (n-1)/n of its buffer a device (r(n) below); an
    all-reduce is a reduce-scatter plus an all-gather, 2 r(n).

      data    gradient all-reduce of the device's shard (after fsdp's reduce-scatter):
              2 r(n_d) * grad_bytes * (P_rest + P_exp/n_e) / (n_f n_t)
      fsdp    all-gather of the weights in the forward and again in the backward, reduce-scatter of
              the gradients (ZeRO-3): 3 r(n_f) * param_bytes * (P_rest + P_exp/n_e) / n_t
      tensor  Megatron-style: 2 activation all-reduces a block forward (after attention and after
              the FFN) and 2 backward, over L + mtp_depth blocks:
              (L + D_mtp) * 4 * 2 r(n_t) * T_dev * hidden * act_bytes
      expert  dispatch + combine all-to-all a MoE layer, forward and the same again backward
              (the gradients go the opposite way); under uniform routing r(n_e) of the T_dev * K
              assignments leave the device; tensor ranks split the hidden vector:
              (L_moe + D_mtp) * 2 * r(n_e) * T_dev * K * hidden/n_t * (dispatch + combine bytes)
              plus the all-reduce of the non-expert gradients, which the expert axis holds
              replicated while it splits the batch: 2 r(n_e) * grad_bytes * P_rest / (n_f n_t)

    act_bytes defaults to cfg.dtype's size; dispatch/combine default to DeepSeek's FP8/BF16. The
    all-to-all figure is what a ragged (DeepEP-like) exchange moves; the dropless static-shape one
    of `parallel/ep.py` sends buffers sized for the worst case, n_e times that. Left out:
    optimizer-state traffic, loss/logit reductions over tensor, the small replicated weights
    (norms, router) under tensor, pipeline stages, and any overlap with compute."""
    n = mesh_sizes(mesh_shape)
    shards = n["data"] * n["fsdp"] * n["expert"]
    if batch % shards:
        raise ValueError(f"batch {batch} does not split over data*fsdp*expert = {shards} devices")
    act_bytes = DTYPE_BYTES[cfg.dtype] if act_bytes is None else act_bytes
    p_exp = routed_expert_params(cfg)
    p_rest = cfg.total_params - p_exp
    p_local = (p_rest + p_exp / n["expert"]) / n["tensor"]  # what one fsdp group gathers, a device
    tokens = batch * seq / shards
    blocks = cfg.num_layers + cfg.mtp_depth
    moe_blocks = cfg.num_moe_layers + cfg.mtp_depth if cfg.n_routed_experts else 0
    a2a = (moe_blocks * 2 * _ring(n["expert"]) * tokens * cfg.num_experts_per_tok
           * cfg.hidden_size / n["tensor"] * (dispatch_bytes + combine_bytes))
    return {
        "data": 2 * _ring(n["data"]) * grad_bytes * p_local / n["fsdp"],
        "fsdp": 3 * _ring(n["fsdp"]) * param_bytes * p_local,
        "expert": a2a + 2 * _ring(n["expert"]) * grad_bytes * p_rest / (n["fsdp"] * n["tensor"]),
        "tensor": blocks * 4 * 2 * _ring(n["tensor"]) * tokens * cfg.hidden_size * act_bytes,
    }


def _mesh_arg(text: str) -> dict[str, int]:
    """'data=2,expert=4' -> {'data': 2, 'expert': 4}: any device count (mesh.parse_mesh checks it
    against the devices present; an estimate needs no devices)."""
    shape = {}
    for part in filter(None, text.split(",")):
        name, sep, size = part.partition("=")
        if not sep or not size.strip().isdigit():
            raise ValueError(f"mesh {text!r}: expected axis=size pairs such as data=2,expert=4")
        if name.strip() in shape:
            raise ValueError(f"mesh {text!r}: axis {name.strip()} given twice")
        shape[name.strip()] = int(size)
    mesh_sizes(shape)
    return shape


def mesh_comm_report(cfg: ModelConfig, batch: int, seq: int, meshes: Sequence[str]) -> list[dict]:
    rows = []
    for text in meshes:
        shape = _mesh_arg(text)
        rows.append({"mesh": text, "devices": int(np.prod(list(mesh_sizes(shape).values()))),
                     "bytes_per_device": mesh_axis_comm_bytes(cfg, batch, seq, shape)})
    return rows


# ---- text report ---------------------------------------------------------------------------------
def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return [fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)]


_ROWS = (("nodes reached, mean", "mean_nodes_reached", ".2f"), ("nodes reached, max", "max_nodes_reached", "d"),
         ("remote nodes (IB), mean", "mean_remote_nodes", ".2f"),
         ("remote nodes (IB), max", "max_remote_nodes", "d"),
         ("dispatch B/token (FP8)", "dispatch_bytes_per_token", ",.0f"),
         ("combine B/token (BF16)", "combine_bytes_per_token", ",.0f"))


def format_node_limit(r: dict) -> str:
    lim, free = r["limited"], r["unlimited"]
    rows = []
    for label, key, fmt in _ROWS:
        red = r["reduction"].get(key)
        rows.append([label, format(lim[key], fmt), format(free[key], fmt),
                     "-" if red is None else f"{red:.2f}x"])
    bound = r["paper_bound_t"]
    head = [f"Node-limited routing, {r['config']}: {r['nodes'] * r['experts_per_node']} experts on {r['nodes']} "
            f"nodes ({r['experts_per_node']} a node), top-{r['top_k']}, at most {r['topk_group']} nodes a token",
            f"{r['tokens']} random tokens (seed {r['seed']}), home node = token index mod {r['nodes']}; "
            f"bytes per token and MoE layer at hidden {r['hidden']}"]
    table = _table(["per token", f"limit {r['topk_group']} nodes", "no limit", "reduction"], rows)
    paper = ["paper (ISCA 2025 s.4, V3): a token reaches at most 4 nodes; IB traffic 8t -> 4t",
             f"this config: bound {bound['unlimited']}t -> {bound['limited']}t; measured max remote nodes "
             f"{free['max_remote_nodes']}t -> {lim['max_remote_nodes']}t, mean "
             f"{free['mean_remote_nodes']:.2f}t -> {lim['mean_remote_nodes']:.2f}t"]
    return "\n".join([*head, *table, *paper]) + "\n"


def format_mesh_comm(cfg: ModelConfig, batch: int, seq: int, rows: Sequence[dict]) -> str:
    header = ["mesh", "devices", *(f"{a} MB" for a in MESH_AXES), "total MB"]
    body = []
    for row in rows:
        b = row["bytes_per_device"]
        body.append([row["mesh"], str(row["devices"]), *(f"{b[a] / 1e6:.1f}" for a in MESH_AXES),
                     f"{sum(b.values()) / 1e6:.1f}"])
    head = (f"Estimated bytes one device sends per training step, {cfg.name}, batch {batch} x seq {seq} "
            f"(mesh_axis_comm_bytes; MB = 1e6 bytes)")
    return "\n".join([head, *_table(header, body)]) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="deepseek_v3_671b", help="preset name or ModelConfig JSON path")
    parser.add_argument("--tokens", type=int, default=4096, help="random tokens to route")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--mesh_comm", action="append", metavar="MESH",
                        help="instead: per-axis comm bytes a step on this mesh, e.g. data=2,expert=4 "
                             "(repeatable)")
    parser.add_argument("--batch", type=int, default=8, help="sequences a step (with --mesh_comm)")
    parser.add_argument("--seq", type=int, default=256, help="tokens a sequence (with --mesh_comm)")
    args = parser.parse_args(argv)
    cfg = ModelConfig.from_json(args.config)
    if args.mesh_comm:
        try:
            rows = mesh_comm_report(cfg, args.batch, args.seq, args.mesh_comm)
        except ValueError as e:
            parser.error(str(e))
        out = {"config": cfg.name, "batch": args.batch, "seq": args.seq, "mesh_comm": rows}
        text = format_mesh_comm(cfg, args.batch, args.seq, rows)
    else:
        out = compare_node_limit(cfg, args.tokens, args.seed)
        text = format_node_limit(out)
    print(json.dumps(out, indent=2) if args.json else text.rstrip("\n"))


if __name__ == "__main__":
    main()
