"""dsv3-jax: DeepSeek-V3 (MLA, DeepSeekMoE, MTP, YaRN) in JAX/Flax.

Einsum letter legend, used in every module of the package:
  B batch, T query length, S key length, D model width, H heads, C kv latent (kv_lora_rank),
  Q query latent (q_lora_rank), N per-head no-rope query/key dims, R rope dims, V per-head value
  dims, E experts, K experts chosen per token, F ffn width, X vocabulary.
"""
from dsv3_jax.config import ModelConfig

__all__ = ["ModelConfig"]
__version__ = "0.1.0"
