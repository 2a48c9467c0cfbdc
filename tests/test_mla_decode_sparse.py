"""Sparse MLA decode (DeepSeek-V3.2 DSA, FlashMLA's sparse layout): the plain-jnp reference against the model's
`ops.sparse_attention._sparse_core` and against the dense decode; the kernels ("interpret", and "mosaic_tpu" in
jax's TPU interpreter) against the reference on ragged selections (-1 slots: none, some, all), top-k not a
multiple of the block, 16 and 128 heads, Sq 1 and 2, F32, BF16 and packed FP8 caches, rows never selected
poisoned; the paged form; refusals; and the TPU kernel compiled by libtpu for v5e, v5p, v6e and TPU7x.
"""
import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import topologies
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh, PartitionSpec

from dsv3_jax.ops.sparse_attention import _sparse_core, sparse_attention
from pallas_kernels.mla_decode import (
    MlaDecodeConfig,
    fp8_cache,
    mla_decode_reference,
    mla_decode_sparse,
    mla_decode_sparse_paged,
    mla_decode_sparse_reference,
    mosaic_tpu,
    sparse,
    sparse_backend,
    supports_sparse,
    supports_sparse_paged,
)

SCALE = 0.125
BF16, F32 = jnp.bfloat16, jnp.float32
TOL = {F32: dict(atol=2e-5, rtol=2e-5), BF16: dict(atol=3e-2, rtol=3e-2)}
_reference = jax.jit(mla_decode_sparse_reference, static_argnames=("v_dim", "softmax_scale"))
_quantize = jax.jit(fp8_cache.quantize_rows, static_argnums=1)


@pytest.fixture(autouse=True)
def tpu_interpreter():
    """jax's TPU interpreter keeps global state that must be reset after a failed kernel."""
    pltpu.reset_tpu_interpret_mode_state()
    yield
    pltpu.reset_tpu_interpret_mode_state()


def _selection(seed, batch, sq, s_len, topk):
    """Distinct slots in [1, S) per query, ragged: query (0, 0) has none, (b, 1) loses its second half, every
    third slot of (b > 0, 0) is -1, and one slot is past the cache (S + 3: none too)."""
    rng = np.random.default_rng(seed)
    idx = np.stack([[rng.permutation(np.arange(1, s_len))[:topk] for _ in range(sq)] for _ in range(batch)])
    idx[0, 0] = -1
    if sq > 1:
        idx[:, 1, topk // 2:] = -1
    idx[1:, 0, ::3] = -1
    idx[-1, -1, 0] = s_len + 3
    return idx.astype(np.int32)


def _poisoned(cache, idx):
    """Rows no query of their sequence selects (row 0 among them, which stands in for -1 slots) set to NaN, or
    all bytes 0xFF in a packed FP8 cache (NaN codes and scales)."""
    keep = np.zeros(cache.shape[:2], bool)
    for b in range(cache.shape[0]):
        sel = idx[b][(idx[b] >= 0) & (idx[b] < cache.shape[1])]
        keep[b, sel] = True
    bad = jnp.uint8(255) if cache.dtype == jnp.uint8 else jnp.nan
    return jnp.where(jnp.asarray(keep)[..., None], cache, bad).astype(cache.dtype)


def _inputs(seed, batch, sq, heads, c, r, s_len, dtype, fp8=False):
    kq, kc = jax.random.split(jax.random.key(seed))
    q = jax.random.normal(kq, (batch, sq, heads, c + r), F32).astype(dtype)
    rows = jax.random.normal(kc, (batch, s_len, c + r), F32)
    return q, (_quantize(rows, c) if fp8 else rows.astype(dtype))


def _close(got, want, dtype):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **TOL[dtype])


# ------------------------------------------------------------------------------------------ the reference


