"""DeepSeek-V3.2's lightning indexer against transformers' DeepseekV32 (STYLE.md item 6), and its
config, presets and checkpoint names.

transformers' indexer returns only the top-k indices; the scores it ranks are read from its own
`topk` call (`Capture`, a TorchFunctionMode active only while an indexer runs). Selections are
compared tie-aware: ReLU makes exact ties (keys every head scores <= 0), and near-ties within the
tolerance may rank either way, so where the k-th and (k+1)-th reference scores are that close only
the selected scores are compared, not the indices.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import jax
import jax.numpy as jnp
from hf_models import YARN, build, rel_err
from torch.overrides import TorchFunctionMode
from transformers import DeepseekV32Config, DeepseekV32ForCausalLM
from transformers.models.deepseek_v32 import modeling_deepseek_v32 as hf_v32

from dsv3_jax.config import ModelConfig
from dsv3_jax.hf import layout, load_hf_checkpoint, save_hf_checkpoint
from dsv3_jax.hf_config import config_from_hf, config_to_hf
from dsv3_jax.layers.indexer import INDEX_SCORES, NONE, Indexer, select, selection_mask
from dsv3_jax.model import Transformer, variable_shapes
from dsv3_jax.safetensors_io import SafetensorsDir

SEEDS = [0, 1, 2]
TOL = 1e-4  # as tests/test_parity_components.py: |ours - reference| <= TOL * max(1, max |reference|)
ORIGINAL_MAX_POS = 16
ROPE = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
             "original_max_position_embeddings": ORIGINAL_MAX_POS, "beta_fast": 32, "beta_slow": 1,
             "mscale": 1.0, "mscale_all_dim": 1.0},
    # mscale != mscale_all_dim: YaRN's attention factor (!= 1) scales the indexer's cos and sin too.
    "yarn_attn_factor": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                         "original_max_position_embeddings": ORIGINAL_MAX_POS, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.5},
}
# index_head_dim 16 > qk_rope_head_dim 4: the dims past the rope ones pass unrotated.
SIZES = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16,
         "num_hidden_layers": 2, "first_k_dense_replace": 1, "num_attention_heads": 4,
         "num_key_value_heads": 4, "q_lora_rank": 16, "kv_lora_rank": 12, "qk_nope_head_dim": 8,
         "qk_rope_head_dim": 4, "v_head_dim": 8, "n_routed_experts": 8, "n_shared_experts": 1,
         "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2, "max_position_embeddings": 64,
         "index_n_heads": 4, "index_head_dim": 16, "index_topk": 6}
INDEXER_FILES = ("wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias", "weights_proj.weight")


# ---- helpers -------------------------------------------------------------------------------

class Capture(TorchFunctionMode):
    """Within it, each watched indexer's forward records its inputs (hidden state and q latent,
    inputs[i]), the scores its `topk` ranks (scores[i]) and the indices it returns (indices[i]), i
    its place in `indexers`."""

    def __init__(self, indexers):
        super().__init__()
        self.active, self.inputs, self.scores, self.indices = None, {}, {}, {}
        for i, module in enumerate(indexers):
            module.register_forward_pre_hook(lambda m, args, i=i: self._start(i, args))
            module.register_forward_hook(lambda m, args, out, i=i: self._done(i, out))

    def _start(self, i, args):
        self.active, self.inputs[i] = i, (to_np(args[0]), to_np(args[1]))

    def _done(self, i, out):
        self.indices[i], self.active = out.numpy(), None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.topk and self.active is not None:
            self.scores[self.active] = args[0].detach().numpy().copy()
        return func(*args, **(kwargs or {}))


def to_np(t) -> np.ndarray:
    return t.detach().numpy()


def linear(w) -> np.ndarray:
    """torch Linear weight [out, in] -> ours [in, out]."""
    return to_np(w).T


def indexer_params(module, cfg: ModelConfig) -> dict:
    return {"wq_b": linear(module.wq_b.weight).reshape(cfg.q_lora_rank, cfg.index_n_heads, cfg.index_head_dim),
            "wk": linear(module.wk.weight),
            "k_norm": {"scale": to_np(module.k_norm.weight), "bias": to_np(module.k_norm.bias)},
            "weights_proj": linear(module.weights_proj.weight)}


def assert_scores_close(ours, ref, what: str):
    """Equal -inf patterns (causality), finite scores within TOL."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != reference {ref.shape}"
    hidden = np.isneginf(ref)
    assert (np.isneginf(ours) == hidden).all(), f"{what}: masks differ"
    assert hidden.any() and (~hidden).any()
    bound = TOL * max(1.0, float(np.abs(ref[~hidden]).max()))
    err = float(np.abs(ours[~hidden] - ref[~hidden]).max())
    assert err <= bound, f"{what}: max abs diff {err:.3e} > {bound:.3e}"


