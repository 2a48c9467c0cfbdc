"""How to run a model: the execution policy, apart from what the model is (`ModelConfig`).

Nothing here changes the function a checkpoint computes, only how (and, for `dtype` and `fp8`, at
what precision) it is computed, so a checkpoint may be trained, resumed or served under any
`Runtime`. Every variant name is a key of the registry that implements it (`dsv3_jax.ops`);
"auto" leaves the choice to `dsv3_jax.ops.dispatch`, which decides per platform and shape. The
platform is that of the devices the program is compiled for: `platform` when set, else the
current mesh's devices, else the default device (where a plain `jax.jit` compiles).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from dsv3_jax.ops.attention import ATTENTION
from dsv3_jax.ops.experts import EXPERTS, RAGGED
from dsv3_jax.ops.registry import AUTO
from dsv3_jax.ops.remat import NONE, REMAT
from dsv3_jax.ops.sparse_attention import DSA_STAGES
from pallas_kernels.backends import BACKENDS

DTYPES = ("float32", "bfloat16", "float16")
PLATFORMS = ("cpu", "gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class Runtime:
    dtype: str = "float32"  # activations; parameters stay float32 masters
    attention: str = AUTO  # a key of ops.attention.ATTENTION, or "auto"
    experts: str = AUTO  # a key of ops.experts.EXPERTS, or "auto"
    # FP8 training GEMMs (V3 report s.3.3): the linear layers (attention projections, dense FFN,
    # shared and routed experts) run Fprop, Dgrad and Wgrad on E4M3 inputs with 1x128 activation and
    # 128x128 weight scales; embedding, head, router, norms, MTP projection and the attention core
    # stay in `dtype`. The routed experts then take the ragged path with FP8 grouped GEMMs.
    fp8: bool = False
    # Under an "expert" mesh axis: dispatch tokens as E4M3 with 1x128 scales, combine in BF16
    # (paper s.3); off by default, as it changes the numbers (a few % error, tests/test_ep.py).
    ep_fp8_dispatch: bool = False
    kernel_backend: str = AUTO  # a pallas_kernels backend for the FP8 GEMMs and the decode kernel
    platform: str | None = None  # the compile target's platform; None: the mesh's or default device's
    # What a training step keeps for the backward and what it recomputes (ops.remat): memory vs FLOPs.
    remat: str = NONE
    # Layers as one `nn.scan` per stack (dense, MoE): compiled once whatever the depth. The parameters
    # then take the scanned layout (`model.stack_layers`: same values, a leading "layers" axis).
    scan_layers: bool = False
    # A DeepSeek-V3.2 training stage (models with an indexer; V3.2 report s.2.1.1), None outside training.
    # Both stages make MLA sow the indexer's KL to the main attention and the selection's recall into
    # "intermediates" (the loss reads them). "warmup" runs the attention dense, the function of the model
    # before its indexer is trained: the one field here that changes what a checkpoint computes.
    dsa_stage: str | None = None

    def __post_init__(self):
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("attention", self.attention, (AUTO, *ATTENTION.names))
        _check_choice("experts", self.experts, (AUTO, *EXPERTS.names))
        _check_choice("kernel_backend", self.kernel_backend, BACKENDS)
        _check_choice("remat", self.remat, REMAT.names)
        if self.platform is not None:
            _check_choice("platform", self.platform, PLATFORMS)
        if self.dsa_stage is not None:
            _check_choice("dsa_stage", self.dsa_stage, DSA_STAGES)
        for name in ("fp8", "ep_fp8_dispatch", "scan_layers"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Runtime.{name} = {getattr(self, name)!r}: must be true or false")
        if self.fp8 and self.experts not in (AUTO, FP8_EXPERTS):
            raise ValueError(f"Runtime.experts = {self.experts!r}: FP8 GEMMs run the routed experts on the "
                             f"{FP8_EXPERTS!r} path with FP8 grouped matmuls; use experts={FP8_EXPERTS!r} or 'auto'")

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    def replace(self, **changes: Any) -> Runtime:
        return dataclasses.replace(self, **changes)


# The expert path whose grouped matmul can be the FP8 one.
FP8_EXPERTS = RAGGED


def _check_choice(field: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"Runtime.{field} = {value!r}: must be one of {', '.join(map(str, allowed))}")


def choices(field: str) -> tuple[str, ...]:
    """The values a registry-backed field takes, for CLI flags and their help."""
    table = {"attention": (AUTO, *ATTENTION.names), "experts": (AUTO, *EXPERTS.names), "dtype": DTYPES,
             "kernel_backend": BACKENDS, "remat": REMAT.names}
    return tuple(table[field])
