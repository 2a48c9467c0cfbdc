"""Compile-only plans: the real training step of a config, compiled for TPU chips or GPUs this host does not have.

`python -m dsv3_jax.plan --config small --target v5e:2x2 --mesh fsdp=4 --batch 8 --seq 256`

libtpu (`pip install "jax[tpu]==0.10.2"`) describes a TPU topology without the hardware
(`jax.experimental.topologies.get_topology_desc`); its devices form our mesh, and the step that
`jit_steps` would run (the same `train_step`, state shardings, batch sharding and donation) is lowered
under that mesh with `Runtime(platform="tpu")`, so every per-platform choice follows the target, and
compiled by the TPU compiler. GPU clusters (`--target h100:8`, `h800:32x8` = nodes x GPUs) go the same way
through the CUDA build of jaxlib (`pip install "jax[cuda12]==0.10.2"`), described to its compiler by
`gpu_targets` from the cards' published facts, with `Runtime(platform="gpu")`. What it reports, per device:

- memory, from `memory_analysis()`: arguments (the train state's shards and the batch's), temporaries
  (activations, gradients, the optimizer's scratch) and outputs (the new state, the metrics). The state
  is donated, so most outputs are written into the argument buffers; those bytes (`alias`) are counted
  once: total = arguments + temporaries + outputs - alias. The program's code (generated_code_size) is
  left out.
  TPU layouts pad the two minor dimensions of every array to tiles of (8, 128) 32-bit values, so small
  models take far more than their element count.
- `fits`: total <= the HBM the compiler lets a program use on that chip (`CHIPS`; GPUs: 80% of the card's
  memory, `gpu_targets.COMPILER_MEMORY_SHARE`). A TPU step whose temporaries alone exceed it is refused by
  the compiler (RESOURCE_EXHAUSTED); its figures are read from that message. The GPU compiler refuses
  nothing: it rematerialises towards the limit, warns where it cannot, and the plan says it does not fit.
- FLOPs: the compiler's count for one device's program (`cost_analysis()`; for GPUs, whose compile-only
  executables have none, XLA's HLO cost analysis of the optimised module) beside the cost model's
  (`costmodel.train_flops_per_token` x tokens / devices), with the known reasons they differ.
- communication, from the optimised program (`hlo_comms`): every collective's bytes sent per device,
  loops' trip counts multiplied in, and their time on the links at the published one-direction
  bandwidth (TPU: the chip's ICI, half its bidirectional figure; GPU: NVLink inside a node, the
  InfiniBand NIC for groups that cross nodes).
- an ESTIMATE of the step time: the largest of compute (FLOPs at the chip's published BF16 peak), HBM
  traffic (the compiler's bytes accessed at the published bandwidth) and communication, as if the three
  overlapped perfectly (their sum is the other bound, reported as `serial_step_s`). MFU = model FLOPs /
  (estimated step time x peak).

`--mode decode` compiles the inference engine's decode step instead (`infer.engine.Generator.step`, one
step a call, greedy, plain or `--speculative mtp`) for `--batch` rows whose latent caches hold
`--context` tokens, with the weights as `infer.weights.convert_weights` makes them (`--weights bf16|fp8`)
plus the absorbed attention halves `Transformer.prepare_decode` derives. Same memory figures, `fits`
and exit codes; the estimate is memory-bound: the step's bytes accessed at the HBM bandwidth, and the
tokens per second per device that gives (batch rows / devices / step time; one token a row a step).

Exit codes: 0 the plan fits, 3 it does not (one line with the numbers), 2 bad input (one line).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import json
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import NamedSharding

from dsv3_jax import gpu_targets, hlo_comms
from dsv3_jax.config import ModelConfig
from dsv3_jax.costmodel import active_matmul_params, attention_train_flops_per_token, train_flops_per_token
from dsv3_jax.infer.engine import PREFILL_BUCKET, GenerateConfig, GenerationError, Generator, cache_length
from dsv3_jax.infer.weights import convert_weights
from dsv3_jax.layers.cache import LatentCache
from dsv3_jax.layers.mla import ABSORBED
from dsv3_jax.model import Transformer, logical_axes, stacks, variable_shapes
from dsv3_jax.ops import dispatch
from dsv3_jax.ops.linear import Fp8Weight
from dsv3_jax.ops.remat import NONE as NO_REMAT
from dsv3_jax.parallel.mesh import make_mesh, parse_mesh
from dsv3_jax.parallel.rules import batch_sharding, batch_shards, param_shardings, replicated, to_mesh_spec
from dsv3_jax.runtime import Runtime, choices
from dsv3_jax.train.loop import TrainConfig, TrainingError, optim_config
from dsv3_jax.train.step import MOMENT_DTYPES, OptimConfig, TrainState, init_state, state_shardings, train_step

GIB = 1 << 30
EXIT_BAD_INPUT, EXIT_DOES_NOT_FIT = 2, 3
MODES, DECODE_WEIGHTS, SPECULATIVE = ("train", "prefill", "decode"), ("bf16", "fp8"), ("none", "mtp")


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation or GPU card: published per-chip peaks (docs FACTS.md s.7) and what its compiler
    lets a program use."""

    name: str
    hbm_bytes: float  # published HBM per chip (FACTS.md's GB; the usable figures show they are GiB)
    hbm_bandwidth: float  # bytes/s per chip
    bf16_flops: float  # dense BF16 FLOP/s per chip
    devices_per_chip: int  # JAX devices per chip (Ironwood shows each of its 2 TensorCores)
    # HBM one device's program may use, as the compiler states it when a program exceeds it
    # ("exceeds available HBM (15.75G)", G = GiB); docs/SCALE.md has the command.
    usable_hbm_bytes: int
    platform: str = "tpu"  # the Runtime.platform a step for this chip is built for
    # Interconnect, bytes/s per chip as published, both directions together: inside a slice or node (TPU:
    # ICI; GPU: NVLink), and between nodes (GPUs: the InfiniBand NIC each GPU has; a TPU plan is one slice).
    link_bandwidth: float = 0.0
    network_bandwidth: float = 0.0

    def per_device(self, value: float) -> float:
        return value / self.devices_per_chip


