"""DeepSeek Sparse Attention in the model: the sparse op against its masked-dense reference (values and
gradients, STYLE.md item 5), the layer equal to dense MLA bit for bit where the selection keeps every key,
and whole-model logits against transformers' DeepseekV32, whose attention masks the dense scores with the
same top-k (item 6).

transformers ranks the same float32 indexer scores with torch's top-k; exact ties (ReLU zeroes every head
for some keys) or near-ties at the k-th place may be broken the other way. Every query whose selection
differs from transformers' must have such a tie; its position is left out of the logit comparison, with
every later position of its row where the tie is in a layer before the last (their attention read the
query's output).
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import jax
import jax.numpy as jnp
from hf_models import YARN, build, rel_err
from test_dsa_parity import Capture

from dsv3_jax.config import ModelConfig
from dsv3_jax.hf import load_hf_checkpoint
from dsv3_jax.layers import mla as mla_layer
from dsv3_jax.layers.indexer import INDEX_SCORES, select
from dsv3_jax.model import Transformer, init_variables
from dsv3_jax.ops import dispatch
from dsv3_jax.ops.attention import KvWeights
from dsv3_jax.ops.sparse_attention import (
    NONE,
    attention_distribution,
    gather_scores,
    indexer_kl,
    masked_dense_attention,
    selected_mass,
    sparse_attention,
)
from dsv3_jax.runtime import Runtime

TOL = 1e-4  # as the V3 parity tests: |ours - reference| <= TOL * max |reference|
B, T, H, N, R, C, V, K = 2, 24, 3, 8, 4, 12, 6, 5


def _inputs(seed: int):
    """Random MLA operands and a top-K selection of random scores; the second row's positions start at
    7 (a prefill past a prefix), so slot s holds position s + 7 there."""
    rng = np.random.RandomState(seed)
    f = lambda *shape: jnp.asarray(rng.randn(*shape), jnp.float32)
    positions = jnp.asarray(np.stack([np.arange(T), np.arange(T) + 7]), jnp.int32)
    causal = positions[:, None, :] <= positions[:, :, None]
    indices = select(jnp.where(causal, f(B, T, T), -jnp.inf), K)
    return f(B, T, H, N), f(B, T, H, R), f(B, T, C + R), positions, indices, 0.5 * f(C, H, N + V)


@pytest.mark.parametrize("chunks", [1, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_sparse_attention_equals_masked_dense_values_and_gradients(seed, chunks):
    q_nope, q_pe, kv, positions, indices, wkv_b = _inputs(seed)
    assert (np.asarray(indices) == NONE).any() and (np.asarray(indices) >= 0).all(-1).any()  # padded and full rows
    scale = 0.3

    def loss(fn, args):
        qn, qp, rows, w = args
        out = fn(qn, qp, rows, positions, positions, indices, KvWeights(w), scale)
        return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape)))  # every output counts, unequally

    args = (q_nope, q_pe, kv, wkv_b)
    sparse = lambda *a: sparse_attention(*a, query_chunks=chunks)
    out, ref = sparse(q_nope, q_pe, kv, positions, positions, indices, KvWeights(wkv_b), scale), \
        masked_dense_attention(q_nope, q_pe, kv, positions, positions, indices, KvWeights(wkv_b), scale)
    np.testing.assert_allclose(out, ref, atol=2e-5 * float(jnp.abs(ref).max()))
    grads = jax.grad(lambda a: loss(sparse, a))(args)
    ref_grads = jax.grad(lambda a: loss(masked_dense_attention, a))(args)
    for name, g, r in zip(("q_nope", "q_pe", "kv", "wkv_b"), grads, ref_grads):
        assert float(jnp.abs(r).max()) > 0, name
        np.testing.assert_allclose(g, r, atol=2e-5 * float(jnp.abs(r).max()), err_msg=name)
    # The selection matters: dense attention over every visible key is another function.
    everything = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T, T))
    dense = masked_dense_attention(q_nope, q_pe, kv, positions, positions, everything, KvWeights(wkv_b), scale)
    assert float(jnp.abs(dense - out).max()) > 1e-2


def test_sparse_attention_over_a_cache_reads_slots_as_positions():
    """kv_positions None (slot s holds position s): a key past a query's position is not attended even
    if the indices name it."""
    q_nope, q_pe, kv, _, indices, wkv_b = _inputs(2)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    # The last slot names the last key for every query (where it is not selected already: indices are distinct).
    late = jnp.where(jnp.any(indices == T - 1, axis=-1, keepdims=True), indices, indices.at[:, :, -1].set(T - 1))
    w = KvWeights(wkv_b)
    out = sparse_attention(q_nope, q_pe, kv, positions, None, late, w, 0.3)
    ref = masked_dense_attention(q_nope, q_pe, kv, positions, None, late, w, 0.3)
    np.testing.assert_allclose(out, ref, atol=1e-5 * float(jnp.abs(ref).max()))


def test_indexer_kl_recall_and_their_edges():
    q_nope, q_pe, kv, positions, indices, wkv_b = _inputs(3)
    p = attention_distribution(q_nope, q_pe, kv, positions, positions, KvWeights(wkv_b), 0.3)
    np.testing.assert_allclose(jnp.sum(p, -1), 1.0, atol=1e-5)
    assert float(jnp.abs(jnp.triu(p[0], 1)).max()) == 0  # nothing after the query
    log_p = jnp.log(jnp.where(p > 0, p, 1.0))
    causal = positions[:, None, :] <= positions[:, :, None]
    # KL(p || softmax(log p)) = 0; of uniform scores, positive.
    assert abs(float(indexer_kl(p, jnp.where(causal, log_p, -jnp.inf)))) < 1e-5
    assert float(indexer_kl(p, jnp.where(causal, 0.0, -jnp.inf))) > 0.05
    recall = float(selected_mass(p, indices))
    assert 0 < recall < 1
    everything = jnp.where(causal, jnp.arange(T), NONE).astype(jnp.int32)
    assert abs(float(selected_mass(p, everything)) - 1) < 1e-5
    # Restricted to the selection: gathered scores, -inf at NONE.
    g = gather_scores(jnp.where(causal, log_p, -jnp.inf), indices)
    assert (np.isneginf(np.asarray(g)) == (np.asarray(indices) == NONE)).all()


# ---- the layer in the model ----------------------------------------------------------------------

def _tiny_dsa(topk: int) -> ModelConfig:
    return ModelConfig.from_json("tiny").replace(index_n_heads=2, index_head_dim=16, index_topk=topk)


def test_up_to_topk_keys_the_model_is_dense_mla_bit_for_bit():
    """S <= index_topk: every visible key is selected, and the logits are the V3 model's (the same weights
    without the indexer), bit for bit."""
    cfg = _tiny_dsa(16)
    variables = init_variables(cfg, jax.random.PRNGKey(0))
    strip = lambda tree: {k: strip(v) for k, v in tree.items() if k != "indexer"} if isinstance(tree, dict) else tree
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, cfg.vocab_size)
    assert not dispatch.dsa_sparse(Runtime(), cfg, 16) and dispatch.dsa_sparse(Runtime(), cfg, 17)
    run = lambda c, v: np.asarray(jax.jit(lambda v, t: Transformer(c).apply(v, t, return_mtp=True))(v, tokens)[0])
    v3 = cfg.replace(index_n_heads=0, index_head_dim=0, index_topk=0)
    np.testing.assert_array_equal(run(cfg, variables), run(v3, strip(variables)))


def test_model_gradients_sparse_equal_masked_dense(monkeypatch):
    """The whole tiny model's loss gradient (every parameter) with the sparse op, and with the masked-dense
    reference in its place."""
    cfg = _tiny_dsa(4)
    variables = init_variables(cfg, jax.random.PRNGKey(2))
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 12), 0, cfg.vocab_size)

    def grads():
        def loss(params):
            logits = Transformer(cfg).apply({**variables, "params": params}, tokens)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0])
        return jax.jit(jax.grad(loss))(variables["params"])

    sparse = grads()
    monkeypatch.setattr(mla_layer, "sparse_attention",
                        lambda *a, distribution=False: masked_dense_attention(*a[:-1]))
    reference = grads()
    flat = jax.tree_util.tree_leaves_with_path(reference)
    for (path, r), s in zip(flat, jax.tree_util.tree_leaves(sparse)):
        scale = max(float(jnp.abs(r).max()), 1e-12)
        assert float(jnp.abs(s - r).max()) <= 1e-4 * scale, jax.tree_util.keystr(path)
    assert float(jnp.abs(reference["layers_0"]["attn"]["wkv_b"]).max()) > 0
    assert float(jnp.abs(reference["layers_0"]["attn"]["indexer"]["wk"]).max()) == 0  # top-k: no gradient


# ---- whole model against transformers ------------------------------------------------------------

def _tied(scores: np.ndarray, topk: int) -> np.ndarray:
    """bool [B,T]: queries whose k-th and (k+1)-th best scores (transformers') are equal within TOL."""
    scores = np.asarray(scores, np.float64)
    tol = TOL * max(1.0, float(np.abs(scores[np.isfinite(scores)]).max()))
    out = np.zeros(scores.shape[:2], bool)
    for b, t in np.ndindex(*out.shape):
        ranked = np.sort(scores[b, t][np.isfinite(scores[b, t])])[::-1]
        out[b, t] = len(ranked) > topk and ranked[topk - 1] - ranked[topk] <= tol
    return out


def _affected(cap, sown: dict, topk: int, last_layer: int) -> np.ndarray:
    """bool [B,T]: the positions whose logits a tie broken the other way may change. Each query's selection
    is ours (from our sown scores) and transformers'; where they differ, the boundary must be tied, or the
    query's input already differ (an earlier layer's tie)."""
    out = np.zeros(cap.scores[0].shape[:2], bool)
    for layer in range(last_layer + 1):
        ours = np.asarray(select(sown[f"layers_{layer}"]["attn"]["scores"][0], topk))
        theirs = cap.indices[layer]
        tied, inputs_differ = _tied(cap.scores[layer], topk), out.copy()  # the latter: from earlier layers' ties
        for b, t in np.ndindex(*out.shape):
            if set(ours[b, t]) - {NONE} != set(theirs[b, t][: t + 1]):
                assert tied[b, t] or inputs_differ[b, t], f"layer {layer} query {b, t}: another selection, no tie"
                out[b, t:] |= layer < last_layer  # later layers of the row read this query's output
                out[b, t] = True
    return out


@pytest.mark.parametrize("seed,rope", [(0, "default"), (1, "yarn"), (2, "default"), (3, "yarn")])
def test_v32_logits_match_transformers_with_a_sparse_selection(seed, rope, tmp_path):
    # 16 indexer heads, not hf_models' 4: a key every head's ReLU zeroes (score 0, tied with all such keys)
    # becomes rare, so few rows need leaving out.
    model = build("v32", seed, index_n_heads=16, **({"rope_parameters": YARN} if rope == "yarn" else {}))
    model.save_pretrained(tmp_path)
    cfg, variables = load_hf_checkpoint(str(tmp_path))
    assert cfg.index_topk == 8 and cfg.yarn_active == (rope == "yarn")
    tokens = np.random.RandomState(seed).randint(0, cfg.vocab_size, (2, 40)).astype(np.int32)  # 5 x index_topk
    layers = model.model.layers
    with Capture([layer.self_attn.indexer for layer in layers]) as cap, torch.no_grad():
        ref = model(torch.as_tensor(tokens), use_cache=False).logits.float().numpy()
    ours, state = jax.jit(lambda v, t: Transformer(cfg).apply(v, t, mutable=[INDEX_SCORES]))(variables, tokens)
    affected = _affected(cap, state[INDEX_SCORES], cfg.index_topk, cfg.num_layers - 1)
    assert affected.mean() < 0.3, f"{affected.sum()} of {affected.size} positions read a tied selection"
    err = np.abs(np.asarray(ours) - ref).max(-1)[~affected].max() / np.abs(ref).max()
    assert err < TOL, f"logits differ by {err:.2e} of their largest"
    # The selection matters: dense attention (every key selected) gives other logits.
    dense = np.asarray(jax.jit(lambda v, t: Transformer(cfg.replace(index_topk=64)).apply(v, t))(variables, tokens))
    assert rel_err(dense, ref) > 100 * TOL
