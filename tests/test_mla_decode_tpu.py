"""Backend "mosaic_tpu": the Pallas TPU MLA decode kernel in jax's TPU interpreter on the CPU against the plain-jnp
reference (dense and paged caches, BF16 and packed FP8 rows, ragged lengths, one split and several), its refusals,
and the kernel compiled by libtpu for v5e, v5p, v6e and TPU7x from this CPU host (compile-only devices).

The interpreter leaves VMEM scratch uninitialised as NaN, so a read before a write shows in the output.
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

from pallas_kernels.mla_decode import (
    MlaDecodeConfig,
    fp8_cache,
    mla_decode,
    mla_decode_paged,
    mla_decode_reference,
    mosaic_tpu,
    supports,
    supports_paged,
)

C, R = 128, 64  # the kernel takes whole 128-lane tiles of latent dims; R as V3's
SCALE = 0.125
TOL = dict(atol=3e-2, rtol=3e-2)  # bfloat16 inputs, P and output; FP8 keys are dequantised to bfloat16 in VMEM
BF16, F32 = jnp.bfloat16, jnp.float32


# Jitted: op by op, the reference and the packing compile each of their many small ops apart (seconds).
_reference = jax.jit(mla_decode_reference, static_argnames=("v_dim", "softmax_scale"))
_quantize = jax.jit(fp8_cache.quantize_rows, static_argnums=1)


def _config(**kw):
    return MlaDecodeConfig(interpret=pltpu.InterpretParams(), **kw)


@pytest.fixture(autouse=True)
def tpu_interpreter():
    """jax's TPU interpreter keeps global state that must be reset after a failed kernel."""
    pltpu.reset_tpu_interpret_mode_state()
    yield
    pltpu.reset_tpu_interpret_mode_state()


def _inputs(seed, batch, sq, heads, s_len, fp8):
    kq, kc = jax.random.split(jax.random.key(seed))
    q = jax.random.normal(kq, (batch, sq, heads, C + R), F32).astype(BF16)
    rows = jax.random.normal(kc, (batch, s_len, C + R), F32)
    return q, (_quantize(rows, C) if fp8 else rows.astype(BF16))


def _close(got, want):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **TOL)


def _poisoned(cache, lengths):
    """Garbage after each sequence's end: NaN rows (BF16), or all bytes 0xFF (FP8: NaN codes and NaN scales)."""
    past = (jnp.arange(cache.shape[1])[None, :] >= jnp.asarray(lengths)[:, None])[..., None]
    return jnp.where(past, jnp.uint8(255) if cache.dtype == jnp.uint8 else jnp.nan, cache).astype(cache.dtype)


# (Sq, heads, lengths, S, fp8, config) of the dense entry. Lengths: empty, one row (query 0 of 2 sees nothing),
# around the edges of 64- and 128-row blocks, full. Each case is one kernel compile (~2 s in the interpreter).
DENSE_CASES = {
    "bf16_t2_h16_two_splits": (2, 16, (0, 1, 63, 64, 65, 192), 192, False, dict(num_splits=2)),
    "fp8_t2_h16_three_splits": (2, 16, (1, 64, 129, 192), 192, True, dict(num_splits=3)),
    "fp8_t1_h128_one_split": (1, 128, (0, 127, 128, 256), 256, True, dict(block_s=128, num_splits=1)),
}


@pytest.mark.parametrize("case", DENSE_CASES)
def test_dense_matches_reference_and_garbage_past_length_never_leaks(case):
    sq, heads, lengths, s_len, fp8, config = DENSE_CASES[case]
    q, cache = _inputs(1, len(lengths), sq, heads, s_len, fp8)
    config = _config(**config)
    assert supports(q.shape, cache.shape, cache.dtype, v_dim=C, backend="mosaic_tpu", config=config) is None
    got = mla_decode(q, _poisoned(cache, lengths), jnp.array(lengths, jnp.int32), v_dim=C, softmax_scale=SCALE,
                     backend="mosaic_tpu", config=config)
    want = _reference(q, cache, jnp.array(lengths, jnp.int32), v_dim=C, softmax_scale=SCALE)
    assert got.shape == (len(lengths), sq, heads, C) and got.dtype == BF16
    assert np.all(np.isfinite(np.asarray(got, np.float32)))
    _close(got, want)
    for b in np.flatnonzero(np.asarray(lengths) == 0):  # nothing to see: exact zeros, not a 0/0
        assert np.all(np.asarray(got[b]) == 0)