# ICI: Google Cloud's TPU pages (v5e, v5p, v6e, tpu7x), "bidirectional inter-chip interconnect bandwidth
# per chip": 400, 1,200, 800 and 1,200 GB/s.
CHIPS = {
    "v5e": Chip("TPU v5e", 16 * GIB, 819e9, 197e12, 1, round(15.75 * GIB), link_bandwidth=400e9),
    "v5p": Chip("TPU v5p", 95 * GIB, 2765e9, 459e12, 1, round(95.74 * GIB), link_bandwidth=1200e9),
    "v6e": Chip("TPU v6e", 32 * GIB, 1640e9, 918e12, 1, round(31.25 * GIB), link_bandwidth=800e9),
    "tpu7x": Chip("TPU7x", 192 * GIB, 7370e9, 2307e12, 2, round(94.75 * GIB), link_bandwidth=1200e9),
}
# GPU cards (`h100:8`, `h800:32x8`): their facts and target descriptions live in `gpu_targets`.
GPU_CHIPS = {name: Chip(card.name, card.memory_bytes, card.memory_bandwidth, card.bf16_flops, 1,
                        card.usable_memory_bytes, "gpu", card.nvlink_bandwidth, card.network_bandwidth)
             for name, card in gpu_targets.CARDS.items()}


class PlanError(ValueError):
    """Bad input: an unknown target, a mesh or batch that does not fit the devices."""


# ---- the target ---------------------------------------------------------------------------------
def chip_of(target: str) -> Chip:
    """"v5e:2x2" -> CHIPS["v5e"], "h100:8" -> GPU_CHIPS["h100"]; PlanError naming the known chips otherwise."""
    if gpu_targets.is_gpu_target(target):
        try:
            gpu_targets.parse_target(target)
        except gpu_targets.GpuTargetError as e:
            raise PlanError(str(e)) from e
        return GPU_CHIPS[target.partition(":")[0]]
    name, sep, shape = target.partition(":")
    if name not in CHIPS or not sep or not shape:
        raise PlanError(f"--target {target!r}: expected CHIP:TOPOLOGY as libtpu spells it, e.g. v5e:2x2 or "
                        f"v5p:2x2x1, with CHIP one of {', '.join(CHIPS)}; or a GPU cluster CARD:NODESxGPUS, e.g. "
                        f"h800:32x8, with CARD one of {', '.join(GPU_CHIPS)}")
    return CHIPS[name]


@contextlib.contextmanager
def _native_stderr_dropped() -> Iterator[None]:
    """Drops what native code writes to stderr in the block: libtpu warns at load that it finds no TPU
    VM metadata, which says nothing about a compile-only plan (its errors come as exceptions). Whoever
    passes libtpu flags (LIBTPU_INIT_ARGS) sees everything: libtpu exits on a flag it does not know."""
    if os.environ.get("LIBTPU_INIT_ARGS"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "wb") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def topology_devices(target: str) -> list:
    """The compile-only devices of a libtpu topology ("v5e:2x2": 4 chips) or a GPU cluster ("h800:32x8":
    256 GPUs, `gpu_targets`)."""
    if chip_of(target).platform == "gpu":
        try:
            return gpu_targets.topology_devices(gpu_targets.parse_target(target))
        except gpu_targets.GpuTargetError as e:
            raise PlanError(str(e)) from e
    if importlib.util.find_spec("libtpu") is None:
        raise PlanError("libtpu is not installed; compile-only TPU plans need it: pip install 'jax[tpu]==0.10.2'")
    # libtpu locks /tmp/libtpu_lockfile for the chips it drives; a plan drives none, so it need not wait
    # for (or fail on) another process holding it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        with _native_stderr_dropped():
            return list(topologies.get_topology_desc(platform="tpu", topology_name=target).devices)
    except Exception as e:  # libtpu's own errors (an impossible shape) come as several runtime types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PlanError(f"--target {target!r}: libtpu cannot make this topology ({first})") from e


# ---- compiling the step -------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Setup:
    cfg: ModelConfig
    target: str
    mesh: dict[str, int]
    batch: int
    seq: int
    runtime: Runtime
    optim: OptimConfig
    # --mode decode: the decode step for `batch` rows whose caches hold `context` tokens (`seq` unused)
    mode: str = "train"
    context: int = 0
    weights: str = "bf16"
    speculative: str = "none"


def _abstract_inputs(setup: Setup, mesh) -> tuple[TrainState, jax.ShapeDtypeStruct, TrainState, object]:
    """(state, window) as ShapeDtypeStructs carrying their shardings, and those shardings."""
    shardings = state_shardings(setup.cfg, setup.optim, mesh, setup.runtime)
    abstract = jax.eval_shape(lambda: init_state(setup.cfg, setup.optim, 0, setup.runtime))
    state = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    rows = batch_sharding(mesh)
    # A row is a window of T + 1 + D tokens (objective.compute_loss): T inputs, their targets, MTP's.
    window = jax.ShapeDtypeStruct((setup.batch, setup.seq + 1 + setup.cfg.mtp_depth), jnp.int32, sharding=rows)
    return state, window, shardings, rows


