"""MLA latent-attention decode (FlashMLA-like): absorbed queries against a shared latent cache.

DeepSeek-V2/V3 multi-head latent attention at decode time (V2 report s.2.1.2, "absorb" W_UK into the
query and W_UV into the output): every head's query has been moved into the latent space, so
q = [q_latent (C); q_rope (R)] and one cache row [c_kv (C); k_pe (R)] serves all H heads, as keys
over all C+R dims and, through its first `v_dim` (= C) dims, as values. That is multi-query
attention with head dim C+R = 576 and value dim C = 512, which is why the kernels batch heads (and
the Sq query positions) into the M dimension of one matrix product per cache block.

Letters: B batch, T query positions (Sq), S cache positions, H heads, C latent (v_dim), R rope dims.
Query t of a sequence of length L sits at position L - T + t and sees cache positions <= that
(positions >= L are never valid); a query with nothing to see returns zeros.

Modules: `reference` (backend "xla", plain jnp), `interpret` and `triton` (one pallas_call kernel body,
`common`), `mosaic_gpu` (the Hopper kernel), `mosaic_tpu` (the Pallas TPU kernel); `plan` (how a call is cut
into programs: flash-decoding splits, the block table, the merge of splits), `flash` (the online-softmax math
the kernel bodies share), `config`.
`backends.KERNELS` names the module of each backend; each provides
`refusal(q_shape, cache_shape, dtype, v_dim, config) -> str | None` (its limits) and
`decode(q, cache, lengths, *, v_dim, softmax_scale, config)`; the kernel modules build `decode` from their
`make_plan(q_shape, cache_shape, v_dim, config)` and kernel `run(...)` with `plan.decode`.
`mla_decode_paged` takes FlashMLA's paged cache (pages and a block table): the kernels read it through their
`run`, the reference through `plan.gather_pages`.
`mla_decode_sparse` (and `mla_decode_sparse_paged`) is DeepSeek-V3.2's sparse decode: each query over its own
top-k cache rows, named by indices in FlashMLA's sparse layout (-1: none). `sparse` describes it and the
`sparse_refusal` / `sparse_decode` pair a backend provides for it ("mosaic_gpu" has none: `sparse.SPARSE_REFUSALS`).
"""
from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp

from pallas_kernels import backends
from pallas_kernels.backends import FALLBACK_SMS, resolve_backend
from pallas_kernels.mla_decode import fp8_cache, plan, sparse
from pallas_kernels.mla_decode.common import TRITON_MIN_ROWS
from pallas_kernels.mla_decode.config import MlaDecodeConfig
from pallas_kernels.mla_decode.mosaic_gpu import MOSAIC_REDUCTION_SCRATCH, MOSAIC_SMEM_ALIGN, SMEM_BYTES, WGMMA_M
from pallas_kernels.mla_decode.plan import LOG2E
from pallas_kernels.mla_decode.reference import mla_decode_reference, mla_decode_sparse_reference

__all__ = [
    "FALLBACK_SMS", "LOG2E", "fp8_cache", "is_fp8_cache",
    "MOSAIC_REDUCTION_SCRATCH", "MOSAIC_SMEM_ALIGN", "SMEM_BYTES", "TRITON_MIN_ROWS",
    "WGMMA_M", "MlaDecodeConfig", "mla_decode", "mla_decode_paged", "mla_decode_reference", "supports",
    "supports_paged", "mla_decode_sparse", "mla_decode_sparse_paged", "mla_decode_sparse_reference", "sparse_backend",
    "supports_sparse", "supports_sparse_paged",
]

_MODULES = {backend: importlib.import_module(module) for backend, module in backends.kernels("mla_decode").items()}


def _shapes(**shapes) -> str:
    return ", ".join(f"{k} {tuple(v)}" for k, v in shapes.items())


