"""Block-scaled FP8 GEMM: quantize_act, the reference vs float64, the Pallas kernels vs the reference,
the grouped (MoE) variant, and the FP8 training entries' gradients.

Tolerances. The reference and the kernels both compute, per 128-wide K block, an f32 sum of 128 exact
e4m3 x e4m3 products, then scale it and add it to an f32 accumulator. Recursive f32 summation of n terms
errs by at most n * 2^-24 * sum|terms| (Higham's gamma_n), so each of them lies within
(128 + kb + 3) * 2^-24 * (|A| @ |B|.T) of the float64 product of the dequantised operands ("BOUND" below);
two of them lie within twice that of each other. XLA may order the 128-term sums differently for different
tile shapes, so the interpret kernel and the reference agree to that bound, not always bit for bit.
Compiled GPU backends (run only where a GPU exists) accumulate inside the tensor core with ~14 fraction
bits (the very reason for promotion every 128 of K), so they get 2^-10 instead of 2^-24 per term.
The Mosaic GPU kernel run on CPU by JAX's GPU interpreter multiplies in f32: it keeps the 2^-24 bound.
"""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import fp8_gemm as fg
from pallas_kernels.backends import BACKENDS, resolve_backend
from pallas_kernels.fp8_gemm.tiles import aligned_layout
from pallas_kernels.quant import E4M3_MAX, dequantize_act, dequantize_weight, quantize_act, quantize_weight


def _gpu_backends():
    dev = jax.devices()[0]
    if dev.platform != "gpu":
        return []
    cc = float(getattr(dev, "compute_capability", 0) or 0)
    return ["triton"] + (["mosaic_gpu"] if cc >= 9.0 else [])


KERNEL_BACKENDS = ["interpret", *_gpu_backends()]


def _unit(backend):
    return 2.0**-10 if backend in ("triton", "mosaic_gpu") else 2.0**-24


def _rand(shape, seed, spread=True):
    """Normal values whose magnitude varies by row and column, so that the scales differ tile to tile."""
    rng = np.random.RandomState(seed)
    x = rng.randn(*shape)
    if spread:
        x *= np.exp(rng.uniform(-3, 3, size=(shape[0], 1))) * np.exp(rng.uniform(-2, 2, size=(1, shape[1])))
    return x.astype(np.float32)


def _operands(m, n, k, seed=0):
    a, sa = quantize_act(jnp.asarray(_rand((m, k), seed)))
    b, sb = quantize_weight(jnp.asarray(_rand((n, k), seed + 1)))
    return a, sa, b, sb


def _deq(q, s, act):
    return np.asarray((dequantize_act if act else dequantize_weight)(q, s), np.float64)


