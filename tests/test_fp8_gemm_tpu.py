"""Backend "mosaic_tpu" of the FP8 GEMMs and the weight-only FP8 GEMMs.

The TPU kernels run on CPU in Pallas' TPU interpreter (`Fp8GemmConfig(interpret=pltpu.InterpretParams())`),
against the plain-jnp references; both compute each 128-wide K block's partial product as an f32 sum of exact
products (E4M3 x E4M3 or E4M3 x bf16; an f32 activation's products round once), scale it and add it into an
f32 accumulator, so each lies within (128 + kb + 4) * 2^-24 * (|A| @ |B|.T) of the float64 product of the
dequantised operands (Higham's gamma_n for recursive summation; "bound" below); not bit for bit with each other,
as the interpreter may sum a K block in another order. Then the kernels are compiled by libtpu for
v5e, v5p, v6e and TPU7x devices (compile-only) at DeepSeek-V3 shapes.
"""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels import fp8_gemm as fg
from pallas_kernels.fp8_gemm import mosaic_tpu
from pallas_kernels.quant import quantize_act, quantize_weight

U = 2.0**-24


@pytest.fixture(autouse=True)
def tpu_interpreter():
    """The TPU interpreter keeps state across calls; a failed kernel leaves it dirty."""
    yield
    pltpu.reset_tpu_interpret_mode_state()


def _config(**kw):
    return fg.Fp8GemmConfig(interpret=pltpu.InterpretParams(), **kw)


def _rand(shape, seed):
    """Normal values whose magnitude varies by row and column, so that the scales differ tile to tile."""
    rng = np.random.RandomState(seed)
    x = rng.randn(*shape) * np.exp(rng.uniform(-3, 3, (shape[0], 1))) * np.exp(rng.uniform(-2, 2, (1, shape[1])))
    return x.astype(np.float32)


_quantize_weights = jax.jit(jax.vmap(quantize_weight))


def _weights(g, n, k, seed):
    return _quantize_weights(jnp.asarray(np.stack([_rand((n, k), seed + i) for i in range(g)])))


def _deq(q, scale, rows):
    """float64 q * scale in numpy, one scale per `rows` x 128 block (1: activation tiles, 128: weight blocks)."""
    q, scale = np.asarray(q, np.float64), np.asarray(scale, np.float64)
    full = np.repeat(np.repeat(scale, rows, axis=0), 128, axis=1)
    return q * full[: q.shape[0], : q.shape[1]]


def _exact_and_bound(a64, b64, k):
    """float64 a @ b.T of the dequantised operands and the f32 error bound of the module docstring."""
    kb = -(-k // 128)
    return a64 @ b64.T, (128 + kb + 4) * (np.abs(a64) @ np.abs(b64).T) * U


def _check(out, ref, exact, bound):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert out.shape == ref.shape == exact.shape
    assert np.all(np.abs(ref - exact) <= bound)
    assert np.all(np.abs(out - exact) <= bound)


# ------------------------------------------------------------------------------ the kernels, interpreted


# (m, n, k, config fields, TPU generation): tiles that divide nothing (ragged M, N and K, several tiles and K
# steps, K padded past its 128-blocks) on both dot paths (E4M3 widened to bf16 in VMEM before TPU7x, E4M3 into
# the MXU from TPU7x on).
DENSE = [(70, 200, 300, dict(block_m=32, block_n=128, block_k=256), None),
         (70, 200, 300, dict(block_m=32, block_n=128, block_k=256), 7)]


@pytest.mark.parametrize("m,n,k,cfg,generation", DENSE)
def test_dense_matches_reference(m, n, k, cfg, generation):
    a, sa = quantize_act(jnp.asarray(_rand((m, k), m)))
    (b,), (sb,) = _weights(1, n, k, m + 1)
    config = _config(tpu_generation=generation, **cfg)
    assert mosaic_tpu.fp8_mxu(config) is (generation == 7)  # None on this CPU host: not a TPU, widened
    out = fg.fp8_gemm(a, sa, b, sb, out_dtype=jnp.float32, backend="mosaic_tpu", config=config)
    ref = fg.fp8_gemm_reference(a, sa, b, sb, out_dtype=jnp.float32)
    exact, bound = _exact_and_bound(_deq(a, sa, 1), _deq(b, sb, 128), k)
    _check(out, ref, exact, bound)


def test_few_rows_default_tiles_bf16_output():
    """Five rows with the default tiles (one tile of 32 rows) and the default bf16 output."""
    a, sa = quantize_act(jnp.asarray(_rand((5, 384), 3)))
    (b,), (sb,) = _weights(1, 130, 384, 4)
    out = fg.fp8_gemm(a, sa, b, sb, backend="mosaic_tpu", config=_config())
    ref = fg.fp8_gemm_reference(a, sa, b, sb, out_dtype=jnp.float32)
    assert out.dtype == jnp.bfloat16 and out.shape == (5, 130)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=2.0**-8, atol=0)  # one bf16 rounding


