"""The packed FP8 latent cache (FlashMLA's layout): bytes where the layout says, values within E4M3's rounding,
and the reference decode reading it as its dequantised values."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.mla_decode import fp8_cache, mla_decode, supports


def test_deepseek_row_is_656_bytes_in_flashmla_order():
    c, r = 512, 64
    assert fp8_cache.row_bytes(c, r) == 656 and fp8_cache.offsets(c) == (512, 528)
    rows = jax.random.normal(jax.random.key(0), (2, 3, c + r)) * jnp.arange(1, c + r + 1) / 100
    packed = np.asarray(fp8_cache.quantize_rows(rows, c))
    assert packed.shape == (2, 3, 656) and packed.dtype == np.uint8
    # The 4 scales are little-endian float32s: amax / 448 of each 128-value tile.
    scales = packed[..., 512:528].copy().view("<f4")
    amax = np.abs(np.asarray(rows)[..., :c]).reshape(2, 3, 4, 128).max(-1)
    np.testing.assert_allclose(scales, amax / 448, rtol=1e-6)
    # The rope values are the bfloat16 rows, unquantised.
    rope = packed[..., 528:].copy().view(jnp.bfloat16)
    np.testing.assert_array_equal(rope, np.asarray(rows[..., c:].astype(jnp.bfloat16)))
    # The latent bytes are E4M3 codes of value / scale.
    codes = packed[..., :c].copy().view(jnp.float8_e4m3fn).astype(np.float32).reshape(2, 3, 4, 128)
    np.testing.assert_allclose(codes * scales[..., None], np.asarray(rows)[..., :c].reshape(2, 3, 4, 128),
                               rtol=0.07, atol=1e-6)


@pytest.mark.parametrize("c, r", [(512, 64), (24, 16), (200, 0)])
def test_round_trip_within_e4m3_rounding(c, r):
    rows = jax.random.normal(jax.random.key(1), (5, c + r), jnp.float32) * 4
    back = fp8_cache.dequantize_rows(fp8_cache.quantize_rows(rows, c), c, r, jnp.float32)
    latent, got = np.asarray(rows[:, :c]), np.asarray(back[:, :c])
    tile_max = np.repeat(np.abs(np.pad(latent, ((0, 0), (0, -c % 128)))).reshape(5, -1, 128).max(-1), 128, 1)[:, :c]
    # E4M3 keeps 3 fraction bits: half a step is 1/16 of the value, at worst 1/16 of the tile's largest.
    assert np.all(np.abs(got - latent) <= tile_max / 16 + 1e-7)
    np.testing.assert_array_equal(np.asarray(back[:, c:]), np.asarray(rows[:, c:].astype(jnp.bfloat16), np.float32))


def test_reference_decode_reads_the_packed_cache():
    c, r = 128, 32
    q = jax.random.normal(jax.random.key(2), (2, 2, 4, c + r), jnp.float32)
    rows = jax.random.normal(jax.random.key(3), (2, 9, c + r), jnp.float32)
    packed = fp8_cache.quantize_rows(rows, c)
    lengths = jnp.array([9, 4])
    got = mla_decode(q, packed, lengths, v_dim=c, softmax_scale=0.1, backend="xla")
    want = mla_decode(q, fp8_cache.dequantize_rows(packed, c, r, jnp.float32), lengths, v_dim=c, softmax_scale=0.1,
                      backend="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_wrong_row_bytes_and_unread_backends_are_refused():
    q_shape = (1, 1, 2, 576)
    assert "holds 656 bytes a row, got 600" in supports(q_shape, (1, 4, 600), jnp.uint8, v_dim=512, backend="xla")
    assert supports(q_shape, (1, 4, 656), jnp.uint8, v_dim=512, backend="xla") is None
    with pytest.raises(ValueError, match=r"uint8 \[\.\.\., 656\]"):
        fp8_cache.dequantize_rows(jnp.zeros((3, 600), jnp.uint8), 512, 64)
