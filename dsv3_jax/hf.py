"""Hugging Face checkpoints (DeepSeek's released layout) <-> our variables.

`load_hf_checkpoint(path)` reads `config.json` plus `model.safetensors` or a sharded index, of
DeepseekV3 or DeepseekV2 type; FP8 weights are dequantised with their 128x128 `weight_scale_inv`
blocks; the MTP layer (index == num_hidden_layers) is loaded when present. Tensors are read one at
a time from memory-mapped files, so a checkpoint is never held twice in host memory.
`save_hf_checkpoint` writes the same layout (optionally FP8 with block scales).

One table (`layout`) maps every tensor name to a place in our tree; load and save both walk it.
Linear weights are [out, in] in the file and [in, ...out] in our tree.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from dsv3_jax.config import ModelConfig
from dsv3_jax.hf_config import config_from_hf, config_to_hf
from dsv3_jax.model import variable_shapes
from dsv3_jax.ops.linear import Fp8Weight
from dsv3_jax.safetensors_io import INDEX, SINGLE, SafetensorsDir
from pallas_kernels.quant import dequantize_weight, quantize_weight

log = logging.getLogger(__name__)


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
    with open(cfg_path) as f:
        return json.load(f)


def _file_shape(entry: Entry, leaf_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape the file must hold for a leaf of our tree."""
    shape = leaf_shape[1:] if entry.expert is not None else leaf_shape
    if not entry.linear:
        return tuple(shape)
    return (int(np.prod(shape[entry.in_dims:])), int(np.prod(shape[: entry.in_dims])))


def _read(files: SafetensorsDir, entry: Entry, want: tuple[int, ...]) -> jax.Array:
    """One tensor as float32, FP8 dequantised, checked against the shape we expect."""
    if entry.name not in files:
        raise ValueError(f"{files.directory}: missing tensor {entry.name} (expected shape {want})")
    got = files.shape(entry.name)
    if got != want:
        raise ValueError(f"{files.directory}: tensor {entry.name} has shape {got}, expected {want}")
    x = files.get(entry.name)
    scale = _scale_name(entry.name)
    if scale in files:
        return dequantize_weight(jnp.asarray(x), jnp.asarray(files.get(scale)))
    if x.dtype.itemsize == 1:
        raise ValueError(f"{files.directory}: 8-bit tensor {entry.name} has no {scale} to dequantise it")
    return jnp.asarray(x, jnp.float32)


def _to_ours(x: jax.Array, entry: Entry, shape: tuple[int, ...]) -> jax.Array:
    return x.T.reshape(shape) if entry.linear else x


def _count_mtp_layers(cfg: ModelConfig, files: SafetensorsDir) -> int:
    depth = 0
    while depth < cfg.mtp_depth and f"model.layers.{cfg.num_layers + depth}.eh_proj.weight" in files:
        depth += 1
    return depth


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


def load_hf_checkpoint(path: str, dtype=jnp.float32, keep_fp8: bool = False) -> tuple[ModelConfig, dict]:
    """Read a transformers-layout DeepseekV3/V2 directory -> (ModelConfig, variables).

    `keep_fp8`: weights stored in FP8 (with weight_scale_inv) become `Fp8Weight`s holding the file's
    8-bit values and scales, never expanded to full precision on the host; the rest load at `dtype`."""
    cfg = config_from_hf(read_hf_config(path))
    files = SafetensorsDir(path)
    depth = _count_mtp_layers(cfg, files)
    if depth < cfg.mtp_depth:
        log.info("%s: config asks for %d MTP layer(s), the files hold %d; loading %d",
                 path, cfg.mtp_depth, depth, depth)
        cfg = cfg.replace(mtp_depth=depth)
    shapes = variable_shapes(cfg)
    variables: dict = {}
    stacks: dict[tuple[str, ...], np.ndarray] = {}
    fp8_leaves: dict[tuple[str, ...], list[Entry]] = {}
    for entry in layout(cfg):
        if keep_fp8 and entry.fp8:
            fp8_leaves.setdefault(entry.path, []).append(entry)
    for path_, entries in fp8_leaves.items():
        kept = _load_fp8_leaf(files, cfg, entries, _get(shapes, path_).shape)
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
