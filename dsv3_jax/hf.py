"""Hugging Face checkpoints (DeepSeek's released layout) <-> our variables.

`load_hf_checkpoint(path)` reads `config.json` plus `model.safetensors` or a sharded index, of
DeepseekV3.2, V3 or V2 type (V3.2: each attention block's `self_attn.indexer.*` too); FP8 weights
are dequantised with their 128x128 `weight_scale_inv` blocks; the MTP layer (index ==
num_hidden_layers) is loaded when present. Every tensor in the files must be one the config gives a
place to, and the layer count must be the files' (else an MTP layer would load as a decoder layer,
or a layer be dropped). Tensors are read one at a time from memory-mapped files, so a checkpoint
is never held twice in host memory. Given `shardings`, each leaf is made on its devices instead,
every device's block read alone from the files (`jax.make_array_from_callback`), so no host holds a
whole model, and no device a tensor it shards.
`save_hf_checkpoint` writes the same layout (optionally FP8 with block scales).

One table (`layout`) maps every tensor name to a place in our tree; load and save both walk it.
Linear weights are [out, in] in the file and [in, ...out] in our tree.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from safetensors.numpy import save_file

from dsv3_jax.config import ModelConfig, json_type
from dsv3_jax.hf_config import config_from_hf, config_to_hf
from dsv3_jax.model import variable_shapes
from dsv3_jax.ops.linear import Fp8Weight
from dsv3_jax.safetensors_io import INDEX, SINGLE, SafetensorsDir
from pallas_kernels.quant import BLOCK, dequantize_weight, quantize_weight

log = logging.getLogger(__name__)

# A tree like the variables of where each leaf goes (`parallel.rules.param_shardings`), or a function
# of the config returning one (the config is known only once config.json is read).
Shardings = dict | Callable[[ModelConfig], dict]


class Entry(NamedTuple):
    name: str  # tensor name in the file
    path: tuple[str, ...]  # collection, then keys, in our variables
    linear: bool  # [out, in] in the file: transpose (and reshape) on the way in
    expert: int | None = None  # index into a stacked [E, ...] leaf
    fp8: bool = False  # quantised when saving in FP8 (DeepSeek leaves embed, head, router, norms)
    in_dims: int = 1  # leading dims of our leaf that form the file's `in` (2 for wo [H, V, D])


_ATTN = {"wq_a": "q_a_proj", "wq_b": "q_b_proj", "wq": "q_proj", "wkv_a": "kv_a_proj_with_mqa",
         "wkv_b": "kv_b_proj", "wo": "o_proj"}
_NORMS = {"q_norm": "q_a_layernorm", "kv_norm": "kv_a_layernorm"}
_FFN = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def _block_entries(cfg: ModelConfig, prefix: str, ours: tuple[str, ...], moe: bool) -> Iterator[Entry]:
    p = ("params", *ours)
    yield Entry(f"{prefix}.input_layernorm.weight", (*p, "attn_norm", "scale"), False)
    yield Entry(f"{prefix}.post_attention_layernorm.weight", (*p, "ffn_norm", "scale"), False)
    attn = ["wq_a", "wq_b"] if cfg.q_lora_rank else ["wq"]
    for key in attn + ["wkv_a", "wkv_b", "wo"]:
        yield Entry(f"{prefix}.self_attn.{_ATTN[key]}.weight", (*p, "attn", key), True, fp8=True,
                    in_dims=2 if key == "wo" else 1)
    norms = ["q_norm", "kv_norm"] if cfg.q_lora_rank else ["kv_norm"]
    for key in norms:
        yield Entry(f"{prefix}.self_attn.{_NORMS[key]}.weight", (*p, "attn", key, "scale"), False)
    if cfg.has_indexer:
        yield from _indexer_entries(f"{prefix}.self_attn.indexer", (*p, "attn", "indexer"))
    if not moe:
        for key, hf in _FFN.items():
            yield Entry(f"{prefix}.mlp.{hf}.weight", (*p, "ffn", key), True, fp8=True)
        return
    yield Entry(f"{prefix}.mlp.gate.weight", (*p, "ffn", "router"), True)
    if cfg.router_bias:
        yield Entry(f"{prefix}.mlp.gate.e_score_correction_bias", ("router", *ours, "ffn", "bias"), False)
    for e in range(cfg.n_routed_experts):
        for key, hf in _FFN.items():
            yield Entry(f"{prefix}.mlp.experts.{e}.{hf}.weight", (*p, "ffn", key), True, e, fp8=True)
    if cfg.n_shared_experts:
        for key, hf in _FFN.items():
            yield Entry(f"{prefix}.mlp.shared_experts.{hf}.weight", (*p, "ffn", "shared", key), True, fp8=True)


def _indexer_entries(prefix: str, p: tuple[str, ...]) -> Iterator[Entry]:
    """DeepSeek-V3.2's lightning indexer, named as its checkpoints and transformers name it. Its two
    projections are FP8 in DeepSeek's release; weights_proj stays in higher precision there (BF16 in
    the file, float32 in DeepSeek's code and transformers), as do the LayerNorm's scale and bias."""
    yield Entry(f"{prefix}.wq_b.weight", (*p, "wq_b"), True, fp8=True)
    yield Entry(f"{prefix}.wk.weight", (*p, "wk"), True, fp8=True)
    yield Entry(f"{prefix}.k_norm.weight", (*p, "k_norm", "scale"), False)
    yield Entry(f"{prefix}.k_norm.bias", (*p, "k_norm", "bias"), False)
    yield Entry(f"{prefix}.weights_proj.weight", (*p, "weights_proj"), True)


def _mtp_entries(cfg: ModelConfig, k: int) -> Iterator[Entry]:
    prefix, ours = f"model.layers.{cfg.num_layers + k}", f"mtp_{k}"
    yield Entry(f"{prefix}.enorm.weight", ("params", ours, "enorm", "scale"), False)
    yield Entry(f"{prefix}.hnorm.weight", ("params", ours, "hnorm", "scale"), False)
    yield Entry(f"{prefix}.eh_proj.weight", ("params", ours, "eh_proj"), True)
    yield Entry(f"{prefix}.shared_head.norm.weight", ("params", ours, "head_norm", "scale"), False)
    yield from _block_entries(cfg, prefix, (ours, "block"), moe=cfg.n_routed_experts > 0)


def layout(cfg: ModelConfig, mtp: bool = True) -> Iterator[Entry]:
    """Every tensor of the checkpoint, in file order."""
    yield Entry("model.embed_tokens.weight", ("params", "embed"), False)
    for i in range(cfg.num_layers):
        yield from _block_entries(cfg, f"model.layers.{i}", (f"layers_{i}",), moe=i >= cfg.first_k_dense)
    yield Entry("model.norm.weight", ("params", "final_norm", "scale"), False)
    if not cfg.tie_word_embeddings:
        yield Entry("lm_head.weight", ("params", "lm_head"), True)
    if mtp:
        for k in range(cfg.mtp_depth):
            yield from _mtp_entries(cfg, k)


def _scale_name(name: str) -> str:
    return name[: -len("weight")] + "weight_scale_inv"


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _get_or_none(tree: dict, path: tuple[str, ...]):
    try:
        return _get(tree, path)
    except KeyError:
        return None


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# ---- loading ------------------------------------------------------------------------------------

def read_hf_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            hf = json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{cfg_path}: not a JSON file ({e})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object, got {json_type(hf)}")
    return hf


def _file_shape(entry: Entry, leaf_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape the file must hold for a leaf of our tree."""
    shape = leaf_shape[1:] if entry.expert is not None else leaf_shape
    if not entry.linear:
        return tuple(shape)
    return (int(np.prod(shape[entry.in_dims:])), int(np.prod(shape[: entry.in_dims])))