def is_fp8_cache(q_shape, cache_shape, cache_dtype, v_dim: int) -> bool:
    """Whether the cache is packed FP8 rows (`fp8_cache`) for queries of q_shape [..., C+R] and C = v_dim."""
    return fp8_cache.is_packed(cache_shape, cache_dtype, v_dim, q_shape[-1] - v_dim)


def _call_refusal(q_shape, cache_shape, cache_dtype, v_dim, config) -> str | None:
    """What makes a call invalid whatever the backend."""
    if len(q_shape) != 4:
        return f"q must be [B, Sq, H, C+R] ({_shapes(q=q_shape)})"
    if len(cache_shape) != 3 or cache_shape[0] != q_shape[0]:
        return f"cache must be [B, S, C+R] with the batch of q ({_shapes(q=q_shape, cache=cache_shape)})"
    if not isinstance(v_dim, int) or not 0 < v_dim <= q_shape[-1]:
        return f"v_dim must be an int in [1, C+R = {q_shape[-1]}], got {v_dim!r}"
    if jnp.dtype(cache_dtype) == fp8_cache.FP8_CACHE_DTYPE:
        want = fp8_cache.row_bytes(v_dim, q_shape[-1] - v_dim)
        if cache_shape[-1] != want:
            return (f"an FP8 cache (uint8) of C={v_dim}, R={q_shape[-1] - v_dim} holds {want} bytes a row, "
                    f"got {cache_shape[-1]} ({_shapes(q=q_shape, cache=cache_shape)})")
    elif cache_shape[-1] != q_shape[-1]:
        return (f"cache last dim {cache_shape[-1]} != q last dim {q_shape[-1]} "
                f"({_shapes(q=q_shape, cache=cache_shape)})")
    elif not jnp.issubdtype(cache_dtype, jnp.floating):
        return f"cache must be floating point or a packed FP8 cache (uint8), got {jnp.dtype(cache_dtype)}"
    if config is not None and not isinstance(config, MlaDecodeConfig):
        return f"config must be an MlaDecodeConfig or None, got {type(config).__name__}"
    return None


def supports(q_shape, cache_shape, cache_dtype, *, v_dim: int, backend: str,
             config: MlaDecodeConfig | None = None) -> str | None:
    """Why `mla_decode` cannot take q [B, Sq, H, C+R] over a cache [B, S, C+R] of `cache_dtype` on `backend`
    with `config`, in one line; None: it can. `mla_decode` refuses exactly these (ValueError); backends
    "xla" and "interpret" take every valid call."""
    reason = _call_refusal(q_shape, cache_shape, cache_dtype, v_dim, config) or backends.backend_refusal(backend)
    if reason:
        return reason
    backend, config = resolve_backend(backend), config or MlaDecodeConfig()
    reason = backends.interpret_refusal(config.interpret, backend)
    if reason:
        return reason
    refusal = _MODULES[backend].refusal(tuple(q_shape), tuple(cache_shape), jnp.dtype(cache_dtype), v_dim, config)
    if is_fp8_cache(q_shape, cache_shape, cache_dtype, v_dim) and not getattr(_MODULES[backend], "READS_FP8_CACHE",
                                                                              False):
        return refusal or f"backend {backend!r} does not read an FP8 cache"  # the backend's own why, if it says
    return refusal


def _argument_refusal(q, cache, lengths, softmax_scale) -> str | None:
    """What `supports` cannot see: lengths, the softmax scale, q's dtype."""
    if lengths.shape != (q.shape[0],):
        return f"lengths must be [B] = [{q.shape[0]}] ({_shapes(lengths=lengths.shape, q=q.shape)})"
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        return f"lengths must be integers, got {lengths.dtype}"
    if not isinstance(softmax_scale, (int, float)) or not softmax_scale > 0:
        return f"softmax_scale must be a positive Python number, got {softmax_scale!r}"
    if not jnp.issubdtype(q.dtype, jnp.floating):
        return f"q must be floating point, got {q.dtype}"
    if q.dtype != cache.dtype and cache.dtype != fp8_cache.FP8_CACHE_DTYPE:
        return f"q dtype {q.dtype} != cache dtype {cache.dtype}"
    return None


