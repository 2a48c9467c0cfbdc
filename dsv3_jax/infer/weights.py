"""Loading a model for inference from any of our checkpoint layouts, at the weight precision asked for.

Layouts, told apart by what the directory holds:
- a training workdir: checkpoints/<step>/ (orbax, written by train.py); the newest step that restores
  is used, with a warning line naming each newer one that does not (damaged);
- an export: model_config.json + orbax/ (written by `python -m dsv3_jax.export`);
- a Hugging Face checkpoint: config.json + *.safetensors in DeepSeek's layout (FP8 or not).

Weights: "fp32" as stored; "bf16" every floating weight in bfloat16, computing in bfloat16; "fp8"
the linear layers' weights as E4M3 with 128x128 block scales (`Fp8Weight`), the embedding, head,
norms, router and MTP projection in bfloat16, computing in bfloat16, as DeepSeek serves V3. An FP8
Hugging Face checkpoint loaded with "fp8" keeps its 8-bit tensors as they are in the files.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.export import CONFIG_FILE, INFO_FILE, ORBAX_DIR, ExportError, load_exported, restore_variables
from dsv3_jax.hf import layout, load_hf_checkpoint
from dsv3_jax.ops.linear import Fp8Weight
from dsv3_jax.runtime import Runtime

WEIGHTS = ("fp32", "bf16", "fp8")
COMPUTE_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp8": "bfloat16"}


class CheckpointError(ValueError):
    """A checkpoint path that is missing or of no layout we know."""


def detect_format(path: str) -> str:
    if not os.path.isdir(path):
        raise CheckpointError(f"--checkpoint {path}: no such directory")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return "workdir"
    if os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isdir(os.path.join(path, ORBAX_DIR)):
        return "export"
    if os.path.isfile(os.path.join(path, "config.json")) and any(f.endswith(".safetensors") for f in os.listdir(path)):
        return "hf"
    raise CheckpointError(f"--checkpoint {path}: not a checkpoint this tool knows; expected a training workdir "
                          f"(checkpoints/), an export ({CONFIG_FILE} + {ORBAX_DIR}/) or a Hugging Face directory "
                          "(config.json + *.safetensors)")


def _tokenizer_of(path: str, fmt: str, recorded: str | None) -> str | None:
    """The tokenizer spec that belongs to a checkpoint, when it says (None: unknown)."""
    if fmt == "hf":
        tok = os.path.join(path, "tokenizer.json")
        return tok if os.path.isfile(tok) else None
    return recorded


def runtime_for(weights: str, **choices) -> Runtime:
    """The runtime that serves weights loaded as `weights`: computing in their dtype (bfloat16 for
    fp8), never with FP8 *training* GEMMs (a run trained with --precision=fp8 is served like any)."""
    return Runtime(dtype=COMPUTE_DTYPE[weights], **choices)


def load_checkpoint(path: str, weights: str = "fp32") -> tuple[ModelConfig, dict, str | None]:
    """-> (ModelConfig, variables as `weights` asks, tokenizer spec or None); serve them with
    `runtime_for(weights)`."""
    if weights not in WEIGHTS:
        raise CheckpointError(f"--weights={weights!r}: expected one of {list(WEIGHTS)}")
    fmt = detect_format(path)
    recorded = None
    try:
        if fmt == "workdir":
            cfg, variables, _, recorded = restore_variables(path)
        elif fmt == "export":
            cfg, variables = load_exported(path)
            recorded = _read_info(path).get("tokenizer")
        else:
            cfg, variables = load_hf_checkpoint(path, keep_fp8=weights == "fp8")
    except (ExportError, FileNotFoundError, ValueError) as e:
        raise CheckpointError(f"--checkpoint {path}: {e}") from e
    return cfg, convert_weights(cfg, variables, weights), _tokenizer_of(path, fmt, recorded)


def _read_info(path: str) -> dict:
    info = os.path.join(path, INFO_FILE)
    if not os.path.isfile(info):
        return {}
    with open(info) as f:
        recorded = json.load(f)
    if not isinstance(recorded, dict):
        raise ValueError(f"{info}: expected a JSON object, found {type(recorded).__name__}")
    return recorded


def _linear_paths(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, bool]]:
    """The weights DeepSeek keeps in FP8 -> (in_dims, stacked over experts)."""
    return {e.path: (e.in_dims, e.expert is not None) for e in layout(cfg) if e.fp8}


def convert_weights(cfg: ModelConfig, variables: dict, weights: str) -> dict:
    """Cast or quantise loaded variables for `weights` (compute with `runtime_for(weights)`)."""
    linear = _linear_paths(cfg) if weights == "fp8" else {}
    low = jnp.float32 if weights == "fp32" else jnp.bfloat16

    def convert(path, x):
        key = tuple(k.key for k in path)
        if isinstance(x, Fp8Weight):
            return x
        if key in linear:
            in_dims, stacked = linear[key]
            return Fp8Weight.quantize(jnp.asarray(x, jnp.float32), in_dims, stacked)
        x = jnp.asarray(x)
        # The router's balancing bias only ranks experts; it stays float32 like the router logits.
        if key[0] == "router" or not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        return x.astype(low)

    return jax.tree_util.tree_map_with_path(convert, variables, is_leaf=lambda x: isinstance(x, Fp8Weight))


def weight_bytes(variables: dict) -> int:
    """Bytes the weights take in memory (8-bit values and their scales included)."""
    return int(sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(variables)))