def _check_batch(setup: Setup, mesh) -> None:
    shards, accum = batch_shards(mesh), setup.optim.grad_accum
    if setup.batch < 1 or setup.seq < 1:
        raise PlanError(f"--batch {setup.batch} --seq {setup.seq}: both must be at least 1")
    if setup.batch % (shards * accum):
        raise PlanError(f"--batch {setup.batch} does not split into {accum} microbatch(es) over the mesh's "
                        f"{shards} batch shards (data x fsdp x expert); use a multiple of {shards * accum}")


def compile_step(setup: Setup, devices: Sequence) -> tuple[jax.stages.Compiled, float]:
    """The train step `jit_steps` builds for this mesh, compiled for `devices`; (compiled, seconds).
    Raises jax.errors.JaxRuntimeError RESOURCE_EXHAUSTED when its temporaries exceed the HBM."""
    mesh = make_mesh(setup.mesh, devices=devices)
    _check_batch(setup, mesh)
    state, window, shardings, rows = _abstract_inputs(setup, mesh)
    cfg, optim, runtime = setup.cfg, setup.optim, setup.runtime
    step = jax.jit(lambda s, w: train_step(s, w, cfg, optim, runtime), in_shardings=(shardings, rows),
                   out_shardings=(shardings, replicated(mesh)), donate_argnums=0)
    start = time.perf_counter()
    with jax.set_mesh(mesh):  # dispatch reads the mesh's devices; the expert axis turns on EP
        lowered = step.lower(state, window)
    compiled = lowered.compile()
    return compiled, time.perf_counter() - start


# ---- compiling the decode step ------------------------------------------------------------------
def decode_generator(setup: Setup) -> Generator:
    """The engine's generator for this plan: greedy, one step a call, the cache in the compute dtype."""
    try:
        return Generator(setup.cfg, GenerateConfig(speculative=setup.speculative, steps_per_call=1),
                         cache_dtype=None, runtime=setup.runtime)
    except GenerationError as e:
        raise PlanError(str(e)) from e


def cache_slots(setup: Setup, depth: int) -> int:
    """Slots per row for `context` tokens, rounded up as `engine.cache_length` rounds them."""
    return cache_length(setup.cfg, setup.context, 0, depth)


def _check_decode(setup: Setup, mesh) -> None:
    shards, most = batch_shards(mesh), setup.cfg.max_position_embeddings
    if setup.batch < 1 or setup.batch % shards:
        raise PlanError(f"--batch {setup.batch}: decode rows must be a positive multiple of the mesh's {shards} "
                        "batch shards (data x fsdp x expert)")
    if not 1 <= setup.context <= most:
        raise PlanError(f"--context {setup.context}: expected 1..{most} (the model's max_position_embeddings)")


