import json
import os

import pytest

from dsv3_jax.config import ModelConfig, list_presets
from dsv3_jax.hf_config import config_from_hf, config_to_hf

PRESETS = ["deepseek_v3_671b", "deepseek_v3_2_671b", "deepseek_v2_236b", "deepseek_v2_lite_16b", "small",
           "small_dsa", "tiny"]


def test_presets_exist_and_load():
    assert set(PRESETS) <= set(list_presets())
    for name in PRESETS:
        assert ModelConfig.from_json(name).name == name


@pytest.mark.parametrize("name", ["deepseek_v3_671b", "deepseek_v3_2_671b", "small", "small_dsa", "tiny"])
def test_v3_family_has_one_mtp_module(name):
    assert ModelConfig.from_json(name).mtp_depth == 1


# The benchmark yardstick's config.json (transformers' DeepseekV3 layout), a copy kept with the tests so
# that they stand alone.
BENCH = os.path.join(os.path.dirname(__file__), "data", "bench_small.json")


def test_small_matches_the_benchmark_yardstick():
    with open(BENCH) as f:
        bench = json.load(f)
    ours = ModelConfig.from_json("small")
    # Only the init and the balancing speed (tuned for short runs) are ours; the shape is the yardstick's.
    assert config_from_hf(bench).replace(init_std=0.02, bias_update_speed=0.01) == ours


def test_v3_derived_figures():
    c = ModelConfig.from_json("deepseek_v3_671b")
    assert c.qk_head_dim == 192 and c.kv_cache_dim == 576
    assert c.kv_cache_bytes_per_token() == 70_272
    assert c.softmax_scale == pytest.approx(0.13523, abs=5e-5)
    assert abs(c.main_model_params / 671e9 - 1) < 0.01
    assert abs(c.active_params / 37e9 - 1) < 0.03


def test_v2_lite_has_no_query_compression():
    c = ModelConfig.from_json("deepseek_v2_lite_16b")
    assert c.q_lora_rank == 0 and c.score_func == "softmax" and not c.router_bias
    assert abs(c.total_params / 15.7e9 - 1) < 0.02


@pytest.mark.parametrize("field,value,rule", [
    ("topk_group", 5, "topk_group = 5: must be <= n_group"),
    ("n_group", 3, "n_group = 3: must divide n_routed_experts"),
    ("num_experts_per_tok", 40, "num_experts_per_tok = 40"),
    ("qk_rope_head_dim", 7, "must be even"),
    ("hidden_size", 0, "hidden_size = 0: must be a positive integer"),
    ("first_k_dense", 9, "first_k_dense = 9: must be <= num_layers"),
    ("score_func", "relu", "score_func = 'relu'"),
    ("rope_factor", 0.5, "rope_factor = 0.5"),
])
def test_invalid_values_name_the_field_and_rule(field, value, rule):
    with pytest.raises(ValueError, match=rule.replace("(", r"\(")):
        ModelConfig.from_json("small").replace(**{field: value})


def test_unknown_field_and_missing_preset():
    with pytest.raises(ValueError, match="unknown field"):
        ModelConfig.from_dict({"hidden_sise": 3})
    with pytest.raises(FileNotFoundError, match="presets"):
        ModelConfig.from_json("no_such_preset")


def test_legacy_runtime_keys_load_and_say_nothing_about_the_model():
    c = ModelConfig.from_json("tiny")
    legacy = {"dtype": "bfloat16", "attention_impl": "absorbed", "moe_impl": "ragged", "fp8": True,
              "ep_fp8_dispatch": True}
    assert ModelConfig.from_dict({**c.to_dict(), **legacy}) == c
    assert not set(legacy) & set(c.to_dict())


def test_name_is_a_label_and_differences_name_the_fields():
    c = ModelConfig.from_json("tiny")
    assert c.replace(name="other") == c and c.differences(c.replace(name="other")) == []
    assert c.differences(c.replace(hidden_size=2 * c.hidden_size, rope_theta=1.0)) == ["hidden_size", "rope_theta"]


@pytest.mark.parametrize("name", PRESETS)
def test_hf_config_round_trip(name):
    c = ModelConfig.from_json(name)
    assert config_from_hf(config_to_hf(c)) == c


def test_from_hf_reads_old_rope_scaling_and_remote_code_keys():
    hf = config_to_hf(ModelConfig.from_json("deepseek_v2_236b"))
    rope = hf.pop("rope_parameters")
    hf["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    hf["rope_scaling"] = rope
    c = config_from_hf(hf)
    assert c.rope_factor == 40 and c.mscale_all_dim == 0.707 and c.topk_group == 3
    assert c.group_score == "max" and c.routed_scaling_factor == 16.0


def test_from_hf_rejects_what_it_cannot_represent():
    hf = config_to_hf(ModelConfig.from_json("tiny"))
    with pytest.raises(ValueError, match="model_type 'llama'"):
        config_from_hf({**hf, "model_type": "llama"})
    with pytest.raises(ValueError, match="topk_group = 9"):
        config_from_hf({**hf, "topk_group": 9})
