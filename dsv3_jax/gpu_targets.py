"""GPU clusters as compile-only targets: one table of published card facts, one generator of the XLA target
description the CUDA compiler reads.

`h100:8` is one node of 8 H100 SXM; `h800:32x8` is 32 nodes of 8 H800 SXM (nodes x GPUs per node). With the
CUDA build of jaxlib installed (`pip install "jax[cuda12]==0.10.2"`) and `JAX_PLATFORMS=cpu`,

    topologies.get_topology_desc(platform="cuda", target_config=target_config_text(card), topology="32x1x8")

gives compile-only devices of that card: `target_config` is an XLA `stream_executor.GpuTargetConfigProto`
in text form (the card's SMs, clocks, memories, compute capability); `topology` is
"<NVLink domains> x <hosts per domain> x <GPUs per host>", and a node of 8 SXM GPUs is one NVLink domain,
so N nodes are "Nx1x8". The devices report the card's `device_description_str` as their `device_kind`
("NVIDIA H100 80GB HBM3"), by which `ops.dispatch` resolves the kernel backend (Hopper: Mosaic GPU).

The figures are those of ../shared/docs/FACTS.md s.7 (published peaks, dense); the SM facts are Hopper's.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import re

import jax
from jax._src.lib import _jax
from jax.experimental import topologies

# Private in jax 0.10: XLA's HLO cost analysis of a module, run by a client of this host (None if absent).
hlo_module_cost_analysis = getattr(_jax, "hlo_module_cost_analysis", None)

GIB = 1 << 30
KIB = 1 << 10


@dataclasses.dataclass(frozen=True)
class SmFacts:
    """What one GPU generation's streaming multiprocessors offer a kernel (FACTS.md s.7, Hopper)."""

    compute_capability: tuple[int, int]
    sms: int
    clock_ghz: float  # boost clock
    fp32_units_per_sm: int
    threads_per_warp: int
    threads_per_block: int
    threads_per_sm: int
    registers_per_sm: int
    registers_per_block: int
    shared_memory_per_block: int  # default; more by opting in
    shared_memory_per_block_optin: int
    shared_memory_per_sm: int
    l2_bytes: int
    block_dims: tuple[int, int, int]


HOPPER = SmFacts(compute_capability=(9, 0), sms=132, clock_ghz=1.98, fp32_units_per_sm=128,
                 threads_per_warp=32, threads_per_block=1024, threads_per_sm=2048, registers_per_sm=65536,
                 registers_per_block=65536, shared_memory_per_block=48 * KIB,
                 shared_memory_per_block_optin=227 * KIB, shared_memory_per_sm=228 * KIB, l2_bytes=50 * (1 << 20),
                 block_dims=(2**31 - 1, 65535, 65535))

# XLA's GPU compiler plans a program into 80% of the device memory it is told of (the rest is left to
# allocations outside its own; it rematerialises to stay under that, less 5% slop, and warns where it
# cannot). A real run gets it with XLA_PYTHON_CLIENT_MEM_FRACTION >= 0.8 (JAX's default preallocation is
# 0.75). docs/SCALE.md ("GPU targets") has the measurement.
COMPILER_MEMORY_SHARE = 0.8


@dataclasses.dataclass(frozen=True)
class GpuCard:
    """One card's published figures (FACTS.md s.7) and how its devices name themselves."""

    name: str
    device_kind: str  # what the card reports as its name (CUDA's device name), and so the devices' kind
    sm: SmFacts
    memory_bytes: int  # FACTS.md's GB, taken as GiB as for the TPUs (not checked against a real card here)
    memory_bandwidth: float  # bytes/s
    bf16_flops: float  # dense BF16 FLOP/s
    fp8_flops: float
    nvlink_bandwidth: float  # bytes/s per GPU inside a node (NVLink, both directions together, as published)
    network_bandwidth: float  # bytes/s per GPU between nodes (one 400 Gb/s InfiniBand NIC per GPU)
    gpus_per_node: int = 8

    @property
    def usable_memory_bytes(self) -> int:
        return int(self.memory_bytes * COMPILER_MEMORY_SHARE)


INFINIBAND_400G = 400e9 / 8
CARDS = {
    "h100": GpuCard("H100 SXM", "NVIDIA H100 80GB HBM3", HOPPER, 80 * GIB, 3.35e12, 989e12, 1979e12, 900e9,
                    INFINIBAND_400G),
    # H200: H100's SMs and NVLink with more and faster HBM.
    "h200": GpuCard("H200 SXM", "NVIDIA H200", HOPPER, 141 * GIB, 4.8e12, 989e12, 1979e12, 900e9, INFINIBAND_400G),
    # H800: H100's compute, NVLink cut to 400 GB/s (the paper's cluster: 2,048 of them, 8 a node).
    "h800": GpuCard("H800 SXM", "NVIDIA H800", HOPPER, 80 * GIB, 3.35e12, 989e12, 1979e12, 400e9, INFINIBAND_400G),
}

_TARGET = re.compile(r"^(?P<card>[a-z0-9]+):(?:(?P<nodes>\d+)x)?(?P<gpus>\d+)$")