@functools.partial(jax.jit, static_argnames=("v_dim", "softmax_scale", "backend", "config"))
def mla_decode(q, cache, lengths, *, v_dim: int, softmax_scale: float, backend: str = "auto",
               config: MlaDecodeConfig | None = None):
    """Absorbed MLA decode: q [B, Sq, H, C+R], cache [B, S, C+R], lengths [B] -> [B, Sq, H, v_dim] (q.dtype).

    The cache may be packed FP8 rows instead (uint8 [B, S, fp8_cache.row_bytes(C, R)], FlashMLA's layout: 656
    bytes a token for V3), on the backends that read it (`supports` says which).

    Lengths are clipped to [0, S]. If S is not a multiple of config.block_s the cache is padded (a
    copy); keep S a multiple of block_s on the fast path.
    """
    reason = (supports(q.shape, cache.shape, cache.dtype, v_dim=v_dim, backend=backend, config=config)
              or _argument_refusal(q, cache, lengths, softmax_scale))
    if reason:
        raise ValueError(f"mla_decode: {reason}")
    backend, config = resolve_backend(backend), config or MlaDecodeConfig()
    return _MODULES[backend].decode(q, cache, lengths, v_dim=v_dim, softmax_scale=softmax_scale, config=config)


def _paged_config(config, page_size: int):
    """The kernels' block is the page: no config means the defaults at that block_s."""
    return MlaDecodeConfig(block_s=page_size) if config is None else config


def supports_paged(q_shape, pages_shape, table_shape, cache_dtype, *, v_dim: int, backend: str,
                   config: MlaDecodeConfig | None = None) -> str | None:
    """`supports` for `mla_decode_paged`: q [B, Sq, H, C+R] over pages [P, block_s, C+R] (or packed FP8 rows)
    through a block table [B, blocks], as the dense cache [B, blocks * block_s, C+R] they stand for."""
    if len(pages_shape) != 3 or len(table_shape) != 2 or not q_shape or table_shape[0] != q_shape[0]:
        return (f"pages must be [P, block_s, C+R] and block_table [B, blocks] with the batch of q "
                f"({_shapes(q=q_shape, pages=pages_shape, block_table=table_shape)})")
    if pages_shape[1] % 8 or not pages_shape[0] or not table_shape[1]:
        return f"pages must be non-empty and hold a multiple of 8 rows each ({_shapes(pages=pages_shape)})"
    if isinstance(config, MlaDecodeConfig) and config.block_s != pages_shape[1]:
        return f"config.block_s {config.block_s} must be the page size {pages_shape[1]} (or config None)"
    cache_shape = (table_shape[0], table_shape[1] * pages_shape[1], pages_shape[2])
    return supports(q_shape, cache_shape, cache_dtype, v_dim=v_dim, backend=backend,
                    config=_paged_config(config, pages_shape[1]))