def _placed(abstract: jax.ShapeDtypeStruct, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(abstract.shape, abstract.dtype, sharding=sharding)


def abstract_decode_variables(setup: Setup, mesh) -> dict:
    """The decode step's variables as ShapeDtypeStructs with shardings: the weights as `convert_weights`
    makes them for `setup.weights`, plus `prepare_decode`'s absorbed collection."""
    cfg, model, shapes = setup.cfg, Transformer(setup.cfg, setup.runtime), variable_shapes(setup.cfg)
    abstract = jax.eval_shape(lambda v: model.prepare_decode(convert_weights(cfg, v, setup.weights)), shapes)
    shardings, whole = param_shardings(logical_axes(cfg), shapes, mesh), replicated(mesh)

    def place(sharding, leaf):
        # An Fp8Weight's 8-bit values are sharded like the leaf they stand for; its block scales (one
        # float32 per 128x128 block, 1/4096 of the values) are replicated.
        if isinstance(leaf, Fp8Weight):
            return leaf.replace(q=_placed(leaf.q, sharding), scale=_placed(leaf.scale, whole))
        return _placed(leaf, sharding)

    weights = {k: v for k, v in abstract.items() if k != ABSORBED}
    placed = jax.tree_util.tree_map(place, shardings, weights)
    # The absorbed halves of wkv_b ([H, C, N] and [H, V, C] per layer, derived once per generation) have
    # no logical axes of their own: replicated, as small as wkv_b itself.
    placed[ABSORBED] = jax.tree_util.tree_map(lambda a: _placed(a, whole), abstract[ABSORBED])
    return placed


def abstract_decode_state(setup: Setup, g: Generator, variables: dict, mesh):
    """The engine's State after a prefill of [batch, PREFILL_BUCKET] tokens into caches of `cache_slots`
    slots: the caches' rows (and a DSA indexer's keys, [B*I, S]: batch-major too) split by `LatentCache.AXES`,
    everything else replicated."""
    tokens = jax.ShapeDtypeStruct((setup.batch, PREFILL_BUCKET), jnp.int32)
    lengths = jax.ShapeDtypeStruct((setup.batch,), jnp.int32)
    prefill = functools.partial(g._prefill, cache_len=cache_slots(setup, g.depth))
    state, _ = jax.eval_shape(prefill, variables, tokens, lengths)
    whole = replicated(mesh)

    def place(x):
        if isinstance(x, LatentCache):
            split = lambda rows: _placed(rows, NamedSharding(mesh, to_mesh_spec(LatentCache.AXES, mesh, rows.shape)))
            index = None if x.index_keys is None else split(x.index_keys)
            return x.replace(rows=split(x.rows), index_keys=index)
        return _placed(x, whole)

    return jax.tree_util.tree_map(place, state, is_leaf=lambda x: isinstance(x, LatentCache))


def compile_prefill(setup: Setup, devices: Sequence) -> tuple[jax.stages.Compiled, float]:
    """The engine's jitted prefill (`Generator.prefill`: `--batch` prompts of `--seq` tokens into caches of
    `--context` slots, the first token and the MTP drafts) compiled for `devices`; (compiled, seconds)."""
    mesh = make_mesh(setup.mesh, devices=devices)
    _check_decode(setup, mesh)
    if not 1 <= setup.seq <= setup.context:
        raise PlanError(f"--seq {setup.seq}: a prompt must fit its cache (--context {setup.context})")
    g = decode_generator(setup)
    variables = abstract_decode_variables(setup, mesh)
    rows = batch_sharding(mesh)
    tokens = jax.ShapeDtypeStruct((setup.batch, setup.seq), jnp.int32, sharding=rows)
    lengths = jax.ShapeDtypeStruct((setup.batch,), jnp.int32, sharding=rows)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = g.prefill.lower(variables, tokens, lengths, cache_slots(setup, g.depth))
    compiled = lowered.compile()
    return compiled, time.perf_counter() - start


def compile_decode(setup: Setup, devices: Sequence) -> tuple[jax.stages.Compiled, float]:
    """The engine's jitted decode step (`Generator.step`, the state donated) compiled for `devices`;
    (compiled, seconds). Raises jax.errors.JaxRuntimeError RESOURCE_EXHAUSTED as `compile_step`."""
    mesh = make_mesh(setup.mesh, devices=devices)
    _check_decode(setup, mesh)
    g = decode_generator(setup)
    variables = abstract_decode_variables(setup, mesh)
    state = abstract_decode_state(setup, g, variables, mesh)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = g.step_for(variables, state).lower(variables, state)
    compiled = lowered.compile()
    return compiled, time.perf_counter() - start


# ---- what the compiler says ---------------------------------------------------------------------
def memory_bytes(compiled: jax.stages.Compiled) -> dict[str, int]:
    """Per-device bytes; outputs written into donated arguments (alias) are counted once."""
    m = compiled.memory_analysis()
    parts = {"arguments": m.argument_size_in_bytes, "temporaries": m.temp_size_in_bytes,
             "outputs": m.output_size_in_bytes, "alias": m.alias_size_in_bytes}
    parts["total"] = parts["arguments"] + parts["temporaries"] + parts["outputs"] - parts["alias"]
    return {k: int(v) for k, v in parts.items()}


_SIZE = r"([\d.]+)([KMGT])"
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def oom_bytes(message: str) -> tuple[int, int, str] | None:
    """(bytes needed, bytes available, what needed them) from the TPU compiler's out-of-memory message, or None.
    libtpu words it two ways (G = GiB): before it lays buffers out, "... required for HLO temporaries (235.17G)
    exceeds available HBM (15.75G)" ("temporaries"); while it does, "Ran out of memory in memory space hbm.
    Used 94.98G of 94.75G hbm" ("total": arguments, outputs and temporaries placed so far)."""
    for pattern, part in ((rf"\({_SIZE}\) exceeds available HBM \({_SIZE}\)", "temporaries"),
                          (rf"Used {_SIZE} of {_SIZE} hbm", "total")):
        m = re.search(pattern, message)
        if m is not None:
            need, need_unit, have, have_unit = m.groups()
            return round(float(need) * _UNITS[need_unit]), round(float(have) * _UNITS[have_unit]), part
    return None


def refused_bytes(need: int, part: str) -> dict:
    """`per_device_bytes` of a step the compiler refused: only the figure its message gives (`oom_bytes`)."""
    return {"arguments": None, "temporaries": None, "outputs": None, "alias": None, "total": None, part: need}


def model_flops_per_device(setup: Setup, num_devices: int) -> float:
    return train_flops_per_token(setup.cfg, setup.seq) * setup.batch * setup.seq / num_devices


def flops_parts(setup: Setup, num_devices: int) -> dict[str, float]:
    """Per-device FLOPs the compiled step runs that the cost model leaves out, as far as they can be
    counted from the config: the MTP blocks and their projection and head (the cost model follows the
    paper, which leaves MTP out), and the masked half of the s x s attention scores (the cost model
    counts a causal query's mean s/2 keys; the naive core computes all s)."""
    cfg, d = setup.cfg, setup.cfg.mtp_depth
    tokens = setup.batch * setup.seq / num_devices
    with_mtp = cfg.replace(num_layers=cfg.num_layers + d) if d else cfg
    mtp_per_token = (train_flops_per_token(with_mtp, setup.seq) - train_flops_per_token(cfg, setup.seq)
                     + 6.0 * d * (2 * cfg.hidden_size ** 2 + cfg.vocab_size * cfg.hidden_size))
    return {"mtp": mtp_per_token * tokens,
            "masked_attention": attention_train_flops_per_token(with_mtp, setup.seq) * tokens}


def flops_note(setup: Setup, num_devices: int, compiled_flops: float, model_flops: float) -> str:
    """One line: why the compiler's FLOPs differ from the cost model's, as far as we know."""
    # With microbatches the step is a loop, whose body the compiler counts once: compare one microbatch.
    per = 1.0 / setup.optim.grad_accum
    parts = {k: v * per for k, v in flops_parts(setup, num_devices).items()}
    model = model_flops * per
    rest = compiled_flops - model - sum(parts.values())
    share = lambda x: f"{x / model:+.0%}"
    reasons = [f"the compiler counts the {setup.optim.grad_accum}-microbatch loop's body once, so against one "
               f"microbatch's model FLOPs" if per < 1 else "",
               f"MTP blocks and head {share(parts['mtp'])}" if parts["mtp"] else "",
               f"the masked half of the attention scores {share(parts['masked_attention'])}",
               f"remat {setup.runtime.remat!r} recomputes forward work" if setup.runtime.remat != NO_REMAT else ""]
    where = ("the routed experts' grouped matmuls, which XLA runs as dense matmuls over every expert (TPU: the "
             "weight gradients; GPU: forward and backward)"
             + ("" if setup.mesh.get("expert", 1) > 1 else ", on every device over the whole batch's rows"))
    if dispatch.grouped_kernel(setup.runtime, setup.cfg) is not None:  # megablox: grouped forward and backward
        where = ("the routing, sorting and norms (megablox's grouped matmuls count at their declared cost, the "
                 "experts' own FLOPs: benchmarks/tpu_kernels.py)")
    tail = f"the rest {share(rest)}" + (f" is mostly {where} (docs/SCALE.md)" if setup.cfg.n_routed_experts else "")
    return f"compiled / model = {compiled_flops / model:.2f}: " + "; ".join([r for r in reasons if r] + [tail])


def links(chip: Chip, target: str, num_devices: int) -> hlo_comms.Links:
    """One device's one-direction bandwidths (half the published bidirectional figures)."""
    per_node = gpu_targets.parse_target(target).gpus_per_node if chip.platform == "gpu" else num_devices
    return hlo_comms.Links(chip.per_device(chip.link_bandwidth) / 2, chip.per_device(chip.network_bandwidth) / 2,
                           per_node)


def communication(compiled: jax.stages.Compiled, chip: Chip, target: str, num_devices: int) -> dict:
    """The program's collectives (`hlo_comms`): bytes one device sends a step and their time on the links."""
    found, unknown = hlo_comms.collectives(compiled.as_text(), num_devices)
    comm = hlo_comms.communication(found, links(chip, target, num_devices))
    return {"communication_bytes_per_device": comm["bytes"], "communication_by_kind": comm["by_kind"],
            "network_bytes_per_device": comm["network_bytes"], "communication_s": comm["seconds"],
            "loops_without_trip_count": unknown}


def roofline(chip: Chip, compiled_flops: float, bytes_accessed: float, model_flops: float,
             communication_s: float = 0.0) -> dict[str, float]:
    """An ESTIMATE: compute at the published peak, HBM traffic at the published bandwidth and the
    collectives on the links, whichever is longest (perfect overlap; `serial_step_s` is their sum). A
    compiled count below the model's (a loop body counted once) is replaced by the model's."""
    peak, bandwidth = chip.per_device(chip.bf16_flops), chip.per_device(chip.hbm_bandwidth)
    compute_s = max(compiled_flops, model_flops) / peak
    memory_s = bytes_accessed / bandwidth
    step_s = max(compute_s, memory_s, communication_s)
    return {"compute_s": compute_s, "hbm_s": memory_s, "estimated_step_s": step_s,
            "serial_step_s": compute_s + memory_s + communication_s,
            "estimated_mfu": model_flops / (step_s * peak) if step_s else 0.0}


def decode_model_flops_per_device(setup: Setup, num_devices: int) -> float:
    """One decode step's forward FLOPs by the cost model: every row's window of 1 + D tokens through the
    active matmul weights (head included), and the absorbed attention core over `context` cached
    tokens (per head and key: C + R for the score, C for the output). MTP drafting is left out."""
    cfg, depth = setup.cfg, cfg_depth(setup)
    core = 2.0 * cfg.num_layers * cfg.num_heads * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim) * setup.context
    return (2.0 * active_matmul_params(cfg) + core) * setup.batch * (1 + depth) / num_devices


