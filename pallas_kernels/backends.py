"""Backend names shared by the kernels, and how "auto" picks one.

- "interpret": `pl.pallas_call(..., interpret=True)`; the kernel body run by XLA on any platform (CPU tests).
- "mosaic_gpu": Pallas' Mosaic GPU lowering (Hopper and later: TMA copies, wgmma).
- "triton": Pallas' Triton lowering (any CUDA GPU).
- "xla": the plain-jnp `*_reference` of each kernel file.
- "auto": "mosaic_gpu" on a GPU of compute capability >= 9.0, "triton" on other GPUs, "xla" elsewhere.
"""
from __future__ import annotations

import jax

BACKENDS = ("interpret", "mosaic_gpu", "triton", "xla", "auto")
_HOPPER = 9.0


def _compute_capability(device) -> float:
    try:
        return float(getattr(device, "compute_capability", "0") or 0)
    except (TypeError, ValueError):
        return 0.0


def resolve_backend(backend: str) -> str:
    """Validate `backend` and turn "auto" into a concrete name for the default device."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends are {', '.join(map(repr, BACKENDS))}")
    if backend != "auto":
        return backend
    device = jax.devices()[0]
    if device.platform != "gpu":
        return "xla"
    return "mosaic_gpu" if _compute_capability(device) >= _HOPPER else "triton"
