"""Translate between `ModelConfig` and a Hugging Face `config.json` (DeepseekV3 / DeepseekV2).

Reads both the transformers 5 spelling (`rope_parameters`) and the older one (`rope_scaling`,
`rope_theta` at top level, DeepSeek's remote-code keys `scoring_func` / `topk_method`).
"""
from __future__ import annotations

from dsv3_jax.config import ModelConfig

V3, V2 = "deepseek_v3", "deepseek_v2"


def _rope(hf: dict) -> dict:
    """The rope dict, whichever key holds it, with rope_theta folded in."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def _rope_fields(hf: dict) -> dict:
    rope = _rope(hf)
    out = {"rope_theta": float(rope["rope_theta"])}
    if rope["rope_type"] not in ("default", "yarn"):
        raise ValueError(f"config.json: rope type {rope['rope_type']!r} is not supported (default, yarn)")
    if rope["rope_type"] == "yarn":
        max_pos = hf.get("max_position_embeddings", 4096)
        orig = rope.get("original_max_position_embeddings") or max_pos
        # transformers infers the factor from the two lengths when it is absent.
        factor = rope.get("factor") or max_pos / orig
        out.update(
            rope_factor=float(factor),
            original_max_position_embeddings=int(orig),
            beta_fast=float(rope.get("beta_fast") or 32),
            beta_slow=float(rope.get("beta_slow") or 1),
            # Missing keys read as 0, which ModelConfig interprets as transformers does
            # (see ModelConfig.rope_attention_factor and softmax_scale).
            mscale=float(rope.get("mscale") or 0.0),
            mscale_all_dim=float(rope.get("mscale_all_dim") or 0.0),
        )
    return out


def _routing_fields(hf: dict, model_type: str) -> dict:
    n_group = hf.get("n_group") or 1
    topk_group = hf.get("topk_group") or 1
    method = hf.get("topk_method", "noaux_tc" if model_type == V3 else "greedy")
    if method == "greedy":  # no group limit
        n_group, topk_group = 1, 1
    if model_type == V3:
        return dict(score_func=hf.get("scoring_func", "sigmoid"), group_score="top2_sum",
                    router_bias=True, n_group=n_group, topk_group=topk_group,
                    norm_topk_prob=bool(hf.get("norm_topk_prob", True)))
    return dict(score_func=hf.get("scoring_func", "softmax"), group_score="max", router_bias=False,
                n_group=n_group, topk_group=topk_group,
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)))


def config_from_hf(hf: dict) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in (V3, V2):
        raise ValueError(f"config.json: model_type {model_type!r} is not supported ({V3}, {V2})")
    if hf.get("num_key_value_heads", hf["num_attention_heads"]) != hf["num_attention_heads"]:
        raise ValueError("config.json: MLA needs num_key_value_heads == num_attention_heads")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act {hf['hidden_act']!r} is not supported (silu)")
    if hf.get("attention_bias"):
        raise ValueError("config.json: attention_bias = true is not supported")
    if (hf.get("moe_layer_freq") or 1) != 1:
        raise ValueError("config.json: moe_layer_freq != 1 is not supported")
    values = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        moe_intermediate_size=hf["moe_intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        first_k_dense=hf.get("first_k_dense_replace") or 0,
        num_heads=hf["num_attention_heads"],
        q_lora_rank=hf.get("q_lora_rank") or 0,
        kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"],
        qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"],
        n_routed_experts=hf["n_routed_experts"],
        n_shared_experts=hf.get("n_shared_experts") or 0,
        num_experts_per_tok=hf["num_experts_per_tok"],
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        mtp_depth=hf.get("num_nextn_predict_layers", 1 if model_type == V3 else 0) or 0,
        aux_loss_alpha=float(hf.get("aux_loss_alpha", 0.0001)),
        # Not transformers keys: ours, written by config_to_hf so that training settings survive.
        bias_update_speed=float(hf.get("bias_update_speed", 0.001)),
        mtp_loss_weight=float(hf.get("mtp_loss_weight", 0.3)),
        init_std=float(hf.get("initializer_range", 0.006)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        name=hf.get("_name_or_path") or model_type,
    )
    values.update(_routing_fields(hf, model_type))
    values.update(_rope_fields(hf))
    return ModelConfig(**values)


def config_to_hf(cfg: ModelConfig) -> dict:
    """A config.json that transformers and `config_from_hf` read back to the same model."""
    v3 = cfg.router_bias
    if v3 and (cfg.group_score != "top2_sum"):
        raise ValueError("config_to_hf: a biased router must score groups by 'top2_sum' (V3)")
    if not v3 and (cfg.group_score != "max" or cfg.score_func != "softmax"):
        raise ValueError("config_to_hf: without a router bias the model must be V2-shaped "
                         "(softmax scores, 'max' group score)")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_factor > 1.0:
        rope.update(rope_type="yarn", factor=cfg.rope_factor,
                    original_max_position_embeddings=cfg.original_max_position_embeddings,
                    beta_fast=cfg.beta_fast, beta_slow=cfg.beta_slow, mscale=cfg.mscale,
                    mscale_all_dim=cfg.mscale_all_dim)
    grouped = cfg.n_group > 1
    hf = {
        "architectures": ["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
        "model_type": V3 if v3 else V2,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_hidden_layers": cfg.num_layers, "first_k_dense_replace": cfg.first_k_dense,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_heads,
        "q_lora_rank": cfg.q_lora_rank or None, "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "n_routed_experts": cfg.n_routed_experts, "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "n_group": cfg.n_group, "topk_group": cfg.topk_group,
        "scoring_func": cfg.score_func, "norm_topk_prob": cfg.norm_topk_prob,
        "topk_method": "noaux_tc" if v3 else ("group_limited_greedy" if grouped else "greedy"),
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_parameters": rope,
        "num_nextn_predict_layers": cfg.mtp_depth,
        "aux_loss_alpha": cfg.aux_loss_alpha,
        "bias_update_speed": cfg.bias_update_speed,
        "mtp_loss_weight": cfg.mtp_loss_weight,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": False,
    }
    if v3:
        hf["rope_interleave"] = True  # our rope key layout is DeepSeek's adjacent pairs
    return hf
