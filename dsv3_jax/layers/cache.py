"""The latent KV cache of one attention layer: per batch row and slot, MLA's C + R cached values, and with a
DSA indexer (DeepSeek-V3.2) the indexer's key, index_head_dim values, stored transposed."""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from pallas_kernels.mla_decode import fp8_cache

# The cache dtype that stores rows packed in FP8 (`fp8_cache`: FlashMLA's layout, 656 bytes a token for V3
# against 1,152 in bfloat16); any other cache dtype is a jnp dtype the rows are stored in as they are.
FP8 = "fp8"


def is_fp8(cache_dtype) -> bool:
    return isinstance(cache_dtype, str) and cache_dtype == FP8


def stored(x: jax.Array) -> jax.Array:
    """Cached values as the cache holds them: bfloat16 as the uint16 of its bits, any other dtype as it is.
    XLA:CPU widens a bfloat16 array to float32 around every scatter into it and narrows it back (the whole
    cache, twice a write: 0.43 against 0.006 ms for 32K slots of indexer keys); an integer scatter is done in
    place, and the readers' bitcast (`held`) costs nothing."""
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype == jnp.bfloat16 else x


def held(x: jax.Array) -> jax.Array:
    """The values `stored` holds, in their dtype (uint16 bits: bfloat16)."""
    return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == jnp.uint16 else x


def index_dtype(cache_dtype):
    """The dtype a DSA indexer's cached keys are stored in: the cache's, and bfloat16 where the cache packs FP8
    rows (a layout of the latent's). A narrower cache halves the bytes every decode step scores; the indexer's
    dot then runs in that dtype with float32 sums (`layers.indexer.index_scores`)."""
    return jnp.dtype(jnp.bfloat16) if is_fp8(cache_dtype) else jnp.dtype(cache_dtype)


def row_bytes(latent_dim: int, rope_dim: int, cache_dtype) -> int:
    """Bytes of one cached token of one layer in `cache_dtype` (FP8 or a jnp dtype)."""
    if is_fp8(cache_dtype):
        return fp8_cache.row_bytes(latent_dim, rope_dim)
    return (latent_dim + rope_dim) * jnp.dtype(cache_dtype).itemsize


