"""Pallas kernels for DeepSeek-V3: block-scaled FP8 GEMM and MLA latent-attention decode.

- `quant`: E4M3 quantisation, 1x128 activation tiles and 128x128 weight blocks (scale = amax/448).
- `fp8_gemm`: dequant(a) @ dequant(b).T with FP32 promotion every 128 of K (DeepGEMM's recipe),
  a grouped variant for MoE experts, and `fp8_linear` / `fp8_grouped_linear` (custom_vjp: Fprop,
  Dgrad and Wgrad in FP8) for training.
- `mla_decode`: absorbed-MLA decode over the latent cache (FlashMLA's design), dense and paged.

Each kernel takes `backend=`: "interpret" (the Pallas interpreter, CPU), "mosaic_gpu" (Hopper),
"triton" (other GPUs), "xla" (the plain-jnp reference beside each kernel), "auto" (the fastest for
the platform; `backends.resolve_backend`). This package never imports `dsv3_jax`.
"""
