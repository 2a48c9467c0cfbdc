"""Translate between `ModelConfig` and a Hugging Face `config.json` (DeepseekV3.2 / V3 / V2).

Reads both the transformers 5 spelling (`rope_parameters`) and the older one (`rope_scaling`,
`rope_theta` at top level, DeepSeek's remote-code keys `scoring_func` / `topk_method`). A
"deepseek_v32" config is a V3 one plus the DSA indexer (`index_n_heads`, `index_head_dim`,
`index_topk`, transformers' and DeepSeek's names); a config with an indexer is written as one.
"""
from __future__ import annotations

from dsv3_jax.config import ModelConfig, json_type

V32, V3, V2 = "deepseek_v32", "deepseek_v3", "deepseek_v2"
MODEL_TYPES = (V32, V3, V2)
_ARCHITECTURES = {V32: "DeepseekV32ForCausalLM", V3: "DeepseekV3ForCausalLM", V2: "DeepseekV2ForCausalLM"}
# transformers' DeepseekV32Config defaults, which it reads for indexer keys a deepseek_v32 file leaves out.
INDEXER_DEFAULTS = {"index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048}


_REQUIRED = object()
_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "an object"}


def _get(hf: dict, key: str, kind: type, default=_REQUIRED):
    """hf[key], checked strictly to be of `kind` (a bool is no number, 64.0 no integer, "false" no
    boolean); null or absent -> `default`, an error naming the key when there is none."""
    value = hf.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ValueError(f"config.json: {key} is missing")
        return default
    ok = isinstance(value, bool) if kind is bool else (
        not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else kind))
    if not ok:
        raise ValueError(f"config.json: {key} = {value!r}: must be {_KINDS[kind]}, not {json_type(value)}")
    return float(value) if kind is float else value


def _rope_fields(hf: dict) -> dict:
    # The rope dict, whichever key holds it; rope_theta and the type may sit at the top level or in it.
    rope = _get(hf, "rope_parameters" if hf.get("rope_parameters") else "rope_scaling", dict, {})
    out = {"rope_theta": _get(rope, "rope_theta", float, _get(hf, "rope_theta", float, 10000.0))}
    rope_type = _get(rope, "rope_type", str, _get(rope, "type", str, "default"))
    if rope_type not in ("default", "yarn"):
        raise ValueError(f"config.json: rope type {rope_type!r} is not supported (default, yarn)")
    if rope_type == "yarn":
        max_pos = _get(hf, "max_position_embeddings", int, 4096)
        orig = _get(rope, "original_max_position_embeddings", int, 0) or max_pos
        # transformers infers the factor from the two lengths when it is absent.
        factor = _get(rope, "factor", float, 0.0) or max_pos / orig
        out.update(
            rope_factor=float(factor),
            original_max_position_embeddings=orig,
            beta_fast=_get(rope, "beta_fast", float, 0.0) or 32.0,
            beta_slow=_get(rope, "beta_slow", float, 0.0) or 1.0,
            # Missing keys read as 0, which ModelConfig interprets as transformers does
            # (see ModelConfig.rope_attention_factor and softmax_scale).
            mscale=_get(rope, "mscale", float, 0.0),
            mscale_all_dim=_get(rope, "mscale_all_dim", float, 0.0),
        )
    return out


TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


def _routing_fields(hf: dict, model_type: str) -> dict:
    n_group = _get(hf, "n_group", int, 1) or 1
    topk_group = _get(hf, "topk_group", int, 1) or 1
    v3 = model_type in (V3, V32)
    method = _get(hf, "topk_method", str, "noaux_tc" if v3 else "greedy")
    if method not in TOPK_METHODS:
        raise ValueError(f"config.json: topk_method {method!r} is not supported {TOPK_METHODS}")
    if method == "greedy":  # no group limit
        n_group, topk_group = 1, 1
    if v3:
        return dict(score_func=_get(hf, "scoring_func", str, "sigmoid"), group_score="top2_sum",
                    router_bias=True, n_group=n_group, topk_group=topk_group,
                    norm_topk_prob=_get(hf, "norm_topk_prob", bool, True))
    return dict(score_func=_get(hf, "scoring_func", str, "softmax"), group_score="max", router_bias=False,
                n_group=n_group, topk_group=topk_group,
                norm_topk_prob=_get(hf, "norm_topk_prob", bool, False))