@functools.partial(jax.jit, static_argnames=("v_dim", "softmax_scale", "backend", "config"))
def mla_decode_paged(q, pages, block_table, lengths, *, v_dim: int, softmax_scale: float, backend: str = "auto",
                     config: MlaDecodeConfig | None = None):
    """Absorbed MLA decode over a paged cache (FlashMLA's): q [B, Sq, H, C+R], pages [P, block_s, C+R] (or packed
    FP8 rows, uint8 [P, block_s, fp8_cache.row_bytes(C, R)]), block_table [B, blocks] (sequence b's block j is
    page block_table[b, j]; entries are clipped to [0, P), and those past a sequence's end are never read),
    lengths [B] -> [B, Sq, H, v_dim] (q.dtype). The page size is the kernels' block_s.

    Kernel backends (their modules provide `make_plan` and `run`) read the pages through the table; the
    others ("xla") decode the dense cache the pages stand for (`plan.gather_pages`: a copy).
    """
    reason = (supports_paged(q.shape, pages.shape, block_table.shape, pages.dtype, v_dim=v_dim, backend=backend,
                             config=config)
              or _argument_refusal(q, pages, lengths, softmax_scale))
    if reason is None and not jnp.issubdtype(block_table.dtype, jnp.integer):
        reason = f"block_table must be integers, got {block_table.dtype}"
    if reason:
        raise ValueError(f"mla_decode_paged: {reason}")
    backend, config = resolve_backend(backend), _paged_config(config, pages.shape[1])
    module = _MODULES[backend]
    if not hasattr(module, "run"):
        cache = plan.gather_pages(pages, block_table)
        return module.decode(q, cache, lengths, v_dim=v_dim, softmax_scale=softmax_scale, config=config)
    cache_shape = (q.shape[0], block_table.shape[1] * pages.shape[1], pages.shape[2])
    layout = module.make_plan(q.shape, cache_shape, v_dim, config)
    return plan.decode_pages(q, pages, block_table, lengths, softmax_scale=softmax_scale, plan=layout,
                             run=functools.partial(module.run, config=config))


# ---- sparse decode (DeepSeek-V3.2's DSA; `sparse`): each query over its own top-k rows ------------------------


def sparse_backend(backend: str) -> str:
    """The backend a sparse call runs on: `resolve_backend`'s, except that "auto" takes the stand-in where that
    backend has no sparse kernel (Hopper: "triton", `sparse.SPARSE_STAND_IN`)."""
    resolved = resolve_backend(backend)
    return sparse.SPARSE_STAND_IN.get(resolved, resolved) if backend == "auto" else resolved


def _sparse_refusal(q_shape, cache_shape, rows_shape, indices_shape, cache_dtype, v_dim, backend, config):
    """`supports_sparse` over the flattened rows [R, W] that the dense or paged cache stands for."""
    reason = _call_refusal(q_shape, cache_shape, cache_dtype, v_dim, config) or backends.backend_refusal(backend)
    if reason:
        return reason
    if len(indices_shape) != 3 or tuple(indices_shape[:2]) != tuple(q_shape[:2]) or not indices_shape[2]:
        return (f"indices must be [B, Sq, topk] with topk > 0 and the B, Sq of q "
                f"({_shapes(q=q_shape, indices=indices_shape)})")
    backend, config = sparse_backend(backend), config or MlaDecodeConfig()
    reason = backends.interpret_refusal(config.interpret, backend)
    if reason:
        return reason
    module = _MODULES[backend]
    if backend in sparse.SPARSE_REFUSALS or not hasattr(module, "sparse_decode"):
        return sparse.SPARSE_REFUSALS.get(backend, f"{backend}: no sparse kernel")
    return module.sparse_refusal(tuple(q_shape), tuple(rows_shape), indices_shape[2], jnp.dtype(cache_dtype),
                                 v_dim, config)


def supports_sparse(q_shape, cache_shape, indices_shape, cache_dtype, *, v_dim: int, backend: str,
                    config: MlaDecodeConfig | None = None) -> str | None:
    """Why `mla_decode_sparse` cannot take q [B, Sq, H, C+R] over a cache [B, S, C+R] (or packed FP8 rows) through
    indices [B, Sq, topk] on `backend`, in one line; None: it can. "xla" takes every valid call."""
    rows_shape = (cache_shape[0] * cache_shape[1], cache_shape[-1]) if len(cache_shape) == 3 else ()
    return _sparse_refusal(q_shape, cache_shape, rows_shape, indices_shape, cache_dtype, v_dim, backend, config)


