"""Component parity with transformers' PyTorch DeepseekV3 / DeepseekV2 (STYLE.md items 5, 6).

Each test builds a tiny transformers config, reads our `ModelConfig` from its `to_dict()`, fills the
PyTorch module with random weights (norm scales and the router bias included, so they matter),
copies them into our parameter tree and compares outputs in float32.

Weight layouts: a torch Linear weight is [out, in]; ours are [in, ...] with heads split out
(wq_b [Q, H, N+R], wkv_b [C, H, N+V], wo [H, V, D]). transformers fuses the routed experts as
gate_up_proj [E, 2F, D] (gate rows first) and down_proj [E, D, F].
"""
from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import flax.linen as nn
import jax
import jax.numpy as jnp
from transformers import DeepseekV2Config, DeepseekV3Config
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as hf_v2
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_v3

from dsv3_jax.config import ModelConfig
from dsv3_jax.hf_config import config_from_hf
from dsv3_jax.layers import rope
from dsv3_jax.layers.mla import MLA
from dsv3_jax.layers.moe import MoE, route
from dsv3_jax.layers.norm import rms_norm
from dsv3_jax.model import Block
from dsv3_jax.ops.experts import EXPERTS
from dsv3_jax.runtime import Runtime

SEEDS = [0, 1, 2]
TOL = 1e-4  # max |ours - reference| <= TOL * max(1, max |reference|)

SIZES = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16,
         "num_hidden_layers": 2, "first_k_dense_replace": 1, "num_attention_heads": 4,
         "num_key_value_heads": 4, "q_lora_rank": 16, "kv_lora_rank": 12, "qk_nope_head_dim": 8,
         "qk_rope_head_dim": 4, "v_head_dim": 8, "n_routed_experts": 8, "n_shared_experts": 1,
         "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2, "max_position_embeddings": 64}
ORIGINAL_MAX_POS = 16  # YaRN's pretraining window in the tiny configs; tests go past it

# rope_parameters variants. None drops the key, so transformers' defaults for missing keys are hit.
ROPE = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    # DeepSeek-V3's shape: mscale == mscale_all_dim, so cos/sin are unscaled, the softmax scale is not.
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
             "original_max_position_embeddings": ORIGINAL_MAX_POS, "beta_fast": 32, "beta_slow": 1,
             "mscale": 1.0, "mscale_all_dim": 1.0},
    # mscale != mscale_all_dim: a YaRN attention factor != 1 multiplies cos and sin.
    "yarn_attn_factor": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                         "original_max_position_embeddings": ORIGINAL_MAX_POS, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.5},
    # DeepSeek-V2-Lite's shape (mscale 0.707 on both).
    "yarn_v2_lite": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                     "original_max_position_embeddings": ORIGINAL_MAX_POS, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    # No mscale keys: attention factor 0.1 ln(s) + 1, no softmax correction.
    "yarn_no_mscale": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                       "original_max_position_embeddings": ORIGINAL_MAX_POS},
    # Lower betas: the ramp between kept and interpolated frequencies spans several rope dims.
    "yarn_wide_ramp": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                       "original_max_position_embeddings": ORIGINAL_MAX_POS, "beta_fast": 1.0,
                       "beta_slow": 0.01, "mscale": 1.0, "mscale_all_dim": 1.0},
}


# ---- helpers -------------------------------------------------------------------------------

def configs(version: str = "v3", rope_kind: str = "default", **overrides):
    """(transformers config, our ModelConfig) for the tiny sizes plus `overrides`."""
    values = {**SIZES, "rope_parameters": dict(ROPE[rope_kind]), **overrides}
    hf = (DeepseekV3Config if version == "v3" else DeepseekV2Config)(**values)
    hf._attn_implementation = "eager"
    hf._experts_implementation = "eager"
    return hf, config_from_hf(hf.to_dict())


