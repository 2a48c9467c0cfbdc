"""The MLA decode kernels' tuning knobs."""
from __future__ import annotations

import dataclasses

from pallas_kernels import backends


@dataclasses.dataclass(frozen=True)
class MlaDecodeConfig:
    """Tuning knobs. None picks a default from the problem shape and backend.

    block_s: cache positions per step.
    num_splits: splits of the cache length (flash-decoding); None fills the device's SMs once (Mosaic TPU:
        the TensorCores a grid is spread over).
    block_h: heads per program; each program handles block_h * Sq query rows.
    num_stages: pipeline depth (Mosaic GPU: cache blocks in flight in shared memory; Triton: num_stages).
    num_warps: Triton warps per program.
    interpret: run a Mosaic kernel in a jax interpreter (on the CPU, slowly; for tests) instead of compiling
        it. Backend "mosaic_gpu": True, or a jax `InterpretGPUParams` (e.g. with detect_races=True) from
        jax._src.pallas.mosaic_gpu.interpret.params. Backend "mosaic_tpu": a `pltpu.InterpretParams()`
        (jax's TPU interpreter). Other backends take neither.
    """

    block_s: int = 64
    num_splits: int | None = None
    block_h: int | None = None
    num_stages: int = 2
    num_warps: int = 8
    interpret: object = False

    def __post_init__(self):
        for name in ("block_s", "num_splits", "block_h", "num_stages", "num_warps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"MlaDecodeConfig.{name} must be a positive int or None, got {value!r}")
        if not (isinstance(self.interpret, bool) or backends.is_interpret_params(self.interpret)
                or backends.is_tpu_interpret_params(self.interpret)):
            raise ValueError(f"MlaDecodeConfig.interpret must be a bool or an InterpretGPUParams "
                             f"(or a pltpu.InterpretParams), got {self.interpret!r}")
        if self.block_s % 8:
            raise ValueError(f"MlaDecodeConfig.block_s must be a multiple of 8, got {self.block_s}")
