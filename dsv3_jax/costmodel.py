"""Back-of-envelope costs of DeepSeek-V3 and its peers, rebuilt from model shapes.

Rebuilds the figures of "Insights into DeepSeek-V3" (arXiv 2505.09343): KV-cache bytes per token
(Table 1), total/activated parameters and training FLOPs per token (Table 2), and the
expert-parallel decode limit (s.2.3.2). Nothing here is copied from the paper except the `PAPER`
table, which only feeds the comparison column of the report.

Parameters. For DeepSeek-V3, "total_params" is `ModelConfig.main_model_params`, without the MTP
module (~11.6B more): the paper's 671B is the main model. "active_params" also excludes MTP and
counts the embedding and the output head, as the 37B does.

Training FLOPs per token at sequence length s (forward + backward = 3x forward):

    flops = 6 * P_mm  +  6 * L * H * (d_qk + d_v) * s_ctx

  P_mm   matmul weights one token touches: attention projections, dense FFN or router plus
         (top-k + shared) experts, and the output head; no embedding lookup, norms or biases.
  second term: the score (Q K^T, d_qk per head) and value (P V, d_v per head) matmuls, 2 FLOPs a
         multiply-add, over s_ctx keys. MLA trains with its naive form, d_qk = 128 + 64, d_v = 128.
  s_ctx  s / 2 with a causal mask (the mean key count), s without one.

We use the causal variant with the head; it lands within ~1% of the paper for V3, V2 and LLaMA,
while the non-causal one overshoots V3 by ~12% (at seq 4096, GFLOPs; the paper gives no formula):

    model          paper   causal (ours)   causal, no head   non-causal
    DeepSeek-V3     250       250.4            244.9            281.2
    DeepSeek-V2     155       155.3            152.2            185.5
    LLaMA-3.1-405B 2448      2473.2           2460.6           2524.0
    Qwen-2.5-72B    394       444.9            437.4            461.0

Qwen is the outlier (+13%), and no variant we tried reaches 394 from Qwen-2.5-72B's published
shape: 394 GFLOPs would need ~63B matmul weights against the ~71.5B its shape has (80 layers of
0.88B plus a 1.25B head). The paper's Qwen figure likely used another accounting or shape; we
report the gap rather than tune for it. MTP's extra block and head are left out, as the V3 figure
appears to leave them out too (they would add ~4%).

EP decode limit (s.2.3.2). Each device holds one expert and `tokens_per_device` tokens; per MoE
layer it sends each token's hidden vector to every chosen expert (dispatch, FP8: 1 byte) and gets
it back (combine, BF16: 2 bytes):

    comm per layer = (dispatch_bytes + combine_bytes) * tokens * (top-k + shared) * hidden / bw
    TPOT           = 2 * comm per layer * layers

The factor 2: with two micro-batches overlapping compute and communication, each layer costs
two communication slots per step; compute is taken to hide under them.

Node-limited routing (ISCA 2025 s.4; V3 report s.2.1.2 and s.3.2), `--routing`. Expert group g
lives on node g: `n_group` groups = nodes, so expert e sits on node `e // experts_per_group` (V3:
256 experts, 8 nodes of 32). A token lives on its home node. As in DeepEP, the token's hidden vector
crosses InfiniBand ONCE per distinct remote node that holds any of its chosen experts, then fans out
inside that node over NVLink; experts on the home node cost no IB traffic. So per token and MoE
layer, with R = number of distinct remote nodes:

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

Per-axis communication of a training step, `--mesh_comm`: `mesh_axis_comm_bytes` (its docstring
holds the formulas and what they leave out).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import types
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.layers.moe import route
from dsv3_jax.parallel.mesh import MESH_AXES

TRAIN_SEQ_LEN = 4096  # V3's pre-training sequence length (Table 2's setting)
DTYPE_BYTES = types.MappingProxyType({"float32": 4, "bfloat16": 2, "float16": 2})
BF16_BYTES = DTYPE_BYTES["bfloat16"]


@dataclasses.dataclass(frozen=True)
class DenseGQA:
    """A dense decoder with grouped-query attention and a SwiGLU FFN (LLaMA / Qwen shape)."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False

    def kv_cache_bytes_per_token(self, bytes_per_value: int = BF16_BYTES) -> int:
        return self.num_layers * self.num_kv_heads * self.head_dim * 2 * bytes_per_value  # K and V

    @property
    def attention_matmul_params(self) -> int:
        q_out = self.num_heads * self.head_dim
        kv_out = 2 * self.num_kv_heads * self.head_dim
        return self.hidden_size * (q_out + kv_out) + q_out * self.hidden_size

    @property
    def _layer_params(self) -> int:
        d = self.hidden_size
        bias = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim if self.qkv_bias else 0
        return self.attention_matmul_params + bias + 3 * d * self.intermediate_size + 2 * d

    @property
    def total_params(self) -> int:
        embeddings = (1 if self.tie_word_embeddings else 2) * self.vocab_size * self.hidden_size
        return self.num_layers * self._layer_params + embeddings + self.hidden_size  # final norm

    @property
    def active_params(self) -> int:
        return self.total_params