GROUPS = [
    ([25, 0, 45, 17], 100),  # uneven, an empty group, 13 rows past the groups
    ([0, 60, 1, 39], 100),  # empty first group, a one-row group, sizes sum to M
    ([0, 0, 0, 0], 100),  # no rows at all: no tile is live
]  # one M for all: one compiled kernel, group sizes are values


@pytest.mark.parametrize("sizes,m", GROUPS)
def test_grouped_matches_reference(sizes, m):
    g, n, k = len(sizes), 120, 200
    a, sa = quantize_act(jnp.asarray(_rand((m, k), 11)))
    b, sb = _weights(g, n, k, 12)
    gs = jnp.asarray(sizes, jnp.int32)
    config = _config(block_m=32, block_n=128, block_k=128)
    out = np.asarray(fg.fp8_grouped_gemm(a, sa, b, sb, gs, out_dtype=jnp.float32, backend="mosaic_tpu",
                                         config=config))
    ref = np.asarray(fg.fp8_grouped_gemm_reference(a, sa, b, sb, gs, out_dtype=jnp.float32))
    da = _deq(a, sa, 1)
    start = 0
    for i, size in enumerate(sizes):
        rows = slice(start, start + size)
        exact, bound = _exact_and_bound(da[rows], _deq(b[i], sb[i], 128), k)
        _check(out[rows], ref[rows], exact, bound)
        start += size
    assert out.shape == (m, n)
    np.testing.assert_array_equal(out[start:], 0.0)  # rows past the groups


# ----------------------------------------------------------------------------------- weight-only FP8


@pytest.mark.parametrize("backend,x_dtype,generation,w_layout", [
    ("mosaic_tpu", jnp.bfloat16, None, "nk"), ("mosaic_tpu", jnp.bfloat16, 7, "nk"),
    ("mosaic_tpu", jnp.float32, None, "nk"), ("mosaic_tpu", jnp.bfloat16, None, "kn"),
    ("mosaic_tpu", jnp.bfloat16, 7, "kn"), ("mosaic_tpu", jnp.float32, None, "kn"),
    ("interpret", jnp.float32, None, "nk"), ("interpret", jnp.float32, None, "kn"), ("xla", jnp.float32, None, "kn"),
])
def test_weight_only_matches_reference(backend, x_dtype, generation, w_layout):
    """w_layout "kn": the weight held [K, N] as the model holds it (`Fp8Weight`), its scales as the checkpoint's."""
    m, n, k = 9, 200, 300
    x = jnp.asarray(_rand((m, k), 21)).astype(x_dtype)
    (w,), (ws,) = _weights(1, n, k, 22)
    config = _config(tpu_generation=generation, block_k=256) if backend == "mosaic_tpu" else None
    held = w.T if w_layout == "kn" else w
    out = fg.fp8_weight_gemm(x, held, ws, out_dtype=jnp.float32, backend=backend, config=config, w_layout=w_layout)
    ref = fg.fp8_weight_gemm_reference(x, w, ws, out_dtype=jnp.float32)
    exact, bound = _exact_and_bound(np.asarray(x, np.float64), _deq(w, ws, 128), k)
    _check(out, ref, exact, bound)
    assert fg.fp8_weight_gemm(x, w, ws, backend="xla").dtype == x_dtype  # out_dtype None: x's


