"""The model's contract, and the variants that must agree (STYLE.md item 5)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import Transformer, init_variables, logical_axes
from dsv3_jax.ops.attention import ATTENTION
from dsv3_jax.ops.experts import EXPERTS
from dsv3_jax.runtime import Runtime

CFG = ModelConfig.from_json("tiny")


@pytest.fixture(scope="module")
def variables():
    v = init_variables(CFG, jax.random.PRNGKey(0))
    # A non-zero router bias so selection differs from the unbiased scores.
    return {**v, "router": jax.tree_util.tree_map(lambda b: 0.02 * jnp.arange(b.size) % 0.05, v["router"])}


def _tokens(seed=0, shape=(2, 16)):
    return jnp.asarray(np.random.RandomState(seed).randint(0, CFG.vocab_size, shape), jnp.int32)


def _loss(cfg, rt):
    def loss(params, other, tokens):
        logits, mtp = Transformer(cfg, rt).apply({"params": params, **other}, tokens, return_mtp=True)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + jnp.mean(jax.nn.log_softmax(mtp)[..., 1])
    return jax.jit(jax.value_and_grad(loss))


def _max_rel(a, b):
    return max(float(jnp.abs(x - y).max() / (jnp.abs(y).max() + 1e-30))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_contract(variables):
    logits = Transformer(CFG).apply(variables, _tokens())
    assert logits.shape == (2, 16, CFG.vocab_size) and logits.dtype == jnp.float32
    logits2, mtp = Transformer(CFG).apply(variables, _tokens(), return_mtp=True)
    assert mtp.shape == (CFG.mtp_depth, 2, 16, CFG.vocab_size) and mtp.dtype == jnp.float32
    np.testing.assert_array_equal(logits, logits2)


@pytest.mark.parametrize("changes", [{"attention": v} for v in ATTENTION if v not in ("naive", "latent_kernel")]
                         + [{"experts": v} for v in EXPERTS if v != "dense"])
def test_variants_agree_forward_and_gradient(variables, changes):
    """Every registered attention and experts variant in the whole model (MTP included): the loss and
    gradients of the reference variants. (latent_kernel reads a cache: tests/test_infer.py.)"""
    other = {"router": variables["router"]}
    base = Runtime(experts="dense", attention="naive")
    tokens = _tokens(1)
    l0, g0 = _loss(CFG, base)(variables["params"], other, tokens)
    l1, g1 = _loss(CFG, base.replace(**changes))(variables["params"], other, tokens)
    assert abs(float(l0 - l1)) < 1e-5 * abs(float(l0)), changes
    assert _max_rel(g1, g0) < 1e-4, changes


def test_causal(variables):
    """Changing token j changes no main logit before j and no depth-1 MTP logit before j - 1."""
    t = _tokens(2)
    j = 9
    t2 = t.at[:, j].set((t[:, j] + 1) % CFG.vocab_size)
    a, ma = Transformer(CFG).apply(variables, t, return_mtp=True)
    b, mb = Transformer(CFG).apply(variables, t2, return_mtp=True)
    np.testing.assert_allclose(a[:, :j], b[:, :j], atol=1e-6)
    assert float(jnp.abs(a[:, j] - b[:, j]).max()) > 1e-4
    # MTP depth 1 at position i reads Emb(t_{i+1}), so it sees token j from position j - 1 on.
    np.testing.assert_allclose(ma[0, :, : j - 1], mb[0, :, : j - 1], atol=1e-6)
    assert float(jnp.abs(ma[0, :, j - 1] - mb[0, :, j - 1]).max()) > 1e-4


def test_router_bias_changes_the_choice_not_the_weights(variables):
    tokens = _tokens(3)
    _, state = Transformer(CFG).apply(variables, tokens, mutable=["intermediates"])
    routing = state["intermediates"]["layers_1"]["ffn"]["routing"][0]
    zero = jax.tree_util.tree_map(jnp.zeros_like, variables["router"])
    _, state0 = Transformer(CFG).apply({**variables, "router": zero}, tokens, mutable=["intermediates"])
    routing0 = state0["intermediates"]["layers_1"]["ffn"]["routing"][0]
    np.testing.assert_array_equal(routing.scores, routing0.scores)
    assert not np.array_equal(routing.experts, routing0.experts)
    # Gate weights are the unbiased scores of the chosen experts, normalised, times the scale.
    picked = jnp.take_along_axis(routing.scores, routing.experts, axis=-1)
    expected = picked / picked.sum(-1, keepdims=True) * CFG.routed_scaling_factor
    np.testing.assert_allclose(routing.weights, expected, rtol=1e-6)


def test_group_limit_respected(variables):
    _, state = Transformer(CFG).apply(variables, _tokens(4), mutable=["intermediates"])
    experts = np.asarray(state["intermediates"]["layers_1"]["ffn"]["routing"][0].experts)
    groups = experts // CFG.experts_per_group
    assert max(len(set(row)) for row in groups) <= CFG.topk_group


def test_bfloat16_activations_stay_close(variables):
    tokens = _tokens(5)
    ref = Transformer(CFG).apply(variables, tokens)
    low = Transformer(CFG, Runtime(dtype="bfloat16")).apply(variables, tokens)
    assert low.dtype == jnp.float32
    assert float(jnp.abs(low - ref).max() / jnp.abs(ref).max()) < 0.05


def test_positions_argument(variables):
    """RoPE sees only relative positions: a uniform shift changes nothing, stretching does."""
    tokens = _tokens(6)
    pos = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), tokens.shape)
    a = Transformer(CFG).apply(variables, tokens)
    np.testing.assert_allclose(Transformer(CFG).apply(variables, tokens, pos + 5), a, atol=1e-5)
    assert float(jnp.abs(Transformer(CFG).apply(variables, tokens, pos * 2) - a).max()) > 1e-4


def test_every_weight_has_logical_axes():
    specs = logical_axes(CFG)
    shapes = jax.eval_shape(lambda: init_variables(CFG, jax.random.PRNGKey(0)))
    for (path, spec), leaf in zip(jax.tree_util.tree_flatten_with_path(specs["params"])[0],
                                  jax.tree_util.tree_leaves(shapes["params"])):
        assert len(spec) == len(leaf.shape) and all(spec), path
    assert tuple(specs["params"]["layers_1"]["ffn"]["w1"]) == ("expert", "embed", "mlp")


def test_causal_query_blocks_change_nothing():
    """The model attends in causal query blocks exactly when it makes the positions itself (so they
    increase); given the same positions explicitly it attends in one block: same logits
    (tests/test_ops.py checks the blocked core itself, values and gradients)."""
    cfg = CFG.replace(max_position_embeddings=256, mtp_depth=0)
    variables = init_variables(cfg, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 128), 0, cfg.vocab_size)
    explicit = jnp.arange(128)[None]  # given positions: one block; made by the model: 4 blocks
    apply = jax.jit(Transformer(cfg).apply)
    np.testing.assert_allclose(apply(variables, tokens), apply(variables, tokens, explicit), rtol=1e-5, atol=1e-6)