Model = ModelConfig | DenseGQA

# Public shapes of the paper's dense baselines.
QWEN25_72B = DenseGQA("qwen2.5-72b", num_layers=80, hidden_size=8192, num_heads=64,
                      num_kv_heads=8, head_dim=128, intermediate_size=29568,
                      vocab_size=152064, qkv_bias=True)
LLAMA31_405B = DenseGQA("llama3.1-405b", num_layers=126, hidden_size=16384, num_heads=128,
                        num_kv_heads=8, head_dim=128, intermediate_size=53248,
                        vocab_size=128256)


@dataclasses.dataclass(frozen=True)
class ModelCost:
    kv_cache_bytes_per_token: int
    total_params: int
    active_params: int
    train_gflops_per_token: float


@dataclasses.dataclass(frozen=True)
class EPDecode:
    comm_us_per_layer: float
    tpot_ms: float
    tokens_per_s: float


# ---- parameters and FLOPs ----------------------------------------------------------------------
def total_params(model: Model) -> int:
    """Parameters in the model; for a ModelConfig the main model only (no MTP module)."""
    if isinstance(model, ModelConfig):
        return model.main_model_params
    return model.total_params


def active_matmul_params(model: Model) -> int:
    """Matmul weights one token passes through, output head included, embedding excluded."""
    head = model.vocab_size * model.hidden_size
    if isinstance(model, DenseGQA):
        per_layer = model.attention_matmul_params + 3 * model.hidden_size * model.intermediate_size
        return model.num_layers * per_layer + head
    c = model
    attn = c.attention_params - c.q_lora_rank - c.kv_lora_rank  # drop the two latent norms
    dense_ffn = 3 * c.hidden_size * c.intermediate_size
    moe_ffn = c.hidden_size * c.n_routed_experts  # router
    experts = c.num_experts_per_tok + c.n_shared_experts
    moe_ffn += experts * 3 * c.hidden_size * c.moe_intermediate_size
    return c.num_layers * attn + c.first_k_dense * dense_ffn + c.num_moe_layers * moe_ffn + head


def _attention_dims(model: Model) -> tuple[int, int, int]:
    """(heads, per-head query/key dim, per-head value dim) of the attention core."""
    if isinstance(model, DenseGQA):
        return model.num_heads, model.head_dim, model.head_dim
    return model.num_heads, model.qk_head_dim, model.v_head_dim


def attention_train_flops_per_token(model: Model, seq_len: int, causal: bool = True) -> float:
    heads, d_qk, d_v = _attention_dims(model)
    keys = seq_len / 2 if causal else seq_len  # mean keys a query sees
    return 6.0 * model.num_layers * heads * (d_qk + d_v) * keys


def train_flops_per_token(model: Model, seq_len: int = TRAIN_SEQ_LEN, causal: bool = True) -> float:
    """Forward + backward FLOPs per token (see the module docstring for the formula)."""
    attention = attention_train_flops_per_token(model, seq_len, causal)
    return 6.0 * active_matmul_params(model) + attention


def model_cost(model: Model, seq_len: int = TRAIN_SEQ_LEN) -> ModelCost:
    return ModelCost(
        kv_cache_bytes_per_token=model.kv_cache_bytes_per_token(),
        total_params=total_params(model),
        active_params=model.active_params,
        train_gflops_per_token=train_flops_per_token(model, seq_len) / 1e9,
    )


# ---- expert-parallel decode limit (paper s.2.3.2) ---------------------------------------------
# s.2.3.2's decode batch: ~32 tokens per device, one expert per device.
PAPER_TOKENS_PER_DEVICE = 32
# Unidirectional link bandwidth per device, bytes/s: 400 Gb/s InfiniBand, GB200 NVL72 NVLink.
LINKS = types.MappingProxyType({"ib_400g": 50e9, "nvl72": 900e9})
# The paper rounds V3's hidden size 7168 to "~7K" = 7000; the headline reproduction does too.
PAPER_HIDDEN_ROUNDED = 7000