def _shuffled_pages(cache, lengths, page, spare, seed):
    """The dense cache scattered to random pages among `spare` extra ones (pages not in use hold garbage); table
    entries past a sequence's end point nowhere (-3 and P + 5: clipped, never read)."""
    batch, s_len, width = cache.shape
    blocks = s_len // page
    rng = np.random.default_rng(seed)
    perm = rng.permutation(batch * blocks + spare)
    table = perm[: batch * blocks].reshape(batch, blocks)
    garbage = jnp.asarray(rng.integers(0, 256, (len(perm), page, width)), jnp.uint8)
    pages = garbage if cache.dtype == jnp.uint8 else jnp.full((len(perm), page, width), jnp.nan, cache.dtype)
    pages = pages.at[table.reshape(-1)].set(cache.reshape(batch * blocks, page, width))
    past = np.arange(blocks)[None, :] * page >= np.asarray(lengths)[:, None]
    table = np.where(past, np.where(np.arange(blocks) % 2, -3, len(perm) + 5), table)
    return pages, jnp.asarray(table, jnp.int32)


# fp8, page size, Sq, heads, splits (None: the default, one split here: batch x head blocks fill the cores).
@pytest.mark.parametrize("fp8,page,sq,heads,splits", [(False, 64, 2, 128, None), (True, 128, 1, 16, 2)])
def test_paged_with_shuffled_block_table(fp8, page, sq, heads, splits):
    lengths = (0, 1, page - 1, page + 1, 3 * page)
    q, cache = _inputs(2, len(lengths), sq, heads, 3 * page, fp8)
    lengths = jnp.array(lengths, jnp.int32)
    pages, table = _shuffled_pages(_poisoned(cache, lengths), lengths, page, spare=3, seed=page + sq)
    config = _config(block_s=page, num_splits=splits)
    assert supports_paged(q.shape, pages.shape, table.shape, pages.dtype, v_dim=C, backend="mosaic_tpu",
                          config=config) is None
    got = mla_decode_paged(q, pages, table, lengths, v_dim=C, softmax_scale=SCALE, backend="mosaic_tpu",
                           config=config)
    # The "xla" paged entry gathers the pages; both must be the dense reference on the cache they stand for.
    via_xla = mla_decode_paged(q, pages, table, lengths, v_dim=C, softmax_scale=SCALE, backend="xla")
    want = _reference(q, cache, lengths, v_dim=C, softmax_scale=SCALE)
    assert np.all(np.isfinite(np.asarray(got, np.float32)))  # garbage pages and rows past the end never leak
    _close(got, want)
    np.testing.assert_array_equal(np.asarray(via_xla), np.asarray(want))
    assert np.all(np.asarray(got[0]) == 0) and np.all(np.asarray(got[1, : sq - 1]) == 0)


# ------------------------------------------------------------------------------------------------ refusals