def cfg_depth(setup: Setup) -> int:
    return setup.cfg.mtp_depth if setup.speculative == "mtp" else 0


def decode_estimate(chip: Chip, setup: Setup, num_devices: int, compiled_flops: float, bytes_accessed: float,
                    model_flops: float, communication_s: float = 0.0) -> dict[str, float]:
    """An ESTIMATE of a memory-bound decode step: the compiler's bytes accessed at the published HBM
    bandwidth, or the collectives' time if longer (compute at peak shown beside it); tokens/s per device
    counts one token a row a step (with MTP, accepted drafts add to it)."""
    peak, bandwidth = chip.per_device(chip.bf16_flops), chip.per_device(chip.hbm_bandwidth)
    hbm_s = bytes_accessed / bandwidth
    step_s = max(hbm_s, communication_s)
    return {"compute_s": compiled_flops / peak, "hbm_s": hbm_s, "estimated_step_s": step_s,
            "serial_step_s": hbm_s + communication_s,
            "estimated_mfu": model_flops / (step_s * peak) if step_s else 0.0,
            "estimated_tokens_per_s": setup.batch / num_devices / step_s if step_s else 0.0}


# ---- the plan -----------------------------------------------------------------------------------
def _header(setup: Setup, devices: Sequence, chip: Chip) -> dict:
    decode = setup.mode == "decode"
    model = (decode_model_flops_per_device if decode else model_flops_per_device)(setup, len(devices))
    if setup.mode == "prefill":  # a forward pass: a third of the training FLOPs of the same tokens
        model /= 3
    report = {"mode": setup.mode, "config": setup.cfg.name, "target": setup.target, "chip": chip.name,
              "devices": len(devices), "mesh": dict(setup.mesh), "batch": setup.batch, "seq": setup.seq,
              "remat": setup.runtime.remat, "scan_layers": setup.runtime.scan_layers,
              "grad_accum": setup.optim.grad_accum,
              "moments_dtype": setup.optim.moments_dtype, "dtype": setup.runtime.dtype,
              "hbm_bytes": chip.usable_hbm_bytes, "hbm_published_bytes_per_device": chip.per_device(chip.hbm_bytes),
              "model_flops_per_device": model}
    report.update(link_bandwidth_per_device=chip.per_device(chip.link_bandwidth),
                  network_bandwidth_per_device=chip.per_device(chip.network_bandwidth))
    if setup.mode != "train":
        report.update(context=setup.context, weights=setup.weights, speculative=setup.speculative)
    return report