def to_np(t) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def assert_close(ours, ref, tol: float = TOL, what: str = ""):
    ours, ref = np.asarray(ours, np.float64), to_np(ref).astype(np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != reference {ref.shape}"
    err = float(np.max(np.abs(ours - ref)))
    bound = tol * max(1.0, float(np.max(np.abs(ref))))
    assert err <= bound, f"{what}: max abs diff {err:.3e} > {bound:.3e}"


def randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights ~ N(0, 1/fan_in) so activations stay O(1); 1-D weights (norm scales) ~ 1 + N(0, 0.5);
    V3's e_score_correction_bias ~ N(0, 0.1), the size of the gaps between sigmoid scores."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.5 * torch.randn(p.shape))
            else:
                p.copy_(torch.randn(p.shape) / math.sqrt(p.shape[-1]))
        for name, b in module.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape))
    return module.eval()


def linear(w) -> np.ndarray:
    """torch Linear weight [out, in] -> ours [in, out]."""
    return to_np(w).T


def mla_params(attn, cfg: ModelConfig) -> dict:
    d, h = cfg.hidden_size, cfg.num_heads
    p = {}
    if attn.q_lora_rank is None:
        p["wq"] = linear(attn.q_proj.weight).reshape(d, h, cfg.qk_head_dim)
    else:
        p["wq_a"] = linear(attn.q_a_proj.weight)
        p["q_norm"] = {"scale": to_np(attn.q_a_layernorm.weight)}
        p["wq_b"] = linear(attn.q_b_proj.weight).reshape(cfg.q_lora_rank, h, cfg.qk_head_dim)
    p["wkv_a"] = linear(attn.kv_a_proj_with_mqa.weight)
    p["kv_norm"] = {"scale": to_np(attn.kv_a_layernorm.weight)}
    p["wkv_b"] = linear(attn.kv_b_proj.weight).reshape(
        cfg.kv_lora_rank, h, cfg.qk_nope_head_dim + cfg.v_head_dim)
    p["wo"] = linear(attn.o_proj.weight).reshape(h, cfg.v_head_dim, d)
    return p


def mlp_params(mlp) -> dict:
    return {"w1": linear(mlp.gate_proj.weight), "w3": linear(mlp.up_proj.weight),
            "w2": linear(mlp.down_proj.weight)}


def moe_variables(moe, cfg: ModelConfig) -> tuple[dict, dict]:
    """(params, router collection) of our MoE from a transformers DeepseekV3MoE / DeepseekV2Moe."""
    f = cfg.moe_intermediate_size
    gate_up = to_np(moe.experts.gate_up_proj)  # [E, 2F, D], gate rows first
    params = {
        "router": linear(moe.gate.weight),
        "w1": gate_up[:, :f].transpose(0, 2, 1),
        "w3": gate_up[:, f:].transpose(0, 2, 1),
        "w2": to_np(moe.experts.down_proj).transpose(0, 2, 1),
        "shared": mlp_params(moe.shared_experts),
    }
    bias = getattr(moe.gate, "e_score_correction_bias", None)
    return params, ({} if bias is None else {"bias": to_np(bias)})


def check_tree(module, variables: dict, *args):
    """The tree we built has exactly the names and shapes our module would initialise."""
    want = nn.unbox(jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args)))
    want = jax.tree_util.tree_map(lambda a: tuple(a.shape), want)
    got = jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), variables)
    assert got == want


def causal_additive_mask(t: int) -> torch.Tensor:
    return torch.full((t, t), float("-inf")).triu(1)[None, None]


def inputs(seed: int, batch: int = 2, t: int = 6, d: int = SIZES["hidden_size"]):
    """Hidden states x [B, T, D] and positions [B, T]; the second row starts past YaRN's window."""
    torch.manual_seed(1000 + seed)
    x = torch.randn(batch, t, d)
    starts = torch.tensor([0, ORIGINAL_MAX_POS + 3 + seed])[:batch]
    positions = starts[:, None] + torch.arange(t)[None]
    return x, positions


def rotary(hf, version: str):
    return (hf_v3.DeepseekV3RotaryEmbedding if version == "v3" else hf_v2.DeepseekV2RotaryEmbedding)(hf)


