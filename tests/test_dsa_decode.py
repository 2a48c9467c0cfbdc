"""DSA decoding (issue 17): the cache holds each layer's indexer keys beside the latent rows, and cached
attention reads each query's top-k latent rows only. Teacher-forced logits through the cache equal the full
uncached model's (its sparse path) at every position, with contexts shorter and longer than index_topk;
greedy decoding, MTP speculative decoding and infer.py run on a DSA model."""
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.config import ModelConfig
from dsv3_jax.hf import save_hf_checkpoint
from dsv3_jax.infer import cli
from dsv3_jax.infer.engine import GenerateConfig, GenerationError, Generator, cache_bytes_per_token, generate
from dsv3_jax.layers.cache import FP8, LatentCache, stored
from dsv3_jax.layers.indexer import index_scores, select, select_cached
from dsv3_jax.model import Transformer, init_variables
from dsv3_jax.ops import dispatch
from dsv3_jax.ops.attention import KvWeights, visible
from dsv3_jax.ops.sparse_attention import sparse_attention
from pallas_kernels.mla_decode import fp8_cache

TOPK = 8
CFG = ModelConfig.from_json("tiny").replace(index_n_heads=2, index_head_dim=16, index_topk=TOPK)
SLOTS = 64  # the engine's cache bucket: well past TOPK, so the cached attention runs sparse
L = 40  # tokens per row, 5 x TOPK


@pytest.fixture(scope="module")
def variables():
    return init_variables(CFG, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.PRNGKey(1), (2, L), 0, CFG.vocab_size)


@pytest.fixture(scope="module")
def full(variables, tokens):
    """The uncached model over all L tokens: sparse (L > TOPK), and causal, so its logits at position i are
    those of the model run on the sequence grown to i + 1 tokens."""
    assert dispatch.dsa_sparse(Transformer(CFG).runtime, CFG, L)
    return np.asarray(jax.jit(lambda v, t: Transformer(CFG).apply(v, t))(variables, tokens))


_step = jax.jit(lambda cfg, v, t, p, c: Transformer(cfg).apply(v, t, p, c, method=Transformer.step), static_argnums=0)


def _teacher_forced(cfg, variables, tokens, prompt: int, cache_dtype=None):
    """Prefill `prompt` tokens, then feed the rest one at a time -> logits [B, L, V] from the cache."""
    b = tokens.shape[0]
    g = Generator(cfg, GenerateConfig(), cache_dtype)
    cache = g._empty_cache(b, SLOTS, cfg.num_layers)
    pos = jnp.broadcast_to(jnp.arange(prompt), (b, prompt))
    logits, _, cache = _step(cfg, variables, tokens[:, :prompt], pos, cache)
    got = [logits]
    for i in range(prompt, tokens.shape[1]):
        logits, _, cache = _step(cfg, variables, tokens[:, i:i + 1], jnp.full((b, 1), i), cache)
        got.append(logits)
    return np.asarray(jnp.concatenate(got, axis=1)), cache


@pytest.mark.parametrize("prompt", [5, 20])  # prefill shorter and longer than TOPK; decoding passes it either way
@pytest.mark.parametrize("absorbed", [False, True])
def test_cached_logits_equal_the_uncached_sparse_model(variables, tokens, full, prompt, absorbed):
    v = Transformer(CFG).prepare_decode(variables) if absorbed else variables
    got, _ = _teacher_forced(CFG, v, tokens, prompt)
    np.testing.assert_allclose(got, full, rtol=1e-4, atol=1e-5)


def test_the_selection_matters(variables, tokens, full):
    """The same weights with dense attention (top-k past the context) give other logits once a query sees
    more than TOPK keys, and the same up to TOPK: the test above can tell sparse from dense."""
    dense = np.asarray(Transformer(CFG.replace(index_topk=SLOTS)).apply(variables, tokens))
    np.testing.assert_allclose(dense[:, :TOPK], full[:, :TOPK], rtol=1e-4, atol=1e-5)
    assert np.abs(dense[:, TOPK + 1:] - full[:, TOPK + 1:]).max() > 1e-3