def ep_comm_seconds_per_layer(tokens_per_device: int, experts_per_token: int, hidden_size: int,
                              bandwidth_bytes_per_s: float, dispatch_bytes: int = 1,
                              combine_bytes: int = 2) -> float:
    """All-to-all time of one MoE layer: FP8 dispatch out, BF16 combine back."""
    payload = (dispatch_bytes + combine_bytes) * tokens_per_device * experts_per_token * hidden_size
    return payload / bandwidth_bytes_per_s


def ep_decode_limit(comm_seconds_per_layer: float, num_layers: int,
                    micro_batches: int = 2) -> EPDecode:
    """Decode step time when communication is the bottleneck and micro-batches overlap."""
    tpot = micro_batches * comm_seconds_per_layer * num_layers
    return EPDecode(comm_seconds_per_layer * 1e6, tpot * 1e3, 1.0 / tpot)


def ep_decode_for(cfg: ModelConfig, bandwidth_bytes_per_s: float,
                  tokens_per_device: int = PAPER_TOKENS_PER_DEVICE,
                  hidden_size: int | None = None) -> EPDecode:
    """The paper's setting for a config: every routed and shared expert of a token is reached."""
    comm = ep_comm_seconds_per_layer(
        tokens_per_device, cfg.num_experts_per_tok + cfg.n_shared_experts,
        cfg.hidden_size if hidden_size is None else hidden_size, bandwidth_bytes_per_s)
    # The paper multiplies by all layers (61), though V3's first 3 are dense; we follow it.
    return ep_decode_limit(comm, cfg.num_layers)


# ---- node-limited routing (ISCA 2025 s.4) ------------------------------------------------------
# Random router: logits x @ W have this std (sigmoid scores spread over ~0.1..0.9), and the
# selection-only bias this std (the balancer moves it by ~1e-3 a step, so it drifts to ~1e-2..1e-1).
LOGIT_STD = 1.0
BIAS_STD = 0.05


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


def random_routing(cfg: ModelConfig, tokens: int, seed: int = 0) -> np.ndarray:
    """Expert ids [tokens, K] that the model's `route` picks for random hidden states, router and bias."""
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