def _checked_scaled(files: SafetensorsDir, entry: Entry, want: tuple[int, ...]) -> bool:
    """Whether a tensor, checked present and of the shape we expect, comes with FP8 block scales."""
    if entry.name not in files:
        raise ValueError(f"{files.directory}: missing tensor {entry.name} (expected shape {want})")
    got = files.shape(entry.name)
    if got != want:
        raise ValueError(f"{files.directory}: tensor {entry.name} has shape {got}, expected {want}")
    scale = _scale_name(entry.name)
    if scale in files:
        blocks = (math.ceil(want[0] / BLOCK), math.ceil(want[1] / BLOCK)) if len(want) == 2 else None
        if files.shape(scale) != blocks:
            raise ValueError(f"{files.directory}: {scale} has shape {files.shape(scale)}; {BLOCK}x{BLOCK} block "
                             f"scales of a {want} weight are {blocks}")
        return True
    if files.dtype(entry.name).itemsize == 1:
        raise ValueError(f"{files.directory}: 8-bit tensor {entry.name} has no {scale} to dequantise it")
    return False


def _read(files: SafetensorsDir, entry: Entry, want: tuple[int, ...]) -> jax.Array:
    """One tensor as float32, FP8 dequantised, checked against the shape we expect."""
    if _checked_scaled(files, entry, want):
        return dequantize_weight(jnp.asarray(files.get(entry.name)), jnp.asarray(files.get(_scale_name(entry.name))))
    return jnp.asarray(files.get(entry.name), jnp.float32)