@pytest.mark.parametrize("fp8", [False, True], ids=["f32", "fp8"])
def test_reference_matches_the_models_sparse_core(fp8):
    c, r = 64, 16
    q, cache = _inputs(0, 3, 2, 4, c, r, 40, F32, fp8)
    idx = _selection(0, 3, 2, 40, 12)
    idx[-1, -1, 0] = -1  # _sparse_core reads no out-of-range slot; the op treats one as -1 (tested below)
    ok = jnp.asarray(idx >= 0)
    want, _ = _sparse_core(q, cache, ok, jnp.asarray(idx), SCALE, c)
    got = _reference(q, cache, jnp.asarray(idx), v_dim=c, softmax_scale=SCALE)
    some = np.asarray(ok).any(-1)  # _sparse_core averages its stand-in rows where a query has no slot
    np.testing.assert_allclose(np.asarray(got)[some], np.asarray(want)[some], atol=2e-5, rtol=2e-5)
    assert not some[0, 0] and np.all(np.asarray(got[0, 0]) == 0)  # FlashMLA's zeros for an empty selection


def test_reference_is_the_dense_decode_when_the_selection_is_the_prefix():
    """All slots < L, shuffled and padded with -1 and out-of-range slots, is the dense decode of length L."""
    q, cache = _inputs(1, 3, 1, 4, 64, 16, 50, F32)
    lengths = np.array([5, 31, 50])
    rng = np.random.default_rng(1)
    idx = np.full((3, 1, 56), -1, np.int32)
    for b, n in enumerate(lengths):
        idx[b, 0, :n] = rng.permutation(n)
    idx[0, 0, 50:] = 50 + np.arange(6)  # past the cache: none
    got = _reference(q, cache, jnp.asarray(rng.permuted(idx, axis=-1)), v_dim=64, softmax_scale=SCALE)
    want = mla_decode_reference(q, cache, jnp.asarray(lengths, jnp.int32), v_dim=64, softmax_scale=SCALE)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=2e-6)


# ------------------------------------------------------------------------------ the kernels, interpreted


def _tpu(**kw):
    return MlaDecodeConfig(interpret=pltpu.InterpretParams(), **kw)


# backend, cache dtype ("fp8": packed rows, q in bfloat16), Sq, heads, C, R, top-k, config. S = 96.
KERNEL_CASES = {
    "interpret_f32_t1_h16_default": ("interpret", F32, 1, 16, 64, 16, 70, None),
    "interpret_bf16_t2_h16_two_splits": ("interpret", BF16, 2, 16, 64, 16, 70, MlaDecodeConfig(block_s=32,
                                                                                                 num_splits=2)),
    "interpret_bf16_t2_h128_head_blocks": ("interpret", BF16, 2, 128, 64, 16, 40, MlaDecodeConfig(block_s=16)),
    "interpret_fp8_t2_h16": ("interpret", "fp8", 2, 16, 128, 64, 70, MlaDecodeConfig(block_s=32)),
    "interpret_f32_t1_h16_v3_dims": ("interpret", F32, 1, 16, 512, 64, 24, MlaDecodeConfig(block_s=16)),
    "mosaic_tpu_f32_dma_t2_h16_two_splits": ("mosaic_tpu", F32, 2, 16, 128, 64, 70, _tpu(block_s=16, num_splits=2)),
    "mosaic_tpu_bf16_t1_h128": ("mosaic_tpu", BF16, 1, 128, 128, 64, 40, _tpu(block_s=16)),
    "mosaic_tpu_fp8_t2_h16": ("mosaic_tpu", "fp8", 2, 16, 128, 64, 70, _tpu(block_s=32)),
}


@pytest.mark.parametrize("case", KERNEL_CASES)
def test_kernel_matches_reference_on_ragged_selections(case):
    backend, dtype, sq, heads, c, r, topk, config = KERNEL_CASES[case]
    fp8 = dtype == "fp8"
    dtype = BF16 if fp8 else dtype
    q, cache = _inputs(2, 3, sq, heads, c, r, 96, dtype, fp8)
    idx = _selection(2, 3, sq, 96, topk)
    assert supports_sparse(q.shape, cache.shape, idx.shape, cache.dtype, v_dim=c, backend=backend,
                           config=config) is None
    got = mla_decode_sparse(q, _poisoned(cache, idx), jnp.asarray(idx), v_dim=c, softmax_scale=SCALE,
                            backend=backend, config=config)
    want = _reference(q, cache, jnp.asarray(idx), v_dim=c, softmax_scale=SCALE)
    assert got.shape == (3, sq, heads, c) and got.dtype == dtype
    assert np.all(np.isfinite(np.asarray(got, np.float32)))  # rows not selected (and row 0) never leak
    _close(got, want, dtype)
    assert np.all(np.asarray(got[0, 0]) == 0) and np.abs(np.asarray(got[1, 0], np.float32)).max() > 0.05


