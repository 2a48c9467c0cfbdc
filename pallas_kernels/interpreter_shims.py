"""The Mosaic GPU constructs JAX's GPU interpreter (jax 0.10.2, on the CPU) cannot run, and what the kernels
trace in their place there. Kernel bodies call these and never ask which mode they run in; on the GPU each
traces exactly the construct it names, so the CUDA lowering is the kernel as written.

- `plgpu.layout_cast` and the `layout=` of `plgpu.broadcasted_iota`: no CPU lowering ("MLIR translation rule
  for primitive 'layout_cast' not found for platform cpu"). Registers have no layout there: dropped.
- `plgpu.load` (SMEM -> registers in a layout): the interpreter has no rule for it and re-binds it on a buffer
  key, failing `_load_abstract_eval`. A plain ref read instead (and so no `optimized=` transfer plan either).
- a transposed wgmma operand, `plgpu.transpose_ref`: the interpreter's wgmma reads operands through index
  transforms only ("'TransposeTransform' object has no attribute 'indices'"). The operand is copied, transposed,
  into a scratch SMEM buffer that exists only there (`scratch`).
- a wgmma whose A operand is in registers: the interpreter's wgmma reads both operands from SMEM buffers. The
  registers are stored into a scratch SMEM buffer that exists only there (`scratch`), and the wgmma reads that.
- a wgmma accumulating into registers it was seeded with (`pl.run_state` over `plgpu.ACC.init`): the
  interpreter has no seeded accumulator. A fresh one, added to the carried value.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl


@dataclasses.dataclass(frozen=True)
class MosaicShims:
    interpret: bool  # True: trace for JAX's GPU interpreter

    def layout_cast(self, x: jax.Array, layout) -> jax.Array:
        return x if self.interpret else plgpu.layout_cast(x, layout)

    def load(self, ref, layout, *, optimized: bool = True) -> jax.Array:
        """SMEM -> registers in `layout`; optimized=False lets Mosaic GPU take a bank-conflicting transfer where it
        finds no conflict-free one (8-bit rows of an unswizzled buffer)."""
        return ref[...] if self.interpret else plgpu.load(ref, (), layout=layout, optimized=optimized)

    def iota(self, shape, dim: int, layout) -> jax.Array:
        if self.interpret:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=layout)

    def scratch(self, shape, dtype):
        """The SMEM buffer `transposed` copies into: only under the interpreter (None: nothing allocated)."""
        return plgpu.SMEM(shape, dtype) if self.interpret else None

    def transposed(self, ref, scratch, *index):
        """ref [R, C] in SMEM as the [C, R] (K-major) wgmma operand; `scratch` (at `index`) from `scratch()`."""
        if not self.interpret:
            return plgpu.transpose_ref(ref, (1, 0))
        dst = scratch.at[index] if index else scratch
        dst[...] = ref[...].T
        return dst

    def wgmma_registers(self, acc_ref, a: jax.Array, b_smem, scratch) -> None:
        """acc_ref += a @ b_smem with `a` in registers (WGMMA layout); `scratch` from `scratch(a.shape, a.dtype)`."""
        if not self.interpret:
            plgpu.wgmma(acc_ref, a, b_smem)
            return
        scratch[...] = a
        plgpu.wgmma(acc_ref, scratch, b_smem)

    def mma_accumulate(self, acc: jax.Array, a_smem, b_smem) -> jax.Array:
        """acc + a @ b on the tensor cores; on the GPU accumulated in place (acc's registers seed the wgmma)."""
        def mma(acc_ref):
            plgpu.wgmma(acc_ref, a_smem, b_smem)

        if not self.interpret:
            return pl.run_state(mma)(plgpu.ACC.init(acc))

        def fresh(acc_ref):
            mma(acc_ref)
            return acc_ref[...]

        return acc + pl.run_scoped(fresh, plgpu.ACC(acc.shape, jnp.float32))