def _to_ours(x: jax.Array, entry: Entry, shape: tuple[int, ...]) -> jax.Array:
    return x.T.reshape(shape) if entry.linear else x


_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def _span(indices) -> str:
    lo, hi = min(indices), max(indices)
    return f"model.layers.{lo}" if lo == hi else f"model.layers.{lo}..{hi}"


def _mtp_depth_in_files(cfg: ModelConfig, files: SafetensorsDir, path: str) -> int:
    """How many MTP layers the files hold (an MTP layer is the one with an eh_proj), once the layer
    count of config.json is checked against them: with the wrong count, an MTP layer would load as
    a decoder layer, or a decoder layer be dropped."""
    layers = {int(m.group(1)) for m in map(_LAYER.match, files.names()) if m}
    mtp = {i for i in layers if f"model.layers.{i}.eh_proj.weight" in files}
    main = layers - mtp
    in_files = max(main) + 1 if main else 0
    if in_files != cfg.num_layers:
        held = f"{in_files} decoder layer(s)" + (f" ({_span(main)})" if main else "")
        if mtp:
            held += f" and {len(mtp)} MTP layer(s) ({_span(mtp)})"
        raise ValueError(f"{path}: config.json says num_hidden_layers = {cfg.num_layers}, but the safetensors "
                         f"files hold {held}")
    if len(mtp) > cfg.mtp_depth:
        raise ValueError(f"{path}: the safetensors files hold {len(mtp)} MTP layer(s) ({_span(mtp)}), but "
                         f"config.json's num_nextn_predict_layers is {cfg.mtp_depth}")
    return len(mtp)


def _known_names(cfg: ModelConfig) -> set[str]:
    """Every tensor name a checkpoint of `cfg` may hold: the layout's, their FP8 scales, and the
    copies of the shared embedding and head (each MTP layer's; lm_head when tied) that are not read."""
    names = {e.name for e in layout(cfg)}
    names |= {_scale_name(n) for n in names}
    for k in range(cfg.mtp_depth):
        names |= {f"model.layers.{cfg.num_layers + k}.embed_tokens.weight",
                  f"model.layers.{cfg.num_layers + k}.shared_head.head.weight"}
    if cfg.tie_word_embeddings:
        names.add("lm_head.weight")
    return names


def _check_accounted(cfg: ModelConfig, files: SafetensorsDir, path: str) -> None:
    """Refuse tensors the config gives no place to: they would otherwise be silently left out."""
    extra = sorted(set(files.names()) - _known_names(cfg))
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise ValueError(f"{path}: {len(extra)} tensor(s) in the safetensors files are not part of the model "
                         f"config.json describes: {shown}")


def _read_fp8(files: SafetensorsDir, entry: Entry, want: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray] | None:
    """(e4m3 values, scales) of a tensor stored in FP8, untouched (views of the mapped file); None
    if the file holds it at higher precision."""
    scale = _scale_name(entry.name)
    if entry.name not in files or scale not in files or files.shape(entry.name) != want:
        return None
    return files.get(entry.name), files.get(scale)


def _load_fp8_leaf(files: SafetensorsDir, cfg: ModelConfig, entries: list[Entry], leaf: tuple[int, ...]):
    """An Fp8Weight for one leaf (all experts of a stacked leaf), or None if not stored in FP8."""
    parts = [_read_fp8(files, e, _file_shape(e, leaf)) for e in entries]
    if any(p is None for p in parts):
        return None
    q, s = (np.stack(x) if entries[0].expert is not None else x[0] for x in zip(*parts))
    return Fp8Weight.from_file(q, s, leaf, entries[0].in_dims, stacked=entries[0].expert is not None)


# ---- loading into shardings ---------------------------------------------------------------------
# A leaf's block is given by ranges of our indices. A linear weight's file tensor [out, in] is viewed
# as [*out_dims, *in_dims] of our [*in_dims, *out_dims], so any block of ours is a block of that view.