def assert_same_selection(ours, ref_idx, ref_scores, topk: int, what: str):
    """ours [B,T,topk] (NONE-padded), transformers' indices [B,T,min(topk,S)] and scores [B,T,S]:
    each query keeps the keys transformers keeps; at a boundary tied within the tolerance, keys
    that transformers scores as high."""
    ours, ref_scores = np.asarray(ours), np.asarray(ref_scores, np.float64)
    assert ours.shape == (*ref_scores.shape[:2], topk) and ours.dtype == np.int32
    tol = TOL * max(1.0, float(np.abs(ref_scores[np.isfinite(ref_scores)]).max()))
    strict, boundaries = 0, 0
    for b, t in np.ndindex(*ref_scores.shape[:2]):
        row = ref_scores[b, t]
        n = min(int(np.isfinite(row).sum()), topk)
        assert (ours[b, t, n:] == NONE).all() and (ours[b, t, :n] >= 0).all(), f"{what}: row {b, t} padding"
        mine, theirs = ours[b, t, :n], ref_idx[b, t, :n]
        np.testing.assert_allclose(np.sort(row[mine]), np.sort(row[theirs]), atol=tol, err_msg=what)
        ranked = np.sort(row[np.isfinite(row)])[::-1]
        if n == len(ranked) or ranked[n - 1] - ranked[n] > tol:  # no boundary, or a clear one
            assert set(mine) == set(theirs), f"{what}: row {b, t} keeps {sorted(mine)}, transformers {sorted(theirs)}"
            strict += 1
            boundaries += n < len(ranked)
    assert strict >= 0.9 * ref_scores.shape[0] * ref_scores.shape[1], f"{what}: only {strict} rows compared exactly"
    assert boundaries > 0, f"{what}: no query had more visible keys than topk"


def dsa_configs(rope_kind: str = "default", **overrides):
    """(transformers DeepseekV32Config, our ModelConfig) for the tiny sizes."""
    hf = DeepseekV32Config(**{**SIZES, "rope_parameters": dict(ROPE[rope_kind]), **overrides})
    return hf, config_from_hf(hf.to_dict())


def sown_scores(cfg: ModelConfig, variables: dict, tokens: np.ndarray):
    """(logits, {INDEX_SCORES: every layer's sown scores}) of our model; jitted, as one program
    compiles faster than the model's ops one by one."""
    return jax.jit(lambda v, t: Transformer(cfg).apply(v, t, mutable=[INDEX_SCORES]))(variables, tokens)


def randomised_indexer(hf, seed: int):
    """transformers' indexer, weights ~ N(0, 1/fan_in), LayerNorm scale 1 + N(0, 0.5), bias N(0, 0.5)."""
    torch.manual_seed(seed)
    module = hf_v32.DeepseekV32Indexer(hf, layer_idx=0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape) / math.sqrt(p.shape[-1]))
            else:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.5 * torch.randn(p.shape))
    return module.eval()