def _check_supported(hf: dict) -> str:
    """The model type, once everything we cannot represent is refused."""
    if not isinstance(hf, dict):
        raise ValueError(f"config.json: expected a JSON object, got {json_type(hf)}")
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"config.json: model_type {model_type!r} is not supported ({', '.join(MODEL_TYPES)})")
    heads = _get(hf, "num_attention_heads", int)
    if _get(hf, "num_key_value_heads", int, heads) != heads:
        raise ValueError("config.json: MLA needs num_key_value_heads == num_attention_heads")
    if _get(hf, "hidden_act", str, "silu") != "silu":
        raise ValueError(f"config.json: hidden_act {hf['hidden_act']!r} is not supported (silu)")
    if _get(hf, "attention_bias", bool, False):
        raise ValueError("config.json: attention_bias = true is not supported")
    if (_get(hf, "moe_layer_freq", int, 1) or 1) != 1:
        raise ValueError("config.json: moe_layer_freq != 1 is not supported")
    return model_type


def config_from_hf(hf: dict) -> ModelConfig:
    model_type = _check_supported(hf)
    values = dict(
        vocab_size=_get(hf, "vocab_size", int),
        hidden_size=_get(hf, "hidden_size", int),
        intermediate_size=_get(hf, "intermediate_size", int),
        moe_intermediate_size=_get(hf, "moe_intermediate_size", int),
        num_layers=_get(hf, "num_hidden_layers", int),
        first_k_dense=_get(hf, "first_k_dense_replace", int, 0),
        num_heads=_get(hf, "num_attention_heads", int),
        q_lora_rank=_get(hf, "q_lora_rank", int, 0),
        kv_lora_rank=_get(hf, "kv_lora_rank", int),
        qk_nope_head_dim=_get(hf, "qk_nope_head_dim", int),
        qk_rope_head_dim=_get(hf, "qk_rope_head_dim", int),
        v_head_dim=_get(hf, "v_head_dim", int),
        n_routed_experts=_get(hf, "n_routed_experts", int),
        n_shared_experts=_get(hf, "n_shared_experts", int, 0),
        num_experts_per_tok=_get(hf, "num_experts_per_tok", int),
        routed_scaling_factor=_get(hf, "routed_scaling_factor", float, 1.0),
        rms_norm_eps=_get(hf, "rms_norm_eps", float, 1e-6),
        max_position_embeddings=_get(hf, "max_position_embeddings", int, 4096),
        # Absent: V3 has one MTP module, V2 none; null: none.
        mtp_depth=_get(hf, "num_nextn_predict_layers", int, 0) if "num_nextn_predict_layers" in hf
        else (0 if model_type == V2 else 1),
        aux_loss_alpha=_get(hf, "aux_loss_alpha", float, 0.0001),
        # Not transformers keys: ours, written by config_to_hf so that training settings survive.
        bias_update_speed=_get(hf, "bias_update_speed", float, 0.001),
        mtp_loss_weight=_get(hf, "mtp_loss_weight", float, 0.3),
        init_std=_get(hf, "initializer_range", float, 0.006),
        tie_word_embeddings=_get(hf, "tie_word_embeddings", bool, False),
        name=_get(hf, "_name_or_path", str, "") or model_type,
    )
    values.update(_routing_fields(hf, model_type))
    values.update(_rope_fields(hf))
    if model_type == V32:  # V3 and V2 files have no indexer, whatever keys they carry
        values.update({key: _get(hf, key, int, default) for key, default in INDEXER_DEFAULTS.items()})
    try:
        return ModelConfig(**values)
    except ValueError as e:
        raise ValueError(f"config.json: {e}") from None


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
    if cfg.has_indexer and not v3:
        raise ValueError("config_to_hf: an indexer (DeepSeek-V3.2) needs a V3-shaped router (router_bias)")
    model_type = V32 if cfg.has_indexer else (V3 if v3 else V2)
    grouped = cfg.n_group > 1
    hf = {
        "architectures": [_ARCHITECTURES[model_type]],
        "model_type": model_type,
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
    if model_type == V3:
        hf["rope_interleave"] = True  # our rope key layout is DeepSeek's adjacent pairs
    if model_type == V32:
        # transformers' V3.2 has no rope_interleave key: its MLA always takes the interleaved layout.
        hf.update(index_n_heads=cfg.index_n_heads, index_head_dim=cfg.index_head_dim, index_topk=cfg.index_topk)
    return hf
