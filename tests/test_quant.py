"""Block-scaled FP8 weights: the reference that checkpoint import and the kernels rely on."""
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.quant import E4M3_MAX, dequantize_weight, quantize_weight


@pytest.mark.parametrize("shape", [(256, 128), (300, 200), (7, 130), (129, 1)])
def test_round_trip_any_shape(shape):
    w = np.random.RandomState(0).randn(*shape).astype(np.float32)
    q, s = quantize_weight(jnp.asarray(w))
    assert q.dtype == jnp.float8_e4m3fn and q.shape == shape
    assert s.shape == (-(-shape[0] // 128), -(-shape[1] // 128)) and s.dtype == jnp.float32
    d = np.asarray(dequantize_weight(q, s))
    # E4M3 keeps 3 mantissa bits: each value within 1/16 of its block's scale * 448 range.
    block_max = np.repeat(np.repeat(np.asarray(s) * E4M3_MAX, 128, 0), 128, 1)[: shape[0], : shape[1]]
    assert np.all(np.abs(d - w) <= np.maximum(np.abs(w) / 16, block_max * 2.0 ** -9) + 1e-7)


def test_scales_are_per_block_amax():
    w = np.zeros((256, 256), np.float32)
    w[5, 3], w[200, 250] = 3.0, -0.5
    q, s = quantize_weight(jnp.asarray(w))
    np.testing.assert_allclose(s, [[3.0 / 448, 1e-4 / 448], [1e-4 / 448, 0.5 / 448]], rtol=1e-6)
    assert float(q.astype(jnp.float32)[5, 3]) == 448.0  # the block's amax maps to E4M3's max
    np.testing.assert_allclose(dequantize_weight(q, s), w, atol=1e-7)


def test_power_of_two_scales():
    w = np.random.RandomState(1).randn(130, 260).astype(np.float32)
    q, s = quantize_weight(jnp.asarray(w), pow2=True)
    assert np.all(np.log2(np.asarray(s)) == np.round(np.log2(np.asarray(s))))
    assert float(jnp.abs(q.astype(jnp.float32)).max()) <= E4M3_MAX
    assert float(np.abs(np.asarray(dequantize_weight(q, s)) - w).max()) < 0.1 * np.abs(w).max()


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight(jnp.zeros((2, 3, 4)))
    q, _ = quantize_weight(jnp.zeros((200, 200)))
    with pytest.raises(ValueError, match=r"needs scales of shape \(2, 2\)"):
        dequantize_weight(q, jnp.ones((1, 2)))