def _exact_and_bound(a, sa, b, sb):
    """float64 dequant(a) @ dequant(b).T, and the f32 error bound BOUND of the module docstring (unit 1)."""
    da, db = _deq(a, sa, True), _deq(b, sb, False)
    kb = -(-a.shape[1] // 128)
    return da @ db.T, (128 + kb + 3) * (np.abs(da) @ np.abs(db).T)


# ------------------------------------------------------------------------------------------ quantize_act


@pytest.mark.parametrize("shape", [(1, 100), (65, 384), (3, 130)])
def test_quantize_act_round_trip(shape):
    x = _rand(shape, 3)
    q, s = quantize_act(jnp.asarray(x))
    kb = -(-shape[1] // 128)
    assert q.dtype == jnp.float8_e4m3fn and q.shape == shape
    assert s.dtype == jnp.float32 and s.shape == (shape[0], kb)
    xp = np.pad(x, ((0, 0), (0, kb * 128 - shape[1]))).reshape(shape[0], kb, 128)
    np.testing.assert_allclose(s, np.maximum(np.abs(xp).max(-1), 1e-4) / 448, rtol=1e-6)
    # E4M3: 3 mantissa bits, so a normal value rounds within |x|/16; subnormals (below 2^-6 in scaled
    # units) sit on a 2^-9 grid, so within half of that times the tile's scale.
    full_s = np.repeat(np.asarray(s), 128, axis=1)[:, : shape[1]]
    err = np.abs(np.asarray(dequantize_act(q, s)) - x)
    assert np.all(err <= np.abs(x) / 16 + full_s * 2.0**-10 + 1e-12)
    assert float(jnp.abs(q.astype(jnp.float32)).max()) == E4M3_MAX  # each tile's amax maps to 448


def test_quantize_act_zero_tile_and_pow2():
    x = np.zeros((2, 256), np.float32)
    x[0, 5] = 3.0
    x[1, 200] = -0.25
    q, s = quantize_act(jnp.asarray(x))
    np.testing.assert_allclose(s, [[3.0 / 448, 1e-4 / 448], [1e-4 / 448, 0.25 / 448]], rtol=1e-6)
    np.testing.assert_allclose(dequantize_act(q, s), x, rtol=1e-6, atol=0)  # amax -> 448 and back; zeros stay 0
    y = _rand((5, 300), 4)
    q2, s2 = quantize_act(jnp.asarray(y), pow2=True)
    s2 = np.asarray(s2)
    assert np.all(np.log2(s2) == np.round(np.log2(s2)))
    assert np.all(s2 >= np.asarray(quantize_act(jnp.asarray(y))[1]))  # rounded up: never clips
    assert float(jnp.abs(q2.astype(jnp.float32)).max()) <= E4M3_MAX
    with pytest.raises(ValueError, match="2-D"):
        quantize_act(jnp.zeros((2, 3, 4)))


# ----------------------------------------------------------------------------------------- the GEMMs

SHAPES = [(1, 130, 100), (65, 130, 384), (200, 256, 257)]


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_reference_matches_float64(m, n, k):
    a, sa, b, sb = _operands(m, n, k)
    exact, bound = _exact_and_bound(a, sa, b, sb)
    ref = np.asarray(fg.fp8_gemm_reference(a, sa, b, sb, out_dtype=jnp.float32))
    assert ref.shape == (m, n)
    assert np.all(np.abs(ref - exact) <= bound * 2.0**-24)
    # The scales matter: the raw e4m3 product alone is nowhere near.
    raw = np.asarray(a, np.float64) @ np.asarray(b, np.float64).T
    assert np.abs(raw - exact).max() > 1e3 * (bound.max() * 2.0**-24)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_kernel_matches_reference(backend, m, n, k):
    a, sa, b, sb = _operands(m, n, k, seed=m)
    exact, bound = _exact_and_bound(a, sa, b, sb)
    ref = np.asarray(fg.fp8_gemm(a, sa, b, sb, out_dtype=jnp.float32, backend="xla"))
    out = np.asarray(fg.fp8_gemm(a, sa, b, sb, out_dtype=jnp.float32, backend=backend))
    assert out.shape == (m, n)
    assert np.all(np.abs(out - exact) <= bound * _unit(backend))
    assert np.all(np.abs(out - ref) <= bound * (_unit(backend) + 2.0**-24))


def test_bf16_output_and_small_tiles():
    """Default bf16 output, and a config whose tiles do not divide M or N (ragged edges on every side)."""
    a, sa, b, sb = _operands(70, 200, 300, seed=7)
    ref = fg.fp8_gemm(a, sa, b, sb, backend="xla")
    cfg = fg.Fp8GemmConfig(block_m=32, block_n=64)
    out = fg.fp8_gemm(a, sa, b, sb, backend="interpret", config=cfg)
    assert out.dtype == ref.dtype == jnp.bfloat16 and out.shape == (70, 200)
    ref32 = np.asarray(ref, np.float32)
    # the f32 results agree to ~1e-6; after rounding to bf16 they differ by at most one bf16 ulp (2^-8 rel.)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref32, rtol=2.0**-7, atol=1e-30)


GROUP_CASES = [
    ([50, 0, 90, 37], 200),  # uneven, an empty group, 23 rows past the groups
    ([0, 130, 1, 69], 200),  # empty first group, a one-row group, sizes sum to M
]


@pytest.mark.parametrize("sizes,m", GROUP_CASES)
def test_grouped_gemm(sizes, m):
    g, n, k = len(sizes), 130, 256
    a, sa = quantize_act(jnp.asarray(_rand((m, k), 11)))
    b, sb = jax.vmap(quantize_weight)(jnp.asarray(np.stack([_rand((n, k), 12 + i) for i in range(g)])))
    gs = jnp.asarray(sizes, jnp.int32)
    ref = np.asarray(fg.fp8_grouped_gemm(a, sa, b, sb, gs, out_dtype=jnp.float32, backend="xla"))
    outs = {be: np.asarray(fg.fp8_grouped_gemm(a, sa, b, sb, gs, out_dtype=jnp.float32, backend=be))
            for be in KERNEL_BACKENDS}
    start = 0
    for i, size in enumerate(sizes):
        rows = slice(start, start + size)
        exact, bound = _exact_and_bound(a[rows], sa[rows], b[i], sb[i])
        assert np.all(np.abs(ref[rows] - exact) <= bound * 2.0**-24)
        for be, out in outs.items():
            assert np.all(np.abs(out[rows] - exact) <= bound * _unit(be)), be
        start += size
    for out in (ref, *outs.values()):
        assert out.shape == (m, n)
        np.testing.assert_array_equal(out[start:], 0.0)  # rows past the groups


# ------------------------------------------------------------- the Mosaic GPU kernel in JAX's GPU interpreter
#
# `Fp8GemmConfig(interpret=True)` runs the Hopper kernel of backend "mosaic_gpu" on CPU: TMA copies, the
# warp-specialised pipeline's barriers, three warpgroups as threads, E4M3 wgmma (the interpreter multiplies
# in numpy with an f32 result: exact products, f32 sums, so the 2^-24 bound holds), the promotion and the
# persistent tile loop (`interpreter_shims` lists the spots traced differently for the interpreter).
# Each case compiles and runs its own simulation (3-4 s on 2 idle cores): the smallest shapes that turn every loop.


@pytest.fixture
def gpu_interpreter():
    """The interpreter's state: reset around each test (a failed kernel leaves it dirty); yields its races.

    It runs the three warpgroups as concurrent XLA:CPU computations that wait on each other's barriers, so
    the CPU client's thread pool needs three threads; it has max(cores, CPU devices) of them (measured:
    2 cores with 1 or 2 devices deadlock, 3 devices run). conftest asks for 8 devices.
    """
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

    threads = max(os.cpu_count() or 1, jax.local_device_count("cpu"))
    assert threads >= 3, f"the GPU interpreter would deadlock with {threads} XLA:CPU threads (needs 3)"
    gpu_callbacks.reset_gpu_interpret_mode_state()
    yield lambda: gpu_callbacks.get_races().races_found
    gpu_callbacks.reset_gpu_interpret_mode_state()


INTERPRETED = [
    # 2 x 2 tiles of 128 x 128 on 2 CTAs (each walks two tiles), 3 K blocks through a 2-slot ring, ragged M
    ((200, 256, 384), dict(block_n=128, num_stages=2, num_sms=2), jnp.float32),
    # ragged M, N and K, one 128 x 256 tile per CTA, bf16 out (its own epilogue swizzle)
    ((130, 200, 257), dict(block_n=256, num_sms=2), jnp.bfloat16),
]


@pytest.mark.parametrize("mnk,cfg,out_dtype", INTERPRETED, ids=["f32-2x2tiles-ring", "bf16-ragged-bn256"])
def test_mosaic_gpu_interpreted_matches_reference(gpu_interpreter, mnk, cfg, out_dtype):
    m, n, k = mnk
    a, sa, b, sb = _operands(m, n, k, seed=m)
    config = fg.Fp8GemmConfig(interpret=True, **cfg)
    out = fg.fp8_gemm(a, sa, b, sb, out_dtype=out_dtype, backend="mosaic_gpu", config=config)
    assert not gpu_interpreter()  # no unsynchronised SMEM / GMEM access between warpgroups and TMA
    ref = fg.fp8_gemm(a, sa, b, sb, out_dtype=jnp.float32, backend="xla")
    assert out.shape == (m, n) and out.dtype == out_dtype
    out, ref = np.asarray(out, np.float32), np.asarray(ref)
    if out_dtype == jnp.float32:
        exact, bound = _exact_and_bound(a, sa, b, sb)
        assert np.all(np.abs(out - exact) <= bound * 2.0**-24)
        assert np.all(np.abs(out - ref) <= bound * 2.0**-23)
    else:  # within one bf16 ulp of the f32 reference
        np.testing.assert_allclose(out, ref, rtol=2.0**-7, atol=1e-30)


def test_mosaic_gpu_interpreted_grouped(gpu_interpreter):
    """Aligned groups: three tiles in use of five, the expert's B per tile, the tile count read in the kernel."""
    sizes, m, n, k = [50, 0, 90, 37], 200, 130, 256
    g = len(sizes)
    a, sa = quantize_act(jnp.asarray(_rand((m, k), 11)))
    b, sb = jax.vmap(quantize_weight)(jnp.asarray(np.stack([_rand((n, k), 12 + i) for i in range(g)])))
    gs = jnp.asarray(sizes, jnp.int32)
    config = fg.Fp8GemmConfig(block_n=256, num_sms=2, interpret=True)
    out = np.asarray(fg.fp8_grouped_gemm(a, sa, b, sb, gs, out_dtype=jnp.float32, backend="mosaic_gpu",
                                         config=config))
    assert not gpu_interpreter()
    ref = np.asarray(fg.fp8_grouped_gemm(a, sa, b, sb, gs, out_dtype=jnp.float32, backend="xla"))
    assert out.shape == (m, n)
    start = 0
    for i, size in enumerate(sizes):
        rows = slice(start, start + size)
        exact, bound = _exact_and_bound(a[rows], sa[rows], b[i], sb[i])
        assert np.all(np.abs(out[rows] - exact) <= bound * 2.0**-24), i
        assert np.all(np.abs(out[rows] - ref[rows]) <= bound * 2.0**-23), i
        start += size
    np.testing.assert_array_equal(out[start:], 0.0)  # rows past the groups


def test_aligned_layout():
    layout = jax.jit(aligned_layout, static_argnums=(1, 2, 3))
    dest, tile_group, num_tiles, t = layout(jnp.asarray([3, 0, 5, 1], jnp.int32), 12, 4, 4)
    # groups start on 4-row tiles: rows 0-2 -> 0-2, rows 3-7 -> 4-8, row 8 -> 12, rows 9-11 past the groups
    np.testing.assert_array_equal(dest, [0, 1, 2, 4, 5, 6, 7, 8, 12, t * 4, t * 4, t * 4])
    assert int(num_tiles[0]) == 4 and t >= 4
    np.testing.assert_array_equal(tile_group[:4], [0, 2, 2, 3])


# ------------------------------------------------------------------------------------------ validation


def test_bad_backend_and_shapes_are_refused():
    a, sa, b, sb = _operands(8, 130, 200)
    assert resolve_backend("auto") == "xla"  # conftest runs on CPU
    assert [resolve_backend(x) for x in BACKENDS[:-1]] == list(BACKENDS[:-1])
    with pytest.raises(ValueError, match="unknown backend 'cuda'.*'interpret'.*'mosaic_gpu'.*'triton'.*'xla'"):
        fg.fp8_gemm(a, sa, b, sb, backend="cuda")
    with pytest.raises(ValueError, match=r"K of a \(8, 200\) and b \(130, 100\) differ"):
        fg.fp8_gemm(a, sa, b[:, :100], sb, backend="xla")
    with pytest.raises(ValueError, match=r"a \(8, 200\) needs a_scale of shape \(8, 2\), got \(8, 1\)"):
        fg.fp8_gemm(a, sa[:, :1], b, sb)
    with pytest.raises(ValueError, match=r"b \(130, 200\) needs b_scale of shape \(2, 2\), got \(1, 2\)"):
        fg.fp8_gemm(a, sa, b, sb[:1])
    with pytest.raises(ValueError, match="a must be float8_e4m3fn, got float32"):
        fg.fp8_gemm(a.astype(jnp.float32), sa, b, sb)
    bg, sbg = b[None], sb[None]
    with pytest.raises(ValueError, match=r"needs group_sizes of shape \(1,\), got \(2,\)"):
        fg.fp8_grouped_gemm(a, sa, bg, sbg, jnp.asarray([4, 4], jnp.int32))
    with pytest.raises(ValueError, match="mosaic_gpu: block_m must be 128"):
        fg.default_config("mosaic_gpu", fg.Fp8GemmConfig(block_m=64))
    with pytest.raises(ValueError, match="interpret runs the mosaic_gpu kernel.*got 'xla'"):
        fg.fp8_gemm(a, sa, b, sb, backend="xla", config=fg.Fp8GemmConfig(interpret=True))
    with pytest.raises(ValueError, match="block_n must be a positive int"):
        fg.Fp8GemmConfig(block_n=0)
    with pytest.raises(ValueError, match=r"x must be \[M, K\] and w \[K, N\], got x \(8, 200\) and w \(130, 200\)"):
        fg.fp8_linear(a.astype(jnp.float32), b.astype(jnp.float32))


# supports(...) asked up front agrees with the wrappers both ways: what it refuses raises that reason, what it
# takes runs (b [N, K]: fp8_gemm; b [G, N, K]: fp8_grouped_gemm). (b shape, backend, config, part of the reason
# or None.) The GPU backends' accepted configs are lowered for CUDA in test_kernel_lowering.
SUPPORT_CASES = {
    "interpret_ragged": ((130, 200), "interpret", fg.Fp8GemmConfig(block_m=48, block_n=80), None),
    "xla_grouped": ((2, 130, 200), "xla", None, None),
    "interpret_grouped": ((2, 130, 200), "interpret", fg.Fp8GemmConfig(block_m=16, block_n=256), None),
    "k_mismatch": ((130, 100), "interpret", None, "K of a (64, 200) and b (130, 100) differ (200 vs 100)"),
    "unknown_backend": ((130, 200), "tpu", None, "unknown backend 'tpu'"),
    "interpret_config": ((130, 200), "interpret", fg.Fp8GemmConfig(interpret=True), "needs backend='mosaic_gpu'"),
    "triton_tile": ((2, 130, 200), "triton", fg.Fp8GemmConfig(block_m=48), "triton: block_m must be a power of two"),
    "mosaic_block_m": ((130, 200), "mosaic_gpu", fg.Fp8GemmConfig(block_m=64), "mosaic_gpu: block_m must be 128"),
    "mosaic_block_n": ((2, 130, 200), "mosaic_gpu", fg.Fp8GemmConfig(block_n=96), "mosaic_gpu: block_n must be"),
}


@pytest.mark.parametrize("case", SUPPORT_CASES)
def test_supports_agrees_with_the_gemms(case):
    b_shape, backend, config, want = SUPPORT_CASES[case]
    reason = fg.supports((64, 200), b_shape, backend=backend, config=config)
    a, sa = quantize_act(jnp.asarray(_rand((64, 200), 51)))
    g, n, k = (1, *b_shape) if len(b_shape) == 2 else b_shape
    b, sb = jax.vmap(quantize_weight)(jnp.asarray(_rand((g * n, k), 52)).reshape(g, n, k))
    sizes = jnp.asarray([30, 20], jnp.int32)
    run = lambda be, cfg: (fg.fp8_gemm(a, sa, b[0], sb[0], out_dtype=jnp.float32, backend=be, config=cfg)
                           if len(b_shape) == 2 else
                           fg.fp8_grouped_gemm(a, sa, b, sb, sizes, out_dtype=jnp.float32, backend=be, config=cfg))
    if want is None:
        assert reason is None
        out, ref = np.asarray(run(backend, config)), np.asarray(run("xla", None))
        assert out.shape == (64, b_shape[-2])
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    else:
        assert reason is not None and want in reason and "\n" not in reason
        with pytest.raises(ValueError, match=re.escape(reason)):
            run(backend, config)


# ------------------------------------------------------------------------------------------- gradients


def _value_and_vjp(f, x, w, ct):
    """f(x, w) and its cotangents for `ct`, compiled once."""

    def run(x, w, ct):
        y, vjp = jax.vjp(f, x, w)
        return (y, *vjp(ct))

    return jax.jit(run)(x, w, ct)


def _rel(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(x - ref) / np.linalg.norm(ref)


# E4M3 keeps 3 mantissa bits: a value is off by up to 2^-4 relative, ~2% RMS; a product of two quantised
# operands (and the quantised output gradient in Dgrad and Wgrad) lands near 3-4% relative in norm.
FP8_REL = 0.06


def test_fp8_linear_gradients():
    m, k, n = 130, 256, 200
    x = jnp.asarray(_rand((m, k), 21, spread=False))
    w = jnp.asarray(_rand((k, n), 22, spread=False) * 0.05)
    ct = jnp.asarray(_rand((m, n), 23, spread=False))
    y0, gx0, gw0 = _value_and_vjp(lambda x, w: x @ w, x, w, ct)
    grads = {}
    for be in ("interpret", "xla"):
        grads[be] = _value_and_vjp(lambda x, w, be=be: fg.fp8_linear(x, w, backend=be), x, w, ct)
        for got, want in zip(grads[be], (y0, gx0, gw0)):
            assert got.shape == want.shape and got.dtype == want.dtype
            assert _rel(got, want) < FP8_REL
    for got, want in zip(grads["interpret"], grads["xla"]):  # the kernel and the reference agree
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))
    # Exactly the FP8 recipe, in float64:
    # Dgrad = deq(q_act(dy)) @ deq(q_w(w)) ; Wgrad = deq(q_act(x.T)) @ deq(q_w(dy.T)).T
    _, gx, gw = grads["interpret"]
    wq, ws = quantize_weight(w.T)
    dx_exact, dx_bound = _exact_and_bound(*quantize_act(ct), wq.T, ws.T)
    dw_exact, dw_bound = _exact_and_bound(*quantize_act(x.T), *quantize_weight(ct.T))
    assert np.all(np.abs(np.asarray(gx) - dx_exact) <= dx_bound * 2.0**-24 + 1e-6 * np.abs(dx_exact))
    assert np.all(np.abs(np.asarray(gw) - dw_exact) <= dw_bound * 2.0**-24 + 1e-6 * np.abs(dw_exact))


def test_fp8_linear_bf16_and_jit():
    x = jnp.asarray(_rand((16, 128), 31, spread=False), jnp.bfloat16)
    w = jnp.asarray(_rand((128, 64), 32, spread=False) * 0.1)
    loss = lambda x, w: jnp.sum(fg.fp8_linear(x, w, backend="xla").astype(jnp.float32) ** 2)
    gx, gw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
    gx0, gw0 = jax.grad(lambda x, w: jnp.sum((x.astype(jnp.float32) @ w) ** 2), argnums=(0, 1))(x, w)
    assert gx.dtype == jnp.bfloat16 and gw.dtype == jnp.float32
    assert _rel(gx, gx0) < FP8_REL and _rel(gw, gw0) < FP8_REL


def test_fp8_grouped_linear_gradients():
    sizes, m, k, n = [40, 0, 70, 5], 130, 256, 160
    g = len(sizes)
    gs = jnp.asarray(sizes, jnp.int32)
    x = jnp.asarray(_rand((m, k), 41, spread=False))
    w = jnp.asarray(np.stack([_rand((k, n), 42 + i, spread=False) for i in range(g)]) * 0.05)
    ct = jnp.asarray(_rand((m, n), 49, spread=False))
    gid = np.repeat(np.arange(g + 1), [*sizes, m - sum(sizes)])
    keep = jnp.asarray(gid < g)[:, None]

    def full(x, w):  # per-row expert weight, full precision
        return jnp.where(keep, jnp.einsum("mk,mkn->mn", x, w[np.minimum(gid, g - 1)]), 0.0)

    y0, gx0, gw0 = _value_and_vjp(full, x, w, ct)
    y, gx, gw = _value_and_vjp(lambda x, w: fg.fp8_grouped_linear(x, w, gs, backend="interpret"), x, w, ct)
    for got, want in zip((y, gx, gw), (y0, gx0, gw0)):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert _rel(got, want) < FP8_REL
    np.testing.assert_array_equal(gw[1], 0.0)  # the empty group gets no gradient
    np.testing.assert_array_equal(gx[sum(sizes):], 0.0)  # nor do rows past the groups
    np.testing.assert_array_equal(y[sum(sizes):], 0.0)
    # Wgrad of each expert is exactly the dense FP8 recipe on its own rows (its tiles along M start at its first row).
    start = 0
    for i, size in enumerate(sizes):
        if size:
            rows = slice(start, start + size)
            exact, bound = _exact_and_bound(*quantize_act(x[rows].T), *quantize_weight(ct[rows].T))
            assert np.all(np.abs(np.asarray(gw[i]) - exact) <= bound * 2.0**-24 + 1e-6 * np.abs(exact))
        start += size