# ---- the indexer alone -----------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("rope_kind", list(ROPE))
def test_indexer_scores_and_selection(rope_kind, seed):
    hf, cfg = dsa_configs(rope_kind)
    assert (cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk) == (4, 16, 6)
    module = randomised_indexer(hf, seed)
    torch.manual_seed(1000 + seed)
    b, t = 2, 24
    x, q_resid = torch.randn(b, t, cfg.hidden_size), torch.randn(b, t, cfg.q_lora_rank)
    # The second row starts past YaRN's original window; positions within a row stay contiguous, so
    # transformers' index-causal mask is the positional one.
    positions = torch.tensor([0, ORIGINAL_MAX_POS + 5 + seed])[:, None] + torch.arange(t)[None]
    cos, sin = hf_v32.DeepseekV32RotaryEmbedding(hf)(x, positions)
    causal = torch.ones(t, t, dtype=torch.bool).tril()[None].expand(b, t, t)
    with Capture([module]) as cap, torch.no_grad():
        module(x, q_resid, (cos, sin), causal, positions)
    ours = Indexer(cfg).apply({"params": indexer_params(module, cfg)}, jnp.asarray(to_np(x)),
                              jnp.asarray(to_np(q_resid)), jnp.asarray(to_np(positions)))
    assert_scores_close(ours, cap.scores[0], "indexer scores")
    assert_same_selection(select(ours, cfg.index_topk), cap.indices[0], cap.scores[0], cfg.index_topk, "top-k")