@pytest.mark.parametrize("backend,w_layout", [("mosaic_tpu", "nk"), ("mosaic_tpu", "kn"), ("interpret", "nk"),
                                              ("interpret", "kn")])
def test_grouped_weight_only_matches_reference(backend, w_layout):
    sizes, m, n, k = [3, 0, 40, 1], 50, 130, 384
    x = jnp.asarray(_rand((m, k), 31)).astype(jnp.bfloat16)
    w, ws = _weights(len(sizes), n, k, 32)
    gs = jnp.asarray(sizes, jnp.int32)
    config = _config(block_m=32, block_k=256) if backend == "mosaic_tpu" else fg.Fp8GemmConfig(block_m=16)
    held = jnp.swapaxes(w, 1, 2) if w_layout == "kn" else w
    out = np.asarray(fg.fp8_grouped_weight_gemm(x, held, ws, gs, out_dtype=jnp.float32, backend=backend,
                                                config=config, w_layout=w_layout))
    ref = np.asarray(fg.fp8_grouped_weight_gemm_reference(x, w, ws, gs, out_dtype=jnp.float32))
    x64 = np.asarray(x, np.float64)
    start = 0
    for i, size in enumerate(sizes):
        rows = slice(start, start + size)
        exact, bound = _exact_and_bound(x64[rows], _deq(w[i], ws[i], 128), k)
        _check(out[rows], ref[rows], exact, bound)
        start += size
    np.testing.assert_array_equal(out[start:], 0.0)


# ------------------------------------------------------------------------------------------ refusals


SUPPORT_CASES = {
    "block_m": (fg.Fp8GemmConfig(block_m=48), False, "mosaic_tpu: block_m must be a multiple of 32"),
    "block_n": (fg.Fp8GemmConfig(block_n=192), False, "mosaic_tpu: block_n must be a multiple of 128"),
    "block_k": (fg.Fp8GemmConfig(block_k=200), False, "mosaic_tpu: block_k must be a multiple of 128"),
    "vmem": (fg.Fp8GemmConfig(block_m=2048, block_n=2048), False, "MiB of VMEM"),
    "gpu_interpreter": (fg.Fp8GemmConfig(interpret=True), False, "interpret=pltpu.InterpretParams()"),
    "fine": (fg.Fp8GemmConfig(block_m=32, block_n=128, block_k=128), True, None),
}


@pytest.mark.parametrize("case", SUPPORT_CASES)
def test_supports_agrees_with_the_wrappers(case):
    config, weight_only, want = SUPPORT_CASES[case]
    reason = fg.supports((16, 200), (130, 200), backend="mosaic_tpu", config=config, weight_only=weight_only)
    if want is None:
        assert reason is None
        fg.default_config("mosaic_tpu", config)
        return
    assert want in reason and "\n" not in reason
    x = jnp.zeros((16, 200), jnp.bfloat16)
    (w,), (ws,) = _weights(1, 130, 200, 5)
    with pytest.raises(ValueError, match=re.escape(reason)):
        fg.fp8_weight_gemm(x, w, ws, backend="mosaic_tpu", config=config)