def _refused(report: dict, error: Exception) -> dict:
    """The report of a step the compiler refused for want of HBM."""
    found = oom_bytes(str(error))
    if found is None:
        raise error
    need, have, part = found
    report.update(fits=False, refused_by_compiler=True, hbm_bytes=have, compile_s=None,
                  per_device_bytes=refused_bytes(need, part),
                  compiled_flops_per_device=None, estimated_step_s=None, estimated_mfu=None)
    if report["mode"] == "decode":
        report["estimated_tokens_per_s"] = None
    return report


def plan(setup: Setup, devices: Sequence) -> dict:
    """Compile the step for `devices` and report what the compiler says (module docstring)."""
    chip, decode = chip_of(setup.target), setup.mode == "decode"
    report = _header(setup, devices, chip)
    try:
        compile_fn = {"train": compile_step, "prefill": compile_prefill, "decode": compile_decode}[setup.mode]
        compiled, seconds = compile_fn(setup, devices)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return _refused(report, e)
    memory = memory_bytes(compiled)
    cost = gpu_targets.compiled_cost(compiled)
    flops, traffic = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    model = report["model_flops_per_device"]
    report.update(per_device_bytes=memory, fits=memory["total"] <= chip.usable_hbm_bytes, compile_s=seconds,
                  compiled_flops_per_device=flops, compiled_bytes_accessed_per_device=traffic,
                  **communication(compiled, chip, setup.target, len(devices)))
    comm_s = report["communication_s"]
    if decode:
        left_out = "MTP drafting, " if setup.speculative == "mtp" else ""
        report.update(flops_note=f"compiled / model = {flops / model:.2f}: the model's count leaves out "
                                 f"{left_out}sampling, the norms and the cache writes",
                      **decode_estimate(chip, setup, len(devices), flops, traffic, model, comm_s))
    elif setup.mode == "prefill":
        report.update(flops_note=f"compiled / model = {flops / model:.2f}: the model's count (a third of the "
                                 "training FLOPs of the prompts) leaves out the MTP drafts, the masked half of "
                                 "the attention scores and the cache writes",
                      **roofline(chip, flops, traffic, model, comm_s))
    elif setup.runtime.scan_layers:
        report.update(**_scanned_figures(setup, len(devices), chip, flops, traffic, model, comm_s))
    else:
        report.update(flops_note=flops_note(setup, len(devices), flops, model),
                      **roofline(chip, flops, traffic, model, comm_s))
    return report


def batch_unit(setup: Setup, devices: Sequence) -> int:
    """The batch's granularity: the mesh's batch shards (x microbatches for training)."""
    shards = batch_shards(make_mesh(setup.mesh, devices=devices))
    return shards * (setup.optim.grad_accum if setup.mode == "train" else 1)


def largest_batch(setup: Setup, devices: Sequence, report: dict) -> dict:
    """The largest batch that fits, found by compiling, in multiples of `batch_unit`. A step's bytes grow
    about linearly with its batch, so once two probes have their totals the next probe is the batch their
    line reaches the HBM at (`_affine_guess`), kept inside the bracket of the largest batch known to fit and
    the smallest known not to; without a guess the search doubles from the planned batch (halves, if it does
    not fit) and then bisects. Each probe is one full compile (minutes at V3's size); every probe is
    reported."""
    unit, hbm = batch_unit(setup, devices), report.get("hbm_bytes")

    def probe(batch: int, r: dict) -> dict:  # a refused step has only its temporaries' or its total's figure
        b = r["per_device_bytes"]
        return {"batch": batch, "fits": r["fits"], "bytes": b["temporaries"] if b["total"] is None else b["total"],
                "refused_by_compiler": bool(r.get("refused_by_compiler"))}

    probes = [probe(setup.batch, report)]
    lo, hi = (setup.batch, None) if report["fits"] else (0, setup.batch)
    last_side, bisect = None, False  # two guesses in a row that move one end: one bisection follows
    while hi is None or hi - lo > unit:
        guess = None if bisect else _affine_guess(probes, hbm, unit)
        if guess is not None:  # inside the bracket; with no upper end yet, at most 8x the largest that fits
            top = max(lo, unit) * 8 if hi is None else hi - unit
            batch = min(max(guess, lo + unit), top)
        elif hi is None:
            batch = max(lo * 2, unit)
        else:
            batch = (lo + hi) // 2 // unit * unit
        probes.append(probe(batch, plan(dataclasses.replace(setup, batch=batch), devices)))
        # Each probe is minutes at real sizes: say how it went as it goes.
        p = probes[-1]
        print(f"--largest_batch: batch {batch} {'fits' if p['fits'] else 'does not fit'} ({p['bytes'] / GIB:.2f} GiB)",
              file=sys.stderr, flush=True)
        side = "lo" if probes[-1]["fits"] else "hi"
        bisect = guess is not None and side == last_side and hi is not None
        last_side = side if guess is not None else None
        lo, hi = (batch, hi) if probes[-1]["fits"] else (lo, batch)
    return {"largest_batch": lo, "batch_unit": unit, "batch_probes": probes}


