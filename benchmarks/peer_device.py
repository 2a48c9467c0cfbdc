"""Where the PyTorch peer of a benchmark runs: on CUDA when JAX runs on a GPU and torch sees one (a
peer on the CPU would flatter a GPU run), else on the CPU. Shared by the benchmark scripts."""
from __future__ import annotations

import jax


def torch_device() -> str:
    import torch

    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def torch_sync(device: str) -> None:
    """Wait for the device's queued work, so that a host timer measures it."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
