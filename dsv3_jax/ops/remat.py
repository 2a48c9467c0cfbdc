"""Rematerialisation policies: what a block's forward keeps for the backward, and what it recomputes.

Each policy is registered by name (`Runtime.remat`); the model wraps every block (main and MTP) in
`flax.linen.remat` with it. None changes the function computed or its gradients, only the memory a
training step holds against the FLOPs it spends again:
- `none`: no rematerialisation (everything the backward needs is kept).
- `full`: each block keeps only its input and recomputes the rest in the backward (one extra
  forward of the blocks).
- `save_attention`: keeps MLA's projections (query, latent rows) and the attention output, the
  cheap-to-store, costly-to-recompute part; the FFN and experts are recomputed.
- `save_dots`: keeps every matmul without batch dimensions (the weight projections); recomputes
  the elementwise work, norms, softmax and the attention core.
- `offload_attention`: `save_attention`'s tensors moved to host memory between the forward and the
  backward (accelerators with pinned host memory; `ops.dispatch` refuses it on CPU).
"""
from __future__ import annotations

from collections.abc import Callable

import jax

from dsv3_jax.ops.registry import Registry

NONE, FULL, SAVE_ATTENTION, SAVE_DOTS, OFFLOAD_ATTENTION = (
    "none", "full", "save_attention", "save_dots", "offload_attention")
# Names MLA gives its saved tensors (jax.ad_checkpoint.checkpoint_name).
ATTENTION_SAVED = ("mla_query", "mla_latent", "mla_attention")

PolicyFactory = Callable[[], Callable[..., bool] | None]
REMAT: Registry[PolicyFactory] = Registry("remat", reference=NONE)
REMAT.register(NONE)(lambda: None)  # not wrapped at all (see `enabled`)
REMAT.register(FULL)(lambda: jax.checkpoint_policies.nothing_saveable)
REMAT.register(SAVE_ATTENTION)(lambda: jax.checkpoint_policies.save_only_these_names(*ATTENTION_SAVED))
REMAT.register(SAVE_DOTS)(lambda: jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
REMAT.register(OFFLOAD_ATTENTION)(lambda: jax.checkpoint_policies.save_and_offload_only_these_names(
    names_which_can_be_saved=(), names_which_can_be_offloaded=ATTENTION_SAVED,
    offload_src="device", offload_dst="pinned_host"))


def enabled(name: str) -> bool:
    return name != NONE