def supports_sparse_paged(q_shape, pages_shape, indices_shape, cache_dtype, *, v_dim: int, backend: str,
                          config: MlaDecodeConfig | None = None) -> str | None:
    """`supports_sparse` for `mla_decode_sparse_paged`: pages [P, page_size, C+R] (or packed FP8 rows)."""
    if len(pages_shape) != 3 or not pages_shape[0] * pages_shape[1]:
        return f"pages must be non-empty [P, page_size, C+R] ({_shapes(pages=pages_shape)})"
    rows_shape = (pages_shape[0] * pages_shape[1], pages_shape[2])
    cache_shape = (*q_shape[:1], *rows_shape)  # what the common checks read: the row width and dtype
    return _sparse_refusal(q_shape, cache_shape, rows_shape, indices_shape, cache_dtype, v_dim, backend, config)


def _sparse_argument_refusal(q, cache, indices, softmax_scale) -> str | None:
    """What `supports_sparse` cannot see: the indices' and q's dtypes, the softmax scale."""
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        return f"indices must be integers, got {indices.dtype}"
    return _argument_refusal(q, cache, jax.ShapeDtypeStruct((q.shape[0],), jnp.int32), softmax_scale)


@functools.partial(jax.jit, static_argnames=("v_dim", "softmax_scale", "backend", "config"))
def mla_decode_sparse(q, cache, indices, *, v_dim: int, softmax_scale: float, backend: str = "auto",
                      config: MlaDecodeConfig | None = None):
    """Sparse absorbed MLA decode (`sparse`): q [B, Sq, H, C+R], cache [B, S, C+R] (or packed FP8 rows, on the
    backends that read them), indices [B, Sq, topk] int (slots of row b's cache; -1, or any slot outside [0, S),
    holds none) -> [B, Sq, H, v_dim] in q.dtype: each query's softmax over its valid slots; zeros for a query
    with none (FlashMLA's convention). Distinct slots are the caller's to ensure (a repeated one counts twice).
    config.block_s is the number of slots a kernel step reads."""
    reason = (supports_sparse(q.shape, cache.shape, indices.shape, cache.dtype, v_dim=v_dim, backend=backend,
                              config=config)
              or _sparse_argument_refusal(q, cache, indices, softmax_scale))
    if reason:
        raise ValueError(f"mla_decode_sparse: {reason}")
    b, s_len, width = cache.shape
    rows, idx = cache.reshape(b * s_len, width), sparse.flat_indices(indices, s_len, b * s_len)
    return _MODULES[sparse_backend(backend)].sparse_decode(q, rows, idx, v_dim=v_dim, softmax_scale=softmax_scale,
                                                           config=config or MlaDecodeConfig())


@functools.partial(jax.jit, static_argnames=("v_dim", "softmax_scale", "backend", "config"))
def mla_decode_sparse_paged(q, pages, indices, *, v_dim: int, softmax_scale: float, backend: str = "auto",
                            config: MlaDecodeConfig | None = None):
    """`mla_decode_sparse` over FlashMLA's paged cache: pages [P, page_size, C+R] (or packed FP8 rows), indices
    [B, Sq, topk] into the flattened pages (page * page_size + offset, as FlashMLA's sparse kernels take them; -1
    or outside [0, P page_size): none). No block table: the indexer's selection already names rows."""
    reason = (supports_sparse_paged(q.shape, pages.shape, indices.shape, pages.dtype, v_dim=v_dim, backend=backend,
                                    config=config)
              or _sparse_argument_refusal(q, pages, indices, softmax_scale))
    if reason:
        raise ValueError(f"mla_decode_sparse_paged: {reason}")
    rows = pages.reshape(pages.shape[0] * pages.shape[1], pages.shape[2])
    idx = sparse.flat_indices(indices, None, rows.shape[0])
    return _MODULES[sparse_backend(backend)].sparse_decode(q, rows, idx, v_dim=v_dim, softmax_scale=softmax_scale,
                                                           config=config or MlaDecodeConfig())