def _affine_guess(probes: list[dict], hbm: int | None, unit: int) -> int | None:
    """The largest multiple of `unit` whose bytes stay within `hbm` on the line through the last two probes
    with distinct batches and whole totals (not refused by the compiler), or None (fewer than two, or
    bytes not growing with the batch)."""
    known = {}
    for p in probes:
        if not p["refused_by_compiler"] and p["bytes"] is not None:
            known[p["batch"]] = p["bytes"]
    points = [(b, known[b]) for b in dict.fromkeys(p["batch"] for p in reversed(probes)) if b in known][:2]
    if hbm is None or len(points) < 2:
        return None
    (b1, y1), (b0, y0) = points
    slope = (y1 - y0) / (b1 - b0)
    if slope <= 0:
        return None
    return max(int(b1 + (hbm - y1) / slope) // unit * unit, 0)


def counted_once(cfg: ModelConfig) -> ModelConfig:
    """What the compiler's cost analysis sees of a scanned model: a scan's body is counted once, so one
    layer per stack (`model.stacks`)."""
    return cfg.replace(num_layers=len(stacks(cfg)), first_k_dense=min(cfg.first_k_dense, 1))


def _scanned_figures(setup: Setup, n: int, chip: Chip, flops: float, traffic: float, model: float,
                     comm_s: float) -> dict:
    """The FLOPs note against a model of one layer per stack, and the roofline on the compiler's FLOPs and
    bytes scaled by the layers the scans repeat (an ESTIMATE: model FLOPs of all layers over one each)."""
    once = dataclasses.replace(setup, cfg=counted_once(setup.cfg))
    scale = model / model_flops_per_device(once, n)
    note = (f"the compiler counts each scanned stack's body once, so against {once.cfg.num_layers} layer(s): "
            + flops_note(once, n, flops, model_flops_per_device(once, n)))
    return {"flops_note": note, "compiled_flops_per_device_scaled": flops * scale,
            "compiled_bytes_accessed_per_device_scaled": traffic * scale,
            **roofline(chip, flops * scale, traffic * scale, model, comm_s)}


# ---- output -------------------------------------------------------------------------------------
def _size(n: float | None) -> str:
    if n is None:
        return "?"
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / (1 << 20):.1f} MiB"


def _duration(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.3g} ms"


def refusal_line(r: dict) -> str:
    """The one line of a plan that does not fit."""
    b = r["per_device_bytes"]
    shape = f"batch {r['batch']} x seq {r['seq']}"
    if r["mode"] == "decode":
        shape = f"decode, {r['batch']} rows x context {r['context']}, {r['weights']} weights"
    elif r["mode"] == "prefill":
        shape = f"prefill, {r['batch']} prompts x {r['seq']} tokens into context {r['context']}"
    where = f"{r['config']} on {r['target']} ({r['devices']} devices), {shape}"
    if r.get("refused_by_compiler") and b["total"] is not None:
        return (f"does not fit: {where}: the compiler ran out of HBM placing its buffers, {_size(b['total'])} "
                f"per device placed, {_size(r['hbm_bytes'])} of HBM available")
    if r.get("refused_by_compiler"):
        return (f"does not fit: {where}: the compiler refused it, its temporaries alone need "
                f"{_size(b['temporaries'])} per device, {_size(r['hbm_bytes'])} of HBM available")
    return (f"does not fit: {where}: {_size(b['total'])} per device (arguments {_size(b['arguments'])} + "
            f"temporaries {_size(b['temporaries'])} + outputs {_size(b['outputs'])} - donated "
            f"{_size(b['alias'])}), {_size(r['hbm_bytes'])} of HBM available")


def search_line(r: dict) -> str:
    """The outcome of --largest_batch, with every probe."""
    probes = ", ".join(f"{p['batch']} " + ("refused by the compiler, " if p["refused_by_compiler"] else
                                           "fits, " if p["fits"] else "does not fit, ") + _size(p["bytes"])
                       for p in sorted(r["batch_probes"], key=lambda p: p["batch"]))
    return (f"largest batch that fits: {r['largest_batch'] or 'none'} (multiples of {r['batch_unit']}; "
            f"compiled: {probes})")


def format_report(r: dict) -> str:
    b = r["per_device_bytes"]
    mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "one device"
    decode = r["mode"] == "decode"
    what = (f"decode step, {r['batch']} rows x context {r['context']}, {r['weights']} weights, speculative "
            f"{r['speculative']}" if decode else f"batch {r['batch']} x seq {r['seq']}, remat {r['remat']}, "
            f"grad_accum {r['grad_accum']}, moments {r['moments_dtype']}")
    if r["mode"] == "prefill":
        what = (f"prefill, {r['batch']} prompts x {r['seq']} tokens into context {r['context']}, {r['weights']} "
                f"weights, speculative {r['speculative']}")
    lines = [
        f"plan: {r['config']} on {r['target']} ({r['chip']}, {r['devices']} devices, mesh {mesh}), {what}; "
        f"compiled in {r['compile_s']:.1f} s",
        "per device (compiler's memory_analysis):",
        f"  arguments    {b['arguments']:>16,d} B  {_size(b['arguments'])}",
        f"  temporaries  {b['temporaries']:>16,d} B  {_size(b['temporaries'])}",
        f"  outputs      {b['outputs']:>16,d} B  {_size(b['outputs'])}  ({b['alias']:,d} B of them written into "
        f"the donated arguments, counted once)",
        f"  total        {b['total']:>16,d} B  {_size(b['total'])} of {_size(r['hbm_bytes'])} usable HBM: "
        f"{'fits' if r['fits'] else 'DOES NOT FIT'}",
        f"FLOPs per device: compiled {r['compiled_flops_per_device']:.4g}, cost model "
        f"{r['model_flops_per_device']:.4g} ({r['flops_note']})",
        f"communication per device: {_size(r['communication_bytes_per_device'])} sent a step ("
        + ", ".join(f"{k} {_size(v)}" for k, v in r["communication_by_kind"].items() if v)
        + (f"; {_size(r['network_bytes_per_device'])} of it between nodes" if r["network_bytes_per_device"] else "")
        + f"), {_duration(r['communication_s'])} on the links",
        f"ESTIMATE (memory-bound): step {_duration(r['estimated_step_s'])} (bytes accessed "
        f"{r['compiled_bytes_accessed_per_device']:.4g} at the HBM bandwidth, {_duration(r['hbm_s'])}; "
        f"communication {_duration(r['communication_s'])}; compute {_duration(r['compute_s'])} at peak), "
        f"{r['estimated_tokens_per_s']:,.0f} tokens/s per device" if decode else
        f"ESTIMATE (roofline, perfect overlap): step {_duration(r['estimated_step_s'])} (compute "
        f"{_duration(r['compute_s'])} at peak, HBM traffic {_duration(r['hbm_s'])}, communication "
        f"{_duration(r['communication_s'])}; {_duration(r['serial_step_s'])} without overlap), "
        f"MFU {r['estimated_mfu']:.1%}",
    ]
    return "\n".join(lines)