@flax.struct.dataclass
class LatentCache:
    """`rows` [B*S, C+R]: slot s of batch row b at row b*S + s holds [normalised c_kv; rotated k_pe]
    of the token at position s (576 values per token for V3); packed FP8 rows instead (uint8
    [B*S, fp8_cache.row_bytes(C, R)]) when `fp8_dims` is (C, R): quantised as they are written, read
    by the attention ops (`dsv3_jax.ops.attention`) through `fp8_cache`. Rows in bfloat16 are held as
    their bits (`stored`); `view` gives them in their dtype.

    Stored flat, one row per (batch row, slot): XLA:CPU then updates it in place with one row scatter;
    as [B, S, C+R] with B = 1 it duplicates the update into each reader and copies the whole cache
    four times per layer and step. Batch-major, so splitting the rows over the batch mesh axes
    splits whole batch rows (logical axes `AXES`).

    `index_keys` [B*I, S] (None without an indexer): the DSA indexer's key of each token (`Indexer.keys`),
    transposed: row b*I + i holds dim i of batch row b's keys, one column per slot, written at the slots `rows`
    are. Kept apart from the latent rows because the indexer scores every visible slot with its own dot
    products, while the attention reads only the selected latent rows; in `index_dtype` (bfloat16 held as its
    bits, `stored`). Transposed because each step multiplies the queries [T*H, I] by every cached key:
    against [I, S] that is one plain matmul, where [S, I] rows make XLA:CPU transpose the keys every step (32K
    slots, one query: 0.18 against 0.38 ms; docs/PERFORMANCE.md, "DeepSeek Sparse Attention"). Still batch-major,
    so the batch shards split it."""

    rows: jax.Array
    slots: int = flax.struct.field(pytree_node=False)
    fp8_dims: tuple[int, int] | None = flax.struct.field(pytree_node=False, default=None)
    index_keys: jax.Array | None = None

    AXES = ("batch", "kv_latent")  # logical axes of `rows` (dsv3_jax.parallel.rules)

    @classmethod
    def empty(cls, batch: int, slots: int, dim: int, dtype, latent_dim: int | None = None, index_dim: int = 0,
              index_dtype=None) -> LatentCache:
        """Rows of `dim` = C + R values in `dtype`; dtype FP8 packs them, and needs C (`latent_dim`). With
        `index_dim` > 0, also the indexer's keys, in `index_dtype` (a jnp dtype). Held as `stored` holds them."""
        index = stored(jnp.zeros((batch * index_dim, slots), index_dtype)) if index_dim else None
        if not is_fp8(dtype):
            return cls(stored(jnp.zeros((batch * slots, dim), dtype)), slots, index_keys=index)
        if latent_dim is None or not 0 < latent_dim <= dim:
            raise ValueError(f"an FP8 latent cache needs latent_dim in [1, {dim}], got {latent_dim!r}")
        dims = (latent_dim, dim - latent_dim)
        rows = jnp.zeros((batch * slots, fp8_cache.row_bytes(*dims)), fp8_cache.FP8_CACHE_DTYPE)
        return cls(rows, slots, dims, index)

    @property
    def batch(self) -> int:
        return self.rows.shape[0] // self.slots

    @property
    def dtype(self):
        """The dtype of the rows `view` gives (uint8 where packed FP8)."""
        return held(self.rows).dtype

    def view(self) -> jax.Array:
        """[B, S, C+R] in the cache's dtype, or [B, S, row bytes] packed (a reshape and a bitcast: no copy)."""
        return held(self.rows.reshape(self.batch, self.slots, self.rows.shape[-1]))

    def index_view(self) -> jax.Array:
        """The indexer's keys, transposed: [B, I, S] in their dtype (a reshape and a bitcast: no copy)."""
        return held(self.index_keys.reshape(self.batch, -1, self.slots))

    def _targets(self, start: jax.Array, t: int) -> jax.Array:
        """The flat row of each of T new entries per batch row written from slot start[b] -> [B*T]; an entry
        past its row's S slots goes to one row past the array, which mode="drop" scatters drop."""
        slot = start[:, None] + jnp.arange(t)
        rows = jnp.arange(start.shape[0])[:, None] * self.slots + slot
        return jnp.where(slot < self.slots, rows, self.rows.shape[0]).reshape(-1)

    def write_index(self, keys: jax.Array, start: jax.Array) -> LatentCache:
        """keys [B,T,I] -> the cache with row b's indexer keys at slots start[b]..start[b]+T-1 (as `write`:
        entries past a row's S slots are dropped)."""
        b, t, i = keys.shape
        slot = start[:, None, None] + jnp.arange(t)[None, :, None]  # [B, T, 1]
        col = jnp.where(slot < self.slots, slot, self.slots)  # past the slots: out of range, dropped
        row = jnp.arange(b)[:, None, None] * i + jnp.arange(i)  # [B, 1, I]
        row, col = jnp.broadcast_arrays(row, col)
        values = stored(keys.reshape(-1).astype(held(self.index_keys).dtype))
        index = self.index_keys.at[row.reshape(-1), col.reshape(-1)].set(values, mode="drop")
        return self.replace(index_keys=index)

    def write(self, new: jax.Array, start: jax.Array) -> LatentCache:
        """new [B,T,C+R], start [B] -> the cache with row b's entries at slots start[b]..start[b]+T-1.
        Entries past a row's S slots are dropped (never written into the next row's slots, nor outside
        the array). Rolling back (speculative decoding) needs no undo: a later write at the same
        positions replaces whatever a rejected draft left there before any query can see it."""
        if self.fp8_dims is not None:  # each token's row quantised on its own: its scales are its own
            new = fp8_cache.quantize_rows(new, self.fp8_dims[0])
        b, t, k = new.shape
        rows = self.rows.at[self._targets(start, t)].set(stored(new.reshape(b * t, k).astype(self.dtype)), mode="drop")
        return self.replace(rows=rows)
