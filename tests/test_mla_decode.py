"""MLA latent-attention decode: Pallas kernel (interpret mode on CPU) and the Mosaic GPU kernel (jax's GPU
interpreter on CPU) against the plain-jnp reference, and the reference against an independent float64
computation of un-absorbed MLA. The kernels read the cache through a block table (FlashMLA's pages); the
public entry has a dense cache, so the shuffled-table tests drive the internal paged path (`plan.decode_pages`).
"""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.mla_decode import MlaDecodeConfig, fp8_cache, mla_decode, mla_decode_reference, supports
from pallas_kernels.mla_decode import interpret as interpret_backend
from pallas_kernels.mla_decode import mosaic_gpu as mosaic_backend
from pallas_kernels.mla_decode import plan as decode_plan

PAGE_SIZE = 64  # FlashMLA's block size, MlaDecodeConfig's default block_s

LENGTHS = (1, 63, 64, 65, 130)  # one row, around a 64-block edge (64: query 0 of 2 stops one short), two blocks
SCALE = 0.125
# bfloat16: inputs, P and the output are rounded to 8 bits of mantissa (relative ~4e-3 each).
TOL = {jnp.float32: dict(atol=2e-5, rtol=2e-5), jnp.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def _inputs(seed, batch, sq, heads, c, r, s_len, dtype):
    kq, kc = jax.random.split(jax.random.key(seed))
    q = jax.random.normal(kq, (batch, sq, heads, c + r), jnp.float32)
    cache = jax.random.normal(kc, (batch, s_len, c + r), jnp.float32)
    return q.astype(dtype), cache.astype(dtype)


def _close(a, b, dtype):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **TOL[dtype])


def _naive_mla_float64(q_nope, q_pe, c_kv, k_pe, w_uk, w_uv, lengths, scale):
    """Un-absorbed MLA, one head and one query at a time: keys c_kv @ W_UK[h] (+ shared k_pe), values c_kv @ W_UV[h]."""
    batch, sq, heads, _ = q_nope.shape
    out = np.zeros((batch, sq, heads, w_uv.shape[-1]))
    for b in range(batch):
        for t in range(sq):
            visible = lengths[b] - sq + t + 1  # positions 0 .. L - Sq + t
            if visible <= 0:
                continue
            for h in range(heads):
                keys = c_kv[b, :visible] @ w_uk[h]
                scores = (keys @ q_nope[b, t, h] + k_pe[b, :visible] @ q_pe[b, t, h]) * scale
                p = np.exp(scores - scores.max())
                out[b, t, h] = (p / p.sum()) @ (c_kv[b, :visible] @ w_uv[h])
    return out


def test_reference_matches_float64_unabsorbed_mla():
    rng = np.random.default_rng(0)
    batch, sq, heads, c, r, nope, dv, s_len = 3, 2, 3, 16, 8, 12, 10, 20
    q_nope, q_pe = rng.normal(size=(batch, sq, heads, nope)), rng.normal(size=(batch, sq, heads, r))
    c_kv, k_pe = rng.normal(size=(batch, s_len, c)), rng.normal(size=(batch, s_len, r))
    w_uk, w_uv = rng.normal(size=(heads, c, nope)) / 4, rng.normal(size=(heads, c, dv)) / 4
    lengths = np.array([0, 1, 17])  # empty; the first query before the sequence; a normal one
    want = _naive_mla_float64(q_nope, q_pe, c_kv, k_pe, w_uk, w_uv, lengths, SCALE)

    # Absorb W_UK into the query (q_latent = W_UK q_nope); apply W_UV to the latent output afterwards.
    q_latent = np.einsum("hcn,bthn->bthc", w_uk, q_nope)
    q = jnp.asarray(np.concatenate([q_latent, q_pe], -1), jnp.float32)
    cache = jnp.asarray(np.concatenate([c_kv, k_pe], -1), jnp.float32)
    latent = mla_decode_reference(q, cache, jnp.asarray(lengths, jnp.int32), v_dim=c, softmax_scale=SCALE)
    got = np.einsum("bthc,hcv->bthv", np.asarray(latent, np.float64), w_uv)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert np.all(got[0] == 0) and np.all(got[1, 0] == 0) and np.abs(got[2]).max() > 0.1


