"""The GPU backends of the Pallas kernels lower for CUDA from this CPU-only machine.

`jax.export` with platforms=["cuda"] runs the whole Pallas lowering (Mosaic GPU's Python lowering, with its
layout, swizzle and wgmma checks; or the Triton IR generation) without a GPU; only the final compile to PTX
/ SASS needs one. One test per kernel and backend; `_export_for_cuda` and `CALL_TARGETS` are shared.

Call targets (found by experiment on jax 0.10.2): Mosaic GPU kernels become `stablehlo.custom_call
@mosaic_gpu_v2`; Pallas Triton kernels `@__gpu$xla.gpu.triton` (jaxlib <= 0.10.2; later jaxlib compiles
Triton itself and emits `triton_kernel_call_ffi`).
"""
import functools
import re

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import fp8_gemm as fg

CALL_TARGETS = {"mosaic_gpu": "mosaic_gpu_v2", "triton": "__gpu$xla.gpu.triton"}
E4M3 = jnp.float8_e4m3fn
S = jax.ShapeDtypeStruct


def _export_for_cuda(fn, args, backend: str) -> jax.export.Exported:
    """Export `fn` for CUDA; assert the module holds the backend's kernel call; return the export."""
    checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in CALL_TARGETS.values()]
    exp = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*args)
    assert exp.platforms == ("cuda",)
    target = CALL_TARGETS[backend]
    assert target.encode() in exp.mlir_module_serialized  # the serialized StableHLO bytecode
    assert set(re.findall(r"stablehlo\.custom_call @([\w$.]+)", exp.mlir_module())) == {target}
    return exp


# -------------------------------------------------------------------------------------------- fp8_gemm

# Ragged on purpose: M, N, K are padded to the tiles inside the wrapper.
_GEMM_ARGS = (S((200, 1000), E4M3), S((200, 8), jnp.float32), S((384, 1000), E4M3), S((3, 8), jnp.float32))
_GROUPED_ARGS = (S((200, 1000), E4M3), S((200, 8), jnp.float32), S((4, 384, 1000), E4M3),
                 S((4, 3, 8), jnp.float32), S((4,), jnp.int32))


def _fp8_wgmma(exp) -> list[str]:
    return re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k32\.f32\.e4m3\.e4m3", exp.mlir_module())


def test_fp8_gemm_lowers_mosaic_gpu():
    exp = _export_for_cuda(lambda *a: fg.fp8_gemm(*a, backend="mosaic_gpu"), _GEMM_ARGS, "mosaic_gpu")
    assert _fp8_wgmma(exp)  # FP8 operands go to the tensor cores as E4M3 (K-major A and B)
    assert "cp.async.bulk.tensor" in exp.mlir_module()  # TMA copies


def test_fp8_gemm_lowers_triton():
    exp = _export_for_cuda(lambda *a: fg.fp8_gemm(*a, backend="triton"), _GEMM_ARGS, "triton")
    assert "tt.ptr<f8E4M3FN>" in exp.mlir_module()  # the kernel loads E4M3 tiles


def test_fp8_grouped_gemm_lowers_mosaic_gpu():
    fn = lambda *a: fg.fp8_grouped_gemm(*a, backend="mosaic_gpu")
    assert _fp8_wgmma(_export_for_cuda(fn, _GROUPED_ARGS, "mosaic_gpu"))


def test_fp8_grouped_gemm_lowers_triton():
    fn = lambda *a: fg.fp8_grouped_gemm(*a, backend="triton")
    assert "tt.ptr<f8E4M3FN>" in _export_for_cuda(fn, _GROUPED_ARGS, "triton").mlir_module()


@pytest.mark.parametrize("backend", ["mosaic_gpu", "triton"])
def test_fp8_linear_grad_lowers(backend):
    """Training path: Fprop, Dgrad and Wgrad all become kernel calls (three per step)."""
    loss = lambda x, w: jnp.sum(fg.fp8_linear(x, w, backend=backend).astype(jnp.float32))
    args = (S((256, 512), jnp.bfloat16), S((512, 384), jnp.float32))
    exp = _export_for_cuda(jax.value_and_grad(loss, argnums=(0, 1)), args, backend)
    assert exp.mlir_module().count(f"stablehlo.custom_call @{CALL_TARGETS[backend]}") == 3


# -------------------------------------------------------------------------------------------- mla_decode

from pallas_kernels import mla_decode as md  # noqa: E402
from pallas_kernels.mla_decode import mosaic_gpu as md_mosaic  # noqa: E402
from pallas_kernels.mla_decode import plan as md_plan  # noqa: E402
from pallas_kernels.mla_decode import triton as md_triton  # noqa: E402

# FlashMLA's benchmark shapes: batch 128, cache 4096, C = 512, R = 64, bfloat16.
_MLA_KW = dict(v_dim=512, softmax_scale=576**-0.5)
_MLA_WGMMA = (
    "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16",  # scores: 64 query rows x 64 cache positions
    "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16",  # P.V: 64 rows x half of C per warpgroup
)