# ---- per-axis communication of a training step (estimates) -------------------------------------
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
                         grad_bytes: int = 4, param_bytes: int = 4, act_bytes: int = DTYPE_BYTES["float32"],
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

    act_bytes is the activation dtype's size, a run setting rather than the model's, so the caller
    names it (float32 by default); dispatch/combine default to DeepSeek's FP8/BF16. The
    all-to-all figure is what a ragged (DeepEP-like) exchange moves; the dropless static-shape one
    of `parallel/ep.py` sends buffers sized for the worst case, n_e times that. Left out:
    optimizer-state traffic, loss/logit reductions over tensor, the small replicated weights
    (norms, router) under tensor, pipeline stages, and any overlap with compute."""
    n = mesh_sizes(mesh_shape)
    shards = n["data"] * n["fsdp"] * n["expert"]
    if batch % shards:
        raise ValueError(f"batch {batch} does not split over data*fsdp*expert = {shards} devices")
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


def mesh_comm_report(cfg: ModelConfig, batch: int, seq: int, meshes: Sequence[str],
                     act_dtype: str = "float32") -> dict:
    """The `--mesh_comm` section: one row of per-axis bytes for each mesh given as 'axis=size,...'."""
    if act_dtype not in DTYPE_BYTES:
        raise ValueError(f"act_dtype {act_dtype!r}: must be one of {sorted(DTYPE_BYTES)}")
    rows = []
    for text in meshes:
        shape = _mesh_arg(text)
        comm = mesh_axis_comm_bytes(cfg, batch, seq, shape, act_bytes=DTYPE_BYTES[act_dtype])
        rows.append({"mesh": text, "devices": int(np.prod(list(mesh_sizes(shape).values()))),
                     "bytes_per_device": comm})
    return {"config": cfg.name, "batch": batch, "seq": seq, "act_dtype": act_dtype, "rows": rows}


# ---- the paper's published figures (comparison column only) ------------------------------------
# Parameter counts of the dense models are the nominal sizes in their names.
PAPER = types.MappingProxyType({
    "models": {
        "deepseek-v3": {"kv_cache_bytes_per_token": 70_272, "total_params": 671e9,
                        "active_params": 37e9, "train_gflops_per_token": 250},
        "deepseek-v2": {"kv_cache_bytes_per_token": None, "total_params": 236e9,
                        "active_params": 21e9, "train_gflops_per_token": 155},
        "qwen2.5-72b": {"kv_cache_bytes_per_token": 327_680, "total_params": 72e9,
                        "active_params": 72e9, "train_gflops_per_token": 394},
        "llama3.1-405b": {"kv_cache_bytes_per_token": 516_096, "total_params": 405e9,
                          "active_params": 405e9, "train_gflops_per_token": 2448},
    },
    "ep_tpot": {
        "ib_400g": {"comm_us_per_layer": 120.96, "tpot_ms": 14.76, "tokens_per_s": 67},
        "nvl72": {"comm_us_per_layer": 6.72, "tpot_ms": 0.82, "tokens_per_s": 1200},
    },
})


def paper_models() -> dict[str, Model]:
    return {
        "deepseek-v3": ModelConfig.from_json("deepseek_v3_671b"),
        "deepseek-v2": ModelConfig.from_json("deepseek_v2_236b"),
        "qwen2.5-72b": QWEN25_72B,
        "llama3.1-405b": LLAMA31_405B,
    }


def ep_results(cfg: ModelConfig,
               hidden_size: int | None = PAPER_HIDDEN_ROUNDED) -> dict[str, EPDecode]:
    return {link: ep_decode_for(cfg, bw, hidden_size=hidden_size) for link, bw in LINKS.items()}


def report(seq_len: int = TRAIN_SEQ_LEN) -> dict:
    """The `--json` structure: per-model costs and the EP decode limit of V3."""
    models = paper_models()
    ep = ep_results(models["deepseek-v3"])
    return {
        "models": {name: dataclasses.asdict(model_cost(m, seq_len)) for name, m in models.items()},
        "ep_tpot": {link: {"tpot_ms": r.tpot_ms, "tokens_per_s": r.tokens_per_s}
                    for link, r in ep.items()},
    }


# ---- text report --------------------------------------------------------------------------------
def _gap(ours: float, paper: float | None) -> str:
    if paper is None:
        return "-"
    pct = round(100.0 * (ours - paper) / paper, 1) or 0.0  # no "-0.0%"
    return f"{pct:+.1f}%"


def _table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row: Sequence[str]) -> str:
        cells = (c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        return "  ".join(cells)

    return "\n".join([title, fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def _metric_rows(costs: dict, key: str, scale: float, fmt: str) -> list[list[str]]:
    rows = []
    for name, cost in costs.items():
        ours, paper = cost[key], PAPER["models"][name][key]
        shown = "-" if paper is None else format(paper / scale, fmt)
        rows.append([name, shown, format(ours / scale, fmt), _gap(ours, paper)])
    return rows


def format_report(seq_len: int = TRAIN_SEQ_LEN) -> str:
    costs = report(seq_len)["models"]
    head = ["model", "paper", "ours", "gap"]
    parts = [
        _table("KV cache per token, BF16 (bytes; Table 1)", head,
               _metric_rows(costs, "kv_cache_bytes_per_token", 1, ",.0f")),
        _table("Total parameters (B; V3 without MTP)", head,
               _metric_rows(costs, "total_params", 1e9, ".1f")),
        _table("Activated parameters per token (B)", head,
               _metric_rows(costs, "active_params", 1e9, ".1f")),
        _table(f"Training GFLOPs per token, seq {seq_len}, causal (Table 2)", head,
               _metric_rows(costs, "train_gflops_per_token", 1, ".1f")),
        _ep_table(),
    ]
    return "\n\n".join(parts) + "\n"


_EP_FIELDS = (("comm_us_per_layer", ".2f"), ("tpot_ms", ".2f"), ("tokens_per_s", ".0f"))


def _ep_table() -> str:
    v3 = ModelConfig.from_json("deepseek_v3_671b")
    rounded, exact = ep_results(v3), ep_results(v3, hidden_size=None)
    rows = []
    for link in LINKS:
        paper = PAPER["ep_tpot"][link]
        for field, fmt in _EP_FIELDS:
            ours = getattr(rounded[link], field)
            rows.append([f"{link} {field}", format(paper[field], fmt), format(ours, fmt),
                         _gap(ours, paper[field]), format(getattr(exact[link], field), fmt)])
    title = (f"EP decode limit of DeepSeek-V3 (s.2.3.2; {PAPER_TOKENS_PER_DEVICE} tokens/device, "
             f"{v3.num_experts_per_tok} "
             f"routed + {v3.n_shared_experts} shared experts, {v3.num_layers} layers)")
    header = ["link / figure", "paper", f"ours (d={PAPER_HIDDEN_ROUNDED})", "gap",
              f"ours (d={v3.hidden_size})"]
    return _table(title, header, rows)


_ROUTING_ROWS = (
    ("nodes reached, mean", "mean_nodes_reached", ".2f"), ("nodes reached, max", "max_nodes_reached", "d"),
    ("remote nodes (IB), mean", "mean_remote_nodes", ".2f"), ("remote nodes (IB), max", "max_remote_nodes", "d"),
    ("dispatch B/token (FP8)", "dispatch_bytes_per_token", ",.0f"),
    ("combine B/token (BF16)", "combine_bytes_per_token", ",.0f"))


def format_node_limit(r: dict) -> str:
    """Text of a `compare_node_limit` result."""
    lim, free = r["limited"], r["unlimited"]
    rows = []
    for label, key, fmt in _ROUTING_ROWS:
        red = r["reduction"].get(key)
        rows.append([label, format(lim[key], fmt), format(free[key], fmt),
                     "-" if red is None else f"{red:.2f}x"])
    bound = r["paper_bound_t"]
    title = (f"Node-limited routing, {r['config']}: {r['nodes'] * r['experts_per_node']} experts on {r['nodes']} "
             f"nodes ({r['experts_per_node']} a node), top-{r['top_k']}, at most {r['topk_group']} nodes a token\n"
             f"{r['tokens']} random tokens (seed {r['seed']}), home node = token index mod {r['nodes']}; "
             f"bytes per token and MoE layer at hidden {r['hidden']}")
    table = _table(title, ["per token", f"limit {r['topk_group']} nodes", "no limit", "reduction"], rows)
    paper = ["paper (ISCA 2025 s.4, V3): a token reaches at most 4 nodes; IB traffic 8t -> 4t",
             f"this config: bound {bound['unlimited']}t -> {bound['limited']}t; measured max remote nodes "
             f"{free['max_remote_nodes']}t -> {lim['max_remote_nodes']}t, mean "
             f"{free['mean_remote_nodes']:.2f}t -> {lim['mean_remote_nodes']:.2f}t"]
    return "\n".join([table, *paper]) + "\n"


def format_mesh_comm(section: dict) -> str:
    """Text of a `mesh_comm_report` section: MB one device sends over each axis."""
    header = ["mesh", "devices", *(f"{a} MB" for a in MESH_AXES), "total MB"]
    body = []
    for row in section["rows"]:
        b = row["bytes_per_device"]
        body.append([row["mesh"], str(row["devices"]), *(f"{b[a] / 1e6:.1f}" for a in MESH_AXES),
                     f"{sum(b.values()) / 1e6:.1f}"])
    title = (f"Estimated bytes one device sends per training step, {section['config']}, batch {section['batch']} "
             f"x seq {section['seq']}, {section['act_dtype']} activations (mesh_axis_comm_bytes; MB = 1e6 bytes)")
    return _table(title, header, body) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--seq-len", type=int, default=TRAIN_SEQ_LEN,
                        help="sequence length for the training FLOPs")
    # Each flag below adds a section after the paper's tables (an extra key with --json), so the
    # plain command's output, a contract, stays as it is.
    extra = parser.add_argument_group("traffic sections")
    extra.add_argument("--config", default="deepseek_v3_671b",
                       help="preset name or ModelConfig JSON path, for --mesh_comm and --routing")
    extra.add_argument("--mesh_comm", action="append", metavar="MESH",
                       help="per-axis comm bytes a training step on this mesh, e.g. data=2,expert=4 (repeatable)")
    extra.add_argument("--batch", type=int, default=8, help="sequences a step (--mesh_comm)")
    extra.add_argument("--seq", type=int, default=256, help="tokens a sequence (--mesh_comm)")
    extra.add_argument("--act_dtype", default="float32", choices=sorted(DTYPE_BYTES),
                       help="activation dtype of the tensor-axis all-reduces (--mesh_comm)")
    extra.add_argument("--routing", action="store_true",
                       help="measure node-limited routing: random tokens through route(), limit on and off")
    extra.add_argument("--tokens", type=int, default=4096, help="random tokens to route (--routing)")
    extra.add_argument("--seed", type=int, default=0, help="seed of the random tokens and router (--routing)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    out, texts = report(args.seq_len), [format_report(args.seq_len)]
    cfg = ModelConfig.from_json(args.config) if args.mesh_comm or args.routing else None
    try:  # bad meshes, batches that do not split, configs without routed experts
        if args.mesh_comm:
            out["mesh_comm"] = mesh_comm_report(cfg, args.batch, args.seq, args.mesh_comm, args.act_dtype)
            texts.append(format_mesh_comm(out["mesh_comm"]))
        if args.routing:
            out["routing"] = compare_node_limit(cfg, args.tokens, args.seed)
            texts.append(format_node_limit(out["routing"]))
    except ValueError as e:
        parser.error(str(e))
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print("\n".join(texts), end="")


if __name__ == "__main__":
    main()
