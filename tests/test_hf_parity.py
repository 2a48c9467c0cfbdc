"""Whole-model parity: transformers saves a tiny random model, we load it, logits must agree."""
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from hf_models import YARN, build, logits, rel_err

from dsv3_jax.hf import load_hf_checkpoint
from dsv3_jax.model import Transformer
from dsv3_jax.runtime import Runtime

CASES = {
    "v3_grouped_bias": ("v3", {}),
    "v3_no_q_lora": ("v3", {"q_lora_rank": None}),
    "v3_yarn_long": ("v3", {"rope_parameters": YARN}),
    "v3_ungrouped": ("v3", {"n_group": 1, "topk_group": 1, "first_k_dense_replace": 0}),
    "v2_softmax_greedy": ("v2", {}),
    "v2_group_limited": ("v2", {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
                                "q_lora_rank": 24, "routed_scaling_factor": 16.0}),
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, seed, tmp_path):
    kind, overrides = CASES[case]
    model = build(kind, seed, **overrides)
    model.save_pretrained(tmp_path)
    cfg, variables = load_hf_checkpoint(str(tmp_path))
    # 40 tokens: past the YaRN case's original window of 16 positions.
    tokens = np.random.RandomState(seed).randint(0, cfg.vocab_size, (2, 40)).astype(np.int32)
    ref = logits(model, tokens)
    ours = Transformer(cfg).apply(variables, jnp.asarray(tokens))
    assert ours.dtype == jnp.float32 and ours.shape == ref.shape
    assert rel_err(ours, ref) < 1e-4


def test_loaded_config_reflects_the_file(tmp_path):
    build("v3", 0, rope_parameters=YARN, q_lora_rank=None).save_pretrained(tmp_path)
    cfg, _ = load_hf_checkpoint(str(tmp_path))
    assert cfg.q_lora_rank == 0 and cfg.rope_factor == 8.0 and cfg.yarn_active
    assert cfg.original_max_position_embeddings == 16
    assert cfg.router_bias and cfg.score_func == "sigmoid" and (cfg.n_group, cfg.topk_group) == (4, 2)
    # transformers writes no MTP layer, so none is loaded even though the config names one.
    assert cfg.mtp_depth == 0
    build("v2", 0).save_pretrained(tmp_path / "v2")
    cfg2, variables2 = load_hf_checkpoint(str(tmp_path / "v2"))
    assert cfg2.score_func == "softmax" and not cfg2.router_bias and cfg2.n_shared_experts == 2
    assert "router" not in variables2


def test_absorbed_and_ragged_paths_match_transformers(tmp_path):
    model = build("v3", 2)
    model.save_pretrained(tmp_path)
    cfg, variables = load_hf_checkpoint(str(tmp_path))
    tokens = np.random.RandomState(2).randint(0, cfg.vocab_size, (2, 24)).astype(np.int32)
    ours = Transformer(cfg, Runtime(attention="absorbed", experts="ragged")).apply(variables, tokens)
    assert rel_err(ours, logits(model, tokens)) < 1e-4
