"""Training throughput on the `small` preset against transformers' PyTorch DeepseekV3, same run.

Measures, on this machine and in one process (so the ratio is fair on a noisy shared machine):
  - a float32 matmul peak (GFLOP/s) of this machine, the limit for MFU;
  - our jitted train step (forward, backward, AdamW, bias update) in tokens/s, both without MTP
    (the same model the peer trains) and with DeepSeek-V3's full objective (MTP depth 1);
  - the peer: transformers' DeepseekV3ForCausalLM, eager PyTorch, loss.backward() + AdamW step;
  - a breakdown of our step into parts (attention, MoE, dense FFN, head + loss, optimizer), each
    timed alone with its achieved GFLOP/s (XLA's own FLOP count) against the peak, to name the part
    furthest from its limit;
  - the GEMMs of the step's own shapes (head, dense FFN, an expert window, attention scores) in XLA
    and in torch on the same device: matmuls are most of both steps, so their ratio bounds ours / peer.
The peer runs where we run: on CUDA when JAX runs on a GPU and torch sees one, else on the CPU.

Usage: python benchmarks/train_throughput.py [--batch 8] [--seq 256] [--repeats 5] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from peer_device import torch_device, torch_sync

from dsv3_jax.config import ModelConfig
from dsv3_jax.costmodel import train_flops_per_token
from dsv3_jax.hf_config import config_to_hf
from dsv3_jax.layers.mla import MLA
from dsv3_jax.layers.mlp import MLP
from dsv3_jax.layers.moe import MoE
from dsv3_jax.ops import dispatch
from dsv3_jax.ops.attention import ATTENTION, KvWeights
from dsv3_jax.ops.experts import window_rows
from dsv3_jax.runtime import Runtime
from dsv3_jax.train.objective import cross_entropy
from dsv3_jax.train.step import OptimConfig, init_state, jit_steps, make_optimizer


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up (and compile)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of a float32 n x n matmul chain, the densest work this machine does."""
    a = jnp.asarray(np.random.RandomState(0).randn(n, n), jnp.float32)
    f = jax.jit(lambda x: (x @ a) @ a)
    t = median_time(lambda: f(a).block_until_ready(), repeats)
    return 2 * 2 * n ** 3 / t / 1e9


def ours(cfg: ModelConfig, batch: int, seq: int, repeats: int) -> float:
    optim = OptimConfig(total_steps=1000)
    state = init_state(cfg, optim, 0)
    train, _ = jit_steps(cfg, optim)
    window = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (batch, seq + 1 + cfg.mtp_depth)),
                         jnp.int32)
    box = [state]

    def step():
        box[0], m = train(box[0], window)
        jax.block_until_ready(m["loss"])

    return batch * seq / median_time(step, repeats)


def peer(cfg: ModelConfig, batch: int, seq: int, repeats: int) -> float | None:
    try:
        import torch
        from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    except ImportError:
        return None
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    device = torch_device()
    hf = {k: v for k, v in config_to_hf(cfg.replace(mtp_depth=0)).items() if k not in ("architectures", "model_type")}
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**hf)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)

    def step():
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        torch_sync(device)

    return batch * seq / median_time(step, repeats)


