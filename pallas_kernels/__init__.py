"""Pallas kernels for DeepSeek-V3: block-scaled FP8 GEMM and MLA latent-attention decode.

- `quant`: E4M3 quantisation, 1x128 activation tiles and 128x128 weight blocks (scale = amax/448).
- `fp8_gemm`: dequant(a) @ dequant(b).T with FP32 promotion every 128 of K (DeepGEMM's recipe),
  a grouped variant for MoE experts, and `fp8_linear` / `fp8_grouped_linear` (custom_vjp: Fprop,
  Dgrad and Wgrad in FP8) for training.
- `mla_decode`: absorbed-MLA decode over a dense latent cache (FlashMLA's design: the kernels read the
  cache through a block table of pages).

Each op is a package: `__init__` holds the public wrappers, their validation and `supports(...)` (why a call
cannot run on a backend, asked up front; the wrappers raise exactly those reasons), and one module per
backend: "interpret" (the Pallas interpreter, CPU), "mosaic_gpu" (Hopper), "triton" (other GPUs), "xla"
(`reference`, plain jnp). `backends` holds the table of which module implements each op on each backend,
`resolve_backend` ("auto": the fastest for a platform), the device facts grids are sized by, and the settings
of JAX's GPU interpreter; `interpreter_shims` what the Mosaic GPU kernels trace differently under that
interpreter. This package never imports `dsv3_jax`.
"""
