"""Block-scaled FP8 GEMM with FP32 promotion every 128 of K (DeepSeek-V3 report s.3.3, DeepGEMM's recipe).

    out[M, N] = dequant(a) @ dequant(b).T,  a: e4m3 [M, K] with float32 scales [M, ceil(K/128)] (1x128 tiles),
                                            b: e4m3 [N, K] with float32 scales [ceil(N/128), ceil(K/128)] (128x128).

Hopper's tensor cores keep only ~14 fraction bits while they accumulate FP8 products, so a long K loses
up to ~2% (paper s.3.1). The fix, and the contract of every backend here: within one 128-wide K block the
raw e4m3 products are accumulated by the MMA; the block's partial sum is then multiplied by
a_scale[m, kblock] * b_scale[nblock, kblock] and added into an FP32 accumulator ("promotion").

The grouped variant (MoE experts, rows sorted by expert) copies each group's rows into a layout where no
tile of `block_m` rows straddles two groups (DeepGEMM's "contiguous" layout, `tiles.aligned_layout`), runs
the same kernels with the tile's expert weight, and gathers the rows back.

`fp8_linear` / `fp8_grouped_linear` are the differentiable entries for training (custom VJP: Fprop, Dgrad
and Wgrad all run on E4M3 inputs).

Weight-only FP8 for decoding (`fp8_weight_gemm`, `fp8_grouped_weight_gemm`): x stays bf16 or f32 and only the
weight is E4M3 with its 128x128 block scales, dequantised where the kernel reads it (in VMEM on TPUs), so a
decode step reads half the weight bytes of bf16 on any generation; the promotion is the same with the
activation scales gone (each K block's partial product times its weight block's scale).

Modules: `reference` (backend "xla": plain jnp, the promotion as a scan over K blocks), `interpret` and
`triton` (one Pallas kernel body, `common`), `mosaic_gpu` (the Hopper kernel), `mosaic_tpu` (the TPU kernels,
v5e to TPU7x); `operands` (validation and shared math), `tiles` (padding to whole tiles, the aligned grouped
layout), `config`. `backends.KERNELS` names the module of each backend; each provides `DEFAULTS` (its
Fp8GemmConfig defaults), `config_refusal(config)`, `gemm(a, a_scale, b, b_scale, *, out_dtype, config)` and
`grouped_gemm(a, a_scale, b, b_scale, group_sizes, *, out_dtype, config)`; those with the weight-only GEMMs
("xla", "interpret", "mosaic_tpu") also `weight_gemm(x, w, w_scale, *, out_dtype, config)` and
`grouped_weight_gemm(x, w, w_scale, group_sizes, *, out_dtype, config)`.

Letters: M rows (tokens), N output features, K contraction, G groups (experts); kb = ceil(K/128).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib

import jax
import jax.numpy as jnp

from pallas_kernels import backends
from pallas_kernels.backends import resolve_backend
from pallas_kernels.fp8_gemm.config import Fp8GemmConfig
from pallas_kernels.fp8_gemm.operands import (
    BLOCK_K,
    group_sizes_refusal,
    operand_refusal,
    refuse,
    shape_refusal,
    weight_matrix_shape,
    weight_operand_refusal,
)
from pallas_kernels.fp8_gemm.reference import (
    fp8_gemm_reference,
    fp8_grouped_gemm_reference,
    fp8_grouped_weight_gemm_reference,
    fp8_kgrouped_gemm_reference,
    fp8_weight_gemm_reference,
)
from pallas_kernels.fp8_gemm.tiles import aligned_layout
from pallas_kernels.quant import quantize_act, quantize_weight

__all__ = [
    "BLOCK_K", "Fp8GemmConfig", "default_config", "fp8_gemm", "fp8_gemm_reference", "fp8_grouped_gemm",
    "fp8_grouped_gemm_reference", "fp8_grouped_linear", "fp8_grouped_weight_gemm", "fp8_grouped_weight_gemm_reference",
    "fp8_kgrouped_gemm_reference", "fp8_linear", "fp8_weight_gemm", "fp8_weight_gemm_reference", "supports",
]

_MODULES = {backend: importlib.import_module(module) for backend, module in backends.kernels("fp8_gemm").items()}


# ----------------------------------------------------------------------------------- what runs where


def _filled(backend: str, config: Fp8GemmConfig | None) -> Fp8GemmConfig:
    config = config or Fp8GemmConfig()
    fill = {k: v for k, v in _MODULES[backend].DEFAULTS.items() if getattr(config, k) is None}
    return dataclasses.replace(config, **fill)


def _config_refusal(backend: str, config: Fp8GemmConfig) -> str | None:
    if backends.is_tpu_interpret_params(config.interpret):
        reason = backends.interpret_refusal(config.interpret, backend)
        if reason:
            return reason
    elif config.interpret and backend not in backends.GPU_INTERPRETED:
        names = " or ".join(backends.GPU_INTERPRETED)
        hint = ("; the TPU interpreter runs it with Fp8GemmConfig(interpret=pltpu.InterpretParams())"
                if backend in backends.TPU_INTERPRETED else "")
        return (f"Fp8GemmConfig.interpret runs the {names} kernel in JAX's GPU interpreter; "
                f"it needs backend={names!r}, got {backend!r}{hint}")
    return _MODULES[backend].config_refusal(config)


def default_config(backend: str, config: Fp8GemmConfig | None = None) -> Fp8GemmConfig:
    """`config` with its unset fields filled from the defaults of a concrete `backend`; ValueError if the
    backend cannot run it."""
    config = _filled(backend, config)
    reason = _config_refusal(backend, config)
    if reason:
        raise ValueError(reason)
    return config


def supports(a_shape, b_shape, *, backend: str, config: Fp8GemmConfig | None = None,
             weight_only: bool = False) -> str | None:
    """Why the GEMM of a [M, K] by b [N, K] (`fp8_gemm`) or b [G, N, K] (`fp8_grouped_gemm`) cannot run on
    `backend` with `config`, in one line; None: it can. The wrappers refuse exactly these (ValueError).
    weight_only: the same for `fp8_weight_gemm` / `fp8_grouped_weight_gemm` (a is the unquantised x).

    Any M, N, K runs on every backend; what a backend refuses is a config it cannot tile with, or a weight-only
    GEMM it has no kernel for.
    """
    reason = shape_refusal(a_shape, b_shape) or backends.backend_refusal(backend)
    if reason is None and config is not None and not isinstance(config, Fp8GemmConfig):
        reason = f"config must be an Fp8GemmConfig or None, got {type(config).__name__}"
    if reason:
        return reason
    backend = resolve_backend(backend)
    if weight_only and not hasattr(_MODULES[backend], "weight_gemm"):
        have = ", ".join(repr(b) for b, module in _MODULES.items() if hasattr(module, "weight_gemm"))
        return f"backend {backend!r} has no weight-only FP8 GEMM; {have} have"
    return _config_refusal(backend, _filled(backend, config))


# ----------------------------------------------------------------------------------------- wrappers


@functools.partial(jax.jit, static_argnames=("out_dtype", "backend", "config"))
def _fp8_gemm(a, a_scale, b, b_scale, *, out_dtype, backend: str, config: Fp8GemmConfig):
    return _MODULES[backend].gemm(a, a_scale, b, b_scale, out_dtype=out_dtype, config=config)


def fp8_gemm(a, a_scale, b, b_scale, *, out_dtype=jnp.bfloat16, backend: str = "auto",
             config: Fp8GemmConfig | None = None) -> jax.Array:
    """dequant(a) @ dequant(b).T -> [M, N], promoted to FP32 every 128 of K. Any M, N, K.

    a: e4m3 [M, K], a_scale: f32 [M, ceil(K/128)]; b: e4m3 [N, K], b_scale: f32 [ceil(N/128), ceil(K/128)]
    (`quant.quantize_act` and `quant.quantize_weight` produce these).
    """
    refuse("fp8_gemm", operand_refusal(a, a_scale, b, b_scale, grouped=False)
           or supports(a.shape, b.shape, backend=backend, config=config))
    backend = resolve_backend(backend)
    return _fp8_gemm(a, a_scale, b, b_scale, out_dtype=jnp.dtype(out_dtype), backend=backend,
                     config=default_config(backend, config))


@functools.partial(jax.jit, static_argnames=("out_dtype", "backend", "config"))
def _fp8_grouped_gemm(a, a_scale, b, b_scale, group_sizes, *, out_dtype, backend: str, config: Fp8GemmConfig):
    return _MODULES[backend].grouped_gemm(a, a_scale, b, b_scale, group_sizes, out_dtype=out_dtype, config=config)


def fp8_grouped_gemm(a, a_scale, b, b_scale, group_sizes, *, out_dtype=jnp.bfloat16, backend: str = "auto",
                     config: Fp8GemmConfig | None = None) -> jax.Array:
    """Grouped (MoE) FP8 GEMM: rows of `a` sorted by group; row r of group g gets dequant(a)[r] @ dequant(b[g]).T.

    a: e4m3 [M, K], a_scale [M, ceil(K/128)]; b: e4m3 [G, N, K], b_scale [G, ceil(N/128), ceil(K/128)];
    group_sizes: int [G], summing to <= M (rows past the sum come out as zeros). Returns [M, N].
    """
    refuse("fp8_grouped_gemm", operand_refusal(a, a_scale, b, b_scale, grouped=True)
           or group_sizes_refusal(group_sizes, b.shape[0], f"b {b.shape}")
           or supports(a.shape, b.shape, backend=backend, config=config))
    backend = resolve_backend(backend)
    return _fp8_grouped_gemm(a, a_scale, b, b_scale, group_sizes, out_dtype=jnp.dtype(out_dtype),
                             backend=backend, config=default_config(backend, config))


def _weight_in(backend: str, w: jax.Array, w_layout: str) -> tuple[jax.Array, dict]:
    """w as `backend`'s weight-only GEMM takes it: a [K, N] weight goes as it is to a backend with a [K, N] kernel
    (`WEIGHT_KN`), else it is transposed to [N, K] here, in XLA (a copy of the weight: the reference backends')."""
    if w_layout == "kn" and getattr(_MODULES[backend], "WEIGHT_KN", False):
        return w, dict(w_layout="kn")
    return (jnp.swapaxes(w, -1, -2) if w_layout == "kn" else w), {}


@functools.partial(jax.jit, static_argnames=("out_dtype", "backend", "config", "w_layout"))
def _fp8_weight_gemm(x, w, w_scale, *, out_dtype, backend: str, config: Fp8GemmConfig, w_layout: str):
    w, layout = _weight_in(backend, w, w_layout)
    return _MODULES[backend].weight_gemm(x, w, w_scale, out_dtype=out_dtype, config=config, **layout)


def fp8_weight_gemm(x, w, w_scale, *, out_dtype=None, backend: str = "auto",
                    config: Fp8GemmConfig | None = None, w_layout: str = "nk") -> jax.Array:
    """x @ dequant(w).T -> [M, N] with only the weight in FP8 (decoding: half the weight bytes of bf16). Any M, N, K.

    x: bf16 or f32 [M, K], not quantised; w: e4m3 [N, K], w_scale: f32 [ceil(N/128), ceil(K/128)]
    (`quant.quantize_weight`). Each 128-wide K block's f32 partial product is scaled by its weight block's scale
    and added into an f32 accumulator. out_dtype None: x's dtype.
    w_layout "kn": w is held [K, N] (the model's [in, out] leaves), its scales still [ceil(N/128), ceil(K/128)];
    "mosaic_tpu" reads it so, with no copy; the other backends transpose it first.
    """
    refuse("fp8_weight_gemm", weight_operand_refusal(x, w, w_scale, grouped=False, w_layout=w_layout)
           or supports(x.shape, weight_matrix_shape(w.shape, w_layout), backend=backend, config=config,
                       weight_only=True))
    backend = resolve_backend(backend)
    return _fp8_weight_gemm(x, w, w_scale, out_dtype=jnp.dtype(out_dtype or x.dtype), backend=backend,
                            config=default_config(backend, config), w_layout=w_layout)


@functools.partial(jax.jit, static_argnames=("out_dtype", "backend", "config", "w_layout"))
def _fp8_grouped_weight_gemm(x, w, w_scale, group_sizes, *, out_dtype, backend: str, config: Fp8GemmConfig,
                             w_layout: str):
    w, layout = _weight_in(backend, w, w_layout)
    return _MODULES[backend].grouped_weight_gemm(x, w, w_scale, group_sizes, out_dtype=out_dtype, config=config,
                                                 **layout)


def fp8_grouped_weight_gemm(x, w, w_scale, group_sizes, *, out_dtype=None, backend: str = "auto",
                            config: Fp8GemmConfig | None = None, w_layout: str = "nk") -> jax.Array:
    """Grouped (MoE) weight-only FP8 GEMM: rows of x sorted by group; row r of group g gets x[r] @ dequant(w[g]).T.

    x: bf16 or f32 [M, K]; w: e4m3 [G, N, K], w_scale [G, ceil(N/128), ceil(K/128)]; group_sizes: int [G],
    summing to <= M (rows past the sum come out as zeros). Returns [M, N] in out_dtype (None: x's dtype).
    w_layout "kn": w is [G, K, N], as `fp8_weight_gemm` takes it.
    """
    refuse("fp8_grouped_weight_gemm", weight_operand_refusal(x, w, w_scale, grouped=True, w_layout=w_layout)
           or group_sizes_refusal(group_sizes, w.shape[0], f"w {w.shape}")
           or supports(x.shape, weight_matrix_shape(w.shape, w_layout), backend=backend, config=config,
                       weight_only=True))
    backend = resolve_backend(backend)
    return _fp8_grouped_weight_gemm(x, w, w_scale, group_sizes, out_dtype=jnp.dtype(out_dtype or x.dtype),
                                    backend=backend, config=default_config(backend, config), w_layout=w_layout)


# ----------------------------------------------------------------------------- differentiable entries


def _quantize_weight_kn(w: jax.Array):
    """w [K, N] -> e4m3 [N, K] and scales [ceil(N/128), ceil(K/128)]: the GEMM's B for Fprop.

    128x128 blocks are the same set whichever way the matrix is read, so the transpose of this pair
    is the [K, N] quantisation Dgrad needs: one quantisation serves both (as DeepSeek does).
    """
    return quantize_weight(w.T)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fp8_linear(x, w, backend):
    return _fp8_linear_fwd(x, w, backend)[0]


def _fp8_linear_fwd(x, w, backend):
    xq, xs = quantize_act(x)
    wq, ws = _quantize_weight_kn(w)
    y = fp8_gemm(xq, xs, wq, ws, out_dtype=x.dtype, backend=backend)
    # Wgrad reads x along M: keep it in E4M3 as 1x128 tiles of x.T (per channel, 128 tokens).
    xtq, xts = quantize_act(x.T)
    return y, (xtq, xts, wq, ws, jnp.zeros((0,), w.dtype))


def _fp8_linear_bwd(backend, res, dy):
    xtq, xts, wq, ws, w_like = res
    gq, gs = quantize_act(dy)  # Dgrad's A: 1x128 tiles along N
    dx = fp8_gemm(gq, gs, wq.T, ws.T, out_dtype=jnp.float32, backend=backend)  # [M, K]
    gtq, gts = quantize_weight(dy.T)  # Wgrad's B: 128x128 blocks of dy.T [N, M]
    dw = fp8_gemm(xtq, xts, gtq, gts, out_dtype=jnp.float32, backend=backend)  # [K, N]
    return dx.astype(dy.dtype), dw.astype(w_like.dtype)


_fp8_linear.defvjp(_fp8_linear_fwd, _fp8_linear_bwd)


def fp8_linear(x: jax.Array, w: jax.Array, *, backend: str = "auto") -> jax.Array:
    """x [M, K] @ w [K, N] with every GEMM of training in FP8 (DeepSeek-V3 report s.3.3). Differentiable.

    w is the full-precision master weight in this project's [in, out] layout. Forward (Fprop): x per 1x128
    tile, w per 128x128 block. Backward: Dgrad = dy (1x128 tiles) @ w (the forward's blocks, transposed);
    Wgrad = x.T (1x128 tiles along M) @ dy (128x128 blocks). Output in x.dtype; grads in x.dtype, w.dtype.
    """
    if not (x.ndim == 2 and w.ndim == 2 and x.shape[1] == w.shape[0]):
        refuse("fp8_linear", f"x must be [M, K] and w [K, N], got x {x.shape} and w {w.shape}")
    return _fp8_linear(x, w, resolve_backend(backend))


def _quantize_experts(w: jax.Array):
    return jax.vmap(_quantize_weight_kn)(w)  # [G, N, K] e4m3, [G, nb, kb]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fp8_grouped_linear(x, w, group_sizes, backend):
    return _fp8_grouped_linear_fwd(x, w, group_sizes, backend)[0]


def _fp8_grouped_linear_fwd(x, w, group_sizes, backend):
    xq, xs = quantize_act(x)
    wq, ws = _quantize_experts(w)
    y = fp8_grouped_gemm(xq, xs, wq, ws, group_sizes, out_dtype=x.dtype, backend=backend)
    return y, (x, wq, ws, group_sizes, jnp.zeros((0,), w.dtype))


def _fp8_grouped_linear_bwd(backend, res, dy):
    x, wq, ws, group_sizes, w_like = res
    m, g = x.shape[0], group_sizes.shape[0]
    gq, gs = quantize_act(dy)
    dx = fp8_grouped_gemm(gq, gs, jnp.swapaxes(wq, 1, 2), jnp.swapaxes(ws, 1, 2), group_sizes,
                          out_dtype=jnp.float32, backend=backend)
    # Wgrad: rows moved so each expert starts on a 128-row tile; then no tile along M mixes two experts.
    dest, _, _, t = aligned_layout(group_sizes, m, g, BLOCK_K)
    aligned = lambda v: jnp.zeros((t * BLOCK_K, v.shape[1]), jnp.float32).at[dest].set(v, mode="drop")
    padded_sizes = (group_sizes.astype(jnp.int32) + BLOCK_K - 1) // BLOCK_K * BLOCK_K
    xtq, xts = quantize_act(aligned(x).T)
    gtq, gts = quantize_weight(aligned(dy).T)
    dw = fp8_kgrouped_gemm_reference(xtq, xts, gtq, gts, padded_sizes)
    return dx.astype(x.dtype), dw.astype(w_like.dtype), None


_fp8_grouped_linear.defvjp(_fp8_grouped_linear_fwd, _fp8_grouped_linear_bwd)


def fp8_grouped_linear(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, backend: str = "auto") -> jax.Array:
    """MoE experts in FP8: row r of group g gets x[r] @ w[g]; x [M, K] sorted by expert, w [G, K, N].

    Differentiable in x and w (the grouped counterpart of `fp8_linear`); rows past sum(group_sizes) give 0.
    Wgrad runs in plain jnp (`fp8_kgrouped_gemm_reference`), whatever the backend.
    """
    if not (x.ndim == 2 and w.ndim == 3 and x.shape[1] == w.shape[1]):
        refuse("fp8_grouped_linear", f"x must be [M, K] and w [G, K, N], got x {x.shape} and w {w.shape}")
    if group_sizes.shape != (w.shape[0],):
        refuse("fp8_grouped_linear", f"w {w.shape} needs group_sizes of shape {(w.shape[0],)}, got {group_sizes.shape}")
    return _fp8_grouped_linear(x, w, group_sizes, resolve_backend(backend))