@pytest.mark.parametrize(
    "dtype,sq,heads", [(jnp.float32, 1, 16), (jnp.float32, 2, 4), (jnp.bfloat16, 2, 16), (jnp.bfloat16, 1, 4)]
)
def test_interpret_matches_reference_on_ragged_lengths(dtype, sq, heads):
    q, cache = _inputs(1, len(LENGTHS), sq, heads, 64, 16, 192, dtype)
    lengths = jnp.array(LENGTHS, jnp.int32)
    got = mla_decode(q, cache, lengths, v_dim=64, softmax_scale=SCALE, backend="interpret",
                     config=MlaDecodeConfig(num_splits=2))
    want = mla_decode_reference(q, cache, lengths, v_dim=64, softmax_scale=SCALE)
    assert got.shape == (len(LENGTHS), sq, heads, 64) and got.dtype == dtype
    _close(got, want, dtype)


def test_interpret_deepseek_latent_dims_bfloat16():
    q, cache = _inputs(2, 2, 2, 16, 512, 64, 128, jnp.bfloat16)
    got = mla_decode(q, cache, jnp.array([70, 500], jnp.int32), v_dim=512, softmax_scale=576 ** -0.5,
                     backend="interpret")
    # Lengths past the cache are clipped to S.
    want = mla_decode_reference(q, cache, jnp.array([70, 128], jnp.int32), v_dim=512, softmax_scale=576 ** -0.5)
    _close(got, want, jnp.bfloat16)


@pytest.mark.parametrize(
    "config",
    [
        MlaDecodeConfig(num_splits=1),
        MlaDecodeConfig(num_splits=3),
        MlaDecodeConfig(num_splits=8),  # more splits than blocks: clamped
        MlaDecodeConfig(num_splits=2, block_s=32, block_h=3),  # heads padded 4 -> 6
        MlaDecodeConfig(block_s=48),  # S = 150 is padded to 192
    ],
)
def test_split_counts_and_blocks_agree(config):
    q, cache = _inputs(3, 5, 2, 4, 64, 16, 150, jnp.float32)
    lengths = jnp.array([1, 63, 64, 97, 150], jnp.int32)  # 97: one past a 32- and a 48-block edge
    got = mla_decode(q, cache, lengths, v_dim=64, softmax_scale=SCALE, backend="interpret", config=config)
    want = mla_decode_reference(q, cache, lengths, v_dim=64, softmax_scale=SCALE)
    _close(got, want, jnp.float32)


def test_empty_rows_give_zeros_and_garbage_past_length_never_leaks():
    q, cache = _inputs(4, 3, 2, 4, 64, 16, 128, jnp.float32)
    lengths = jnp.array([0, 1, 70], jnp.int32)
    poisoned = jnp.where(jnp.arange(128)[None, :, None] < lengths[:, None, None], cache, jnp.nan)
    for backend in ("interpret", "xla"):
        clean = mla_decode(q, cache, lengths, v_dim=64, softmax_scale=SCALE, backend=backend,
                           config=MlaDecodeConfig(num_splits=2))
        dirty = mla_decode(q, poisoned, lengths, v_dim=64, softmax_scale=SCALE, backend=backend,
                           config=MlaDecodeConfig(num_splits=2))
        assert np.all(np.isfinite(np.asarray(dirty))), backend
        np.testing.assert_array_equal(np.asarray(dirty), np.asarray(clean))
        assert np.all(np.asarray(clean[0]) == 0)  # L = 0: nothing to attend to
        assert np.all(np.asarray(clean[1, 0]) == 0)  # L = 1, Sq = 2: query 0 sits at position -1
        assert np.abs(np.asarray(clean[1, 1])).max() > 0


def _decode_paged(backend_module, q, pages, table, lengths, *, v_dim, config):
    """The kernels' block-table path: sequence b's block j is page table[b, j]."""
    layout = backend_module.make_plan(q.shape, (q.shape[0], table.shape[1] * PAGE_SIZE, q.shape[-1]), v_dim, config)
    run = functools.partial(backend_module.run, config=config)
    return jax.jit(lambda *a: decode_plan.decode_pages(*a, softmax_scale=SCALE, plan=layout, run=run))(
        q, pages, table, lengths)


def _paged_reference(q, pages, table, lengths, *, v_dim):
    """Gather each sequence's pages into a dense cache, then `mla_decode_reference`."""
    table = jnp.clip(table, 0, pages.shape[0] - 1)
    cache = pages[table].reshape(table.shape[0], table.shape[1] * PAGE_SIZE, pages.shape[-1])
    return mla_decode_reference(q, cache, lengths, v_dim=v_dim, softmax_scale=SCALE)


