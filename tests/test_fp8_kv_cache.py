"""The FP8 latent cache end to end: the pallas_call kernel body (backend "interpret", the code "triton" lowers)
reading packed rows against the reference on the same rows, dense and paged; which backends read it; the engine
storing and reading it in prefill, decode and MTP drafting; infer.py --kv_cache."""
import functools
import json
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
from dsv3_jax.infer.engine import GenerateConfig, Generator, cache_bytes_per_token, generate, pad_prompts
from dsv3_jax.layers.cache import FP8, LatentCache
from dsv3_jax.model import Transformer, init_variables
from dsv3_jax.ops import attention as attention_op
from dsv3_jax.ops import dispatch
from dsv3_jax.runtime import Runtime
from pallas_kernels.mla_decode import MlaDecodeConfig, fp8_cache, mla_decode, mla_decode_reference, supports
from pallas_kernels.mla_decode import interpret as interpret_backend
from pallas_kernels.mla_decode import plan as decode_plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTHS = (0, 1, 63, 64, 65, 130)  # empty, one row, around a 64-block edge, two blocks and a bit
SCALE = 0.125
BLOCK_S = 64


def _packed(seed, batch, sq, heads, c, r, s_len, dtype):
    """q and a packed cache whose 128-value tiles differ in size by 10^3, so a scale read for the wrong
    tile (or the wrong row) shows."""
    kq, kc = jax.random.split(jax.random.key(seed))
    q = jax.random.normal(kq, (batch, sq, heads, c + r), jnp.float32).astype(dtype)
    tile_size = jnp.where(jnp.arange(c + r) < c, 10.0 ** (jnp.arange(c + r) // 128 % 3 - 1.0), 1.0)
    rows = jax.random.normal(kc, (batch, s_len, c + r), jnp.float32) * tile_size
    return q, fp8_cache.quantize_rows(rows, c)


def _close(got, want, dtype):
    tol = 2e-5 if dtype == jnp.float32 else 3e-2  # bfloat16: the dequantised block and P rounded to 8 bits
    scale = float(jnp.abs(want.astype(jnp.float32)).max())
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol * scale, rtol=tol)


@pytest.mark.parametrize("c,r,sq,dtype", [
    (256, 32, 1, jnp.bfloat16),  # two tiles of very different scales
    (200, 8, 2, jnp.float32),  # a short last tile (72 values)
])
def test_kernel_reads_the_packed_cache_as_the_reference_does(c, r, sq, dtype):
    q, cache = _packed(0, len(LENGTHS), sq, 4, c, r, 192, dtype)
    lengths = jnp.array(LENGTHS, jnp.int32)
    decode = functools.partial(mla_decode, q, lengths=lengths, v_dim=c, softmax_scale=SCALE, backend="interpret",
                               config=MlaDecodeConfig(num_splits=2))
    got = decode(cache)
    want = mla_decode_reference(q, cache, lengths, v_dim=c, softmax_scale=SCALE)
    assert got.shape == (len(LENGTHS), sq, 4, c) and got.dtype == dtype
    _close(got, want, dtype)
    assert np.all(np.asarray(got[0]) == 0) and np.all(np.asarray(got[1, : sq - 1]) == 0)  # nothing to see
    # 0xFF bytes (E4M3 NaN codes, NaN scales and rope values) in every row past each sequence's end never leak.
    poisoned = jnp.where(jnp.arange(192)[None, :, None] < lengths[:, None, None], cache, jnp.uint8(255))
    np.testing.assert_array_equal(np.asarray(decode(poisoned)), np.asarray(got))


def _shuffled_pages(cache, lengths, blocks, spare, seed):
    """The packed cache scattered over random physical pages among `spare` extra (zero) ones; the table entries
    past a sequence's end point nowhere (-7): they must never be read."""
    batch = cache.shape[0]
    perm = np.random.default_rng(seed).permutation(batch * blocks + spare)
    table = perm[: batch * blocks].reshape(batch, blocks)
    pages = jnp.zeros((len(perm), BLOCK_S, cache.shape[-1]), cache.dtype)
    pages = pages.at[table.reshape(-1)].set(cache.reshape(batch * blocks, BLOCK_S, -1))
    table = np.where(np.arange(blocks)[None, :] * BLOCK_S < np.asarray(lengths)[:, None], table, -7)
    return pages, jnp.asarray(table, jnp.int32)


def test_paged_packed_cache_with_a_shuffled_block_table(sq=2):
    c, r, blocks = 256, 16, 3
    q, cache = _packed(1, len(LENGTHS), sq, 4, c, r, blocks * BLOCK_S, jnp.float32)
    lengths = jnp.array(LENGTHS, jnp.int32)
    pages, table = _shuffled_pages(cache, LENGTHS, blocks, 4, seed=1)
    config = MlaDecodeConfig(num_splits=2)
    layout = interpret_backend.make_plan(q.shape, cache.shape, c, config)
    run = functools.partial(interpret_backend.run, config=config)
    got = jax.jit(lambda *a: decode_plan.decode_pages(*a, softmax_scale=SCALE, plan=layout, run=run))(
        q, pages, table, lengths)
    _close(got, mla_decode_reference(q, cache, lengths, v_dim=c, softmax_scale=SCALE), jnp.float32)


def test_which_backends_read_the_packed_cache():
    q_shape, cache_shape = (2, 1, 16, 576), (2, 256, 656)  # V3's rows: 656 bytes
    for backend in ("xla", "interpret", "triton", "mosaic_gpu"):
        assert supports(q_shape, cache_shape, jnp.uint8, v_dim=512, backend=backend) is None, backend
    # Mosaic GPU TMA-copies the rows in 16-byte units: C = 256 gives 392-byte rows.
    reason = supports((2, 1, 16, 320), (2, 256, 392), jnp.uint8, v_dim=256, backend="mosaic_gpu")
    assert reason.startswith("mosaic_gpu: an FP8 cache needs v_dim 512") and "\n" not in reason


def test_triton_lowers_the_packed_cache_for_cuda():
    """Pallas' Triton lowering (run on this CPU by jax.export) takes the packed read: strided byte loads and
    same-width bitcasts only."""
    target = "__gpu$xla.gpu.triton"
    s = jax.ShapeDtypeStruct
    args = (s((2, 2, 16, 576), jnp.bfloat16), s((2, 256, 656), jnp.uint8), s((2,), jnp.int32))
    fn = lambda *a: mla_decode(*a, v_dim=512, softmax_scale=576 ** -0.5, backend="triton")
    exp = jax.export.export(jax.jit(fn), platforms=["cuda"],
                            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(target)])(*args)
    assert f"stablehlo.custom_call @{target}" in exp.mlir_module()