def test_indexer_rope_is_half_split_not_interleaved():
    """A quarter turn maps each pair (x_i, x_{i+R/2}) to (-x_{i+R/2}, x_i) on the key's first R dims
    and leaves the rest: the half-split layout, not MLA's adjacent pairs."""
    hf, cfg = dsa_configs()
    params = {"params": indexer_params(randomised_indexer(hf, 0), cfg)}
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 5, cfg.hidden_size))
    zeros = jnp.zeros((1, 5, cfg.qk_rope_head_dim // 2))
    keys = lambda cos, sin: np.asarray(Indexer(cfg).apply(params, x, cos, sin, method=lambda m, *a: m.keys(*a)))
    plain, turned = keys(1 + zeros, zeros), keys(zeros, 1 + zeros)
    raw = Indexer(cfg).apply(params, x, method=lambda m, x: m.k_norm(x @ m.wk))
    np.testing.assert_allclose(plain, raw, atol=1e-6)  # no turn: the key as it is, dims in place
    r = cfg.qk_rope_head_dim
    np.testing.assert_allclose(turned[..., : r // 2], -plain[..., r // 2: r], atol=1e-6)
    np.testing.assert_allclose(turned[..., r // 2: r], plain[..., : r // 2], atol=1e-6)
    np.testing.assert_allclose(turned[..., r:], plain[..., r:], atol=1e-6)
    assert np.abs(plain[..., :r]).min() > 0  # the check above is not 0 == 0


# ---- select and the selection mask -----------------------------------------------------------

def test_select_pads_with_none_and_orders_by_score():
    scores = jnp.asarray(np.random.RandomState(0).randn(2, 7, 7), jnp.float32)
    causal = jnp.tril(jnp.ones((7, 7), bool))
    scores = jnp.where(causal, scores, -jnp.inf)
    idx = np.asarray(select(scores, 3))
    assert idx.shape == (2, 7, 3) and idx.dtype == np.int32
    for b, t in np.ndindex(2, 7):
        n = min(t + 1, 3)
        assert (idx[b, t, n:] == NONE).all()
        kept = np.asarray(scores[b, t])[idx[b, t, :n]]
        assert (np.diff(kept) <= 0).all()  # descending
        assert set(idx[b, t, :n]) == set(np.argsort(-np.asarray(scores[b, t]))[:n])
    # Fewer keys than topk: still [B,T,topk], the slots past the keys NONE.
    wide = np.asarray(select(scores, 10))
    assert wide.shape == (2, 7, 10) and (wide[:, :, 7:] == NONE).all()
    assert (wide[:, 6, :7] >= 0).all()


def test_selection_mask_is_the_selected_keys():
    rng = np.random.RandomState(1)
    scores = jnp.where(jnp.tril(jnp.ones((9, 9), bool)), jnp.asarray(rng.randn(3, 9, 9), jnp.float32), -jnp.inf)
    idx = select(scores, 4)
    mask = np.asarray(selection_mask(idx, 9))
    want = np.zeros((3, 9, 9), bool)
    for b, t, j in np.ndindex(*np.shape(idx)):
        if idx[b, t, j] >= 0:
            want[b, t, idx[b, t, j]] = True
    np.testing.assert_array_equal(mask, want)
    assert (mask.sum(-1) == np.minimum(np.arange(9) + 1, 4)[None]).all()
    assert not (mask & ~np.tril(np.ones((9, 9), bool))).any()  # never a key after the query


# ---- the whole model, loaded from transformers' files -----------------------------------------

@pytest.mark.parametrize("rope,seed", [("default", 0), ("yarn", 1)])
def test_loaded_model_indexer_matches_transformers(rope, seed, tmp_path):
    """Every layer's indexer, loaded from transformers' files, on transformers' inputs to it. The
    first layer's also inside our model: the MLA feeds it what transformers' does (the normed hidden
    state and the q latent). tests/test_dsa_model.py compares the whole model, sparse attention included."""
    model = build("v32", seed, **({"rope_parameters": YARN} if rope == "yarn" else {}))
    model.save_pretrained(tmp_path)
    cfg, variables = load_hf_checkpoint(str(tmp_path))
    assert cfg.has_indexer and cfg.index_topk == 8 and cfg.yarn_active == (rope == "yarn")
    # 40 tokens: past YaRN's original window of 16 positions, and 5 times index_topk.
    tokens = np.random.RandomState(seed).randint(0, cfg.vocab_size, (2, 40)).astype(np.int32)
    layers = model.model.layers
    with Capture([layer.self_attn.indexer for layer in layers]) as cap, torch.no_grad():
        model(torch.as_tensor(tokens), use_cache=False)
    assert len(cap.scores) == len(layers) == cfg.num_layers
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    for i in range(cfg.num_layers):
        params = {"params": variables["params"][f"layers_{i}"]["attn"]["indexer"]}
        scores = Indexer(cfg).apply(params, *map(jnp.asarray, cap.inputs[i]), positions)
        assert_scores_close(scores, cap.scores[i], f"layer {i} scores")
        assert_same_selection(select(scores, cfg.index_topk), cap.indices[i], cap.scores[i], cfg.index_topk,
                              f"layer {i} top-k")
    _, state = sown_scores(cfg, variables, tokens)
    (sown,) = state[INDEX_SCORES]["layers_0"]["attn"]["scores"]
    assert_scores_close(sown, cap.scores[0], "layer 0 scores in the model")
    assert_same_selection(select(sown, cfg.index_topk), cap.indices[0], cap.scores[0], cfg.index_topk,
                          "layer 0 top-k in the model")


def test_v32_logits_and_scores_match_transformers_when_the_selection_is_dense(tmp_path):
    """With index_topk >= the sequence every visible key is selected, so transformers' sparse mask
    is the causal one and its attention dense MLA's: the logits agree (the rest of a V3.2 checkpoint
    loads right), and so do the scores our model sows in every layer."""
    model = build("v32", 3, index_topk=64)
    model.save_pretrained(tmp_path)
    cfg, variables = load_hf_checkpoint(str(tmp_path))
    tokens = np.random.RandomState(3).randint(0, cfg.vocab_size, (2, 24)).astype(np.int32)
    layers = model.model.layers
    with Capture([layer.self_attn.indexer for layer in layers]) as cap, torch.no_grad():
        ref = model(torch.as_tensor(tokens), use_cache=False).logits.numpy()
    ours, state = sown_scores(cfg, variables, tokens)
    assert rel_err(ours, ref) < 1e-4
    for i in range(cfg.num_layers):
        (sown,) = state[INDEX_SCORES][f"layers_{i}"]["attn"]["scores"]
        assert_scores_close(sown, cap.scores[i], f"layer {i} scores in the model")


def test_indexer_parameters_only_with_an_indexer():
    """The V3 parameter tree has no indexer; a V3.2 one has one per attention block (MTP's too), all
    counted by `total_params`."""
    v3 = ModelConfig.from_json("tiny")
    dsa = v3.replace(index_n_heads=2, index_head_dim=16, index_topk=4)
    shapes = variable_shapes(dsa)["params"]
    assert "indexer" not in str(jax.tree_util.tree_structure(variable_shapes(v3)))
    for block in ("layers_0", "layers_1"):
        assert shapes[block]["attn"]["indexer"]["wq_b"].shape == (32, 2, 16)
    assert shapes["mtp_0"]["block"]["attn"]["indexer"]["weights_proj"].shape == (64, 2)
    count = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(variable_shapes(dsa)))
    assert count == dsa.total_params and dsa.total_params - v3.total_params == 3 * dsa.indexer_params
    # init computes the scores (to create the parameters) but keeps none of them.
    assert set(variable_shapes(dsa)) == {"params", "router"}


# ---- config.json and presets -------------------------------------------------------------------

def test_config_json_both_ways():
    hf, cfg = dsa_configs("yarn")
    assert cfg.index_n_heads == 4 and cfg.router_bias and cfg.mtp_depth == 1
    out = config_to_hf(cfg)
    assert out["model_type"] == "deepseek_v32" and out["architectures"] == ["DeepseekV32ForCausalLM"]
    assert (out["index_n_heads"], out["index_head_dim"], out["index_topk"]) == (4, 16, 6)
    assert "rope_interleave" not in out  # transformers' V3.2 has no such key
    assert config_from_hf(out) == cfg
    back = DeepseekV32Config(**out)  # transformers reads our file's indexer keys
    assert (back.index_n_heads, back.index_head_dim, back.index_topk) == (4, 16, 6)
    # Keys a deepseek_v32 file leaves out take transformers' defaults.
    sparse = {k: v for k, v in out.items() if not k.startswith("index_")}
    assert (config_from_hf(sparse).index_n_heads, config_from_hf(sparse).index_topk) == (64, 2048)
    # No indexer: written as V3, and a V3 file's stray indexer keys are not read.
    v3 = config_to_hf(cfg.replace(index_n_heads=0, index_head_dim=0, index_topk=0))
    assert v3["model_type"] == "deepseek_v3" and "index_topk" not in v3
    assert not config_from_hf({**v3, "index_n_heads": 4, "index_head_dim": 16, "index_topk": 6}).has_indexer


def test_release_config_json_reads_as_the_preset():
    """DeepSeek-V3.2's config.json as the release spells it (remote-code keys, `rope_scaling` with
    "type", rope_theta at the top level) is the deepseek_v3_2_671b preset."""
    release = {
        "architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32", "vocab_size": 129280,
        "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
        "first_k_dense_replace": 3, "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536,
        "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
        "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.5,
        "moe_layer_freq": 1, "ep_size": 1, "hidden_act": "silu", "rms_norm_eps": 1e-06,
        "max_position_embeddings": 163840, "rope_theta": 10000,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        "num_nextn_predict_layers": 1, "index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048,
        "initializer_range": 0.02, "tie_word_embeddings": False, "attention_bias": False,
    }
    preset = ModelConfig.from_json("deepseek_v3_2_671b")
    assert config_from_hf(release).differences(preset) == ["init_std"]  # the preset keeps the paper's 0.006


@pytest.mark.parametrize("name", ["deepseek_v3_2_671b", "small_dsa"])
def test_dsa_presets(name):
    c = ModelConfig.from_json(name)
    base = ModelConfig.from_json("deepseek_v3_671b" if name == "deepseek_v3_2_671b" else "small")
    # A V3.2 preset is its V3 base plus the indexer, nothing else.
    assert c.differences(base) == ["index_head_dim", "index_n_heads", "index_topk"]
    assert config_from_hf(config_to_hf(c)) == c
    if name == "deepseek_v3_2_671b":  # the release: 64 heads x 128 dims, 2048 keys per query
        assert (c.index_n_heads, c.index_head_dim, c.index_topk) == (64, 128, 2048)
        assert c.indexer_params == 1536 * 64 * 128 + 7168 * 128 + 2 * 128 + 7168 * 64
    else:
        assert c.index_topk < c.max_position_embeddings and c.index_head_dim >= c.qk_rope_head_dim


@pytest.mark.parametrize("change,rule", [
    ({"index_topk": 0}, "index_topk = 0: must be > 0 when the model has an indexer"),
    ({"index_n_heads": 0}, "index_n_heads = 0: must be > 0"),
    ({"index_head_dim": 8}, "index_head_dim = 8: must be >= qk_rope_head_dim"),
    ({"index_n_heads": -1}, "index_n_heads = -1: must be a non-negative integer"),
    ({"index_topk": 64.0}, "index_topk = 64.0: must be an integer, not a float"),
    ({"index_topk": True}, "index_topk = True: must be an integer, not a boolean"),
    ({"q_lora_rank": 0}, "q_lora_rank = 0: must be > 0 when the model has an indexer"),
])
def test_invalid_indexer_fields_name_the_field(change, rule):
    with pytest.raises(ValueError, match=rule):
        ModelConfig.from_json("small_dsa").replace(**change)


def test_v2_shaped_config_with_an_indexer_is_not_written():
    c = ModelConfig.from_json("deepseek_v2_lite_16b")
    with pytest.raises(ValueError, match="indexer"):
        config_to_hf(c.replace(q_lora_rank=64, index_n_heads=4, index_head_dim=64, index_topk=16))


# ---- checkpoints ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dsa():
    """A V3.2 config and random variables of its shapes (every leaf, LayerNorm biases included, drawn
    N(0, 0.1), so that each one's round trip shows)."""
    cfg = ModelConfig.from_json("tiny").replace(index_n_heads=2, index_head_dim=16, index_topk=4)
    rng = np.random.RandomState(0)
    variables = jax.tree_util.tree_map(lambda x: (0.1 * rng.randn(*x.shape)).astype(np.float32),
                                       variable_shapes(cfg))
    return cfg, variables


def test_checkpoint_round_trip_with_indexer(tiny_dsa, tmp_path):
    cfg, variables = tiny_dsa
    save_hf_checkpoint(cfg, variables, str(tmp_path / "ckpt"))
    files = SafetensorsDir(str(tmp_path / "ckpt"))
    for i in range(cfg.num_layers + cfg.mtp_depth):  # the MTP block (layer num_layers) has one too
        for name in INDEXER_FILES:
            assert f"model.layers.{i}.self_attn.indexer.{name}" in files
    assert files.shape("model.layers.0.self_attn.indexer.wq_b.weight") == (2 * 16, 32)  # [H*I, Q]
    cfg2, variables2 = load_hf_checkpoint(str(tmp_path / "ckpt"))
    assert cfg2 == cfg
    leaves, leaves2 = jax.tree_util.tree_leaves_with_path(variables), jax.tree_util.tree_leaves_with_path(variables2)
    assert [p for p, _ in leaves] == [p for p, _ in leaves2]
    for (path, a), (_, b) in zip(leaves, leaves2):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    assert {e.path[-1] for e in layout(cfg) if "indexer" in e.path} >= {"wq_b", "wk", "weights_proj"}


def test_fp8_checkpoint_quantises_the_indexer_projections(tiny_dsa, tmp_path):
    cfg, variables = tiny_dsa
    save_hf_checkpoint(cfg, variables, str(tmp_path / "ckpt"), weights="fp8")
    files = SafetensorsDir(str(tmp_path / "ckpt"))
    prefix = "model.layers.1.self_attn.indexer"
    for name in ("wq_b", "wk"):
        assert files.get(f"{prefix}.{name}.weight").dtype.name == "float8_e4m3fn"
        assert files.shape(f"{prefix}.{name}.weight_scale_inv") == (1, 1)
    assert files.get(f"{prefix}.weights_proj.weight").dtype == np.float32  # kept precise, as DeepSeek's
    assert f"{prefix}.weights_proj.weight_scale_inv" not in files
    _, variables2 = load_hf_checkpoint(str(tmp_path / "ckpt"))
    w = variables["params"]["layers_1"]["attn"]["indexer"]["wq_b"]
    w2 = variables2["params"]["layers_1"]["attn"]["indexer"]["wq_b"]
    assert not np.array_equal(w, w2)
    np.testing.assert_allclose(w2, w, atol=float(jnp.abs(w).max()) / 8)


def test_transformers_reads_our_indexer_weights(tiny_dsa, tmp_path):
    cfg, variables = tiny_dsa
    save_hf_checkpoint(cfg, variables, str(tmp_path / "ckpt"))
    model, info = DeepseekV32ForCausalLM.from_pretrained(str(tmp_path / "ckpt"), output_loading_info=True)
    assert not info["missing_keys"]
    ours = variables["params"]["layers_1"]["attn"]["indexer"]
    theirs = indexer_params(model.model.layers[1].self_attn.indexer, cfg)
    for key in ("wq_b", "wk", "weights_proj"):
        np.testing.assert_array_equal(theirs[key], ours[key], err_msg=key)
    for key in ("scale", "bias"):
        np.testing.assert_array_equal(theirs["k_norm"][key], ours["k_norm"][key], err_msg=key)