def _shuffled_pages(cache, lengths, blocks, spare, seed):
    """The dense cache scattered to random physical pages among `spare` extra ones; the table entries past
    a sequence's end point nowhere (-7): they must never be read."""
    batch = cache.shape[0]
    perm = np.random.default_rng(seed).permutation(batch * blocks + spare)
    table = perm[: batch * blocks].reshape(batch, blocks)
    pages = jnp.zeros((len(perm), PAGE_SIZE, cache.shape[-1]), cache.dtype)
    pages = pages.at[table.reshape(-1)].set(cache.reshape(batch * blocks, PAGE_SIZE, -1))
    table = np.where(np.arange(blocks)[None, :] * PAGE_SIZE < np.asarray(lengths)[:, None], table, -7)
    return pages, jnp.asarray(table, jnp.int32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_paged_matches_dense_with_shuffled_block_table(dtype):
    batch, sq, heads, c, r, blocks = len(LENGTHS), 2, 4, 64, 16, 3
    q, cache = _inputs(6, batch, sq, heads, c, r, blocks * PAGE_SIZE, dtype)
    lengths = jnp.array(LENGTHS, jnp.int32)
    pages, table = _shuffled_pages(cache, LENGTHS, blocks, 5, seed=1)
    dense = mla_decode(q, cache, lengths, v_dim=c, softmax_scale=SCALE, backend="interpret")
    paged = _decode_paged(interpret_backend, q, pages, table, lengths, v_dim=c, config=MlaDecodeConfig(num_splits=2))
    paged_ref = _paged_reference(q, pages, table, lengths, v_dim=c)
    _close(paged, dense, dtype)
    _close(paged, paged_ref, dtype)
    _close(paged_ref, mla_decode_reference(q, cache, lengths, v_dim=c, softmax_scale=SCALE), dtype)


# ------------------------------------------------------------------ Mosaic GPU kernel in jax's GPU interpreter

MOSAIC_C, MOSAIC_R = 128, 64  # the Mosaic kernel needs v_dim a multiple of 128 and bf16/f16 (wgmma)


@pytest.fixture
def gpu_interpreter():
    """jax's Mosaic GPU interpreter keeps global state that must be reset after a failed kernel."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as mosaic_interpret

    mosaic_interpret.reset_gpu_interpret_mode_state()
    yield mosaic_interpret
    mosaic_interpret.reset_gpu_interpret_mode_state()


# The interpreter compiles each CTA's three warpgroups as separate XLA programs (seconds per grid point
# on a small CPU), so each case keeps the grid (head blocks x splits x batch) to 2 points.
MOSAIC_CASES = {
    # 2 head blocks of 32 heads x 2 queries (all 64 rows); 161 = 3 blocks (the third a refill of one of
    # 2 slots, partial); the race detector checks the barrier protocol (TMA slots, the shared P tile).
    "two_head_blocks_refill": (2, 64, (161,), dict(num_splits=1), True),
    # Split 0: 2 full blocks through one slot (the second waits for it to be freed); split 1: 2 rows.
    "splits_one_stage": (1, 16, (130,), dict(num_splits=2, num_stages=1), False),
}


@pytest.mark.parametrize("case", MOSAIC_CASES)
def test_mosaic_gpu_interpreted_matches_reference(gpu_interpreter, case):
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    sq, heads, lengths, config, detect_races = MOSAIC_CASES[case]
    lengths = jnp.array(lengths, jnp.int32)
    q, cache = _inputs(8, len(lengths), sq, heads, MOSAIC_C, MOSAIC_R, 192, jnp.bfloat16)
    interpret = InterpretGPUParams(detect_races=True) if detect_races else True
    got = mla_decode(q, cache, lengths, v_dim=MOSAIC_C, softmax_scale=SCALE, backend="mosaic_gpu",
                     config=MlaDecodeConfig(interpret=interpret, **config))
    want = mla_decode_reference(q, cache, lengths, v_dim=MOSAIC_C, softmax_scale=SCALE)
    assert got.shape == (len(lengths), sq, heads, MOSAIC_C) and got.dtype == jnp.bfloat16
    _close(got, want, jnp.bfloat16)
    assert not gpu_interpreter.get_races().races_found


def test_mosaic_gpu_interpreted_paged_with_shuffled_block_table(gpu_interpreter):
    batch, sq, heads, blocks = 2, 2, 16, 3
    lengths = jnp.array((0, 150), jnp.int32)  # nothing to read; 3 blocks (a refill), the last partial
    q, cache = _inputs(10, batch, sq, heads, MOSAIC_C, MOSAIC_R, blocks * PAGE_SIZE, jnp.bfloat16)
    pages, table = _shuffled_pages(cache, (0, 150), blocks, 2, seed=2)
    got = _decode_paged(mosaic_backend, q, pages, table, lengths, v_dim=MOSAIC_C,
                        config=MlaDecodeConfig(num_splits=1, interpret=True))
    _close(got, mla_decode_reference(q, cache, lengths, v_dim=MOSAIC_C, softmax_scale=SCALE), jnp.bfloat16)
    assert np.all(np.asarray(got[0]) == 0) and np.abs(np.asarray(got[1])).max() > 0


# The packed FP8 cache (`fp8_cache`): the kernel TMA-copies the bytes and dequantises each block into a bfloat16
# tile in shared memory. Its TMA copies need C a multiple of 512, so these run V3's row (C=512, R=64, 656 bytes).
FP8_C, FP8_R = 512, 64


def _fp8_inputs(seed, batch, sq, heads, s_len, dtype=jnp.bfloat16):
    """q and a packed cache whose four 128-value tiles differ in size (x1, x8, x1/8, x2), so a scale read for
    the wrong tile or row shows."""
    kq, kc = jax.random.split(jax.random.key(seed))
    q = jax.random.normal(kq, (batch, sq, heads, FP8_C + FP8_R), jnp.float32).astype(dtype)
    tile = jnp.array([1.0, 8.0, 0.125, 2.0])[jnp.minimum(jnp.arange(FP8_C + FP8_R) // 128, 3)]
    rows = jax.random.normal(kc, (batch, s_len, FP8_C + FP8_R), jnp.float32) * jnp.where(
        jnp.arange(FP8_C + FP8_R) < FP8_C, tile, 1.0)
    return q, fp8_cache.quantize_rows(rows, FP8_C)


def _close_scaled(got, want):
    """bfloat16 (the dequantised block, P and the output rounded to 8 bits), relative to the output's size."""
    size = float(jnp.abs(want.astype(jnp.float32)).max())
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=3e-2 * size, rtol=3e-2)