@pytest.mark.parametrize("backend,config", [("xla", None), ("interpret", MlaDecodeConfig(block_s=16)),
                                            ("mosaic_tpu", _tpu(block_s=16))])
def test_paged_indices_name_rows_of_the_flattened_pages(backend, config):
    """FlashMLA's paged form: sequence b's slot s lives at page table[b, s // page] row s % page; the indices
    are page * page_size + offset. Shuffled pages (the spare ones NaN) give the dense result."""
    page, batch, s_len = 16, 2, 64
    q, cache = _inputs(3, batch, 2, 16, 128, 64, s_len, F32)
    idx = _selection(3, batch, 2, s_len, 24)
    rng = np.random.default_rng(3)
    table = rng.permutation(batch * s_len // page + 3)[: batch * s_len // page].reshape(batch, -1)
    pages = jnp.full((batch * s_len // page + 3, page, cache.shape[-1]), jnp.nan, F32)
    pages = pages.at[table.reshape(-1)].set(cache.reshape(-1, page, cache.shape[-1]))
    inside = (idx >= 0) & (idx < s_len)
    safe = np.where(inside, idx, 0)
    flat = np.where(inside, np.take_along_axis(table, safe.reshape(batch, -1) // page, 1).reshape(idx.shape) * page
                    + safe % page, -1)
    assert supports_sparse_paged(q.shape, pages.shape, flat.shape, F32, v_dim=128, backend=backend,
                                 config=config) is None
    got = mla_decode_sparse_paged(q, pages, jnp.asarray(flat), v_dim=128, softmax_scale=SCALE, backend=backend,
                                  config=config)
    want = _reference(q, cache, jnp.asarray(idx), v_dim=128, softmax_scale=SCALE)
    _close(got, want, F32)


# ------------------------------------------------------------------------------------------------ refusals

Q, CACHE, IDX = (2, 1, 16, 192), (2, 64, 192), (2, 1, 32)
REFUSALS = {
    "mosaic_gpu": (Q, CACHE, IDX, BF16, 128, "mosaic_gpu", None, "mosaic_gpu: no sparse kernel: Hopper's TMA"),
    "triton_block": (Q, CACHE, IDX, BF16, 128, "triton", MlaDecodeConfig(block_s=24),
                     "triton: block_s must be a power of two, got 24"),
    "triton_pow2": ((2, 1, 16, 96), (2, 64, 96), IDX, BF16, 80, "triton", None,
                    "triton: v_dim must be a power of two, got 80"),
    "tpu_lanes": ((2, 1, 16, 96), (2, 64, 96), IDX, BF16, 64, "mosaic_tpu", None,
                  "mosaic_tpu: v_dim must be a multiple of 128"),
    "tpu_smem": ((64, 2, 16, 192), (64, 64, 192), (64, 2, 2048), BF16, 128, "mosaic_tpu", None,
                 "mosaic_tpu: the slots of the sparse decode take 1048576 bytes of SMEM"),
    "indices_shape": (Q, CACHE, (2, 2, 32), BF16, 128, "xla", None, "indices must be [B, Sq, topk]"),
    "empty_topk": (Q, CACHE, (2, 1, 0), BF16, 128, "xla", None, "with topk > 0"),
    "gpu_interpreter": (Q, CACHE, IDX, BF16, 128, "mosaic_tpu", MlaDecodeConfig(interpret=True),
                        "interpret it with config.interpret=pltpu.InterpretParams()"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_are_one_clear_line_and_raised(case):
    q_shape, cache_shape, idx_shape, dtype, v_dim, backend, config, want = REFUSALS[case]
    reason = supports_sparse(q_shape, cache_shape, idx_shape, dtype, v_dim=v_dim, backend=backend, config=config)
    assert reason is not None and want in reason and "\n" not in reason
    q = jnp.zeros(q_shape, BF16 if dtype == jnp.uint8 else dtype)
    with pytest.raises(ValueError, match=re.escape(reason)):
        mla_decode_sparse(q, jnp.zeros(cache_shape, dtype), jnp.zeros(idx_shape, jnp.int32), v_dim=v_dim,
                          softmax_scale=SCALE, backend=backend, config=config)


def test_argument_errors_and_auto():
    q, cache = jnp.zeros(Q, BF16), jnp.zeros(CACHE, BF16)
    with pytest.raises(ValueError, match="indices must be integers"):
        mla_decode_sparse(q, cache, jnp.zeros(IDX, F32), v_dim=128, softmax_scale=SCALE, backend="xla")
    with pytest.raises(ValueError, match="q dtype float32 != cache dtype bfloat16"):
        mla_decode_sparse(q.astype(F32), cache, jnp.zeros(IDX, jnp.int32), v_dim=128, softmax_scale=SCALE)
    with pytest.raises(ValueError, match=r"pages must be non-empty \[P, page_size, C\+R\]"):
        mla_decode_sparse_paged(q, jnp.zeros((4, 16), BF16), jnp.zeros(IDX, jnp.int32), v_dim=128,
                                softmax_scale=SCALE, backend="xla")
    assert sparse_backend("auto") == "xla" and sparse_backend("mosaic_gpu") == "mosaic_gpu"  # this CPU host
    assert sparse.SPARSE_STAND_IN == {"mosaic_gpu": "triton"}  # "auto" on Hopper: triton's pointer gathers
    idx = jnp.asarray(_selection(4, 2, 1, 64, 32))
    q, cache = _inputs(4, 2, 1, 16, 128, 64, 64, F32)
    auto = mla_decode_sparse(q, cache, idx, v_dim=128, softmax_scale=SCALE)
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(_reference(q, cache, idx, v_dim=128,
                                                                           softmax_scale=SCALE)))


# ------------------------------------------------------------------------ compiled by libtpu, compile-only

TOPOLOGIES = {"v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2", "tpu7x": "tpu7x:2x2x1"}
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="compile-only TPU devices need libtpu: pip install 'jax[tpu]==0.10.2'")


def _compile_on(target: str, fn, *args):
    """Compile `fn` for one chip of `target`: a Pallas TPU call must sit inside a shard_map over TPU devices."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling drives no chip; do not wait for a lock
    devices = topologies.get_topology_desc(platform="tpu", topology_name=target).devices
    mesh = Mesh(np.asarray(devices[:1]), ("x",))
    specs = tuple(PartitionSpec() for _ in args)
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=PartitionSpec(), check_vma=False)
    return jax.jit(mapped).lower(*args).compile()


# V3.2 decode: 128 heads, C = 512, R = 64, top-k 2048 of a 4096-token cache, 2 query positions (MTP); each
# generation compiles the DMA path (F32 rows) and one of the gathered ones (BF16, packed FP8).
COMPILE_CASES = [(g, d) for g in TOPOLOGIES for d in ("f32",)] + [("v5e", "fp8"), ("v6e", "bf16"),
                                                                   ("tpu7x", "fp8")]


@needs_libtpu
@pytest.mark.parametrize("generation,dtype", COMPILE_CASES)
def test_compiles_for_tpu_generations(generation, dtype):
    S = jax.ShapeDtypeStruct
    width = fp8_cache.row_bytes(512, 64) if dtype == "fp8" else 576
    cache_dtype = {"f32": F32, "bf16": BF16, "fp8": jnp.uint8}[dtype]
    q = S((2, 2, 128, 576), F32 if dtype == "f32" else BF16)
    cache, idx = S((2, 4096, width), cache_dtype), S((2, 2, 2048), jnp.int32)
    config = MlaDecodeConfig(block_s=64)
    assert supports_sparse(q.shape, cache.shape, idx.shape, cache.dtype, v_dim=512, backend="mosaic_tpu",
                           config=config) is None
    fn = lambda q, cache, idx: mla_decode_sparse(q, cache, idx, v_dim=512, softmax_scale=576**-0.5,
                                                 backend="mosaic_tpu", config=config)
    compiled = _compile_on(TOPOLOGIES[generation], fn, q, cache, idx)
    calls = [line for line in compiled.as_text().splitlines() if 'custom_call_target="tpu_custom_call"' in line]
    assert len(calls) == 1, "one Pallas TPU kernel"
    # The VMEM it holds (XLA's scoped-memory record, memory space 1) fits every generation's default limit.
    used = re.search(r'"used_scoped_memory_configs":\[\{"memory_space":"1","offset":"0","size":"(\d+)"', calls[0])
    assert 0 < int(used.group(1)) <= mosaic_tpu.VMEM_BYTES


# --------------------------------------------------------------------------------------------- in the model


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


@pytest.mark.parametrize("fp8", [False, True], ids=["f32_cache", "fp8_cache"])
def test_dsa_decode_through_the_kernel_equals_the_jnp_path(fp8, monkeypatch):
    """A DSA model's cached decode steps (T = 1 and 2, a cache past index_topk so the attention is sparse) with
    kernel_backend "interpret" (the sparse kernel) and the default (jnp `sparse_attention`): the same logits."""
    from dsv3_jax.config import ModelConfig
    from dsv3_jax.infer.engine import GenerateConfig, Generator
    from dsv3_jax.layers.cache import FP8
    from dsv3_jax.model import Transformer, init_variables
    from dsv3_jax.ops import dispatch
    from dsv3_jax.runtime import Runtime

    cfg = ModelConfig.from_json("tiny").replace(index_n_heads=2, index_head_dim=16, index_topk=8)
    variables = Transformer(cfg).prepare_decode(init_variables(cfg, jax.random.PRNGKey(0)))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 24), 0, cfg.vocab_size)
    kernel, jnp_path = Runtime(kernel_backend="interpret"), Runtime()
    kv = (2, 64, cfg.kv_cache_dim), F32
    assert dispatch.cached_sparse_attention(jnp_path, cfg, 1, *kv) is sparse_attention  # CPU "auto": jnp
    assert dispatch.cached_sparse_attention(kernel, cfg, 1, *kv) is not sparse_attention
    assert dispatch.cached_sparse_attention(kernel, cfg, dispatch.DECODE_MAX_T + 1, *kv) is sparse_attention
    hopper = Runtime(platform="gpu", kernel_backend="mosaic_gpu")  # asked for by name: no sparse kernel, jnp
    assert dispatch.cached_sparse_attention(hopper, cfg, 1, *kv) is sparse_attention
    monkeypatch.setattr(dispatch, "kernel_backend", lambda rt: "mosaic_gpu")  # "auto" on a Hopper target
    assert dispatch.cached_sparse_attention(Runtime(platform="gpu"), cfg, 1, *kv).args == ("triton",)
    monkeypatch.undo()
    step = lambda rt: lambda v, t, p, c: Transformer(cfg, rt).apply(v, t, p, c, method=Transformer.step)
    cache = Generator(cfg, GenerateConfig(), FP8 if fp8 else None)._empty_cache(2, 64, cfg.num_layers)
    _, _, cache = jax.jit(step(jnp_path))(variables, tokens[:, :20], jnp.broadcast_to(jnp.arange(20), (2, 20)), cache)
    for t in (1, 2):
        args = (variables, tokens[:, 20:20 + t], jnp.broadcast_to(20 + jnp.arange(t), (2, t)), cache)
        out = {}
        for name, rt in (("kernel", kernel), ("jnp", jnp_path)):
            prims = _primitives(jax.make_jaxpr(step(rt))(*args).jaxpr)
            assert ("pallas_call" in prims) == (name == "kernel"), name
            out[name] = jax.jit(step(rt))(*args)
        np.testing.assert_allclose(out["kernel"][0], out["jnp"][0], rtol=2e-5, atol=2e-5)