def gemm_shapes(cfg: ModelConfig, batch: int, seq: int) -> dict[str, tuple[int, ...]]:
    """([batch,] M, K, N) of the step's main matmul kinds, forward; the backward's are their transposes.
    The attention scores: one causal query block against all keys, batched over batch x heads."""
    n, d = batch * seq, cfg.hidden_size
    window = window_rows(n * cfg.num_experts_per_tok, cfg.n_routed_experts)
    return {"head": (n, d, cfg.vocab_size), "dense ffn gate|up": (n, d, 2 * cfg.intermediate_size),
            "expert window gate|up": (window, d, 2 * cfg.moe_intermediate_size),
            "expert window down": (window, cfg.moe_intermediate_size, d),
            "attention scores": (batch * cfg.num_heads, seq // dispatch.QUERY_BLOCKS, cfg.qk_head_dim, seq)}


def gemm_limits(shapes: dict, repeats: int) -> dict:
    """GFLOP/s of each float32 ([batch,] M, K, N) matmul in XLA and in torch on the peer's device, same run."""
    return {name: _gemm_row(shape, repeats) for name, shape in shapes.items()}


def _gemm_row(shape: tuple, repeats: int) -> dict:
    *lead, m, k, n = shape
    flop = 2 * m * k * n * int(np.prod(lead))
    rng = np.random.RandomState(0)
    a, b = rng.randn(*lead, m, k).astype(np.float32), rng.randn(*lead, k, n).astype(np.float32)
    f, ja, jb = jax.jit(jnp.matmul), jnp.asarray(a), jnp.asarray(b)
    row = {"shape": list(shape), "xla_gflops": flop / median_time(lambda: f(ja, jb).block_until_ready(),
                                                                  10 * repeats) / 1e9}
    try:
        import torch
    except ImportError:
        return row
    device = torch_device()
    ta, tb = torch.from_numpy(a).to(device), torch.from_numpy(b).to(device)
    row["torch_gflops"] = flop / median_time(lambda: (ta @ tb, torch_sync(device)), 10 * repeats) / 1e9
    row["xla_over_torch"] = row["xla_gflops"] / row["torch_gflops"]
    return row


def _grad_timer(module: nn.Module, x: jax.Array, variables: dict, loss, repeats: int) -> tuple[float, float]:
    """(seconds, XLA-counted FLOPs) of value_and_grad through one module."""
    f = jax.jit(jax.grad(lambda p, x: loss(module.apply({**variables, "params": p}, x)), argnums=(0, 1)))
    flops = f.lower(variables["params"], x).compile().cost_analysis().get("flops", 0.0)
    t = median_time(lambda: jax.block_until_ready(f(variables["params"], x)), repeats)
    return t, flops


def breakdown(cfg: ModelConfig, batch: int, seq: int, repeats: int) -> dict:
    """Each part of the step alone, forward + backward, on the step's shapes."""
    rng = jax.random.PRNGKey(0)
    x = jax.random.normal(rng, (batch, seq, cfg.hidden_size), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    parts = {"attention (per layer)": _mla_part(cfg, x, pos, repeats),
             "  of which the core": _attention_core_part(cfg, batch, seq, repeats)}
    moe = MoE(cfg)
    parts["moe (per layer)"] = _grad_timer(moe, x, nn.unbox(moe.init(rng, x)), jnp.sum, repeats)
    mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.init_std)
    parts["dense ffn (per layer)"] = _grad_timer(mlp, x, nn.unbox(mlp.init(rng, x)), jnp.sum, repeats)
    parts["head + loss"] = _head_part(cfg, x, repeats)
    parts["optimizer"] = _optimizer_part(cfg, repeats)
    return parts


def _mla_part(cfg, x, pos, repeats):
    mla = MLA(cfg)
    v = nn.unbox(mla.init(jax.random.PRNGKey(0), x, pos))
    # sorted_positions: as in the model's training call (its own arange), causal query blocks on.
    f = jax.jit(jax.grad(lambda p, x: jnp.sum(mla.apply({"params": p}, x, pos, None, True)), argnums=(0, 1)))
    flops = f.lower(v["params"], x).compile().cost_analysis().get("flops", 0.0)
    return median_time(lambda: jax.block_until_ready(f(v["params"], x)), repeats), flops


def _attention_core_part(cfg, batch, seq, repeats):
    """The attention op alone (expansion through wkv_b, scores, causal softmax, value sum) as the
    model's training call dispatches it, without the projections."""
    rng = np.random.RandomState(0)
    h = cfg.num_heads
    shapes = [(batch, seq, h, cfg.qk_nope_head_dim), (batch, seq, h, cfg.qk_rope_head_dim),
              (batch, seq, cfg.kv_cache_dim), (cfg.kv_lora_rank, h, cfg.qk_nope_head_dim + cfg.v_head_dim)]
    args = [jnp.asarray(rng.randn(*s) * 0.1, jnp.float32) for s in shapes]
    pos = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    name, opts = dispatch.attention(Runtime(), cfg, cached=False, q_shape=(batch, seq, h, cfg.kv_cache_dim),
                                    kv_shape=(batch, seq, cfg.kv_cache_dim), kv_dtype=jnp.float32,
                                    sorted_positions=True)
    core = lambda qn, qp, kv, w: jnp.sum(ATTENTION[name](qn, qp, kv, pos, pos, KvWeights(w), opts))
    f = jax.jit(jax.grad(core, argnums=(0, 1, 2, 3)))
    flops = f.lower(*args).compile().cost_analysis().get("flops", 0.0)
    return median_time(lambda: jax.block_until_ready(f(*args)), repeats), flops


def _head_part(cfg, x, repeats):
    head = jnp.asarray(np.random.RandomState(0).randn(cfg.hidden_size, cfg.vocab_size) * 0.02, jnp.float32)
    targets = jnp.zeros(x.shape[:2], jnp.int32)
    x = x.reshape(-1, x.shape[-1])  # the model's head runs on [B*T, D]
    f = jax.jit(jax.grad(lambda h, x: cross_entropy(x @ h, targets), argnums=(0, 1)))
    flops = f.lower(head, x).compile().cost_analysis().get("flops", 0.0)
    return median_time(lambda: jax.block_until_ready(f(head, x)), repeats), flops


def _optimizer_part(cfg, repeats):
    state = init_state(cfg, OptimConfig(), 0)
    opt = make_optimizer(OptimConfig())
    f = jax.jit(lambda g, s, p: optax.apply_updates(p, opt.update(g, s, p)[0]))
    args = (state.params, state.opt_state, state.params)
    flops = f.lower(*args).compile().cost_analysis().get("flops", 0.0)
    return median_time(lambda: jax.block_until_ready(f(*args)), repeats), flops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    cfg = ModelConfig.from_json(a.config)
    peak = matmul_peak()
    plain = cfg.replace(mtp_depth=0)
    experts = dispatch.experts_variant(Runtime(), cfg, a.batch * a.seq)
    out = {"config": a.config, "batch": a.batch, "seq": a.seq, "moe_impl": experts,
           "devices": str(jax.devices()), "matmul_peak_gflops": peak}
    out["ours_tokens_per_s"] = ours(plain, a.batch, a.seq, a.repeats)
    out["ours_with_mtp_tokens_per_s"] = ours(cfg, a.batch, a.seq, a.repeats)
    out["peer_tokens_per_s"] = peer(cfg, a.batch, a.seq, a.repeats)
    flops = train_flops_per_token(plain, a.seq)
    out["model_gflops_per_token"] = flops / 1e9
    out["mfu"] = flops * out["ours_tokens_per_s"] / (peak * 1e9)
    if out["peer_tokens_per_s"]:
        out["peer_device"] = torch_device()
        out["ratio_vs_peer"] = out["ours_tokens_per_s"] / out["peer_tokens_per_s"]
        out["peer_mfu"] = flops * out["peer_tokens_per_s"] / (peak * 1e9)
    out["parts"] = {name: {"ms": t * 1e3, "gflops": f / 1e9, "fraction_of_peak": f / t / 1e9 / peak}
                    for name, (t, f) in breakdown(plain, a.batch, a.seq, a.repeats).items()}
    out["gemm"] = gemm_limits(gemm_shapes(plain, a.batch, a.seq), a.repeats)
    print(json.dumps(out) if a.json else _text(out))


def _text(out: dict) -> str:
    lines = [f"{out['config']} preset, batch {out['batch']} x seq {out['seq']}, MoE path {out['moe_impl']}",
             f"matmul peak (f32, measured now): {out['matmul_peak_gflops']:.1f} GFLOP/s",
             f"ours (no MTP, as the peer):      {out['ours_tokens_per_s']:8.0f} tokens/s   MFU {out['mfu']:.1%}",
             f"ours (V3 objective, MTP 1):      {out['ours_with_mtp_tokens_per_s']:8.0f} tokens/s"]
    if out.get("peer_tokens_per_s"):
        lines += [f"transformers DeepseekV3 (torch): {out['peer_tokens_per_s']:8.0f} tokens/s   "
                  f"MFU {out['peer_mfu']:.1%}  (on {out['peer_device']})",
                  f"ratio ours / peer:               {out['ratio_vs_peer']:.2f}x"]
    lines.append("parts of our step (forward + backward alone; fraction of the matmul peak):")
    for name, r in out["parts"].items():
        lines.append(f"  {name:24s} {r['ms']:8.1f} ms  {r['gflops']:7.2f} GFLOP  {r['fraction_of_peak']:6.1%}")
    lines.append("GEMMs of the step's shapes (float32 GFLOP/s; the peer's matmuls are torch's):")
    for name, r in out["gemm"].items():
        peer_part = ""
        if "torch_gflops" in r:
            peer_part = f"  torch {r['torch_gflops']:6.1f}  xla/torch {r['xla_over_torch']:.2f}"
        lines.append(f"  {name:24s} {'x'.join(map(str, r['shape'])):>18s}  xla {r['xla_gflops']:6.1f}{peer_part}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
