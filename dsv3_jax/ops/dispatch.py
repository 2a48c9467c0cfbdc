"""Which variant of an operation runs, per platform and shape: every threshold lives here.

The platform is the compile target's (`platform`), never the host's: a program built on a CPU host
for GPU or TPU devices gets their choices. Each threshold carries a one-line reason; the
measurements behind them are in docs/PERFORMANCE.md ("Dispatch thresholds").
"""
from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig
from dsv3_jax.ops import attention as attention_op
from dsv3_jax.ops import cross_entropy as cross_entropy_op
from dsv3_jax.ops import experts as experts_op
from dsv3_jax.ops import sparse_attention as sparse_op
from dsv3_jax.ops import top_k as top_k_op
from dsv3_jax.ops.attention import AttentionOptions
from dsv3_jax.ops.cross_entropy import CROSS_ENTROPY, CrossEntropyFn
from dsv3_jax.ops.experts import EXPERTS, ExpertsFn
from dsv3_jax.ops.linear import (
    Fp8Weight,
    cast_here,
    dense_for,
    fp8_ragged_matmul,
    fp8_weight_ragged_matmul,
    kernel_ragged_matmul,
)
from dsv3_jax.ops.registry import AUTO
from dsv3_jax.ops.remat import OFFLOAD_ATTENTION, REMAT
from dsv3_jax.ops.top_k import TOP_K, TopKFn
from dsv3_jax.parallel.ep import data_parallel, expert_axis_size, expert_parallel
from dsv3_jax.parallel.rules import batch_axes, local_rows
from pallas_kernels import fp8_gemm as fp8_gemm_kernel
from pallas_kernels import grouped_matmul as grouped_matmul_kernel
from pallas_kernels import mla_decode as mla_decode_kernel
from pallas_kernels.backends import capability_of_kind, resolve_backend
from pallas_kernels.fp8_gemm.operands import WEIGHT_ONLY_DTYPES

if TYPE_CHECKING:
    from dsv3_jax.runtime import Runtime

# Thresholds of the CPU paths (accelerators take `ragged` experts and the `plain` core). Each has a
# one-line reason; the measurements are in docs/PERFORMANCE.md, "Dispatch thresholds".
GATHER_MAX_PAIRS_PER_EXPERT = 4  # gather while decoding: per pair it reads one expert, dense all E
GATHER_MIN_BYTES = 1 << 20  # below ~a cache of expert weights, dense's one batched matmul wins
DENSE_MAX_TOKENS = 512  # below this, windowed's fixed costs (sort, slicing every expert) dominate
DECODE_MAX_T = 8  # longer query windows (prefill) are compute-bound: expand keys/values per head
QUERY_BLOCKS = 4  # causal query blocks of the blocked core: skip the masked key blocks
QUERY_BLOCK_MIN_T = 128  # shorter sequences gain too little to pay the block loop
# Accelerators: plain's [T, S] float32 scores, kept with their softmax for the backward, outgrow a
# layer's own activations by ~H * S * 4 / (2 * D) (V3 at 4096 keys: 290x); from this many keys the
# chunked core keeps one [T, KEY_CHUNK] chunk alive instead (measured by the plans, docs/SCALE.md).
CHUNKED_MIN_KEYS = 1024
KEY_CHUNK = 512
# CPU: the blocked core holds a [B, H, T, S] float32 score tensor per layer (a dense 32K-token prefill of
# `small`'s 8 heads: 32 GiB); above this size the chunked core runs instead, one [T, KEY_CHUNK] chunk alive.
CPU_SCORES_BYTES = 1 << 31
# The output head's float32 logits [B, T, V] (with their softmax and gradient) dominate a step's memory
# at large vocabularies (V2-Lite, 8 x 4096 rows a chip: 13 GB a copy); from this size they are made
# in slices of positions that keep each slice under it.
HEAD_CHUNK_BYTES = 1 << 30
# Expert parallelism's dropless all-to-all buffers hold n x (a device's tokens x K) rows of D (V3 at
# 4096 tokens a device, n = 8: 3.8 GB each, several alive in a backward); from this size the tokens go
# through in chunks (`parallel.ep.in_token_chunks`).
EP_BUFFER_BYTES = 1 << 28
# DSA's sparse attention gathers each query's K latent rows, [B, T, K, C+R] (V3.2 at 4096 queries a row:
# 9.7 GB a row in BF16); from this size its queries go in chunks, each re-gathered in the backward.
SPARSE_GATHER_BYTES = 1 << 28


