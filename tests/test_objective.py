"""The training objective: losses, the balance statistics and the bias-only balancing."""
import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.layers.moe import Routing
from dsv3_jax.model import Transformer, init_variables
from dsv3_jax.train.objective import balance_loss, compute_loss, cross_entropy, expert_load, update_router_bias

CFG = ModelConfig.from_json("tiny")


def test_cross_entropy_and_its_gradient_match_log_softmax():
    """cross_entropy has a hand-written backward: value and gradient equal autodiff's of the textbook
    -mean(log_softmax[target]), for f32 and bf16 logits."""
    logits = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 11)) * 4
    targets = jax.random.randint(jax.random.PRNGKey(1), (2, 5), 0, 11)
    textbook = lambda x: -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(x.astype(jnp.float32)),
                                                       targets[..., None], axis=-1))
    both = jax.jit(lambda x: ((cross_entropy(x, targets), jax.grad(cross_entropy)(x, targets)),
                              (textbook(x), jax.grad(textbook)(x))))
    for dtype, tol in ((jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)):
        (loss, got), (want_loss, want) = both(logits.astype(dtype))
        np.testing.assert_allclose(loss, want_loss, rtol=tol)
        assert got.dtype == dtype
        np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32), atol=tol / 10)


def test_balance_loss_is_one_when_balanced_and_larger_when_not():
    e, k, t = CFG.n_routed_experts, CFG.num_experts_per_tok, 8
    balanced = jnp.arange(t * k).reshape(t, k) % e
    uniform = jnp.full((t, e), 0.5)
    r = Routing(jnp.ones((t, k)), balanced, uniform)
    assert abs(float(balance_loss(r, 1, CFG)) - 1.0) < 1e-6  # sum_i f_i P_i = sum_i 1 * 1/E * E... = 1
    skewed = jnp.tile(jnp.arange(k), (t, 1))
    scores = jnp.zeros((t, e)).at[:, :k].set(1.0) + 0.01
    assert float(balance_loss(Routing(jnp.ones((t, k)), skewed, scores), 1, CFG)) > 2.0


def test_bias_moves_against_the_load():
    router = {"layers_1": {"ffn": {"bias": jnp.zeros(4)}}}
    loads = {"layers_1": jnp.array([0.4, 0.3, 0.2, 0.1])}
    new = update_router_bias(router, loads, 0.001)["layers_1"]["ffn"]["bias"]
    np.testing.assert_allclose(new, [-0.001, -0.001, 0.001, 0.001])


def test_expert_load_counts_assignments():
    r = Routing(jnp.ones((3, 2)), jnp.array([[0, 1], [0, 2], [0, 3]]), jnp.zeros((3, 4)))
    np.testing.assert_allclose(expert_load(r, 4), [0.5, 1 / 6, 1 / 6, 1 / 6])


def test_loss_parts_and_mtp_targets():
    variables = init_variables(CFG, jax.random.PRNGKey(0))
    window = jnp.asarray(np.random.RandomState(0).randint(0, CFG.vocab_size, (2, 18)), jnp.int32)
    parts, routes = compute_loss(variables["params"], variables["router"], window, CFG)
    assert set(routes) == {"layers_1", "mtp_0/block"}
    # A fresh model predicts near-uniformly: every cross-entropy is close to ln(vocab).
    for x in (parts.ce, parts.mtp):
        assert abs(float(x) - np.log(CFG.vocab_size)) < 0.1
    expected = parts.ce + CFG.mtp_loss_weight * parts.mtp + CFG.aux_loss_alpha * parts.balance
    np.testing.assert_allclose(parts.loss, expected, rtol=1e-6)
    # `future` supplies real tokens where the shift would pad: the early positions are unchanged.
    t = window.shape[1] - 2
    _, with_future = Transformer(CFG).apply(variables, window[:, :t], return_mtp=True, future=window[:, : t + 1])
    _, padded = Transformer(CFG).apply(variables, window[:, :t], return_mtp=True)
    np.testing.assert_allclose(with_future[:, :, : t - 1], padded[:, :, : t - 1], atol=1e-5)
    assert float(jnp.abs(with_future[:, :, t - 1] - padded[:, :, t - 1]).max()) > 1e-5