def _file_axes(entry: Entry, ndim: int) -> tuple[int, ...]:
    """For each axis of the file tensor's view, the axis of our (per-expert) leaf it is."""
    if not entry.linear:
        return tuple(range(ndim))
    return (*range(entry.in_dims, ndim), *range(entry.in_dims))


def _slices(ranges: list[range]) -> tuple[slice, ...]:
    return tuple(slice(r.start, r.stop) for r in ranges)


def _flat_positions(ranges: list[range], dims: tuple[int, ...]) -> np.ndarray:
    """Row-major positions, along the dimension flattened from `dims`, of a block's elements."""
    grid = np.meshgrid(*(np.arange(r.start, r.stop) for r in ranges), indexing="ij")
    return np.ravel_multi_index(grid, dims).ravel()


def _scales_of(files: SafetensorsDir, name: str, view: tuple[int, ...], ranges: list[range], n_out: int) -> np.ndarray:
    """The scale of each element of a block, as [rows, cols] of the file's [out, in] matrix, read from
    only the 128x128 scale blocks that cover the block."""
    rows = _flat_positions(ranges[:n_out], view[:n_out]) // BLOCK
    cols = _flat_positions(ranges[n_out:], view[n_out:]) // BLOCK
    s = files.read(_scale_name(name), (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)))
    return s.astype(np.float32)[(rows - rows[0])[:, None], cols - cols[0]]


def _read_block(files: SafetensorsDir, entry: Entry, shape: tuple[int, ...], ranges: list[range],
                dtype: np.dtype, dequantize: bool = True) -> np.ndarray:
    """Block `ranges` of one (per-expert) leaf of `shape`, read alone from the file, FP8 dequantised
    per element as `dequantize_weight` does (`dequantize=False`: the file's values as they are)."""
    axes = _file_axes(entry, len(shape))
    view = tuple(shape[a] for a in axes)
    view_ranges = [ranges[a] for a in axes]
    x = files.read(entry.name, _slices(view_ranges), view)
    if dequantize and x.size and _scale_name(entry.name) in files:
        s = _scales_of(files, entry.name, view, view_ranges, len(shape) - entry.in_dims)
        x = (x.astype(np.float32).reshape(s.shape) * s).reshape(x.shape)
    return np.ascontiguousarray(np.transpose(x, np.argsort(axes)), dtype)


# read(entry, per-expert shape, ranges) -> that tensor's part of a block.
BlockReader = Callable[[Entry, tuple[int, ...], list[range]], np.ndarray]


def _block(read: BlockReader, entries: list[Entry], shape: tuple[int, ...], index: tuple[slice, ...],
           dtype: np.dtype) -> np.ndarray:
    """Block `index` of a leaf; of a stacked leaf [E, ...], only the block's experts, one at a time."""
    ranges = [range(*s.indices(d)) for s, d in zip(index, shape)]
    if entries[0].expert is None:
        return read(entries[0], shape, ranges)
    out = np.empty([len(r) for r in ranges], dtype)
    for i, e in enumerate(ranges[0]):
        out[i] = read(entries[e], shape[1:], ranges[1:])
    return out