def _check_mla_kernel(exp, backend: str) -> None:
    text = exp.mlir_module()
    if backend == "mosaic_gpu":
        assert all(op in text for op in _MLA_WGMMA)
        assert "cp.async.bulk.tensor" in text  # TMA copies of cache blocks
    else:
        assert "tt.ptr<bf16>" in text


@pytest.mark.parametrize("backend", ["mosaic_gpu", "triton"])
@pytest.mark.parametrize("heads,sq,splits", [(128, 1, 1), (128, 2, 1), (16, 2, 2)])
def test_mla_decode_lowers(backend, heads, sq, splits):
    args = (S((128, sq, heads, 576), jnp.bfloat16), S((128, 4096, 576), jnp.bfloat16), S((128,), jnp.int32))
    config = md.MlaDecodeConfig(num_splits=splits)  # 2 splits: float32 partials merged outside the kernel
    fn = lambda *a: md.mla_decode(*a, backend=backend, config=config, **_MLA_KW)
    _check_mla_kernel(_export_for_cuda(fn, args, backend), backend)


@pytest.mark.parametrize("backend", ["mosaic_gpu", "triton"])
def test_mla_decode_block_table_lowers(backend):
    """The kernels' own block-table path (pages shared by all sequences; the public entry's table is the identity)."""
    module = {"mosaic_gpu": md_mosaic, "triton": md_triton}[backend]
    config = md.MlaDecodeConfig()
    args = (S((128, 2, 128, 576), jnp.bfloat16), S((8192, config.block_s, 576), jnp.bfloat16),
            S((128, 64), jnp.int32), S((128,), jnp.int32))
    layout = module.make_plan(args[0].shape, (128, 64 * config.block_s, 576), 512, config)
    fn = lambda *a: md_plan.decode_pages(*a, softmax_scale=_MLA_KW["softmax_scale"], plan=layout,
                                         run=functools.partial(module.run, config=config))
    _check_mla_kernel(_export_for_cuda(fn, args, backend), backend)


# A packed FP8 cache (V3's 656-byte rows): the bytes TMA-copied, dequantised into a bfloat16 tile, the same wgmma.
_FP8_ROW = 656


def _check_fp8_kernel(exp) -> None:
    _check_mla_kernel(exp, "mosaic_gpu")
    text = exp.mlir_module()
    assert "e4m3x2" in text  # E4M3 codes converted in pairs (to f16, then float32 for the scale)


@pytest.mark.parametrize("heads,sq,splits", [(128, 2, 1), (16, 2, 2)])
def test_mla_decode_fp8_cache_lowers_mosaic_gpu(heads, sq, splits):
    args = (S((128, sq, heads, 576), jnp.bfloat16), S((128, 4096, _FP8_ROW), jnp.uint8), S((128,), jnp.int32))
    config = md.MlaDecodeConfig(num_splits=splits)
    assert md.supports(args[0].shape, args[1].shape, jnp.uint8, v_dim=512, backend="mosaic_gpu", config=config) is None
    fn = lambda *a: md.mla_decode(*a, backend="mosaic_gpu", config=config, **_MLA_KW)
    _check_fp8_kernel(_export_for_cuda(fn, args, "mosaic_gpu"))


def test_mla_decode_fp8_block_table_lowers_mosaic_gpu():
    config = md.MlaDecodeConfig()
    args = (S((128, 2, 128, 576), jnp.bfloat16), S((8192, config.block_s, _FP8_ROW), jnp.uint8),
            S((128, 64), jnp.int32), S((128,), jnp.int32))
    layout = md_mosaic.make_plan(args[0].shape, (128, 64 * config.block_s, _FP8_ROW), 512, config)
    fn = lambda *a: md_plan.decode_pages(*a, softmax_scale=_MLA_KW["softmax_scale"], plan=layout,
                                         run=functools.partial(md_mosaic.run, config=config))
    _check_fp8_kernel(_export_for_cuda(fn, args, "mosaic_gpu"))


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_mla_decode_mosaic_smem_estimate_is_exact(fp8):
    """`mosaic_gpu.refusal` rejects configs by `smem_bytes`: the kernel must use exactly that much."""
    from jax.experimental.mosaic.gpu import core as mgpu_core

    cache = S((2, 256, _FP8_ROW), jnp.uint8) if fp8 else S((2, 256, 576), jnp.bfloat16)
    args = (S((2, 1, 64, 576), jnp.bfloat16), cache, S((2,), jnp.int32))
    config = md.MlaDecodeConfig(num_splits=1)
    plan = md_mosaic.make_plan(args[0].shape, args[1].shape, 512, config)
    need = md_mosaic.smem_bytes(plan, 2, md_mosaic.stages(plan, config), fp8=fp8)
    assert need <= md.SMEM_BYTES
    fn = lambda *a: md.mla_decode(*a, backend="mosaic_gpu", config=config, **_MLA_KW)
    with mgpu_core.artificial_shared_memory_limit(need - 1), pytest.raises(ValueError, match="shared memory"):
        _export_for_cuda(fn, args, "mosaic_gpu")
    with mgpu_core.artificial_shared_memory_limit(need):
        _check_mla_kernel(_export_for_cuda(fn, args, "mosaic_gpu"), "mosaic_gpu")


