"""Kernel backends: their names, which module implements each op on each, how "auto" picks one, the device
facts the kernels size their grids by, and the settings of JAX's GPU and TPU interpreters.

- "interpret": `pl.pallas_call(..., interpret=True)`; the kernel body run by XLA on any platform (CPU tests).
- "mosaic_gpu": Pallas' Mosaic GPU lowering (Hopper and later: TMA copies, wgmma).
- "mosaic_tpu": Pallas' Mosaic TPU lowering (v5e and later).
- "triton": Pallas' Triton lowering (any CUDA GPU).
- "xla": the plain-jnp `*_reference` of each op.
- "auto": "mosaic_gpu" on a GPU of compute capability >= 9.0, "triton" on other GPUs, "mosaic_tpu" on TPUs,
  "xla" elsewhere. A call a backend cannot take is refused up front (`supports`), and the model falls back
  to XLA with that reason (`dsv3_jax.ops.dispatch`).

This module imports no op: the table names modules, and each op's package imports the ones it lists.
"""
from __future__ import annotations

import jax
from jax.experimental.pallas import tpu as pltpu

try:  # private in jax 0.10; without it only the configs that ask for the GPU interpreter fail
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
except ImportError:  # pragma: no cover - depends on the installed jax
    InterpretGPUParams = None

BACKENDS = ("interpret", "mosaic_gpu", "mosaic_tpu", "triton", "xla", "auto")
HOPPER = 9.0  # compute capability from which "auto" picks Mosaic GPU (TMA, wgmma)
_GPU_PLATFORMS = ("gpu", "cuda", "rocm")

# (op, backend) -> the module that implements the op there. The functions each module provides are listed in
# its op's package docstring (the same names in every backend). A backend is a module plus one line per op.
KERNELS = {
    ("fp8_gemm", "interpret"): "pallas_kernels.fp8_gemm.interpret",
    ("fp8_gemm", "mosaic_gpu"): "pallas_kernels.fp8_gemm.mosaic_gpu",
    ("fp8_gemm", "mosaic_tpu"): "pallas_kernels.fp8_gemm.mosaic_tpu",
    ("fp8_gemm", "triton"): "pallas_kernels.fp8_gemm.triton",
    ("fp8_gemm", "xla"): "pallas_kernels.fp8_gemm.reference",
    ("mla_decode", "interpret"): "pallas_kernels.mla_decode.interpret",
    ("mla_decode", "mosaic_gpu"): "pallas_kernels.mla_decode.mosaic_gpu",
    ("mla_decode", "mosaic_tpu"): "pallas_kernels.mla_decode.mosaic_tpu",
    ("mla_decode", "triton"): "pallas_kernels.mla_decode.triton",
    ("mla_decode", "xla"): "pallas_kernels.mla_decode.reference",
}

# Backends whose kernels JAX's GPU interpreter can run on the CPU (the configs' `interpret=` switch).
GPU_INTERPRETED = ("mosaic_gpu",)
# Backends whose kernels JAX's TPU interpreter can run on the CPU (`interpret=` a `pltpu.InterpretParams`).
TPU_INTERPRETED = ("mosaic_tpu",)

# SMs per device kind, for sizing persistent grids and decode splits where the device does not report
# `core_count` (a host lowering for a GPU it does not have). The longest key found in `device_kind` wins.
SMS_BY_DEVICE_KIND = {"H100": 132, "H100 PCIe": 114, "H200": 132, "H800": 132, "H800 PCIe": 114, "A100": 108}
FALLBACK_SMS = 132  # H100/H200 SXM, the GPU the Mosaic kernels are written for
# Compute capability per device kind, for "auto" when a program is built for a GPU the host does not have
# (an abstract device reports its kind, not its capability). The longest key found in the kind wins.
CAPABILITY_BY_DEVICE_KIND = {"H100": 9.0, "H200": 9.0, "H800": 9.0, "H20": 9.0, "GH200": 9.0, "A100": 8.0,
                             "A800": 8.0, "L40": 8.9, "B200": 10.0, "GB200": 10.0}


def kernels(op: str) -> dict[str, str]:
    """backend -> module implementing `op` there."""
    return {backend: module for (name, backend), module in KERNELS.items() if name == op}