# (Sq, heads, lengths, config, detect_races, q dtype); S = 192 (3 blocks). Grids of 2 or 3 points, as above.
MOSAIC_FP8_CASES = {
    # Empty, ragged (3 blocks through one packed slot: two refills, the last block partial) and full; the race
    # detector checks the conversion's hand-offs (free slot, half_ready, the converted tile's reuse).
    "sq2_empty_ragged_full": (2, 16, (0, 130, 192), dict(num_splits=1), True, jnp.bfloat16),
    # Sq 1, 2 splits of 2 blocks: split 0 reads a full block and one row through one packed slot (a refill);
    # split 1 has nothing to read (its log-sum-exp -inf must drop out of the merge). float32 queries: the
    # kernel computes in bfloat16 and the result comes back in float32.
    "sq1_splits_float32_q": (1, 32, (65,), dict(num_splits=2), False, jnp.float32),
}


@pytest.mark.parametrize("case", MOSAIC_FP8_CASES)
def test_mosaic_gpu_interpreted_reads_the_fp8_cache(gpu_interpreter, case):
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    sq, heads, lengths, config, detect_races, dtype = MOSAIC_FP8_CASES[case]
    lengths = jnp.array(lengths, jnp.int32)
    q, cache = _fp8_inputs(11, len(lengths), sq, heads, 192, dtype)
    interpret = InterpretGPUParams(detect_races=True) if detect_races else True
    config = MlaDecodeConfig(interpret=interpret, **config)
    assert supports(q.shape, cache.shape, cache.dtype, v_dim=FP8_C, backend="mosaic_gpu", config=config) is None
    got = mla_decode(q, cache, lengths, v_dim=FP8_C, softmax_scale=SCALE, backend="mosaic_gpu", config=config)
    want = mla_decode_reference(q, cache, lengths, v_dim=FP8_C, softmax_scale=SCALE)
    assert got.shape == (len(lengths), sq, heads, FP8_C) and got.dtype == dtype
    _close_scaled(got, want)
    assert not gpu_interpreter.get_races().races_found