Q, CACHE = (2, 1, 16, C + R), (2, 256, C + R)
FP8_ROW = fp8_cache.row_bytes(C, R)
REFUSALS = {
    "float16": (Q, CACHE, jnp.float16, C, None, "mosaic_tpu: q and cache must be float32 or bfloat16"),
    "v_dim": ((2, 1, 16, 160), (2, 256, 160), BF16, 96, None, "mosaic_tpu: v_dim must be a multiple of 128"),
    "fp8_block_s": (Q, (2, 256, FP8_ROW), jnp.uint8, C, MlaDecodeConfig(block_s=16),
                    "mosaic_tpu: block_s must be a multiple of 32 for a uint8 cache, got 16"),
    "vmem": ((1, 2, 128, 576), (1, 32768, 576), BF16, 512, MlaDecodeConfig(block_s=8192),
             "bytes of VMEM needed (block_s 8192, 256 query rows)"),
    "smem": ((256, 1, 16, C + R), (256, 131072, C + R), BF16, C, MlaDecodeConfig(block_s=32),
             "mosaic_tpu: the block table and lengths take"),
    "gpu_interpreter": (Q, CACHE, BF16, C, MlaDecodeConfig(interpret=True),
                        "interpret it with config.interpret=pltpu.InterpretParams()"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_are_one_clear_line(case):
    q_shape, cache_shape, dtype, v_dim, config, want = REFUSALS[case]
    reason = supports(q_shape, cache_shape, dtype, v_dim=v_dim, backend="mosaic_tpu", config=config)
    assert reason is not None and want in reason and "\n" not in reason
    if np.prod(cache_shape) < 1e6:  # the wrapper raises the same reason
        q = jnp.zeros(q_shape, BF16 if dtype == jnp.uint8 else dtype)
        with pytest.raises(ValueError, match=re.escape(reason)):
            mla_decode(q, jnp.zeros(cache_shape, dtype), jnp.zeros((q_shape[0],), jnp.int32), v_dim=v_dim,
                       softmax_scale=SCALE, backend="mosaic_tpu", config=config)


def test_tpu_interpreter_is_for_mosaic_tpu_only_and_paged_calls_are_validated():
    config = _config()
    assert "applies to backend 'mosaic_tpu' only, got backend 'xla'" in supports(Q, CACHE, BF16, v_dim=C,
                                                                                  backend="xla", config=config)
    q, pages, table = jnp.zeros(Q, BF16), jnp.zeros((6, 64, C + R), BF16), jnp.zeros((2, 4), jnp.int32)
    lengths = jnp.zeros((2,), jnp.int32)
    paged = lambda **kw: mla_decode_paged(**{**dict(q=q, pages=pages, block_table=table, lengths=lengths, v_dim=C,
                                                   softmax_scale=SCALE, backend="mosaic_tpu"), **kw})
    with pytest.raises(ValueError, match=r"config.block_s 128 must be the page size 64"):
        paged(config=_config(block_s=128))
    with pytest.raises(ValueError, match=r"block_table \[B, blocks\] with the batch of q"):
        paged(block_table=jnp.zeros((3, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"block_table must be integers"):
        paged(block_table=jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"mosaic_tpu: block_s must be a multiple of 32 for a uint8 cache"):
        paged(pages=jnp.zeros((6, 8, FP8_ROW), jnp.uint8))


# ------------------------------------------------------------------------ compiled by libtpu, compile-only

# DeepSeek-V3 decode: 128 heads, C = 512, R = 64, 4 sequences of a 4096-token cache, 2 query positions (MTP).
V3 = dict(batch=4, sq=2, heads=128, c=512, r=64, s_len=4096)
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


def _kernel_vmem(compiled) -> int:
    """VMEM the compiled kernel holds: XLA's scoped-memory record on the tpu_custom_call (memory space 1)."""
    calls = [line for line in compiled.as_text().splitlines() if 'custom_call_target="tpu_custom_call"' in line]
    assert len(calls) == 1, "one Pallas TPU kernel"
    used = re.search(r'"used_scoped_memory_configs":\[\{"memory_space":"1","offset":"0","size":"(\d+)"', calls[0])
    return int(used.group(1))


@needs_libtpu
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("generation", TOPOLOGIES)
def test_compiles_for_tpu_generations(generation, fp8):
    v3 = V3
    S = jax.ShapeDtypeStruct
    width = fp8_cache.row_bytes(v3["c"], v3["r"]) if fp8 else v3["c"] + v3["r"]
    q = S((v3["batch"], v3["sq"], v3["heads"], v3["c"] + v3["r"]), BF16)
    cache = S((v3["batch"], v3["s_len"], width), jnp.uint8 if fp8 else BF16)
    config = MlaDecodeConfig(block_s=128)
    assert supports(q.shape, cache.shape, cache.dtype, v_dim=v3["c"], backend="mosaic_tpu", config=config) is None
    fn = lambda q, cache, lengths: mla_decode(q, cache, lengths, v_dim=v3["c"], softmax_scale=576**-0.5,
                                              backend="mosaic_tpu", config=config)
    compiled = _compile_on(TOPOLOGIES[generation], fn, q, cache, S((v3["batch"],), jnp.int32))
    layout = mosaic_tpu.make_plan(q.shape, cache.shape, v3["c"], config)
    assert (layout.head_blocks, layout.rows, layout.num_splits) == (1, 256, 1)  # one program a sequence
    estimate = mosaic_tpu.vmem_bytes(layout, width, cache.dtype.itemsize, 2, 2)
    used = _kernel_vmem(compiled)
    print(f"{generation} {'fp8' if fp8 else 'bf16'}: kernel VMEM {used} bytes (estimate {estimate}), "
          f"HBM temporaries {compiled.memory_analysis().temp_size_in_bytes} bytes")
    assert 0 < used <= estimate <= mosaic_tpu.VMEM_BYTES


@needs_libtpu
def test_paged_fp8_compiles_for_v6e_with_several_splits():
    S = jax.ShapeDtypeStruct
    q = S((1, 1, 128, 576), BF16)
    pages, table = S((512, 64, fp8_cache.row_bytes(512, 64)), jnp.uint8), S((1, 64), jnp.int32)
    config = MlaDecodeConfig(num_splits=4)
    fn = lambda *a: mla_decode_paged(*a, v_dim=512, softmax_scale=576**-0.5, backend="mosaic_tpu", config=config)
    compiled = _compile_on(TOPOLOGIES["v6e"], fn, q, pages, table, S((1,), jnp.int32))
    assert 0 < _kernel_vmem(compiled) <= mosaic_tpu.VMEM_BYTES