def test_cache_at_most_topk_slots_is_the_dense_cached_attention_bit_for_bit(variables, tokens):
    """A cache of <= index_topk slots keeps every visible key: the cached path is the V3 dense one."""
    short = tokens[:, :12]
    cfg_wide = CFG.replace(index_topk=SLOTS)  # SLOTS slots, top-k SLOTS: dense
    v3 = CFG.replace(index_n_heads=0, index_head_dim=0, index_topk=0)
    got, _ = _teacher_forced(cfg_wide, variables, short, 5)
    want, _ = _teacher_forced(v3, variables, short, 5)
    np.testing.assert_array_equal(got, want)


def test_caches_hold_latent_rows_and_indexer_keys(variables, tokens):
    _, cache = _teacher_forced(CFG, variables, tokens[:, :12], 5)
    assert len(cache) == CFG.num_layers
    for layer in cache:
        assert layer.rows.shape == (2 * SLOTS, CFG.kv_cache_dim)
        assert layer.index_keys.shape == (2 * CFG.index_head_dim, SLOTS) and layer.index_keys.dtype == jnp.float32
        keys = np.asarray(layer.index_view())  # [B, I, S]: one column a slot
        assert (np.abs(keys[..., :12]).max(1) > 0).all() and (keys[..., 12:] == 0).all()  # written as tokens came
    packed = Generator(CFG, GenerateConfig(), FP8)._empty_cache(2, SLOTS, 1)[0]
    assert packed.rows.dtype == jnp.uint8 and packed.index_view().dtype == jnp.bfloat16  # FP8 rows: bf16 keys
    narrow = Generator(CFG, GenerateConfig(), jnp.bfloat16)._empty_cache(2, SLOTS, 1)[0]
    assert narrow.dtype == narrow.index_view().dtype == jnp.bfloat16 and narrow.rows.dtype == jnp.uint16
    assert narrow.index_keys.dtype == jnp.uint16  # held as their bits: XLA:CPU scatters them in place
    assert cache_bytes_per_token(CFG, FP8) - cache_bytes_per_token(CFG, jnp.bfloat16) == \
        CFG.num_layers * (fp8_cache.row_bytes(CFG.kv_lora_rank, CFG.qk_rope_head_dim) - CFG.kv_cache_dim * 2)
    v3 = CFG.replace(index_n_heads=0, index_head_dim=0, index_topk=0)
    assert Generator(v3, GenerateConfig())._empty_cache(2, SLOTS, 1)[0].index_keys is None
    assert cache_bytes_per_token(CFG, jnp.float32) == cache_bytes_per_token(v3, jnp.float32) + 2 * 16 * 4


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_write_index_puts_each_key_in_its_slots_column(dtype):
    """Ragged starts, a write running past a row's last slot dropped (never into another row's columns), the
    other slots untouched; `index_view` gives [B, I, S] in the keys' dtype (bf16 held as its bits)."""
    b, s, i, t = 3, 6, 4, 2
    cache = LatentCache.empty(b, s, 8, jnp.float32, index_dim=i, index_dtype=dtype)
    cache = cache.replace(index_keys=stored(jnp.full((b * i, s), -1.0, dtype)))
    keys = jnp.arange(b * t * i, dtype=jnp.float32).reshape(b, t, i)
    written = cache.write_index(keys, jnp.array([0, 4, 5], jnp.int32))
    assert written.index_keys.dtype == cache.index_keys.dtype and written.index_view().dtype == dtype
    got = np.asarray(written.index_view().astype(jnp.float32))
    want = np.full((b, i, s), -1.0, np.float32)
    for row, start in enumerate([0, 4, 5]):
        for j in range(t):
            if start + j < s:
                want[row, :, start + j] = np.asarray(keys[row, j])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("t", [1, 2, 16])
