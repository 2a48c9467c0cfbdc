"""The FP8 GEMMs' tuning knobs."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Fp8GemmConfig:
    """Tile sizes and pipelining; `None` fields take the backend's default (its module's `DEFAULTS`).

    block_m / block_n: output tile. Mosaic GPU: block_m must be 128 (two consumer warpgroups of 64 rows),
      block_n a multiple of 64 up to 256 (each warpgroup keeps two 64 x block_n FP32 accumulators live).
    num_stages: K blocks in flight (Mosaic: SMEM buffers of the TMA pipeline; Triton: software pipelining).
    num_warps: Triton only.
    grid_tile_width: Mosaic only, width of the L2-friendly "planar snake" tile order.
    num_sms: Mosaic only, size of the persistent grid; default the device's SM count (`backends.num_sms`), or
      2 under `interpret` (the interpreter simulates the CTAs one after another).
    interpret: Mosaic only, a test switch: run the Hopper kernel on CPU in JAX's GPU interpreter (TMA,
      barriers, warpgroups and wgmma simulated; `interpreter_shims` lists what is traced differently there).
      Slow: for small shapes in tests. The interpreter runs the three warpgroups as concurrent XLA:CPU
      computations blocking on each other's barriers: with fewer than three threads in the CPU client
      (max(cores, CPU devices)) it deadlocks.
    """

    block_m: int | None = None
    block_n: int | None = None
    num_stages: int | None = None
    num_warps: int | None = None
    grid_tile_width: int = 8
    num_sms: int | None = None
    interpret: bool = False

    def __post_init__(self):
        for name in ("block_m", "block_n", "num_stages", "num_warps", "grid_tile_width", "num_sms"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v <= 0):
                raise ValueError(f"Fp8GemmConfig.{name} must be a positive int, got {v!r}")
        if not isinstance(self.interpret, bool):
            raise ValueError(f"Fp8GemmConfig.interpret must be a bool, got {self.interpret!r}")
