"""The FP8 GEMMs' tuning knobs."""
from __future__ import annotations

import dataclasses

from pallas_kernels import backends


@dataclasses.dataclass(frozen=True)
class Fp8GemmConfig:
    """Tile sizes and pipelining; `None` fields take the backend's default (its module's `DEFAULTS`).

    block_m / block_n: output tile. Mosaic GPU: block_m must be 128 (two consumer warpgroups of 64 rows),
      block_n a multiple of 64 up to 256 (each warpgroup keeps two 64 x block_n FP32 accumulators live).
      Mosaic TPU: block_m a multiple of 32 (an E4M3 VMEM tile holds 32 rows), block_n of 128 (lanes); fewer
      rows than block_m run as one tile of M rounded up to whole VMEM tiles.
    block_k: Mosaic TPU only, K columns a grid step copies into VMEM (a multiple of 128; fewer when K is
      shorter, and spread evenly over the steps so that K pads by less than one 128-block a step).
    num_stages: K blocks in flight (Mosaic GPU: SMEM buffers of the TMA pipeline; Triton: software pipelining;
      Mosaic TPU: VMEM buffers of each operand's pipeline, 1 or 2).
    num_warps: Triton only.
    grid_tile_width: Mosaic only, width of the L2-friendly "planar snake" tile order.
    num_sms: Mosaic only, size of the persistent grid; default the device's SM count (`backends.num_sms`), or
      2 under `interpret` (the interpreter simulates the CTAs one after another).
    tpu_generation: Mosaic TPU only, the TPU generation to build for (5: v5e/v5p, 6: v6e, 7: TPU7x); None: the
      target device's (the current mesh's devices, else the default device; no TPU there: the path of
      generations before 7). From 7 the MXU multiplies E4M3 itself; before, the kernel widens tiles to bf16.
    interpret: Mosaic only, a test switch. Mosaic GPU: run the Hopper kernel on CPU in JAX's GPU interpreter
      (TMA, barriers, warpgroups and wgmma simulated; `interpreter_shims` lists what is traced differently
      there). Slow: for small shapes in tests. The interpreter runs the three warpgroups as concurrent XLA:CPU
      computations blocking on each other's barriers: with fewer than three threads in the CPU client
      (max(cores, CPU devices)) it deadlocks. Mosaic TPU: a `pltpu.InterpretParams()` runs the TPU kernel in
      Pallas' TPU interpreter (VMEM, the DMA pipeline and the scalar prefetch simulated on CPU).
    """

    block_m: int | None = None
    block_n: int | None = None
    num_stages: int | None = None
    num_warps: int | None = None
    grid_tile_width: int = 8
    num_sms: int | None = None
    block_k: int | None = None
    tpu_generation: int | None = None
    interpret: object = False  # bool (True: the GPU interpreter) or a pltpu.InterpretParams (the TPU one)

    def __post_init__(self):
        for name in ("block_m", "block_n", "num_stages", "num_warps", "grid_tile_width", "num_sms", "block_k",
                     "tpu_generation"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v <= 0):
                raise ValueError(f"Fp8GemmConfig.{name} must be a positive int, got {v!r}")
        if not (isinstance(self.interpret, bool) or backends.is_tpu_interpret_params(self.interpret)):
            raise ValueError("Fp8GemmConfig.interpret must be a bool or a pltpu.InterpretParams, "
                             f"got {self.interpret!r}")