def backend_refusal(backend) -> str | None:
    """Why `backend` is not a backend name (None: it is)."""
    if backend in BACKENDS:
        return None
    return f"unknown backend {backend!r}; valid backends are {', '.join(map(repr, BACKENDS))}"


def _compute_capability(device) -> float:
    try:
        return float(getattr(device, "compute_capability", "0") or 0)
    except (TypeError, ValueError):
        return 0.0


def resolve_backend(backend: str, platform: str | None = None, compute_capability: float | None = None) -> str:
    """Validate `backend` and turn "auto" into a concrete backend for `platform`.

    platform None: the default device's platform and compute capability (direct library use). A GPU platform
    without `compute_capability`: the default device's when that is a GPU, else unknown, which picks "triton"
    (it lowers for any CUDA GPU).
    """
    reason = backend_refusal(backend)
    if reason:
        raise ValueError(reason)
    if backend != "auto":
        return backend
    if platform is None:
        platform = jax.devices()[0].platform
    if platform == "tpu":
        return "mosaic_tpu"
    if platform not in _GPU_PLATFORMS:
        return "xla"
    if compute_capability is None:
        device = jax.devices()[0]
        compute_capability = _compute_capability(device) if device.platform in _GPU_PLATFORMS else 0.0
    return "mosaic_gpu" if float(compute_capability) >= HOPPER else "triton"


def capability_of_kind(device_kind: str | None) -> float | None:
    """The compute capability of a GPU by its `device_kind` ("NVIDIA H100 80GB HBM3" -> 9.0); None if unknown."""
    kinds = [kind for kind in CAPABILITY_BY_DEVICE_KIND if kind in (device_kind or "")]
    return CAPABILITY_BY_DEVICE_KIND[max(kinds, key=len)] if kinds else None


def num_sms(device=None) -> int:
    """SMs of `device` (default: the default device): as it reports them, else by its kind, else FALLBACK_SMS."""
    device = jax.devices()[0] if device is None else device
    reported = getattr(device, "core_count", None)
    if reported:
        return reported
    kinds = [kind for kind in SMS_BY_DEVICE_KIND if kind in getattr(device, "device_kind", "")]
    return SMS_BY_DEVICE_KIND[max(kinds, key=len)] if kinds else FALLBACK_SMS


def is_interpret_params(value) -> bool:
    return InterpretGPUParams is not None and isinstance(value, InterpretGPUParams)


def is_tpu_interpret_params(value) -> bool:
    return isinstance(value, pltpu.InterpretParams)


def interpret_refusal(setting, backend: str) -> str | None:
    """Why a config's `interpret` cannot apply to `backend` (None: it can, or it is off). The value names the
    interpreter: a `pltpu.InterpretParams` the TPU one (TPU_INTERPRETED), True or an InterpretGPUParams the
    GPU one (GPU_INTERPRETED)."""
    if setting is False:
        return None
    tpu = is_tpu_interpret_params(setting)
    allowed = TPU_INTERPRETED if tpu else GPU_INTERPRETED
    if backend in allowed:
        return None
    names = " or ".join(map(repr, allowed))
    if tpu:
        return f"config.interpret=pltpu.InterpretParams(...) applies to backend {names} only, got backend {backend!r}"
    hint = "; interpret it with config.interpret=pltpu.InterpretParams()" if backend in TPU_INTERPRETED else ""
    return f"config.interpret applies to backend {names} only, got backend {backend!r}{hint}"


def gpu_interpret_params(setting, *, detect_races: bool):
    """A config's `interpret` -> `plgpu.kernel(interpret=...)`: None compiles for the GPU.

    True runs JAX's GPU interpreter with uninitialised shared memory read as NaN, so a read before a write
    shows in the output, and with `detect_races` recording unsynchronised accesses between warpgroups and TMA
    copies (`jax._src.pallas.mosaic_gpu.interpret.gpu_callbacks.get_races()`); InterpretGPUParams are used as given.
    """
    if setting is False or setting is None:
        return None
    if InterpretGPUParams is None:  # pragma: no cover - depends on the installed jax
        raise NotImplementedError("interpret=True needs JAX's Mosaic GPU interpreter "
                                  "(jax._src.pallas.mosaic_gpu.interpret), which this jax lacks")
    if is_interpret_params(setting):
        return setting
    return InterpretGPUParams(detect_races=detect_races, uninitialized_memory="nan")
