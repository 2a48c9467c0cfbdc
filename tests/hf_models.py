"""Tiny random transformers DeepseekV3.2/V3/V2 models, the outside reference for parity tests."""
from __future__ import annotations

import numpy as np
import torch

TINY_V3 = dict(
    vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16,
    qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=16, n_shared_experts=1,
    num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
    max_position_embeddings=256,
)
TINY_V2 = dict(
    vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16,
    qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8, n_shared_experts=2,
    num_experts_per_tok=3, routed_scaling_factor=1.0, norm_topk_prob=False, topk_method="greedy",
    max_position_embeddings=256,
)
# V3 plus the DSA indexer; index_topk well below the test sequences, so the selection matters.
TINY_V32 = dict(TINY_V3, index_n_heads=4, index_head_dim=16, index_topk=8)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 16,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}


def build(kind: str, seed: int, **overrides):
    """A random DeepseekV{32,3,2}ForCausalLM (kind "v32", "v3", "v2") in eval mode, with norms (the
    indexer's LayerNorm bias too) and router bias perturbed so that every parameter matters. The
    indexer's projections are drawn N(0, 1/fan_in), so its scores are O(1) and their ranking is not
    decided by rounding."""
    from transformers import (
        DeepseekV2Config,
        DeepseekV2ForCausalLM,
        DeepseekV3Config,
        DeepseekV3ForCausalLM,
        DeepseekV32Config,
        DeepseekV32ForCausalLM,
    )

    torch.manual_seed(seed)
    if kind == "v32":
        model = DeepseekV32ForCausalLM(DeepseekV32Config(**{**TINY_V32, **overrides}))
    elif kind == "v3":
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**{**TINY_V3, **overrides}))
    else:
        model = DeepseekV2ForCausalLM(DeepseekV2Config(**{**TINY_V2, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
            elif ".indexer." in name:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(0.05 * torch.randn_like(b))
    return model.eval()


def logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
