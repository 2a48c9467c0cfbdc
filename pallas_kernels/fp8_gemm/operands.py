"""The operands of the FP8 GEMMs, their validation, and the pieces of the promotion math every backend shares.

a: e4m3 [M, K] with float32 scales [M, kb] (1x128 tiles); b: e4m3 [N, K], or [G, N, K] for the grouped GEMM,
with float32 scales [(G,) ceil(N/128), kb] (128x128 blocks); kb = ceil(K/128). Refusals are one-line reasons
(None: fine); the wrappers raise them as ValueErrors.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.quant import BLOCK, E4M3

BLOCK_K = BLOCK  # promotion interval == scale block along K


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def shape_refusal(a_shape, b_shape) -> str | None:
    """a [M, K] against b [N, K] (dense) or [G, N, K] (grouped)."""
    if len(a_shape) != 2:
        return f"a must be [M, K], got shape {tuple(a_shape)}"
    if len(b_shape) not in (2, 3):
        return f"b must be [N, K] or [G, N, K], got shape {tuple(b_shape)}"
    if b_shape[-1] != a_shape[1]:
        return f"K of a {tuple(a_shape)} and b {tuple(b_shape)} differ ({a_shape[1]} vs {b_shape[-1]})"
    return None


def operand_refusal(a, a_scale, b, b_scale, grouped: bool) -> str | None:
    """Shapes and dtypes of a GEMM's four operands."""
    want_b = "[G, N, K]" if grouped else "[N, K]"
    if a.ndim != 2:
        return f"a must be [M, K], got shape {a.shape}"
    if a.dtype != E4M3:
        return f"a must be float8_e4m3fn, got {a.dtype}"
    if b.dtype != E4M3:
        return f"b must be float8_e4m3fn, got {b.dtype}"
    if b.ndim != (3 if grouped else 2):
        return f"b must be {want_b}, got shape {b.shape}"
    reason = shape_refusal(a.shape, b.shape)
    if reason:
        return reason
    if a_scale.dtype != jnp.float32:
        return f"a_scale must be float32, got {a_scale.dtype}"
    if b_scale.dtype != jnp.float32:
        return f"b_scale must be float32, got {b_scale.dtype}"
    m, kb = a.shape[0], cdiv(a.shape[1], BLOCK_K)
    if a_scale.shape != (m, kb):
        return f"a {a.shape} needs a_scale of shape {(m, kb)}, got {a_scale.shape}"
    want = (*b.shape[:-2], cdiv(b.shape[-2], BLOCK), kb)
    if b_scale.shape != want:
        return f"b {b.shape} needs b_scale of shape {want}, got {b_scale.shape}"
    return None


WEIGHT_ONLY_DTYPES = (jnp.bfloat16, jnp.float32)  # x of the weight-only GEMMs: activations as the model holds them


WEIGHT_LAYOUTS = ("nk", "kn")  # w of the weight-only GEMMs: [(G,) N, K] (the checkpoint's) or [(G,) K, N] (ours)


def weight_matrix_shape(w_shape, w_layout: str) -> tuple[int, ...]:
    """A weight-only GEMM's w shape as [(G,) N, K], whichever layout it is held in."""
    w_shape = tuple(w_shape)
    return (*w_shape[:-2], w_shape[-1], w_shape[-2]) if w_layout == "kn" and len(w_shape) >= 2 else w_shape


def weight_operand_refusal(x, w, w_scale, grouped: bool, w_layout: str = "nk") -> str | None:
    """Shapes and dtypes of a weight-only GEMM's operands: x [M, K] (not quantised), w e4m3 [(G,) N, K] ("nk") or
    [(G,) K, N] ("kn") with float32 block scales [(G,) ceil(N/128), ceil(K/128)] in either layout."""
    if w_layout not in WEIGHT_LAYOUTS:
        return f"w_layout must be one of {WEIGHT_LAYOUTS}, got {w_layout!r}"
    want_w = ("[G, N, K]" if grouped else "[N, K]") if w_layout == "nk" else ("[G, K, N]" if grouped else "[K, N]")
    if x.ndim != 2:
        return f"x must be [M, K], got shape {x.shape}"
    if x.dtype not in WEIGHT_ONLY_DTYPES:
        return f"x must be bfloat16 or float32 (it is not quantised), got {x.dtype}"
    if w.dtype != E4M3:
        return f"w must be float8_e4m3fn, got {w.dtype}"
    if w.ndim != (3 if grouped else 2):
        return f"w must be {want_w}, got shape {w.shape}"
    *lead, n, k = weight_matrix_shape(w.shape, w_layout)
    held = f"w {w.shape}" + (" (kn)" if w_layout == "kn" else "")
    if k != x.shape[1]:
        return f"K of x {x.shape} and {held} differ ({x.shape[1]} vs {k})"
    if w_scale.dtype != jnp.float32:
        return f"w_scale must be float32, got {w_scale.dtype}"
    want = (*lead, cdiv(n, BLOCK), cdiv(k, BLOCK_K))
    if w_scale.shape != want:
        return f"{held} needs w_scale of shape {want}, got {w_scale.shape}"
    return None


def group_sizes_refusal(group_sizes, groups: int, what: str) -> str | None:
    """group_sizes: int [G], for the G groups of `what` (an operand's name and shape)."""
    if group_sizes.shape != (groups,):
        return f"{what} needs group_sizes of shape {(groups,)}, got {group_sizes.shape}"
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        return f"group_sizes must be integers, got {group_sizes.dtype}"
    return None


def refuse(fn: str, reason: str | None) -> None:
    if reason:
        raise ValueError(f"{fn}: {reason}")


def column_scales(b_scale: jax.Array, n: int) -> jax.Array:
    """[..., nb, kb] block scales -> [..., kb, n]: the scale of every output column, per K block."""
    return jnp.swapaxes(jnp.repeat(b_scale, BLOCK, axis=-2)[..., :n, :], -1, -2)


def promote(acc, part, sa, sb):
    """One promotion step: scale a K block's raw partial sums and add them to the FP32 accumulator.

    sa [rows] (None: a was not quantised, the weight-only GEMMs), sb [cols].
    """
    return acc + part * (sb[None, :] if sa is None else sa[:, None] * sb[None, :])


def group_ids(group_sizes: jax.Array, m: int) -> jax.Array:
    """Group of every row; G for the rows past sum(group_sizes)."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    return jnp.searchsorted(ends, jnp.arange(m, dtype=jnp.int32), side="right").astype(jnp.int32)
