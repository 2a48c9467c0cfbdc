"""The latent KV cache of one attention layer: per batch row and slot, MLA's C + R cached values."""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class LatentCache:
    """`rows` [B*S, C+R]: slot s of batch row b at row b*S + s holds [normalised c_kv; rotated k_pe]
    of the token at position s (576 values per token for V3).

    Stored flat, one row per (batch row, slot): XLA:CPU then updates it in place with one row scatter;
    as [B, S, C+R] with B = 1 it duplicates the update into each reader and copies the whole cache
    four times per layer and step. Batch-major, so splitting the rows over the batch mesh axes
    splits whole batch rows (logical axes `AXES`)."""

    rows: jax.Array
    slots: int = flax.struct.field(pytree_node=False)

    AXES = ("batch", "kv_latent")  # logical axes of `rows` (dsv3_jax.parallel.rules)

    @classmethod
    def empty(cls, batch: int, slots: int, dim: int, dtype) -> LatentCache:
        return cls(jnp.zeros((batch * slots, dim), dtype), slots)

    @property
    def batch(self) -> int:
        return self.rows.shape[0] // self.slots

    def view(self) -> jax.Array:
        """[B, S, C+R] (a reshape: no copy)."""
        return self.rows.reshape(self.batch, self.slots, self.rows.shape[-1])

    def write(self, new: jax.Array, start: jax.Array) -> LatentCache:
        """new [B,T,C+R], start [B] -> the cache with row b's entries at slots start[b]..start[b]+T-1.
        Entries past a row's S slots are dropped (never written into the next row's slots, nor outside
        the array). Rolling back (speculative decoding) needs no undo: a later write at the same
        positions replaces whatever a rejected draft left there before any query can see it."""
        b, t, k = new.shape
        slot = start[:, None] + jnp.arange(t)
        past_end = self.rows.shape[0]  # dropped by mode="drop"
        at = jnp.where(slot < self.slots, jnp.arange(b)[:, None] * self.slots + slot, past_end).reshape(-1)
        rows = self.rows.at[at].set(new.reshape(b * t, k).astype(self.rows.dtype), mode="drop")
        return LatentCache(rows, self.slots)