# ------------------------------------------------------------------------------------------------ the model

CFG = ModelConfig.from_json("tiny")
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], list(range(20, 90))]  # ragged; the last spans two prefill buckets


@pytest.fixture(scope="module")
def variables():
    return init_variables(CFG, jax.random.PRNGKey(0))


def test_engine_stores_packed_rows_in_every_cache_and_halves_the_bytes(variables):
    tokens, lengths = pad_prompts(PROMPTS)
    g = Generator(CFG, GenerateConfig(speculative="mtp"), cache_dtype=FP8)
    state, _ = jax.eval_shape(functools.partial(g._prefill, cache_len=128), variables, tokens, lengths)
    width = fp8_cache.row_bytes(CFG.kv_lora_rank, CFG.qk_rope_head_dim)  # 16 + 4 + 16 = 36 bytes
    for c in state.cache + state.mtp_cache:
        assert c.rows.dtype == jnp.uint8 and c.rows.shape == (3 * 128, width) and c.fp8_dims == (16, 8)
    assert cache_bytes_per_token(CFG, FP8) == CFG.num_layers * width
    v3 = ModelConfig.from_json("deepseek_v3_671b")
    assert cache_bytes_per_token(v3, FP8) == 61 * 656 and cache_bytes_per_token(v3, jnp.bfloat16) == 61 * 1152


def _step(rt):
    return lambda v, t, p, c: Transformer(CFG, rt).apply(v, t, p, c, method=Transformer.step)