# ---- 1. RMSNorm ----------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("eps", [1e-6, 1e-3])
@pytest.mark.parametrize("x_scale", [1.0, 0.03])  # 0.03: mean(x^2) ~ eps, so eps placement shows
def test_rms_norm(seed, eps, x_scale):
    d = 32
    norm = randomise(hf_v3.DeepseekV3RMSNorm(d, eps=eps), seed)
    torch.manual_seed(100 + seed)
    x = x_scale * torch.randn(3, 5, d)
    with torch.no_grad():
        ref = norm(x)
    ours = rms_norm(jnp.asarray(to_np(x)), jnp.asarray(to_np(norm.weight)), eps)
    assert_close(ours, ref, tol=1e-5, what="rms_norm")


# ---- 2. RoPE / YaRN ------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS[:2])
@pytest.mark.parametrize("rope_dim", [4, 32])
@pytest.mark.parametrize("rope_kind", list(ROPE))
def test_rope_frequencies_and_angles(rope_kind, rope_dim, seed):
    """inv_freq, cos/sin (attention factor included) and the softmax scale, V3 and V2 modules."""
    hf, cfg = configs("v3", rope_kind, qk_rope_head_dim=rope_dim)
    rot = rotary(hf, "v3")
    np.testing.assert_allclose(rope.inv_frequencies(cfg), to_np(rot.inv_freq), rtol=1e-6, atol=0)
    assert cfg.rope_attention_factor == pytest.approx(rot.attention_scaling, rel=1e-6)
    assert cfg.softmax_scale == pytest.approx(hf_v3.DeepseekV3Attention(hf, 0).scaling, rel=1e-6)

    rng = np.random.default_rng(seed)  # positions up to the full window, far past the original
    positions = np.sort(rng.integers(0, SIZES["max_position_embeddings"], size=(2, 12)), axis=-1)
    cos, sin = rope.rope_angles(jnp.asarray(positions), cfg)
    x = torch.zeros(1)
    ref_cos, ref_sin = rot(x, torch.as_tensor(positions))
    half = rope_dim // 2
    assert_close(cos, ref_cos[..., :half], what="cos")
    assert_close(sin, ref_sin[..., :half], what="sin")
    # transformers repeats the angles for its rotate_half layout; both halves must agree.
    assert_close(ref_cos[..., half:], ref_cos[..., :half], tol=0.0, what="cos halves")

    hf2, cfg2 = configs("v2", rope_kind, qk_rope_head_dim=rope_dim)
    assert cfg2.softmax_scale == pytest.approx(hf_v2.DeepseekV2Attention(hf2, 0).scaling, rel=1e-6)
    freqs_cis = rotary(hf2, "v2")(x, torch.as_tensor(positions))
    assert_close(cos, freqs_cis.real, what="v2 cos")
    assert_close(sin, freqs_cis.imag, what="v2 sin")


def test_yarn_variants_are_distinct():
    """The YaRN cases above really exercise YaRN: its frequencies, cos/sin factor, softmax scale."""
    _, plain = configs("v3", "default")
    _, yarn = configs("v3", "yarn")
    _, scaled = configs("v3", "yarn_attn_factor")
    assert yarn.yarn_active and not plain.yarn_active
    assert not np.allclose(rope.inv_frequencies(yarn), rope.inv_frequencies(plain))
    assert yarn.softmax_scale > plain.softmax_scale
    assert abs(scaled.rope_attention_factor - 1.0) > 0.05


@pytest.mark.parametrize("mscale_all_dim", [1.0, 0.707])
def test_yarn_attention_factor_without_mscale(mscale_all_dim):
    """A yarn rope dict with mscale_all_dim but no mscale: transformers then ignores
    mscale_all_dim for cos/sin and scales them by 0.1 ln(factor) + 1."""
    params = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
              "original_max_position_embeddings": ORIGINAL_MAX_POS, "mscale_all_dim": mscale_all_dim}
    hf = DeepseekV3Config(**{**SIZES, "rope_parameters": params})
    cfg = config_from_hf(hf.to_dict())
    rot = rotary(hf, "v3")
    assert cfg.softmax_scale == pytest.approx(hf_v3.DeepseekV3Attention(hf, 0).scaling, rel=1e-6)
    assert cfg.rope_attention_factor == pytest.approx(rot.attention_scaling, rel=1e-6)


