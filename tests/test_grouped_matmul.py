"""The grouped matmul as TPU kernels (megablox, `pallas_kernels.grouped_matmul`), in Pallas' interpreter
here: the reference's (`jax.lax.ragged_dot`) values and gradients, rows outside every group zero both
ways; in the model, on one device and per device's tokens on meshes (`parallel.ep.data_parallel`);
and chosen for TPU targets only."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import Transformer, init_variables
from dsv3_jax.ops import dispatch
from dsv3_jax.ops.linear import cast_here
from dsv3_jax.parallel.mesh import make_mesh, parse_mesh
from dsv3_jax.runtime import Runtime
from pallas_kernels.grouped_matmul import TILE, gmm

CFG = ModelConfig.from_json("tiny")


def _close(got, want, tol=1e-5):
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=tol, atol=tol * max(1.0, float(jnp.abs(w).max())))


@pytest.mark.parametrize("sizes", [[10, 0, 25, 12], [40, 2, 0, 8]])
def test_gmm_matches_ragged_dot(sizes):
    """An empty group, rows not a whole tile, and (first case) 3 rows in no group: their outputs and
    their gradients are zero (the kernels never write them)."""
    r = np.random.RandomState(0)
    m = 50
    assert m % TILE
    x, w = jnp.asarray(r.randn(m, 64), jnp.float32), jnp.asarray(r.randn(4, 64, 32), jnp.float32)
    sizes = jnp.asarray(sizes, jnp.int32)
    dy = jnp.asarray(r.randn(m, 32), jnp.float32)

    def run(f):
        return jax.jit(jax.vjp, static_argnums=0)(lambda x, w: f(x, w, sizes), x, w)

    out, back = run(lambda x, w, s: gmm(x, w, s, interpret=True))
    want, want_back = run(jax.lax.ragged_dot)
    used = int(sizes.sum())
    _close(out[:used], want[:used])
    assert not np.any(np.asarray(out[used:]))
    dx, dw = back(dy)
    want_dx, want_dw = want_back(dy.at[used:].set(0))
    _close((dx[:used], dw), (want_dx[:used], want_dw))
    assert not np.any(np.asarray(dx[used:]))


def _loss_and_grads(rt, variables, tokens):
    loss = lambda p: jnp.mean(Transformer(CFG, rt).apply({**variables, "params": p}, tokens) ** 2)
    return jax.jit(jax.value_and_grad(loss))(variables["params"])


@pytest.mark.parametrize("mesh", ["", "fsdp=4", "fsdp=2,expert=2"])
def test_model_with_kernel_experts_matches_dense(mesh):
    """The ragged path with the interpreted kernels: the dense reference's loss and gradients; under an
    fsdp mesh each device runs its own tokens with the gathered weights (their gradients summed)."""
    variables = init_variables(CFG, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 16), 0, CFG.vocab_size)
    want = _loss_and_grads(Runtime(experts="dense"), variables, tokens)
    rt = Runtime(experts="ragged", kernel_backend="interpret")
    if not mesh:
        _close(_loss_and_grads(rt, variables, tokens), want)
        return
    with jax.set_mesh(make_mesh(parse_mesh(mesh, 4), devices=jax.devices()[:4])):
        _close(_loss_and_grads(rt, variables, tokens), want)


def test_kernels_are_chosen_for_tpu_targets_only():
    v2 = ModelConfig.from_json("deepseek_v2_lite_16b")  # 2048 x 1408: whole 128-tiles
    assert dispatch.grouped_kernel(Runtime(platform="tpu"), v2) is False  # compiled megablox
    assert dispatch.grouped_kernel(Runtime(platform="tpu"), CFG) is None  # 64 x 32: not tiles; ragged_dot
    assert dispatch.grouped_kernel(Runtime(platform="gpu"), v2) is None  # ragged_dot
    assert dispatch.grouped_kernel(Runtime(platform="cpu"), v2) is None
    assert dispatch.grouped_kernel(Runtime(platform="cpu", kernel_backend="interpret"), CFG) is True
    assert dispatch.grouped_kernel(Runtime(platform="tpu", fp8=True), v2) is None  # the FP8 grouped GEMMs


def test_expert_parallel_in_token_chunks_is_the_same(monkeypatch):
    """Expert parallelism with each device's tokens sent in chunks (one chunk's all-to-all buffers alive
    at a time, each chunk recomputed for the backward): the same loss and gradients."""
    variables = init_variables(CFG, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 16), 0, CFG.vocab_size)
    mesh = make_mesh(parse_mesh("fsdp=2,expert=2", 4), devices=jax.devices()[:4])
    rt = Runtime(experts="ragged")
    with jax.set_mesh(mesh):
        want = _loss_and_grads(rt, variables, tokens)
        # 16 tokens a device, K=2, D=64, 4 bytes, n=2: 16 KiB a buffer; 4 KiB asks for 4 chunks
        assert dispatch.ep_chunks(mesh, 64, CFG.num_experts_per_tok, CFG.hidden_size, 4) == 1
        monkeypatch.setattr(dispatch, "EP_BUFFER_BYTES", 4096)
        assert dispatch.ep_chunks(mesh, 64, CFG.num_experts_per_tok, CFG.hidden_size, 4) == 4
        _close(_loss_and_grads(rt, variables, tokens), want)


def test_cast_here_is_a_cast_both_ways():
    w = jax.random.normal(jax.random.PRNGKey(0), (3, 4))
    y, back = jax.vjp(lambda w: cast_here(w, jnp.bfloat16), w)
    assert y.dtype == jnp.bfloat16 and np.array_equal(np.asarray(y), np.asarray(w.astype(jnp.bfloat16)))
    (g,) = back(jnp.ones((3, 4), jnp.bfloat16))
    assert g.dtype == jnp.float32 and np.all(np.asarray(g) == 1)