# ---- command line -------------------------------------------------------------------------------
class _OneLineParser(argparse.ArgumentParser):
    """Bad flags: one line ("prog: error: ..."), exit 2, no usage block."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="python -m dsv3_jax.plan", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="small", help="preset name or ModelConfig JSON path")
    p.add_argument("--target", default="v5e:2x2", help="TPU topology as libtpu spells it: v5e:2x2, v5p:2x2x1, ...; "
                   "or a GPU cluster CARD:NODESxGPUS: h100:8, h200:8, h800:32x8")
    p.add_argument("--mesh", default="", help="axis=size entries as train.py's, e.g. fsdp=2,expert=2 "
                                                  "(default: every device on fsdp)")
    p.add_argument("--mode", default="train", choices=MODES,
                   help="compile the training step, the inference prefill (--seq prompt tokens) or the decode step")
    p.add_argument("--batch", type=int, default=8, help="global sequences a step (decode: rows decoded at once)")
    p.add_argument("--seq", type=int, default=256, help="tokens a sequence")
    p.add_argument("--remat", default="none", choices=choices("remat"), help="Runtime.remat policy")
    p.add_argument("--scan_layers", default=True, action="store_true",
                   help="train: compile each stack of layers once, as one scan (Runtime.scan_layers; default)")
    p.add_argument("--noscan_layers", dest="scan_layers", action="store_false", help="train: layers unrolled")
    p.add_argument("--grad_accum", type=int, default=1, help="microbatches a step (OptimConfig.grad_accum)")
    p.add_argument("--moments", default="auto", choices=("auto", *MOMENT_DTYPES),
                   help="AdamW moments' dtype, as train.py's --moments (auto: bfloat16 from 1B parameters)")
    p.add_argument("--weights", default="bf16", choices=DECODE_WEIGHTS, help="decode: weight precision "
                   "(infer.weights.convert_weights; fp8: E4M3 linear weights with 128x128 block scales)")
    p.add_argument("--context", type=int, default=None,
                   help="decode: tokens each row's cache holds (default: the model's max_position_embeddings)")
    p.add_argument("--speculative", default="none", choices=SPECULATIVE, help="decode: plain or MTP-speculative")
    p.add_argument("--largest_batch", action="store_true",
                   help="also search the largest batch that fits, by compiling (doubling from --batch, then "
                        "bisecting in multiples of the mesh's batch shards): one compile a probe")
    p.add_argument("--json", action="store_true", help="print the report as one line of JSON")
    return p


def setup_from_args(args: argparse.Namespace, num_devices: int) -> Setup:
    try:
        cfg = ModelConfig.from_json(args.config)
        mesh = parse_mesh(args.mesh or f"fsdp={num_devices}", num_devices)
        runtime = Runtime(dtype="bfloat16", platform=chip_of(args.target).platform, remat=args.remat,
                          scan_layers=args.scan_layers and args.mode == "train")
        # train.py's optimizer for these flags (its schedule does not change the compiled step).
        optim = optim_config(TrainConfig(workdir="", batch_size=args.batch, grad_accum=args.grad_accum,
                                         moments=args.moments), cfg)
    except (OSError, ValueError, TrainingError) as e:
        raise PlanError(str(e)) from e
    context = args.context
    if context is None:  # decode: the longest cache; prefill: the prompt itself
        context = args.seq if args.mode == "prefill" else cfg.max_position_embeddings
    return Setup(cfg, args.target, mesh, args.batch, args.seq, runtime, optim, mode=args.mode, context=context,
                 weights=args.weights, speculative=args.speculative)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if "JAX_PLATFORMS" not in os.environ:  # the host runs nothing; keep jax off libtpu's real-chip path
        jax.config.update("jax_platforms", "cpu")
    try:
        devices = topology_devices(args.target)
        setup = setup_from_args(args, len(devices))
        report = plan(setup, devices)
        if args.largest_batch:
            report.update(largest_batch(setup, devices, report))
    except PlanError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.json:
        print(json.dumps(report))
    else:
        print(refusal_line(report) if not report["fits"] else format_report(report))
        if "largest_batch" in report:
            print(search_line(report))
    return 0 if report["fits"] else EXIT_DOES_NOT_FIT


if __name__ == "__main__":
    sys.exit(main())