@pytest.mark.parametrize("seed", SEEDS[:2])
@pytest.mark.parametrize("rope_kind", ["default", "yarn", "yarn_attn_factor"])
def test_apply_rope(rope_kind, seed):
    """Ours (adjacent pairs) vs V3's interleave path (output de-interleaved: evens, then odds)
    and V2's complex path (same layout as ours)."""
    hf, cfg = configs("v3", rope_kind)
    r = cfg.qk_rope_head_dim
    torch.manual_seed(seed)
    q, k = torch.randn(2, 4, 6, r), torch.randn(2, 1, 6, r)  # [B, H, T, R]
    _, positions = inputs(seed)
    cos, sin = rotary(hf, "v3")(q, positions)
    q_ref, k_ref = hf_v3.apply_rotary_pos_emb_interleave(q, k, cos, sin)
    c, s = jnp.asarray(to_np(cos[:, None, :, : r // 2])), jnp.asarray(to_np(sin[:, None, :, : r // 2]))
    for x, ref, name in [(q, q_ref, "q"), (k, k_ref, "k")]:
        ours = np.asarray(rope.apply_rope(jnp.asarray(to_np(x)), c, s))
        assert_close(ours[..., 0::2], ref[..., : r // 2], tol=1e-6, what=f"v3 {name} even")
        assert_close(ours[..., 1::2], ref[..., r // 2:], tol=1e-6, what=f"v3 {name} odd")

    hf2, _ = configs("v2", rope_kind)
    freqs_cis = rotary(hf2, "v2")(q, positions)
    q_ref2, k_ref2 = hf_v2.apply_rotary_emb(q, k, freqs_cis)
    c2 = jnp.asarray(to_np(freqs_cis.real[:, None]))
    s2 = jnp.asarray(to_np(freqs_cis.imag[:, None]))
    for x, ref, name in [(q, q_ref2, "q"), (k, k_ref2, "k")]:
        assert_close(rope.apply_rope(jnp.asarray(to_np(x)), c2, s2), ref, tol=1e-6, what=f"v2 {name}")


# ---- 3. MLA --------------------------------------------------------------------------------

def run_mla(hf, cfg, version: str, seed: int, runtime: Runtime = Runtime()):
    attn_cls = hf_v3.DeepseekV3Attention if version == "v3" else hf_v2.DeepseekV2Attention
    attn = randomise(attn_cls(hf, layer_idx=0), seed)
    x, positions = inputs(seed)
    emb = rotary(hf, version)(x, positions)
    with torch.no_grad():
        if version == "v3":
            ref, _ = attn(x, position_embeddings=emb, attention_mask=causal_additive_mask(x.shape[1]))
        else:
            ref, _ = attn(x, attention_mask=causal_additive_mask(x.shape[1]), position_embeddings=emb)
    params = {"params": mla_params(attn, cfg)}
    xj, pj = jnp.asarray(to_np(x)), jnp.asarray(to_np(positions), jnp.int32)
    check_tree(MLA(cfg, runtime), params, xj, pj)
    return MLA(cfg, runtime).apply(params, xj, pj), ref


@pytest.mark.parametrize("seed", SEEDS[:2])
@pytest.mark.parametrize("impl", ["naive", "absorbed"])
@pytest.mark.parametrize("rope_kind", ["default", "yarn", "yarn_attn_factor"])
@pytest.mark.parametrize("q_lora_rank", [16, None])
@pytest.mark.parametrize("version", ["v3", "v2"])
def test_mla(version, q_lora_rank, rope_kind, impl, seed):
    hf, cfg = configs(version, rope_kind, q_lora_rank=q_lora_rank)
    assert cfg.q_lora_rank == (q_lora_rank or 0)
    ours, ref = run_mla(hf, cfg, version, seed, Runtime(attention=impl))
    assert float(torch.max(torch.abs(ref))) > 0.1  # not a trivially small output
    assert_close(ours, ref, what=f"MLA {version} {impl}")


@pytest.mark.parametrize("seed", SEEDS[:2])
@pytest.mark.parametrize("version", ["v3", "v2"])
def test_mla_latent_norm_eps(version, seed):
    """transformers (like DeepSeek's inference code) builds q_a_layernorm and kv_a_layernorm with the
    default eps 1e-6, whatever config.rms_norm_eps says. With a large rms_norm_eps and latents whose
    mean square is of that size, any other eps changes the output."""
    hf, cfg = configs(version, "default", rms_norm_eps=0.5)
    ours, ref = run_mla(hf, cfg, version, seed)
    assert_close(ours, ref, what=f"MLA {version} rms_norm_eps=0.5")


# ---- 4. Router -----------------------------------------------------------------------------

def sorted_routing(weights, experts):
    """Per token: expert ids ascending, and the weights in the same order."""
    weights, experts = to_np(weights), to_np(experts)
    order = np.argsort(experts, axis=-1)
    return np.take_along_axis(weights, order, -1), np.take_along_axis(experts, order, -1)


def router_case(version: str, seed: int, tokens: int = 48, **overrides):
    hf, cfg = configs(version, **overrides)
    router = randomise((hf_v3.DeepseekV3TopkRouter if version == "v3" else hf_v2.DeepseekV2TopkRouter)(hf), seed)
    torch.manual_seed(2000 + seed)
    x = torch.randn(tokens, cfg.hidden_size)
    with torch.no_grad():
        _, ref_w, ref_e = router(x)
    bias = getattr(router, "e_score_correction_bias", torch.zeros(cfg.n_routed_experts))
    args = (jnp.asarray(to_np(x)), jnp.asarray(linear(router.weight)), jnp.asarray(to_np(bias)))
    return cfg, args, sorted_routing(ref_w, ref_e)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize("n_group,topk_group,top_k", [(4, 2, 2), (2, 1, 3), (1, 1, 2)])
def test_router_v3(n_group, topk_group, top_k, norm_topk_prob, seed):
    cfg, (x, w, bias), (ref_w, ref_e) = router_case(
        "v3", seed, n_group=n_group, topk_group=topk_group, num_experts_per_tok=top_k,
        norm_topk_prob=norm_topk_prob, routed_scaling_factor=2.5)
    assert (cfg.n_group, cfg.topk_group, cfg.score_func) == (n_group, topk_group, "sigmoid")
    routing = route(x, w, bias, cfg)
    ours_w, ours_e = sorted_routing(routing.weights, routing.experts)
    np.testing.assert_array_equal(ours_e, ref_e)
    assert_close(ours_w, ref_w, tol=1e-6, what="router weights")
    # The bias and the group limit each change some token's choice, so the check above saw them.
    unbiased = route(x, w, jnp.zeros_like(bias), cfg)
    assert np.any(sorted_routing(unbiased.weights, unbiased.experts)[1] != ref_e)
    if topk_group < n_group:
        ungrouped = route(x, w, bias, cfg.replace(n_group=1, topk_group=1))
        assert np.any(sorted_routing(ungrouped.weights, ungrouped.experts)[1] != ref_e)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("method,n_group,topk_group,top_k", [("greedy", None, None, 2),
                                                             ("greedy", None, None, 3),
                                                             ("group_limited_greedy", 2, 1, 3)])
def test_router_v2(method, n_group, topk_group, top_k, seed):
    # transformers' V2 router never normalises the top-k weights, so norm_topk_prob stays False.
    cfg, (x, w, bias), (ref_w, ref_e) = router_case(
        "v2", seed, topk_method=method, n_group=n_group, topk_group=topk_group,
        num_experts_per_tok=top_k, norm_topk_prob=False, routed_scaling_factor=16.0)
    assert (cfg.score_func, cfg.router_bias, cfg.norm_topk_prob) == ("softmax", False, False)
    routing = route(x, w, bias, cfg)
    ours_w, ours_e = sorted_routing(routing.weights, routing.experts)
    np.testing.assert_array_equal(ours_e, ref_e)
    assert_close(ours_w, ref_w, tol=1e-6, what="router weights")
    if method == "group_limited_greedy":
        ungrouped = route(x, w, bias, cfg.replace(n_group=1, topk_group=1))
        assert np.any(sorted_routing(ungrouped.weights, ungrouped.experts)[1] != ref_e)


# With a max-scored group limit, K <= topk_group could never change the choice; K = 3 > 1 can.
V2_GROUPED = {"topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1,
              "num_experts_per_tok": 3, "norm_topk_prob": False}


# ---- 5. MoE --------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS[:2])
@pytest.mark.parametrize("experts", EXPERTS.names)
@pytest.mark.parametrize("version,overrides", [
    ("v3", {"n_group": 4, "topk_group": 2}),
    ("v3", {"n_group": 1, "topk_group": 1, "n_shared_experts": 2, "num_experts_per_tok": 3}),
    ("v2", {**V2_GROUPED, "routed_scaling_factor": 2.0}),
], ids=["v3-grouped", "v3-2shared", "v2-grouped"])
def test_moe(version, overrides, experts, seed):
    hf, cfg = configs(version, **overrides)
    moe = randomise((hf_v3.DeepseekV3MoE if version == "v3" else hf_v2.DeepseekV2Moe)(hf), seed)
    x, _ = inputs(seed, t=8)
    with torch.no_grad():
        ref = moe(x)
    params, router = moe_variables(moe, cfg)
    variables = {"params": params, **({"router": router} if router else {})}
    runtime = Runtime(experts=experts)
    xj = jnp.asarray(to_np(x))
    check_tree(MoE(cfg, runtime), variables, xj)
    ours = MoE(cfg, runtime).apply(variables, xj)
    assert_close(ours, ref, what=f"MoE {version} {experts}")


# ---- 6. Decoder block ----------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS[:2])
@pytest.mark.parametrize("rope_kind", ["default", "yarn"])
@pytest.mark.parametrize("version,layer_idx", [("v3", 0), ("v3", 1), ("v2", 1)],
                         ids=["v3-dense", "v3-moe", "v2-moe"])
def test_block(version, layer_idx, rope_kind, seed):
    overrides = {**V2_GROUPED, "q_lora_rank": None} if version == "v2" else {}
    hf, cfg = configs(version, rope_kind, **overrides)
    layer_cls = hf_v3.DeepseekV3DecoderLayer if version == "v3" else hf_v2.DeepseekV2DecoderLayer
    layer = randomise(layer_cls(hf, layer_idx=layer_idx), seed)
    x, positions = inputs(seed)
    with torch.no_grad():
        ref = layer(x, attention_mask=causal_additive_mask(x.shape[1]), position_ids=positions,
                    position_embeddings=rotary(hf, version)(x, positions))
    moe = layer_idx >= hf.first_k_dense_replace
    params = {"attn_norm": {"scale": to_np(layer.input_layernorm.weight)},
              "attn": mla_params(layer.self_attn, cfg),
              "ffn_norm": {"scale": to_np(layer.post_attention_layernorm.weight)}}
    variables = {"params": params}
    if moe:
        params["ffn"], router = moe_variables(layer.mlp, cfg)
        if router:
            variables["router"] = {"ffn": router}
    else:
        params["ffn"] = mlp_params(layer.mlp)
    xj, pj = jnp.asarray(to_np(x)), jnp.asarray(to_np(positions), jnp.int32)
    check_tree(Block(cfg, moe=moe), variables, xj, pj)
    ours = Block(cfg, moe=moe).apply(variables, xj, pj)
    assert_close(ours, ref, what=f"Block {version} layer {layer_idx}")
