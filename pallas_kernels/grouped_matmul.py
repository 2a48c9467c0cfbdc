"""Grouped matmul for TPUs: JAX's own megablox kernels (`jax.experimental.pallas.ops.tpu.megablox`),
whose backward computes the weight gradient grouped too (`tgmm`: each expert's x^T dy over its own
rows only). `jax.lax.ragged_dot`, the reference, is differentiated by XLA, which runs the weight
gradient as dense matmuls over every group on TPU (docs/SCALE.md measures it: the experts' FLOPs
several-fold and [E, rows, F] temporaries).

    gmm(x [M, K], w [G, K, N], group_sizes [G] int32) -> [M, N] in x's dtype

Rows are grouped in order (the first group_sizes[0] rows use w[0], ...); rows past their sum are
not computed (zeros). A Pallas TPU call is not partitioned by the compiler: call it where each
device holds its own rows (inside `shard_map`), as `dsv3_jax.ops.dispatch` does.

Tiles are chosen per call (`choose_tiling`, handed to megablox as its tiling function, so the
backward's gmm and tgmm choose for their own shapes): a [tm, tk] x [tk, tn] step reads x once per
tn columns and each weight tile once per tm rows, so 128-tiles leave V3's expert matmuls bound by
HBM traffic (`benchmarks/tpu_kernels.py --compile_only` compares the two); the largest tiles that
divide the dimensions and fit the scoped VMEM Mosaic gives a kernel that asks for none (megablox
asks for none) cut that traffic several-fold.
"""
from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

TILE = 128  # rows are padded to whole tiles of this many; the smallest K and N tile (the MXU's width)
ROW_TILES = (512, 256, 128)  # tm: each divides the padded rows or is skipped
COL_TILES = (1024, 512, 256, 128)  # tk, tn: multiples of 128 lanes; each divides its dimension or is skipped
# The scoped VMEM of a Mosaic kernel that sets no limit, by TPU generation: 16 MiB before v6e, 32 MiB from it.
# Not a TPU (Pallas' interpreter): the smallest, so that a choice made there runs on every generation.
SCOPED_VMEM_BYTES = {5: 16 << 20}
LATER_SCOPED_VMEM_BYTES = 32 << 20


@jax.custom_vjp
def _rows_kept(x: jax.Array, keep: jax.Array) -> jax.Array:
    """x itself; in the backward, the cotangent of the rows outside `keep` [M] is zero."""
    return x


def _rows_kept_fwd(x, keep):
    return x, keep


def _rows_kept_bwd(keep, g):
    return jnp.where(keep[:, None], g, 0).astype(g.dtype), None


_rows_kept.defvjp(_rows_kept_fwd, _rows_kept_bwd)


def supports(k: int, n: int) -> str | None:
    """Why the compiled kernels cannot take [M, k] x [G, k, n] (None: they can). Mosaic TPU blocks are
    whole (8, 128) tiles or whole dimensions; the tiles here (`choose_tiling`) are whole 128-lane tiles of
    K and N, in the forward and, transposed, in the backward."""
    if k % TILE or n % TILE:
        return f"the kernels need both matmul dims in multiples of {TILE}; got {k} x {n}"
    return None


def vmem_bytes(tm: int, tk: int, tn: int, itemsize: int) -> int:
    """VMEM of one megablox step, gmm's or tgmm's (whichever is larger): its three blocks ([tm, tk], [tk, tn],
    [tm, tn]) double-buffered, and the float32 accumulator of its output block ([tm, tn]; tgmm's is [tk, tn])."""
    return 2 * itemsize * (tm * tk + tk * tn + tm * tn) + 4 * max(tm, tk) * tn


def _col_tiles(dim: int) -> tuple[int, ...]:
    """The candidates that divide `dim`; none (dim not whole 128-lane tiles): one tile of at most 128, the last
    one ragged (megablox masks it; the compiled kernels refuse such dims, `supports`)."""
    return tuple(t for t in COL_TILES if dim % t == 0) or (min(TILE, dim),)


def choose_tiling(m: int, k: int, n: int, *, itemsize: int, vmem_limit: int) -> tuple[int, int, int]:
    """megablox's (tm, tk, tn) for x [m, k] by w [G, k, n] (m: rows padded to whole TILEs): of the candidates
    that divide the dimensions, the tile of the largest volume tm*tk*tn whose step fits `vmem_limit`. Volume,
    because HBM traffic falls with tm (weight re-reads) and tn (x re-reads) and grid steps with all three."""
    fits = [(tm, tk, tn) for tm, tk, tn in itertools.product(
        [t for t in ROW_TILES if m % t == 0] or [TILE], _col_tiles(k), _col_tiles(n))
        if vmem_bytes(tm, tk, tn, itemsize) <= vmem_limit]
    # (tn, tm) break ties: fewer re-reads of x, then of the weights.
    return max(fits, key=lambda t: (t[0] * t[1] * t[2], t[2], t[0]), default=(TILE, min(TILE, k), min(TILE, n)))


@dataclasses.dataclass(frozen=True)
class Tiling:
    """megablox's tiling function (its `LutFn`): `choose_tiling` for each call's (m, k, n), forward and backward.
    Frozen, so hashable: megablox takes it as a non-differentiable argument."""

    itemsize: int
    vmem_limit: int

    def __call__(self, m: int, k: int, n: int) -> tuple[int, int, int]:
        return choose_tiling(m, k, n, itemsize=self.itemsize, vmem_limit=self.vmem_limit)


def scoped_vmem_bytes(generation: int | None) -> int:
    """The scoped VMEM of a kernel that asks for none, on TPU `generation` (None: not a TPU)."""
    if generation is None:
        return min(*SCOPED_VMEM_BYTES.values(), LATER_SCOPED_VMEM_BYTES)
    return SCOPED_VMEM_BYTES.get(generation, LATER_SCOPED_VMEM_BYTES)


def target_generation() -> int | None:
    """The TPU generation being compiled for: the current mesh's devices', else the default device's (None: not a
    TPU, e.g. a CPU host running the interpreter)."""
    try:
        return pltpu.get_tpu_info().generation
    except ValueError:
        return None


def default_tiling(dtype) -> Tiling:
    """The tiling of operands of `dtype` on the target generation (`target_generation`)."""
    return Tiling(jnp.dtype(dtype).itemsize, scoped_vmem_bytes(target_generation()))


def gmm(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, interpret: bool = False,
        tiling: Tiling | None = None) -> jax.Array:
    """The grouped matmul and its megablox VJP; rows padded to whole tiles (the padding in no group).
    `tiling` None: `default_tiling(x.dtype)`."""
    m = x.shape[0]
    tiling = tiling or default_tiling(x.dtype)
    pad = -m % TILE
    sizes = group_sizes.astype(jnp.int32)
    # The kernels never write the rows outside every group (the padding, a buffer's empty slots): their
    # outputs and their gradients are whatever memory held, so both are zeroed here.
    keep = jnp.arange(m + pad) < jnp.sum(sizes)
    rows = _rows_kept(jnp.pad(x, ((0, pad), (0, 0))) if pad else x, keep)
    # Positional: megablox's custom_vjp marks preferred_element_type, tiling, transpose_rhs and
    # interpret non-differentiable by position.
    out = megablox.gmm(rows, w.astype(x.dtype), sizes, x.dtype, tiling, None, None, False, interpret)
    out = jnp.where(keep[:, None], out, 0).astype(x.dtype)
    return out[:m] if pad else out
