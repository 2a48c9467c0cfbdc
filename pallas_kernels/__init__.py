"""Pallas kernels for DeepSeek-V3: block-scaled FP8 GEMM and MLA latent-attention decode.

This package never imports `dsv3_jax`. The kernels arrive with their own issue; until then the
package holds nothing to call.
"""