def test_mosaic_gpu_interpreted_reads_paged_fp8_pages(gpu_interpreter):
    batch, sq, heads, blocks = 2, 2, 16, 3
    lengths = jnp.array((150, 0), jnp.int32)
    q, cache = _fp8_inputs(12, batch, sq, heads, blocks * PAGE_SIZE)
    pages, table = _shuffled_pages(cache, (150, 0), blocks, 2, seed=3)
    got = _decode_paged(mosaic_backend, q, pages, table, lengths, v_dim=FP8_C,
                        config=MlaDecodeConfig(num_splits=1, interpret=True))
    _close_scaled(got, mla_decode_reference(q, cache, lengths, v_dim=FP8_C, softmax_scale=SCALE))
    assert np.abs(np.asarray(got[0])).max() > 0 and np.all(np.asarray(got[1]) == 0)


def test_xla_and_auto_on_cpu_are_the_reference():
    q, cache = _inputs(7, 2, 2, 4, 32, 8, 64, jnp.float32)
    lengths = jnp.array([5, 64], jnp.int32)
    want = np.asarray(mla_decode_reference(q, cache, lengths, v_dim=32, softmax_scale=SCALE))
    for backend in ("xla", "auto"):
        got = mla_decode(q, cache, lengths, v_dim=32, softmax_scale=SCALE, backend=backend)
        np.testing.assert_array_equal(np.asarray(got), want)