class GpuTargetError(ValueError):
    """A GPU target that is malformed, names no known card, or needs the CUDA build that is not installed."""


@dataclasses.dataclass(frozen=True)
class GpuCluster:
    card: GpuCard
    nodes: int
    gpus_per_node: int

    @property
    def devices(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def topology(self) -> str:
        """XLA's GPU topology string: NVLink domains x hosts per domain x GPUs per host (a node is a domain)."""
        return f"{self.nodes}x1x{self.gpus_per_node}"


def is_gpu_target(target: str) -> bool:
    """Whether `target` names a GPU card ("h100:8"), well formed or not."""
    return target.partition(":")[0] in CARDS


def parse_target(target: str) -> GpuCluster:
    """"h100:8" -> 1 node of 8 H100s; "h800:32x8" -> 32 nodes of 8 H800s."""
    m = _TARGET.match(target)
    if m is None or m["card"] not in CARDS:
        raise GpuTargetError(f"--target {target!r}: expected CARD:GPUS or CARD:NODESxGPUS_PER_NODE, e.g. h100:8 or "
                             f"h800:32x8, with CARD one of {', '.join(CARDS)}")
    card, nodes, gpus = CARDS[m["card"]], int(m["nodes"] or 1), int(m["gpus"])
    if nodes < 1 or not 1 <= gpus <= card.gpus_per_node or (nodes > 1 and gpus != card.gpus_per_node):
        raise GpuTargetError(f"--target {target!r}: a node holds 1 to {card.gpus_per_node} GPUs, and a cluster of "
                             f"several nodes {card.gpus_per_node} each")
    return GpuCluster(card, nodes, gpus)


def target_config_text(card: GpuCard) -> str:
    """The card as an XLA `GpuTargetConfigProto` in protobuf text format."""
    sm = card.sm
    major, minor = sm.compute_capability
    fields = {
        "threads_per_block_limit": sm.threads_per_block, "threads_per_warp": sm.threads_per_warp,
        "shared_memory_per_block": sm.shared_memory_per_block, "shared_memory_per_core": sm.shared_memory_per_sm,
        "threads_per_core_limit": sm.threads_per_sm, "core_count": sm.sms, "fpus_per_core": sm.fp32_units_per_sm,
        "block_dim_limit_x": sm.block_dims[0], "block_dim_limit_y": sm.block_dims[1],
        "block_dim_limit_z": sm.block_dims[2], "memory_bandwidth": int(card.memory_bandwidth),
        "l2_cache_size": sm.l2_bytes, "clock_rate_ghz": sm.clock_ghz, "device_memory_size": card.memory_bytes,
        "shared_memory_per_block_optin": sm.shared_memory_per_block_optin,
        "registers_per_core_limit": sm.registers_per_sm, "registers_per_block_limit": sm.registers_per_block,
    }
    lines = [f"  {k}: {v}" for k, v in fields.items()]
    # A real Hopper is compiled for its architecture-specific features (sm_90a: wgmma, setmaxnreg), which
    # XLA's and Mosaic GPU's Hopper code paths use; the target says so.
    extension = "\n    feature_extension: ACCELERATED_FEATURES" if major >= 9 else ""
    lines.append(f"  cuda_compute_capability {{\n    major: {major}\n    minor: {minor}{extension}\n  }}")
    lines.append(f'  device_vendor: "NVIDIA Corporation"\n  name: "{card.device_kind}"')
    body = "\n".join(lines)
    return f'gpu_device_info {{\n{body}\n}}\nplatform_name: "CUDA"\ndevice_description_str: "{card.device_kind}"\n'


def cuda_installed() -> bool:
    """Whether the CUDA build of jaxlib (its PJRT plugin) is installed; compile-only GPU plans need it."""
    return importlib.util.find_spec("jax_plugins") is not None and \
        importlib.util.find_spec("jax_plugins.xla_cuda12") is not None


def topology_devices(cluster: GpuCluster) -> list:
    """The compile-only devices of `cluster`, for the CUDA compiler on this host."""
    if not cuda_installed():
        raise GpuTargetError("the CUDA build of jaxlib is not installed; compile-only GPU plans need it: "
                             "pip install 'jax[cuda12]==0.10.2'")
    description = topologies.get_topology_desc(platform="cuda", target_config=target_config_text(cluster.card),
                                               topology=cluster.topology)
    return list(description.devices)


def compiled_cost(compiled: jax.stages.Compiled) -> dict[str, float]:
    """The compiler's cost analysis of one device's program ("flops", "bytes accessed", ...). The CUDA plugin's
    compile-only executables report none (None); for them XLA's HLO cost analysis, run by this host's CPU
    client, reads the optimised GPU module: every fusion's FLOPs and bytes accessed (a custom call, such as a
    Mosaic GPU kernel, counts no FLOPs). Empty where neither is available."""
    cost = compiled.cost_analysis()
    if cost or hlo_module_cost_analysis is None:
        return dict(cost or {})
    modules = compiled.runtime_executable().hlo_modules()
    return dict(hlo_module_cost_analysis(jax.devices("cpu")[0].client, modules[0])) if modules else {}