def _rows_per_device(batch: int) -> int:
    """The batch rows one device holds: `batch` over the current mesh's batch shards (at least 1)."""
    mesh = jax.sharding.get_abstract_mesh()
    shards = 1 if mesh.empty else math.prod(mesh.shape.get(a, 1) for a in batch_axes())
    return max(batch // shards, 1)


def _mesh_device():
    """The abstract device of the current mesh's devices (None without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else getattr(mesh, "abstract_device", None)


def platform(rt: Runtime) -> str:
    """The compile target's platform: the runtime's, else the current mesh's devices', else the
    default device's (where a plain jit compiles). "gpu" for CUDA and ROCm devices."""
    name = rt.platform
    if name is None:
        device = _mesh_device()
        name = device.platform if device is not None else jax.devices()[0].platform
    return "gpu" if name in ("cuda", "rocm") else name


def kernel_backend(rt: Runtime) -> str:
    """The pallas_kernels backend for the target: the runtime's, or "auto" resolved for its platform
    (and, for a GPU mesh, its devices' kind: a Hopper target gets the Mosaic GPU kernels)."""
    device = _mesh_device()
    capability = capability_of_kind(device.device_kind) if device is not None else None
    return resolve_backend(rt.kernel_backend, platform=platform(rt), compute_capability=capability)


def fp8_backend(rt: Runtime) -> str:
    """The backend of the linear layers' FP8 GEMMs (`rt.fp8`) and of their 8-bit weights' weight-only GEMMs
    (`ops.linear.linear` with an `Fp8Weight`, where the backend takes them)."""
    return kernel_backend(rt)


# ---- experts ------------------------------------------------------------------------------------
def experts_variant(rt: Runtime, cfg: ModelConfig, num_tokens: int | None) -> str:
    """`num_tokens` None: not known here (expert parallelism: each device's share varies)."""
    if rt.experts != AUTO:
        return rt.experts
    if rt.fp8 or platform(rt) != "cpu":
        return experts_op.RAGGED  # grouped matmuls; the one path with FP8 GEMMs
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    weight_bytes = 3 * e * cfg.hidden_size * cfg.moe_intermediate_size * 4
    few = num_tokens is not None and num_tokens * k <= GATHER_MAX_PAIRS_PER_EXPERT * e
    if few and weight_bytes >= GATHER_MIN_BYTES:
        return experts_op.GATHER  # decoding: bound by reading weights; gather reads only the chosen experts
    if num_tokens is not None and num_tokens < DENSE_MAX_TOKENS:
        return experts_op.DENSE
    return experts_op.WINDOWED  # XLA:CPU runs 2-D matmuls faster than batched or ragged ones of the same size


def grouped_kernel(rt: Runtime, cfg: ModelConfig) -> bool | None:
    """Whether the ragged path's grouped matmul is the megablox kernel: on TPU targets whose expert
    matmuls it tiles (XLA runs ragged_dot's weight gradient dense over every expert there), or in
    Pallas' interpreter where the runtime asks for "interpret" kernels. -> None: jax.lax.ragged_dot;
    else the `interpret` flag."""
    if rt.fp8:
        return None
    if rt.kernel_backend == "interpret":
        return True
    tiles = grouped_matmul_kernel.supports(cfg.hidden_size, cfg.moe_intermediate_size) is None
    return False if platform(rt) == "tpu" and rt.kernel_backend in (AUTO, "xla") and tiles else None


def fp8_experts_refusal(rt: Runtime, cfg: ModelConfig, num_tokens: int | None, x_dtype, w1, w3, w2) -> str | None:
    """Why the routed experts' 8-bit weights (stacked `Fp8Weight`s, DeepSeek's checkpoints) are not read 8-bit by the
    grouped weight-only FP8 GEMM, in one line; None: they are, the ragged path's grouped matmul being that kernel
    (decoding reads half the bytes of bf16 weights, and only the chosen experts'). Refused, they are dequantised
    first (`ops.linear.dense_for`). `num_tokens` as for `experts_variant`."""
    if not all(isinstance(w, Fp8Weight) and w.stacked for w in (w1, w3, w2)):
        return "the experts' weights are not 8-bit (stacked Fp8Weights)"
    if rt.fp8:
        return "FP8 training GEMMs (Runtime.fp8) quantise the weights their own way"
    variant = experts_variant(rt, cfg, num_tokens)
    if variant != experts_op.RAGGED:
        return f"the {variant!r} experts path has no grouped matmul to run them; {experts_op.RAGGED!r} has"
    backend = fp8_backend(rt)
    if backend == "xla":
        return "the kernel backend resolves to 'xla' on this platform"
    if jnp.dtype(x_dtype) not in WEIGHT_ONLY_DTYPES:
        return f"the weight-only FP8 GEMMs take bfloat16 or float32 activations, not {jnp.dtype(x_dtype)}"
    rows = (num_tokens or 1) * cfg.num_experts_per_tok
    for w in (w1, w3, w2):
        reason = fp8_gemm_kernel.supports((rows, w.matrix_shape[-1]), w.matrix_shape, backend=backend,
                                          weight_only=True)
        if reason:
            return reason
    return None


def experts_fn(rt: Runtime, cfg: ModelConfig, num_tokens: int | None, fp8_weights: bool = False) -> ExpertsFn:
    """`fp8_weights`: the weights are stacked `Fp8Weight`s that `fp8_experts_refusal` accepted."""
    variant = experts_variant(rt, cfg, num_tokens)
    fn = EXPERTS[variant]
    if fp8_weights:  # accepted only on the ragged path: its grouped matmul reads them 8-bit
        fn = functools.partial(fn, gmm=fp8_weight_ragged_matmul(fp8_backend(rt)))
    elif rt.fp8:  # Runtime allows fp8 only with the ragged path: the same path, FP8 grouped GEMMs
        fn = functools.partial(fn, gmm=fp8_ragged_matmul(kernel_backend(rt)))
    elif variant == experts_op.RAGGED and grouped_kernel(rt, cfg) is not None:
        fn = functools.partial(fn, gmm=kernel_ragged_matmul(interpret=grouped_kernel(rt, cfg)))
    return fn


def routed_experts(rt: Runtime, cfg: ModelConfig, x, gates, ids, w1, w3, w2) -> jax.Array:
    """The routed experts on x [T, D]: expert-parallel when the current mesh has an expert axis
    (`with jax.set_mesh(mesh):`), else on this device's tokens; the same function either way. A
    kernel the compiler cannot partition runs per device's tokens (`parallel.ep.data_parallel`).
    8-bit weights stay 8-bit where `fp8_experts_refusal` accepts them, else are dequantised here."""
    mesh = jax.sharding.get_abstract_mesh()
    ep = expert_axis_size(mesh) > 1
    fp8_weights = fp8_experts_refusal(rt, cfg, None if ep else x.shape[0], x.dtype, w1, w3, w2) is None
    if not fp8_weights:
        w1, x = dense_for(w1, x)
        w3, x = dense_for(w3, x)
        w2, x = dense_for(w2, x)
    megablox = None if fp8_weights else grouped_kernel(rt, cfg)  # None: not megablox; else its `interpret` flag
    if megablox is False:  # compiled megablox (TPU): each layer's weights cast in its own step
        w1, w3, w2 = (cast_here(w, x.dtype) for w in (w1, w3, w2))
    # Pallas calls (FP8 GEMMs, megablox) have no rules for jax's varying-axes check.
    kernel = rt.fp8 or fp8_weights or megablox is not None
    if ep:
        return expert_parallel(x, gates, ids, w1, w3, w2, mesh=mesh, local=experts_fn(rt, cfg, None, fp8_weights),
                               fp8_dispatch=rt.ep_fp8_dispatch, check_vma=not kernel, exchange=ep_exchange(rt),
                               chunks=ep_chunks(mesh, x.shape[0], ids.shape[1], x.shape[1], x.dtype.itemsize))
    fn = experts_fn(rt, cfg, x.shape[0], fp8_weights)
    pallas = fp8_weights or megablox is not None or (rt.fp8 and kernel_backend(rt) != "xla")
    if not mesh.empty and experts_variant(rt, cfg, x.shape[0]) == experts_op.RAGGED \
            and pallas:  # megablox or the FP8 grouped GEMM kernels: the compiler cannot partition them
        return data_parallel(x, gates, ids, w1, w3, w2, mesh=mesh, local=fn, check_vma=False)
    return fn(x, gates, ids, w1, w3, w2)


def ep_exchange(rt: Runtime):
    """How expert parallelism sends its rows: `jax.lax.ragged_all_to_all` on accelerators (only the routed
    rows travel: with n-way EP the padded dropless buffers carry n times as many bytes, which the V3 plans
    measured as the step's whole cost); None, the padded all-to-all, on CPU targets (XLA:CPU lacks the
    ragged collective) and with FP8 dispatch."""
    return None if platform(rt) == "cpu" or rt.ep_fp8_dispatch else jax.lax.ragged_all_to_all


def ep_chunks(mesh, tokens: int, k: int, d: int, itemsize: int) -> int:
    """Token chunks for expert parallelism: the fewest (halving each device's tokens) that keep one
    dropless all-to-all buffer, [n, tokens a device holds x K, D], within EP_BUFFER_BYTES."""
    n, rows = expert_axis_size(mesh), -(-tokens // max(math.prod(mesh.shape.get(a, 1) for a in batch_axes()), 1))
    c = 1
    while n * (rows // c) * k * d * itemsize > EP_BUFFER_BYTES and rows % (2 * c) == 0:
        c *= 2
    return c


# ---- attention ----------------------------------------------------------------------------------
def kernel_refusal(backend: str, q_shape, kv_shape, kv_dtype, v_dim: int) -> str | None:
    """Why the latent-decode kernel cannot take this call (None: it can)."""
    if backend == "xla":
        return "the kernel backend resolves to 'xla' on this platform"
    return mla_decode_kernel.supports(q_shape, kv_shape, kv_dtype, v_dim=v_dim, backend=backend)


def attention(rt: Runtime, cfg: ModelConfig, *, cached: bool, q_shape, kv_shape, kv_dtype,
              sorted_positions: bool) -> tuple[str, AttentionOptions]:
    """The attention variant (a key of ATTENTION) and its options for queries [B,T,H,C+R] over latent rows [B,S,C+R]
    (`cached`: a cache; `sorted_positions`: uncached with positions increasing along T)."""
    backend, t = kernel_backend(rt) if cached else fp8_backend(rt), q_shape[1]
    name = rt.attention
    refusal = kernel_refusal(backend, q_shape, kv_shape, kv_dtype, cfg.kv_lora_rank) if cached else \
        "it reads a cache, and this attention has none"
    if name == AUTO:
        if cached and t <= DECODE_MAX_T:
            name = attention_op.ABSORBED if refusal else attention_op.LATENT_KERNEL
        else:
            name = attention_op.NAIVE
    elif name == attention_op.LATENT_KERNEL and refusal:
        raise ValueError(f"attention {name!r} cannot run here: {refusal}")
    scores = _rows_per_device(q_shape[0]) * q_shape[2] * t * kv_shape[1] * 4
    core, blocks = _core(platform(rt) == "cpu", t, kv_shape[1], sorted_positions, scores)
    return name, AttentionOptions(cfg.softmax_scale, core, blocks, rt.fp8, backend)


def _core(on_cpu: bool, t: int, s: int, sorted_positions: bool, score_bytes: int = 0) -> tuple[str, int]:
    """The naive variant's attention core and its blocks for T queries over S keys (`score_bytes`: the
    float32 scores of all of them on one device)."""
    if on_cpu and not (score_bytes > CPU_SCORES_BYTES and s % KEY_CHUNK == 0):
        # The blocked core's hand-written backward saves XLA:CPU ~3 passes over the scores.
        return attention_op.BLOCKED, QUERY_BLOCKS if sorted_positions and t >= QUERY_BLOCK_MIN_T else 1
    if on_cpu or s >= CHUNKED_MIN_KEYS and s % KEY_CHUNK == 0:
        return attention_op.CHUNKED, s // KEY_CHUNK
    return attention_op.PLAIN, 1  # short sequences: XLA's fusions of the whole softmax


def dsa_sparse(rt: Runtime, cfg: ModelConfig, num_keys: int) -> bool:
    """Whether MLA's uncached attention (training, prefill) of a model with an indexer runs sparse over
    its selection (`ops.sparse_attention`); else dense, as `attention` chooses."""
    if rt.dsa_stage == sparse_op.WARMUP:
        return False  # the warm-up trains the indexer against the dense attention (V3.2 report s.2.1.1)
    # Up to K keys the selection keeps every visible key: the dense attention is the same function, bit for
    # bit the V3 path, without the gather.
    return num_keys > cfg.index_topk


def sparse_query_chunks(batch: int, t: int, k: int, row_bytes: int) -> int:
    """Query chunks of the sparse attention: the fewest (halving T) that keep one chunk's gathered rows,
    [B, T / chunks, K, C+R] of `row_bytes` each, within SPARSE_GATHER_BYTES on each device (the rows a device
    holds: `batch` over the current mesh's batch shards)."""
    rows, n = _rows_per_device(batch), 1
    while rows * (t // n) * k * row_bytes > SPARSE_GATHER_BYTES and t % (2 * n) == 0:
        n *= 2
    return n


def cached_sparse_attention(rt: Runtime, cfg: ModelConfig, t: int, kv_shape, kv_dtype):
    """DSA's attention over a cache, with `ops.sparse_attention.sparse_attention`'s signature: that, or for a decode
    step (T <= DECODE_MAX_T) the sparse decode kernel (`mla_decode_sparse`, FlashMLA's sparse layout) where the
    runtime's kernel backend takes the call. On CPU "auto" is "xla": the jnp path. On Hopper "auto" is "mosaic_gpu",
    which has no sparse kernel (TMA copies tiles, not gathered rows): the op's stand-in there, Triton's pointer
    gathers (`mla_decode.sparse_backend`); asked for by name, "mosaic_gpu" falls back to the jnp path."""
    backend = kernel_backend(rt)
    if rt.kernel_backend == AUTO:
        backend = mla_decode_kernel.sparse.SPARSE_STAND_IN.get(backend, backend)
    q_shape = (kv_shape[0], t, cfg.num_heads, cfg.kv_cache_dim)
    if t > DECODE_MAX_T or backend == "xla" or mla_decode_kernel.supports_sparse(
            q_shape, kv_shape, (kv_shape[0], t, cfg.index_topk), kv_dtype, v_dim=cfg.kv_lora_rank, backend=backend):
        return sparse_op.sparse_attention
    return functools.partial(_sparse_decode, backend)


def _sparse_decode(backend: str, q_nope, q_pe, kv, q_positions, kv_positions, indices, w, scale: float,
                   query_chunks: int = 1):
    """`sparse_attention` over a cache (kv_positions None) through `mla_decode_sparse` on `backend`, each device's
    rows apart (a Pallas call is not partitioned). The same function, except that a query with no visible
    selected slot gets zeros; a decode query always sees its own slot."""
    del kv_positions, query_chunks  # slot s holds position s; T is small
    q, w_v = sparse_op.latent_query(q_nope, q_pe, w, q_nope.dtype)
    # The kernel takes q in the cache's dtype; a packed FP8 cache is dequantised to q's (the compute dtype).
    q = q if kv.dtype == mla_decode_kernel.fp8_cache.FP8_CACHE_DTYPE else q.astype(kv.dtype)
    idx = jnp.where(sparse_op.selected_visible(indices, q_positions, None), indices, sparse_op.NONE)
    decode = lambda q, kv, idx: mla_decode_kernel.mla_decode_sparse(q, kv, idx, v_dim=w.wkv_b.shape[0],
                                                                     softmax_scale=scale, backend=backend)
    o_lat = local_rows(decode, (q, kv, idx)).astype(q_nope.dtype)
    return jnp.einsum("bthc,hvc->bthv", o_lat, w_v)


def top_k(rt: Runtime) -> TopKFn:
    """DSA's selection (`layers.indexer.select`): on CPU the FFI kernel where it built (XLA:CPU's TopK is 2.5-7x
    slower at the indexer's shapes, docs/PERFORMANCE.md); elsewhere XLA's TopK."""
    if platform(rt) == "cpu" and top_k_op.cpu_kernels.available():
        return TOP_K[top_k_op.CPU_KERNEL]
    return TOP_K[top_k_op.XLA]


# ---- rematerialisation --------------------------------------------------------------------------
def remat_policy(rt: Runtime):
    """The jax checkpoint policy of `rt.remat` for the target (None: save nothing)."""
    if rt.remat == OFFLOAD_ATTENTION and platform(rt) == "cpu":
        raise ValueError(f"remat {rt.remat!r} moves tensors to pinned host memory, which CPU targets lack; "
                         "use 'save_attention' or 'full' there")
    return REMAT[rt.remat]()


# ---- cross-entropy ------------------------------------------------------------------------------
def head_chunks(batch: int, seq: int, vocab: int) -> int:
    """Slices of the positions for `ops.cross_entropy.head_cross_entropy`: the fewest (halving `seq`)
    that keep one slice's float32 logits within HEAD_CHUNK_BYTES on each device (the rows a device
    holds: `batch` over the current mesh's batch shards)."""
    rows, n = _rows_per_device(batch), 1
    while rows * (seq // n) * vocab * 4 > HEAD_CHUNK_BYTES and seq % (2 * n) == 0:
        n *= 2
    return n


def cross_entropy_fn(rt: Runtime) -> CrossEntropyFn:
    """`onepass` everywhere: its backward is one pass over [N, V] and keeps no log-softmax buffer."""
    del rt
    return CROSS_ENTROPY[cross_entropy_op.ONEPASS]
