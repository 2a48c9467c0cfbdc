"""The model's contract, and the variants that must agree (STYLE.md item 5)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.config import ModelConfig
from dsv3_jax.layers.moe import resolve_moe_impl
from dsv3_jax.model import Transformer, init_variables, logical_axes

CFG = ModelConfig.from_json("tiny")


@pytest.fixture(scope="module")
def variables():
    v = init_variables(CFG, jax.random.PRNGKey(0))
    # A non-zero router bias so selection differs from the unbiased scores.
    return {**v, "router": jax.tree_util.tree_map(lambda b: 0.02 * jnp.arange(b.size) % 0.05, v["router"])}


def _tokens(seed=0, shape=(2, 16)):
    return jnp.asarray(np.random.RandomState(seed).randint(0, CFG.vocab_size, shape), jnp.int32)


def _loss(cfg):
    def loss(params, other, tokens):
        logits, mtp = Transformer(cfg).apply({"params": params, **other}, tokens, return_mtp=True)
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


def test_variants_agree_forward_and_gradient(variables):
    """Naive vs absorbed MLA and dense vs ragged experts: same loss, same gradients."""
    other = {"router": variables["router"]}
    base = CFG.replace(moe_impl="dense", attention_impl="naive")
    tokens = _tokens(1)
    l0, g0 = _loss(base)(variables["params"], other, tokens)
    for changes in [{"attention_impl": "absorbed"}, {"moe_impl": "ragged"}, {"moe_impl": "windowed"}]:
        l1, g1 = _loss(base.replace(**changes))(variables["params"], other, tokens)
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
    low = Transformer(CFG.replace(dtype="bfloat16")).apply(variables, tokens)
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


def test_moe_impl_auto_picks_a_path():
    from dsv3_jax.layers.moe import DENSE_MAX_TOKENS

    assert resolve_moe_impl(CFG) == "windowed"  # tests run on CPU
    assert resolve_moe_impl(CFG.replace(moe_impl="ragged")) == "ragged"
    e, k = CFG.n_routed_experts, CFG.num_experts_per_tok
    assert resolve_moe_impl(CFG, 1) == "dense"  # T*K < E, but all experts fit in a cache: one matmul
    big = CFG.replace(hidden_size=512, moe_intermediate_size=256)  # 3 x 8 x 512 x 256 x 4 B = 12 MB
    # bound by reading weights: only the chosen experts, up to 4 pairs per expert (decoding batches)
    assert resolve_moe_impl(big, 1) == resolve_moe_impl(big, 4 * e // k) == "gather"
    assert resolve_moe_impl(big, 4 * e // k + 1) == resolve_moe_impl(CFG, DENSE_MAX_TOKENS - 1) == "dense"
    assert resolve_moe_impl(CFG, DENSE_MAX_TOKENS) == "windowed"
    assert resolve_moe_impl(CFG.replace(moe_impl="windowed"), 1) == "windowed"


@pytest.mark.parametrize("pattern", ["all_same", "one_empty", "random"])
def test_expert_paths_agree_on_adversarial_routing(pattern):
    """Dropless means dropless: every token on the same experts, or an expert left empty."""
    from dsv3_jax.layers.moe import EXPERTS, Routing

    t, e, k, d, f = 300, 8, 2, 16, 8
    rng = np.random.RandomState(0)
    experts = {"all_same": np.tile([3, 5], (t, 1)),
               "one_empty": np.stack([rng.choice([0, 1, 2, 4, 5, 6, 7], 2, replace=False) for _ in range(t)]),
               "random": np.stack([rng.choice(e, 2, replace=False) for _ in range(t)])}[pattern]
    routing = Routing(jnp.asarray(rng.rand(t, k), jnp.float32), jnp.asarray(experts, jnp.int32), jnp.zeros((t, e)))
    x = jnp.asarray(rng.randn(t, d), jnp.float32)
    w1, w3 = (jnp.asarray(rng.randn(e, d, f), jnp.float32) for _ in range(2))
    w2 = jnp.asarray(rng.randn(e, f, d), jnp.float32)
    ref = EXPERTS["dense"](x, routing, w1, w3, w2)
    for impl in ("ragged", "windowed", "gather"):
        np.testing.assert_allclose(EXPERTS[impl](x, routing, w1, w3, w2), ref, rtol=1e-4, atol=1e-4)
    # windowed's backward is written by hand: its gradients too, overflow chunks included (all_same
    # puts every token past the windows of two experts; one_empty leaves a window empty).
    def grads(impl):
        loss = lambda *a: jnp.sum(jnp.sin(EXPERTS[impl](a[0], routing._replace(weights=a[1]), *a[2:])))
        return jax.jit(jax.grad(loss, argnums=range(5)))(x, routing.weights, w1, w3, w2)

    for got, want in zip(grads("windowed"), grads("dense"), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))


def test_attention_core_gradients_match_autodiff():
    """attend_naive's core has a hand-written backward: values and gradients equal autodiff through
    attend_absorbed (jax.nn.softmax), with padding that masks some keys and whole query rows."""
    from dsv3_jax.layers.mla import attend_absorbed, attend_naive, causal_mask

    b, t, h, n, r, c, v = 2, 8, 3, 4, 2, 5, 4
    ks = jax.random.split(jax.random.PRNGKey(2), 5)
    args = (jax.random.normal(ks[0], (b, t, h, n)), jax.random.normal(ks[1], (b, t, h, r)),
            jax.random.normal(ks[2], (b, t, c)), jax.random.normal(ks[3], (b, t, r)),
            jax.random.normal(ks[4], (c, h, n + v)))
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    # row 1 left-padded by 3: its first 3 keys are masked for every query, its first query sees none
    mask = causal_mask(pos, pos) & (pos >= jnp.array([[0], [3]]))[:, None, :]
    mask = mask.at[1, 0].set(False)
    def value_and_grads(attend):
        f = lambda *a: attend(*a, mask, 0.3, v)
        return f(*args), jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=range(5))(*args)

    (naive, naive_grads), (absorbed, absorbed_grads) = jax.jit(
        lambda: (value_and_grads(attend_naive), value_and_grads(attend_absorbed)))()
    np.testing.assert_allclose(naive, absorbed, rtol=1e-5, atol=1e-6)
    for got, want in zip(naive_grads, absorbed_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_causal_query_blocks_change_nothing():
    """Training attention in query blocks (each block scores only the keys up to its own end) gives
    the one-block result and gradients; the model uses it exactly when it makes the positions itself."""
    from dsv3_jax.layers.mla import attend_naive, causal_mask

    b, t, h, n, r, c, v = 2, 12, 3, 4, 2, 5, 4
    ks = jax.random.split(jax.random.PRNGKey(0), 5)
    args = (jax.random.normal(ks[0], (b, t, h, n)), jax.random.normal(ks[1], (b, t, h, r)),
            jax.random.normal(ks[2], (b, t, c)), jax.random.normal(ks[3], (b, t, r)),
            jax.random.normal(ks[4], (c, h, n + v)))
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    f = lambda blocks, *a: attend_naive(*a, causal_mask(pos, pos), 0.3, v, query_blocks=blocks)
    loss = lambda blocks: jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(f(blocks, *a))), argnums=range(5)))(*args)
    np.testing.assert_allclose(f(3, *args), f(1, *args), rtol=1e-6, atol=1e-6)
    for got, want in zip(loss(3), loss(1), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    cfg = CFG.replace(max_position_embeddings=256, mtp_depth=0)
    variables = init_variables(cfg, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 128), 0, cfg.vocab_size)
    explicit = jnp.arange(128)[None]  # given positions: one block; made by the model: 4 blocks
    apply = jax.jit(Transformer(cfg).apply)
    np.testing.assert_allclose(apply(variables, tokens), apply(variables, tokens, explicit), rtol=1e-5, atol=1e-6)