def _make_array(read: BlockReader, entries: list[Entry], shape: tuple[int, ...], sharding, dtype) -> jax.Array:
    """One leaf on its devices; devices holding the same block (replicas) share one read of it."""
    blocks: dict[tuple, np.ndarray] = {}

    def callback(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple(s.indices(d)[:2] for s, d in zip(index, shape))
        if key not in blocks:
            blocks[key] = _block(read, entries, shape, index, dtype)
        return blocks[key]

    return jax.make_array_from_callback(shape, sharding, callback)


def _block_axis(spec: tuple, dims: tuple[int, ...], mesh) -> str | tuple[str, ...] | None:
    """How to split one block axis of FP8 scales: as the side ([out] or [in], flattened from `dims`
    split as `spec`) it tiles, where each device's part of that side is a run of whole 128-blocks
    (only the side's first dimension split, into parts a multiple of 128 long), so a device holds the
    scales of its own values and no other; else None: replicated (one float32 per 16384 values)."""
    if spec[0] is None or any(s is not None for s in spec[1:]):
        return None
    parts = math.prod(mesh.shape[a] for a in ((spec[0],) if isinstance(spec[0], str) else spec[0]))
    return spec[0] if (math.prod(dims) // parts) % BLOCK == 0 else None


def _scale_sharding(sharding, entry: Entry, leaf: tuple[int, ...]):
    """Where an Fp8Weight's scales [E?, out/128, in/128] go, given where its values go: the expert
    axis split as the values', each block axis as `_block_axis` says."""
    if not isinstance(sharding, NamedSharding):
        if not sharding.is_fully_replicated:
            raise ValueError(f"keep_fp8: {entry.name} is to be split by {sharding}; give a NamedSharding")
        return sharding
    spec = (*sharding.spec, *(None,) * (len(leaf) - len(sharding.spec)))
    lead, spec, dims = (spec[:1], spec[1:], leaf[1:]) if entry.expert is not None else ((), spec, leaf)
    n = entry.in_dims
    return NamedSharding(sharding.mesh, PartitionSpec(
        *lead, _block_axis(spec[n:], dims[n:], sharding.mesh), _block_axis(spec[:n], dims[:n], sharding.mesh)))


def _sharded_fp8(files: SafetensorsDir, entries: list[Entry], leaf: tuple[int, ...], sharding) -> Fp8Weight:
    """An Fp8Weight kept 8-bit: its values split as the leaf, its scales as `_scale_sharding`."""
    first, stacked = entries[0], entries[0].expert is not None
    q_dtype = files.dtype(first.name)
    q = _make_array(lambda e, shape, r: _read_block(files, e, shape, r, q_dtype, dequantize=False),
                    entries, leaf, sharding, q_dtype)
    scale_shape = (*leaf[:1 if stacked else 0], *files.shape(_scale_name(first.name)))
    scale = _make_array(lambda e, _, r: files.read(_scale_name(e.name), _slices(r)).astype(np.float32),
                        entries, scale_shape, _scale_sharding(sharding, first, leaf), np.dtype(np.float32))
    return Fp8Weight(q, scale, first.in_dims, stacked)


def _by_leaf(cfg: ModelConfig) -> dict[tuple[str, ...], list[Entry]]:
    """The tensors of each leaf of our tree (a stacked leaf's experts in order)."""
    leaves: dict[tuple[str, ...], list[Entry]] = {}
    for entry in layout(cfg):
        leaves.setdefault(entry.path, []).append(entry)
    return leaves


def _load_sharded(files: SafetensorsDir, cfg: ModelConfig, shapes: dict, shardings: dict, dtype,
                  keep_fp8: bool) -> dict:
    """The variables, each leaf made on its devices as `shardings` (a tree like them) says."""
    variables: dict = {}
    dtype = jnp.dtype(dtype)
    read = lambda e, shape, r: _read_block(files, e, shape, r, dtype)
    for path, entries in _by_leaf(cfg).items():
        leaf, sharding = tuple(_get(shapes, path).shape), _get(shardings, path)
        scaled = [_checked_scaled(files, e, _file_shape(e, leaf)) for e in entries]
        if keep_fp8 and entries[0].fp8 and all(scaled):
            _set(variables, path, _sharded_fp8(files, entries, leaf, sharding))
        else:
            _set(variables, path, _make_array(read, entries, leaf, sharding, dtype))
    return variables


def load_hf_checkpoint(path: str, dtype=jnp.float32, keep_fp8: bool = False,
                       shardings: Shardings | None = None) -> tuple[ModelConfig, dict]:
    """Read a transformers-layout DeepseekV3.2/V3/V2 directory -> (ModelConfig, variables).

    `keep_fp8`: weights stored in FP8 (with weight_scale_inv) become `Fp8Weight`s holding the file's
    8-bit values and scales, never expanded to full precision on the host; the rest load at `dtype`.
    `shardings` (`Shardings`): each leaf is made on its devices, each of the process's devices' blocks
    read alone from the files (a stacked leaf's experts one by one, FP8 dequantised with just the
    scale blocks covering it); an Fp8Weight's values take the leaf's sharding, its scales
    `_scale_sharding`. Without it, leaves are whole, on the default device."""
    cfg = config_from_hf(read_hf_config(path))
    files = SafetensorsDir(path)
    depth = _mtp_depth_in_files(cfg, files, path)
    if depth < cfg.mtp_depth:
        log.info("%s: config asks for %d MTP layer(s), the files hold %d; loading %d",
                 path, cfg.mtp_depth, depth, depth)
        cfg = cfg.replace(mtp_depth=depth)
    _check_accounted(cfg, files, path)
    shapes = variable_shapes(cfg)
    if shardings is not None:
        tree = shardings(cfg) if callable(shardings) else shardings
        return cfg, _load_sharded(files, cfg, shapes, tree, dtype, keep_fp8)
    variables: dict = {}
    stacks: dict[tuple[str, ...], np.ndarray] = {}
    for path_, entries in _by_leaf(cfg).items():
        kept = _load_fp8_leaf(files, cfg, entries, _get(shapes, path_).shape) if keep_fp8 and entries[0].fp8 else None
        if kept is not None:
            _set(variables, path_, kept)
    for entry in layout(cfg):
        if keep_fp8 and entry.fp8 and isinstance(_get_or_none(variables, entry.path), Fp8Weight):
            continue
        leaf = _get(shapes, entry.path).shape
        x = _read(files, entry, _file_shape(entry, leaf))
        if entry.expert is None:
            _set(variables, entry.path, _to_ours(x, entry, leaf).astype(dtype))
            continue
        if entry.path not in stacks:  # filled expert by expert, converted once complete
            stacks[entry.path] = np.empty(leaf, jnp.dtype(dtype))
        stacks[entry.path][entry.expert] = np.asarray(_to_ours(x, entry, leaf[1:]).astype(dtype))
        if entry.expert == cfg.n_routed_experts - 1:
            _set(variables, entry.path, jnp.asarray(stacks.pop(entry.path)))
    return cfg, variables


# ---- saving -------------------------------------------------------------------------------------

def _from_ours(value, entry: Entry) -> np.ndarray:
    x = np.asarray(value if entry.expert is None else value[entry.expert], np.float32)
    if not entry.linear:
        return x
    return np.ascontiguousarray(x.reshape(int(np.prod(x.shape[: entry.in_dims])), -1).T)


def _tensors(cfg: ModelConfig, variables: dict, fp8: bool, dtype) -> Iterator[tuple[str, np.ndarray]]:
    for entry in layout(cfg):
        x = _from_ours(_get(variables, entry.path), entry)
        if fp8 and entry.fp8:
            q, s = quantize_weight(jnp.asarray(x))
            yield entry.name, np.asarray(q)
            yield _scale_name(entry.name), np.asarray(s)
        else:
            yield entry.name, x.astype(dtype)
    # DeepSeek's MTP layer carries its own copies of the shared embedding and output head.
    for k in range(cfg.mtp_depth):
        prefix = f"model.layers.{cfg.num_layers + k}"
        params = variables["params"]
        yield f"{prefix}.embed_tokens.weight", np.asarray(params["embed"], dtype)
        head = params["embed"] if cfg.tie_word_embeddings else np.asarray(params["lm_head"]).T
        yield f"{prefix}.shared_head.head.weight", np.ascontiguousarray(np.asarray(head, dtype))


def _write_shards(tensors: Iterator[tuple[str, np.ndarray]], out: str, max_shard_bytes: int) -> None:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, x in tensors:
        if shards[-1] and size + x.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = x
        size += x.nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out, SINGLE), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out, fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
        total += sum(x.nbytes for x in shard.values())
    with open(os.path.join(out, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _readable_by_all(directory: str) -> None:
    """mkdtemp and the safetensors writer make owner-only files; a checkpoint is meant to be shared."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for name in os.listdir(directory):
        os.chmod(os.path.join(directory, name), 0o666 & ~umask)


def save_hf_checkpoint(cfg: ModelConfig, variables: dict, path: str, *, weights: str = "float32",
                       max_shard_bytes: int = 4 << 30, overwrite: bool = False) -> None:
    """Write config.json + safetensors in DeepSeek's layout. weights: float32 | bfloat16 | fp8.

    The directory is written beside `path` and renamed into place at the end, so a failure never
    leaves a half-written checkpoint, and an existing non-empty `path` is kept unless `overwrite`.
    """
    if weights not in ("float32", "bfloat16", "fp8"):
        raise ValueError(f"save_hf_checkpoint: weights={weights!r}, expected float32, bfloat16 or fp8")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty (pass overwrite=True to replace it)")
    dtype = jnp.dtype("bfloat16") if weights == "bfloat16" else np.float32
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".hf-", dir=parent)
    try:
        hf = config_to_hf(cfg)
        if weights == "fp8":
            hf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [128, 128]}
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        _write_shards(_tensors(cfg, variables, weights == "fp8", dtype), tmp, max_shard_bytes)
        _readable_by_all(tmp)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