def test_weight_only_refusals():
    x = jnp.zeros((4, 200), jnp.bfloat16)
    (w,), (ws,) = _weights(1, 130, 200, 6)
    reason = fg.supports(x.shape, w.shape, backend="mosaic_gpu", weight_only=True)
    assert reason.startswith("backend 'mosaic_gpu' has no weight-only FP8 GEMM") and "'mosaic_tpu'" in reason
    assert fg.supports(x.shape, w.shape, backend="mosaic_gpu") is None  # the FP8 GEMM it has
    with pytest.raises(ValueError, match="fp8_weight_gemm: backend 'triton' has no weight-only"):
        fg.fp8_weight_gemm(x, w, ws, backend="triton")
    with pytest.raises(ValueError, match="x must be bfloat16 or float32"):
        fg.fp8_weight_gemm(x.astype(jnp.float16), w, ws, backend="xla")
    with pytest.raises(ValueError, match=r"w \(130, 200\) needs w_scale of shape \(2, 2\), got \(1, 2\)"):
        fg.fp8_weight_gemm(x, w, ws[:1], backend="xla")
    with pytest.raises(ValueError, match=r"InterpretParams\(\.\.\.\) applies to backend 'mosaic_tpu' only"):
        fg.fp8_weight_gemm(x, w, ws, backend="interpret", config=_config())
    with pytest.raises(ValueError, match="tpu_generation must be a positive int"):
        fg.Fp8GemmConfig(tpu_generation=0)
    with pytest.raises(ValueError, match=r"w_layout must be one of \('nk', 'kn'\), got 'nt'"):
        fg.fp8_weight_gemm(x, w, ws, backend="xla", w_layout="nt")
    with pytest.raises(ValueError, match=r"K of x \(4, 200\) and w \(130, 200\) \(kn\) differ \(200 vs 130\)"):
        fg.fp8_weight_gemm(x, w, ws, backend="xla", w_layout="kn")
    with pytest.raises(ValueError, match=r"w \(200, 130\) \(kn\) needs w_scale of shape \(2, 2\), got \(2, 1\)"):
        fg.fp8_weight_gemm(x, w.T, ws[:, :1], backend="xla", w_layout="kn")


# --------------------------------------------------------------------------- compiled by libtpu for TPUs

TARGETS = {"v5e:2x2": 5, "v5p:2x2x1": 5, "v6e:2x2": 6, "tpu7x:2x2x1": 7}
M, K, N, G, DECODE_ROWS = 256, 7168, 2048, 8, 8  # V3: hidden 7168; 2048: a routed expert's intermediate
E4M3 = jnp.float8_e4m3fn
F32 = jnp.float32


@pytest.fixture(scope="module")
def tpu_devices():
    pytest.importorskip("libtpu", reason="compile-only TPU targets need libtpu: pip install 'jax[tpu]==0.10.2'")
    from dsv3_jax.plan import topology_devices

    return topology_devices


def _compiled(devices, fn, *shapes):
    """fn compiled for `devices` inside a shard_map (the compiler does not partition a Pallas TPU call): each
    device runs the whole GEMM on replicated operands."""
    mesh = Mesh(np.asarray(devices), ("d",))
    args = [jax.ShapeDtypeStruct(s, d, sharding=NamedSharding(mesh, P())) for s, d in shapes]
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False)).lower(*args).compile()


