"""The grouped matmul as TPU kernels (megablox, `pallas_kernels.grouped_matmul`), in Pallas' interpreter
here: the reference's (`jax.lax.ragged_dot`) values and gradients, rows outside every group zero both
ways; in the model, on one device and per device's tokens on meshes (`parallel.ep.data_parallel`);
and chosen for TPU targets only."""
import dataclasses

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
from pallas_kernels.grouped_matmul import TILE, Tiling, choose_tiling, gmm, scoped_vmem_bytes, vmem_bytes

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


MIB = 1 << 20
V3_ROWS = 4096 * 8  # a device's tokens x top-k


@pytest.mark.parametrize("mkn,itemsize,vmem,want", [
    ((V3_ROWS, 7168, 2048), 2, 16 * MIB, (512, 1024, 1024)),  # V3's w1/w3 forward, v5p's 16 MiB
    ((V3_ROWS, 2048, 7168), 2, 16 * MIB, (512, 1024, 1024)),  # w2, and w1's backward gmm
    ((V3_ROWS, 7168, 2048), 2, 32 * MIB, (512, 1024, 1024)),  # v6e / TPU7x: the largest candidate already fits
    ((V3_ROWS, 7168, 2048), 4, 16 * MIB, (512, 512, 1024)),  # float32 on 16 MiB: K halved to fit
    ((V3_ROWS, 7168, 2048), 4, 32 * MIB, (512, 1024, 1024)),
    ((2048 * 4, 256, 128), 2, 16 * MIB, (512, 256, 128)),  # `small`: whole K and N
    ((512 + 128, 256, 512), 4, 16 * MIB, (128, 256, 512)),  # 640 rows: 128 the only row tile that divides
    ((128, 64, 32), 4, 16 * MIB, (128, 64, 32)),  # `tiny`: dims under a lane tile, whole
    ((256, 200, 384), 4, 16 * MIB, (256, 128, 128)),  # K not whole lane tiles: 128, the last one ragged
])
def test_tiling_choices(mkn, itemsize, vmem, want):
    got = choose_tiling(*mkn, itemsize=itemsize, vmem_limit=vmem)
    assert got == want
    assert vmem_bytes(*got, itemsize) <= vmem
    assert mkn[0] % got[0] == 0 and all(d % t == 0 or t == TILE for d, t in zip(mkn[1:], got[1:], strict=True))


def test_scoped_vmem_by_generation():
    assert scoped_vmem_bytes(5) == 16 * MIB  # v5e, v5p
    assert scoped_vmem_bytes(6) == scoped_vmem_bytes(7) == 32 * MIB  # v6e, TPU7x
    assert scoped_vmem_bytes(None) == 16 * MIB  # the interpreter: a choice that fits every generation


@dataclasses.dataclass(frozen=True)
class _Recorded(Tiling):
    """The chosen tiling, each call's (m, k, n) and choice written down."""

    calls: list = dataclasses.field(default_factory=list, hash=False, compare=False)

    def __call__(self, m, k, n):
        self.calls.append(((m, k, n), super().__call__(m, k, n)))
        return self.calls[-1][1]


def test_gmm_with_large_tiles_matches_ragged_dot():
    """Tiles other than 128 (512 rows, 256 of K or N) forward, in the backward's gmm and in its tgmm: the
    reference's values and gradients; rows past the groups (24 of padding, 50 in no group) zero both ways."""
    r = np.random.RandomState(1)
    m, k, n, sizes = 1000, 256, 384, jnp.asarray([300, 0, 500, 150], jnp.int32)
    x, w = jnp.asarray(r.randn(m, k), jnp.float32), jnp.asarray(r.randn(4, k, n), jnp.float32)
    dy = jnp.asarray(r.randn(m, n), jnp.float32)
    tiling = _Recorded(4, 16 * MIB)
    out, back = jax.vjp(lambda x, w: gmm(x, w, sizes, interpret=True, tiling=tiling), x, w)
    dx, dw = back(dy)
    assert sorted(set(tiling.calls)) == [((1024, 256, 384), (512, 256, 128)),  # forward gmm, tgmm (dw [G, K, N])
                                         ((1024, 384, 256), (512, 128, 256))]  # backward gmm (dy @ w^T)
    want, want_back = jax.vjp(lambda x, w: jax.lax.ragged_dot(x, w, sizes), x, w)
    used = int(sizes.sum())
    want_dx, want_dw = want_back(dy.at[used:].set(0))
    _close((out[:used], dx[:used], dw), (want[:used], want_dx[:used], want_dw), tol=2e-5)
    assert not np.any(np.asarray(out[used:])) and not np.any(np.asarray(dx[used:]))


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


def test_v3_tiles_compile_for_the_smallest_scoped_vmem():
    """The tiles chosen at V3's expert shapes (512x1024x1024) fit v5e's 16 MiB of scoped VMEM as Mosaic counts it:
    the forward and backward (gmm, transposed gmm, tgmm) compile for a v5e device (compile-only, libtpu)."""
    pytest.importorskip("libtpu", reason="compile-only TPU targets need libtpu: pip install 'jax[tpu]==0.10.2'")
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from dsv3_jax.plan import topology_devices

    mesh = Mesh(np.asarray(topology_devices("v5e:2x2")[:1]), ("d",))
    v3 = ModelConfig.from_json("deepseek_v3_671b")
    m, g, d, f = 1024, 8, v3.hidden_size, v3.moe_intermediate_size
    tiling = _Recorded(2, scoped_vmem_bytes(5))
    train = jax.shard_map(lambda x, w, s, dy: jax.vjp(lambda x, w: gmm(x, w, s, tiling=tiling), x, w)[1](dy),
                          mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False)
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P()))
    jax.jit(train).lower(spec((m, d), jnp.bfloat16), spec((g, d, f), jnp.bfloat16), spec((g,), jnp.int32),
                         spec((m, f), jnp.bfloat16)).compile()
    assert {t for _, t in tiling.calls} == {(512, 1024, 1024)} and len(set(tiling.calls)) == 2