# ----------------------------------------------------------------------- supports() agrees with the lowering

# What `supports` takes on a GPU backend lowers for CUDA; what it refuses raises its reason before lowering.


def _lowers_unless_refused(fn, args, backend: str, reason: str | None, want: str | None) -> None:
    """`reason` (from supports) is None when `want` is, else contains it; `fn` lowers, or raises `reason`."""
    if want is None:
        assert reason is None
        _export_for_cuda(fn, args, backend)
    else:
        assert reason is not None and want in reason
        with pytest.raises(ValueError, match=re.escape(reason)):
            _export_for_cuda(fn, args, backend)


_GEMM_SUPPORT = [
    ("mosaic_gpu", fg.Fp8GemmConfig(block_n=192, num_stages=2), None),
    ("mosaic_gpu", fg.Fp8GemmConfig(block_n=320), "mosaic_gpu: block_n must be a multiple of 64 and <= 256"),
    ("triton", fg.Fp8GemmConfig(block_m=32, block_n=64), None),
    ("triton", fg.Fp8GemmConfig(block_n=8), "triton: block_n must be a power of two >= 16, got 8"),
]


@pytest.mark.parametrize("grouped", [False, True], ids=["dense", "grouped"])
@pytest.mark.parametrize("backend,config,want", _GEMM_SUPPORT)
def test_fp8_gemm_supports_agrees_with_lowering(backend, config, want, grouped):
    args = _GROUPED_ARGS if grouped else _GEMM_ARGS
    reason = fg.supports(args[0].shape, args[2].shape, backend=backend, config=config)
    gemm = fg.fp8_grouped_gemm if grouped else fg.fp8_gemm
    _lowers_unless_refused(lambda *a: gemm(*a, backend=backend, config=config), args, backend, reason, want)


_MLA_SUPPORT = [  # q [B, Sq, H, C+R], cache [B, S, C+R], v_dim, backend, config, part of the reason or None
    ((4, 1, 16, 320), (4, 512, 320), 256, "mosaic_gpu", md.MlaDecodeConfig(block_s=128, num_stages=3), None),
    ((4, 2, 16, 576), (4, 512, 576), 512, "mosaic_gpu", md.MlaDecodeConfig(block_h=64), "query rows exceed"),
    ((4, 1, 16, 576), (4, 512, 576), 512, "mosaic_gpu", md.MlaDecodeConfig(block_s=256, num_splits=1),
     "bytes of shared memory needed"),
    ((4, 1, 16, 576), (4, 500, 576), 512, "triton", md.MlaDecodeConfig(block_s=128, num_splits=2), None),
    ((4, 1, 16, 576), (4, 512, 576), 512, "triton", md.MlaDecodeConfig(block_s=96), "triton: block_s must be"),
]


_MLA_FP8_SUPPORT = [  # the same over packed FP8 rows (uint8 [B, S, row bytes])
    ((4, 2, 16, 576), (4, 512, _FP8_ROW), 512, "mosaic_gpu", md.MlaDecodeConfig(block_h=32), None),
    ((4, 2, 16, 576), (4, 512, _FP8_ROW), 512, "mosaic_gpu", md.MlaDecodeConfig(num_stages=3, num_splits=1),
     "bytes of shared memory needed (block_s 64, 3 stages, an FP8 cache: 2 packed + 1 converted)"),
    ((4, 2, 16, 576), (4, 512, _FP8_ROW), 512, "mosaic_gpu", md.MlaDecodeConfig(block_s=128, num_splits=1),
     "bytes of shared memory needed (block_s 128"),
    ((4, 1, 16, 320), (4, 512, 392), 256, "mosaic_gpu", None, "mosaic_gpu: an FP8 cache needs v_dim 512"),
    ((4, 1, 16, 576), (4, 500, _FP8_ROW), 512, "triton", md.MlaDecodeConfig(block_s=128, num_splits=2), None),
]


_MLA_SUPPORT_CASES = [(*c, jnp.bfloat16) for c in _MLA_SUPPORT] + [(*c, jnp.uint8) for c in _MLA_FP8_SUPPORT]


@pytest.mark.parametrize("q_shape,cache_shape,v_dim,backend,config,want,cache_dtype", _MLA_SUPPORT_CASES)
def test_mla_decode_supports_agrees_with_lowering(q_shape, cache_shape, v_dim, backend, config, want, cache_dtype):
    reason = md.supports(q_shape, cache_shape, cache_dtype, v_dim=v_dim, backend=backend, config=config)
    args = (S(q_shape, jnp.bfloat16), S(cache_shape, cache_dtype), S((q_shape[0],), jnp.int32))
    fn = lambda *a: md.mla_decode(*a, v_dim=v_dim, softmax_scale=0.1, backend=backend, config=config)
    _lowers_unless_refused(fn, args, backend, reason, want)