@pytest.mark.parametrize("target", TARGETS)
def test_compiles_for_tpus(tpu_devices, target, monkeypatch):
    devices = tpu_devices(target)
    chosen = []  # the dot path of each kernel traced for this target (from its devices' kind)
    monkeypatch.setattr(mosaic_tpu, "fp8_mxu", lambda cfg, f=mosaic_tpu.fp8_mxu: chosen.append(f(cfg)) or chosen[-1])
    a, sa = ((M, K), E4M3), ((M, K // 128), F32)
    b, sb = ((N, K), E4M3), ((N // 128, K // 128), F32)
    bg, sbg, gs = ((G, N, K), E4M3), ((G, N // 128, K // 128), F32), ((G,), jnp.int32)
    x = ((DECODE_ROWS, K), jnp.bfloat16)
    c_dense = _compiled(devices, lambda *o: fg.fp8_gemm(*o, backend="mosaic_tpu"), a, sa, b, sb)
    _compiled(devices, lambda *o: fg.fp8_grouped_gemm(*o, backend="mosaic_tpu"), a, sa, bg, sbg, gs)
    c_weight = _compiled(devices, lambda *o: fg.fp8_weight_gemm(*o, backend="mosaic_tpu"), x, b, sb)
    _compiled(devices, lambda *o: fg.fp8_grouped_weight_gemm(*o, backend="mosaic_tpu"), ((4 * G, K), F32), bg, sbg,
              gs)
    # The weights as the model holds them ([(G,) K, N]): read in place, no transposed copy of them in HBM.
    c_kn = _compiled(devices, lambda *o: fg.fp8_weight_gemm(*o, backend="mosaic_tpu", w_layout="kn"),
                     x, ((K, N), E4M3), sb)
    c_grouped_kn = _compiled(devices, lambda *o: fg.fp8_grouped_weight_gemm(*o, backend="mosaic_tpu", w_layout="kn"),
                             ((4 * G, K), jnp.bfloat16), ((G, K, N), E4M3), sbg, gs)
    assert c_grouped_kn.memory_analysis().temp_size_in_bytes < G * N * K / 8
    assert chosen and set(chosen) == {TARGETS[target] >= mosaic_tpu.FP8_MXU_GENERATION}
    for c in (c_dense, c_weight, c_kn):
        stats = c.memory_analysis()
        assert stats.output_size_in_bytes >= N * DECODE_ROWS * 2
        # the weight is read in E4M3 and never widened in HBM: no temporary near its size
        assert stats.argument_size_in_bytes < (N + M) * K * 1.05
        assert stats.temp_size_in_bytes < N * K / 8
    weight_bytes = c_weight.memory_analysis().argument_size_in_bytes
    assert weight_bytes < 0.55 * (N * K * 2)  # weight-only decode reads about half a bf16 weight's bytes


@pytest.mark.parametrize("target", ["v5e:2x2", "tpu7x:2x2x1"])
def test_small_and_ragged_shapes_compile(tpu_devices, target):
    """What the interpreter cannot check: Mosaic's layout rules at the interpreted tests' tiles (a few rows, 32-row
    tiles, s of 1 to 3 K blocks a step, ragged N and K, single buffering), on both dot paths."""
    devices = tpu_devices(target)
    small = fg.Fp8GemmConfig(block_m=32, block_n=128, block_k=256)
    dense = _compiled(devices, lambda *o: fg.fp8_gemm(*o, out_dtype=F32, backend="mosaic_tpu", config=small),
                      ((70, 300), E4M3), ((70, 3), F32), ((200, 300), E4M3), ((2, 3), F32))
    few = _compiled(devices, lambda *o: fg.fp8_gemm(*o, backend="mosaic_tpu"),
                    ((5, 384), E4M3), ((5, 3), F32), ((130, 384), E4M3), ((2, 3), F32))
    grouped = _compiled(devices, lambda *o: fg.fp8_grouped_gemm(*o, backend="mosaic_tpu",
                                                                config=dataclasses.replace(small, num_stages=1)),
                        ((100, 200), E4M3), ((100, 2), F32), ((4, 120, 200), E4M3), ((4, 1, 2), F32),
                        ((4,), jnp.int32))
    weight = _compiled(devices, lambda *o: fg.fp8_weight_gemm(*o, backend="mosaic_tpu", config=small),
                       ((9, 300), F32), ((200, 300), E4M3), ((2, 3), F32))
    weight_kn = _compiled(devices, lambda *o: fg.fp8_grouped_weight_gemm(*o, backend="mosaic_tpu", config=small,
                                                                         w_layout="kn"),
                          ((50, 300), jnp.bfloat16), ((4, 300, 200), E4M3), ((4, 2, 3), F32), ((4,), jnp.int32))
    for c in (dense, few, grouped, weight, weight_kn):
        assert c.memory_analysis() is not None