def test_index_scores_over_transposed_keys_is_the_same_function(t):
    """The cache's transposed keys ([B, I, S], `LatentCache.index_keys`) give the scores of the keys as rows
    beyond float32 summation order, -inf where the key is not visible included."""
    k = jax.random.split(jax.random.PRNGKey(7), 3)
    q, w = jax.random.normal(k[0], (2, t, 4, 32)), jax.random.normal(k[1], (2, t, 4))
    keys = jax.random.normal(k[2], (2, 96, 32))
    positions = jnp.array([[60 + i for i in range(t)], [3 + i for i in range(t)]], jnp.int32)
    a, b = index_scores(q, w, keys, positions, None), index_scores(q, w, keys.swapaxes(1, 2), positions, None, True)
    assert jnp.array_equal(jnp.isinf(a), jnp.isinf(b)) and int(jnp.isinf(a).sum()) > 0
    np.testing.assert_allclose(jnp.where(jnp.isinf(a), 0, a), jnp.where(jnp.isinf(b), 0, b), rtol=1e-5, atol=1e-5)


def test_bfloat16_cached_keys_score_in_bfloat16_with_float32_sums():
    """A bf16 cache's keys meet q rounded to bf16: every product exact, summed in f32, so the scores are those of
    the widened operands up to summation order."""
    k = jax.random.split(jax.random.PRNGKey(8), 3)
    q, w = jax.random.normal(k[0], (2, 1, 4, 32)), jax.random.normal(k[1], (2, 1, 4))
    keys = jax.random.normal(k[2], (2, 32, 96)).astype(jnp.bfloat16)
    positions = jnp.array([[60], [3]], jnp.int32)
    got = index_scores(q, w, keys, positions, None, True)
    want = index_scores(q.astype(jnp.bfloat16).astype(jnp.float32), w, keys.astype(jnp.float32), positions, None, True)
    assert got.dtype == jnp.float32 and jnp.array_equal(jnp.isinf(got), jnp.isinf(want))
    np.testing.assert_allclose(jnp.where(jnp.isinf(got), 0, got), jnp.where(jnp.isinf(want), 0, want), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("chunks", [1, 4, 16])
def test_select_cached_from_start_is_the_same_selection(chunks):
    """A prefill from an empty cache scores each query block against the slots up to its end only: the same
    indices as scoring every slot, NONE slots included (early queries see fewer than topk keys)."""
    k = jax.random.split(jax.random.PRNGKey(3), 3)
    t, s = 64, 80  # slots past the prompt: room for the tokens to come
    q, w = jax.random.normal(k[0], (2, t, 4, 16)), jax.random.normal(k[1], (2, t, 4))
    keys = jax.random.normal(k[2], (2, 16, s))  # as a cache holds them: [B, I, S]
    positions = jnp.broadcast_to(jnp.arange(t), (2, t))
    full = select_cached(q, w, keys, positions, 12, chunks)
    assert (full == -1).any() and (full >= 0).any()
    assert jnp.array_equal(select_cached(q, w, keys, positions, 12, chunks, from_start=True), full)


def test_sparse_attention_reads_packed_fp8_rows_as_their_dequantised_values():
    """The sparse op gathers packed rows and dequantises only those: the same as over the dequantised cache."""
    rng = np.random.RandomState(0)
    b, t, s, h, n, c, r = 2, 3, 20, 2, 8, 16, 8
    f = lambda *shape: jnp.asarray(rng.randn(*shape), jnp.float32)
    packed = fp8_cache.quantize_rows(f(b, s, c + r), c)
    positions = jnp.asarray([[17, 18, 19], [5, 6, 7]], jnp.int32)
    indices = select(jnp.where(visible(positions, None, s), f(b, t, s), -jnp.inf), 6)
    args = (f(b, t, h, n), f(b, t, h, r))
    w = KvWeights(f(c, h, n + 8))
    got = sparse_attention(*args, packed, positions, None, indices, w, 0.3)
    want = sparse_attention(*args, fp8_cache.dequantize_rows(packed, c, r, jnp.float32), positions, None, indices, w,
                            0.3)
    np.testing.assert_array_equal(got, want)


def test_fp8_cache_decodes_near_the_full_model(variables, tokens, full):
    """E4M3 latents (and selections they may move at the top-k boundary): close, not equal."""
    got, _ = _teacher_forced(CFG, variables, tokens, 20, FP8)
    assert np.abs(got - full).max() < 0.15 * np.abs(full).max()


def _greedy_by_full_forwards(variables, prompt, n):
    """Greedy decoding by uncached forwards of a fixed-width buffer (causal: what lies past the cursor is
    irrelevant), the reference."""
    buf = np.zeros((1, L + 8), np.int32)
    buf[0, : len(prompt)] = prompt
    fwd = jax.jit(lambda v, t: Transformer(CFG).apply(v, t))
    for cursor in range(len(prompt), len(prompt) + n):
        buf[0, cursor] = int(jnp.argmax(fwd(variables, buf)[0, cursor - 1]))
    return buf[0, len(prompt): len(prompt) + n].tolist()


def test_greedy_and_speculative_generation_equal_the_full_model(variables):
    prompts = [[3, 1, 4, 1, 5], list(range(30, 50))]
    plain = generate(CFG, variables, prompts, GenerateConfig(max_new_tokens=16))
    assert plain.tokens == [_greedy_by_full_forwards(variables, p, 16) for p in prompts]
    spec = generate(CFG, variables, prompts, GenerateConfig(max_new_tokens=16, speculative="mtp"))
    assert spec.tokens == plain.tokens  # MTP modules have indexers too: their caches carry keys the same way


def test_infer_decodes_from_a_dsa_checkpoint(variables, tmp_path, capsys):
    save_hf_checkpoint(CFG, variables, str(tmp_path))
    flags = dict(checkpoint=str(tmp_path), prompt=["the quick brown"], prompts_file=None, prompt_ids=[],
                 tokenizer="byte", max_new_tokens=12, temperature=0.0, top_p=1.0, top_k=0, seed=0,
                 speculative="none", compare_plain=True, weights="fp32", steps_per_call=8, experts="auto",
                 attention="auto", json=True, kv_cache=None, index_cache=None)
    out = cli.run(types.SimpleNamespace(**flags))
    assert out["tokens"] == _greedy_by_full_forwards(variables, list(b"the quick brown"), 12)
    assert out["kv_cache_bytes_per_token"] == cache_bytes_per_token(CFG, jnp.float32)
    # --index_cache bf16: the keys in half the bytes; the decode the same here (greedy over 12 tokens)
    narrow = cli.run(types.SimpleNamespace(**{**flags, "index_cache": "bf16"}))
    saved = out["kv_cache_bytes_per_token"] - narrow["kv_cache_bytes_per_token"]
    assert saved == CFG.num_layers * CFG.index_head_dim * 2
    assert narrow["tokens"] == out["tokens"]
    g = Generator(CFG, GenerateConfig(), None, index_dtype=jnp.bfloat16)
    assert g._empty_cache(1, SLOTS, 1)[0].index_view().dtype == jnp.bfloat16
    with pytest.raises(GenerationError, match="the indexer's key cache stores float32 or bfloat16, got float16"):
        Generator(CFG, GenerateConfig(), None, index_dtype=jnp.float16)


def test_infer_refuses_an_unknown_index_cache_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "infer.py", "--checkpoint", str(tmp_path), "--index_cache=fp8"],
                       capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "infer.py: --index_cache='fp8': expected one of fp32, bf16 (unset: as --kv_cache)"]