def _bad_calls():
    q, cache = jnp.zeros((2, 1, 4, 80)), jnp.zeros((2, 64, 80))
    lengths = jnp.zeros((2,), jnp.int32)
    dense = lambda **kw: mla_decode(**{**dict(q=q, cache=cache, lengths=lengths, v_dim=64, softmax_scale=SCALE,
                                            backend="interpret"), **kw})
    return [
        (lambda: dense(cache=jnp.zeros((2, 64, 72))), r"cache last dim 72 != q last dim 80"),
        (lambda: dense(lengths=jnp.zeros((3,), jnp.int32)), r"lengths must be \[B\].*\(3,\)"),
        (lambda: dense(lengths=jnp.zeros((2,))), r"lengths must be integers"),
        (lambda: dense(v_dim=81), r"v_dim must be an int in \[1, C\+R = 80\]"),
        (lambda: dense(backend="cuda"), r"unknown backend 'cuda'"),
        (lambda: dense(q=jnp.zeros((2, 4, 80))), r"q must be \[B, Sq, H, C\+R\].*\(2, 4, 80\)"),
        (lambda: dense(cache=jnp.zeros((3, 64, 80))), r"cache must be \[B, S, C\+R\].*\(3, 64, 80\)"),
        (lambda: dense(cache=jnp.zeros((2, 64, 80), jnp.bfloat16)), r"q dtype float32 != cache dtype bfloat16"),
        (lambda: dense(backend="mosaic_gpu"), r"mosaic_gpu: q and cache must be bfloat16 or float16"),
        (lambda: dense(backend="triton", v_dim=48), r"triton: v_dim must be a power of two, got 48"),
        (lambda: MlaDecodeConfig(num_splits=0), r"MlaDecodeConfig.num_splits must be a positive int"),
        (lambda: MlaDecodeConfig(interpret="yes"), r"MlaDecodeConfig.interpret must be a bool"),
        (lambda: dense(config=MlaDecodeConfig(interpret=True)), r"config.interpret applies to backend 'mosaic_gpu'"),
        (lambda: dense(backend="mosaic_gpu", q=jnp.zeros((2, 1, 4, 80), jnp.bfloat16),
                       cache=jnp.zeros((2, 64, 80), jnp.bfloat16), config=MlaDecodeConfig(interpret=True)),
         r"mosaic_gpu: needs v_dim a multiple of 128"),  # the interpreter runs the kernel within its GPU limits
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_clear_errors(case):
    call, message = _bad_calls()[case]
    with pytest.raises(ValueError, match=message):
        call()


# supports(...) asked up front agrees with the wrapper both ways: a call it refuses raises that reason, a call it
# takes runs. (q, cache, dtype, v_dim, backend, config, part of the reason or None.) Calls the GPU backends take
# are lowered for CUDA in test_kernel_lowering.
BF16, F32 = jnp.bfloat16, jnp.float32
SUPPORT_CASES = {
    "interpret_any_dims": ((2, 2, 5, 80), (2, 100, 80), F32, 48, "interpret", MlaDecodeConfig(block_s=32), None),
    "interpret_no_rope": ((2, 1, 3, 40), (2, 70, 40), BF16, 40, "interpret", None, None),
    "xla_any_dims": ((2, 1, 3, 20), (2, 7, 20), jnp.float16, 12, "xla", None, None),
    "bad_v_dim": ((2, 1, 4, 80), (2, 64, 80), F32, 0, "xla", None, "v_dim must be an int in [1, C+R = 80], got 0"),
    "integer_cache": ((2, 1, 4, 80), (2, 64, 80), jnp.int8, 64, "interpret", None, "cache must be floating point"),
    "unknown_backend": ((2, 1, 4, 80), (2, 64, 80), F32, 64, "tpu", None, "unknown backend 'tpu'"),
    "interpret_config": ((2, 1, 4, 80), (2, 64, 80), F32, 64, "xla", MlaDecodeConfig(interpret=True),
                         "config.interpret applies to backend 'mosaic_gpu' only, got backend 'xla'"),
    "triton_v_dim": ((2, 1, 4, 80), (2, 64, 80), F32, 60, "triton", None, "triton: v_dim must be a power of two"),
    "mosaic_float32": ((2, 1, 4, 80), (2, 64, 80), F32, 64, "mosaic_gpu", None, "mosaic_gpu: q and cache must be"),
    "mosaic_v_dim": ((2, 1, 4, 160), (2, 64, 160), BF16, 96, "mosaic_gpu", None,
                     "mosaic_gpu: needs v_dim a multiple of 128 up to 512 and rope dims a multiple of 64"),
    "mosaic_rows": ((2, 2, 64, 192), (2, 64, 192), BF16, 128, "mosaic_gpu", MlaDecodeConfig(block_h=64),
                    "mosaic_gpu: block_h 64 x Sq 2 query rows exceed one 64-row MMA"),
    "mosaic_block_s": ((2, 1, 4, 192), (2, 64, 192), BF16, 128, "mosaic_gpu", MlaDecodeConfig(block_s=32),
                       "mosaic_gpu: block_s must be a multiple of 64 up to 256, got 32"),
    "mosaic_smem": ((1, 1, 64, 576), (1, 1024, 576), BF16, 512, "mosaic_gpu",
                    MlaDecodeConfig(block_s=128, num_splits=1),
                    "bytes of shared memory needed (block_s 128, 2 stages)"),
    # A packed FP8 cache: 128 + 4 + 128 bytes a row are no whole 16-byte TMA units.
    "mosaic_fp8_v_dim": ((2, 1, 4, 192), (2, 64, 260), jnp.uint8, 128, "mosaic_gpu", None,
                         "mosaic_gpu: an FP8 cache needs v_dim 512"),
    # V3's row with 3 stages: two packed blocks and the converted one do not fit (2 stages do, see lowering).
    "mosaic_fp8_smem": ((1, 1, 64, 576), (1, 1024, 656), jnp.uint8, 512, "mosaic_gpu",
                        MlaDecodeConfig(num_stages=3, num_splits=1),
                        "bytes of shared memory needed (block_s 64, 3 stages, an FP8 cache: 2 packed + 1 converted)"),
}


@pytest.mark.parametrize("case", SUPPORT_CASES)
def test_supports_agrees_with_mla_decode(case):
    q_shape, cache_shape, dtype, v_dim, backend, config, want = SUPPORT_CASES[case]
    reason = supports(q_shape, cache_shape, dtype, v_dim=v_dim, backend=backend, config=config)
    kq, kc = jax.random.split(jax.random.key(12))
    q, cache = (jax.random.normal(k, shape).astype(dtype) for k, shape in ((kq, q_shape), (kc, cache_shape)))
    lengths = jnp.full((q_shape[0],), cache_shape[1] - 3, jnp.int32)
    call = functools.partial(mla_decode, q, cache, lengths, v_dim=v_dim, softmax_scale=SCALE, backend=backend,
                             config=config)
    if want is None:
        assert reason is None
        got = call()
        want_out = mla_decode_reference(q, cache, lengths, v_dim=v_dim, softmax_scale=SCALE)
        assert got.shape == want_out.shape == (*q_shape[:3], v_dim)
        _close(got, want_out, F32 if dtype == F32 else BF16)
    else:
        assert reason is not None and want in reason and "\n" not in reason
        with pytest.raises(ValueError, match=re.escape(reason)):
            call()