def _primitives(jaxpr) -> set[str]:
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for p in eqn.params.values():
            for sub in p if isinstance(p, (list, tuple)) else (p,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    names |= _primitives(sub)
    return names


def test_decode_reads_the_packed_cache_through_the_kernel_and_jnp_alike(variables, t=2):
    """A prefill and a decode window of 2 over an FP8 cache: the kernel path (interpret) and the jnp path
    (absorbed) give the same logits and caches. (How far both are from an unquantised cache's logits:
    benchmarks/fp8_cache_accuracy.py.)"""
    s = 96
    tokens = jax.random.randint(jax.random.PRNGKey(3), (3, s), 0, CFG.vocab_size)
    v = Transformer(CFG).prepare_decode(variables)
    positions = jnp.array([0, 40, 90])[:, None] + jnp.arange(t)
    out = {}
    for name, rt in (("kernel", Runtime(kernel_backend="interpret")), ("jnp", Runtime())):
        cache = Generator(CFG, GenerateConfig(), cache_dtype=FP8)._empty_cache(3, s, CFG.num_layers)
        _, _, cache = jax.jit(_step(rt))(v, tokens, jnp.broadcast_to(jnp.arange(s), (3, s)), cache)
        prims = _primitives(jax.make_jaxpr(_step(rt))(v, tokens[:, :t], positions, cache).jaxpr)
        assert ("pallas_call" in prims) == (name == "kernel"), name
        out[name] = jax.jit(_step(rt))(v, tokens[:, :t], positions, cache)
    (logits_k, _, cache_k), (logits_j, _, cache_j) = out["kernel"], out["jnp"]
    np.testing.assert_allclose(logits_k, logits_j, rtol=1e-5, atol=1e-5)
    assert all(c.rows.dtype == jnp.uint8 for c in cache_k + cache_j)
    np.testing.assert_array_equal(np.asarray(cache_k[0].rows), np.asarray(cache_j[0].rows))  # before any attention
    # Later layers' inputs differ by float rounding, which may move a value across an E4M3 rounding boundary.
    for a, b in zip(cache_k[1:], cache_j[1:], strict=True):
        back = lambda x: fp8_cache.dequantize_rows(x.rows, *x.fp8_dims, jnp.float32)
        np.testing.assert_allclose(back(a), back(b), rtol=0.13, atol=1e-6)


def test_a_backend_that_cannot_read_it_falls_back_with_its_reason():
    q_shape, kv_shape = (2, 1, CFG.num_heads, CFG.kv_cache_dim), (2, 64, 36)
    rt = Runtime(kernel_backend="mosaic_gpu", platform="gpu")
    name, _ = dispatch.attention(rt, CFG, cached=True, q_shape=q_shape, kv_shape=kv_shape, kv_dtype=jnp.uint8,
                                 sorted_positions=False)
    assert name == attention_op.ABSORBED
    with pytest.raises(ValueError, match="mosaic_gpu: an FP8 cache needs v_dim 512"):
        dispatch.attention(rt.replace(attention=attention_op.LATENT_KERNEL), CFG, cached=True, q_shape=q_shape,
                           kv_shape=kv_shape, kv_dtype=jnp.uint8, sorted_positions=False)


@pytest.fixture(scope="module")
def bf16_tokens(variables):
    """Greedy tokens over a bfloat16 cache (MTP drafting, which under greedy is plain greedy decoding)."""
    return generate(CFG, variables, PROMPTS, GenerateConfig(max_new_tokens=10, speculative="mtp"),
                    cache_dtype=jnp.bfloat16).tokens


def test_fp8_cache_decodes_the_greedy_tokens_of_a_bfloat16_one(variables, bf16_tokens):
    """MTP drafting over FP8 caches (main and MTP); plain decoding with one is test_infer_main_with_an_fp8_cache."""
    got = generate(CFG, variables, PROMPTS, GenerateConfig(max_new_tokens=10, speculative="mtp"), cache_dtype=FP8)
    assert got.tokens == bf16_tokens and [len(t) for t in got.tokens] == [10] * 3 and got.drafted > 0


def test_cache_write_packs_each_row_on_its_own():
    """Each token quantised with its own scales, into its own slot; a window past a row's end is cut there."""
    rows = np.asarray(jax.random.normal(jax.random.key(5), (2, 3, 24))) * np.array([1.0, 100.0])[:, None, None]
    write = jax.jit(lambda new, start: LatentCache.empty(2, 4, 24, FP8, latent_dim=16).write(new, start).view())
    packed = np.asarray(write(rows, jnp.array([2, 1])))
    np.testing.assert_array_equal(packed[0, 2:], np.asarray(fp8_cache.quantize_rows(rows[0, :2], 16)))
    np.testing.assert_array_equal(packed[1, 1:], np.asarray(fp8_cache.quantize_rows(rows[1], 16)))
    assert not packed[0, :2].any() and not packed[1, 0].any()  # untouched slots
    with pytest.raises(ValueError, match="needs latent_dim"):
        LatentCache.empty(2, 4, 24, FP8)


# ------------------------------------------------------------------------------------------------- infer.py

@pytest.fixture(scope="module")
def checkpoint(variables, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    save_hf_checkpoint(CFG, variables, str(path))
    return str(path)


class _Flags(types.SimpleNamespace):
    def __getitem__(self, name):  # absl's FLAGS["verbosity"].present
        return types.SimpleNamespace(present=True)


def _flags(**kw):
    base = dict(checkpoint=None, prompt=[], prompts_file=None, prompt_ids=[], tokenizer="byte", max_new_tokens=10,
                temperature=0.0, top_p=1.0, top_k=0, seed=0, speculative="none", compare_plain=True, weights="fp32",
                steps_per_call=8, experts="auto", attention="auto", kv_cache=None, index_cache=None, json=True)
    return _Flags(**{**base, **kw})


@pytest.fixture
def keep_xla_flags(monkeypatch):
    """infer's main adds its decode XLA flags to the environment: keep them out of later tests."""
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))


def test_infer_main_with_an_fp8_cache(checkpoint, bf16_tokens, capsys, keep_xla_flags):
    prompt = ",".join(map(str, PROMPTS[0]))
    cli.main(["infer.py"], _flags(checkpoint=checkpoint, prompt_ids=[prompt], kv_cache="fp8"))
    out = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert out["kv_cache"] == "fp8" and out["kv_cache_bytes_per_token"] == CFG.num_layers * 36  # float32: 96
    assert out["tokens"] == bf16_tokens[0]


def test_infer_py_bad_kv_cache_is_one_line_and_status_2(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(REPO, "infer.py"), f"--checkpoint={tmp_path}", "--prompt=x",
                        "--kv_cache=fp16"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [
        "infer.py: --kv_cache='fp16': expected one of bf16, fp8 (unset: the compute dtype)"]
