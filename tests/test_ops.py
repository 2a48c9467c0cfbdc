"""Every registered variant of every op against its reference, gradients included, and the dispatch
that picks them (STYLE.md items 5 and 11)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.config import ModelConfig
from dsv3_jax.ops import dispatch
from dsv3_jax.ops.attention import ATTENTION, CORES, AttentionOptions, KvWeights, absorbed_weights, visible
from dsv3_jax.ops.cross_entropy import CROSS_ENTROPY, head_cross_entropy
from dsv3_jax.ops.experts import EXPERTS
from dsv3_jax.runtime import Runtime, choices
from pallas_kernels.backends import capability_of_kind, resolve_backend

CFG = ModelConfig.from_json("tiny")
# Decode-only variants: a Pallas kernel with no backward; checked on values (and in test_mla_decode).
FORWARD_ONLY = {"latent_kernel"}


def _close(got, want, rtol=1e-4, atol=1e-5):
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol * max(1.0, float(jnp.abs(w).max())))


# ---- experts ------------------------------------------------------------------------------------
def _routing(pattern, t=300, e=8, k=2, seed=0):
    rng = np.random.RandomState(seed)
    ids = {"all_same": np.tile([3, 5], (t, 1)),
           "one_empty": np.stack([rng.choice([0, 1, 2, 4, 5, 6, 7], k, replace=False) for _ in range(t)]),
           "random": np.stack([rng.choice(e, k, replace=False) for _ in range(t)])}[pattern]
    return jnp.asarray(rng.rand(t, k), jnp.float32), jnp.asarray(ids, jnp.int32)


@pytest.mark.parametrize("variant", [v for v in EXPERTS if v != EXPERTS.reference])
@pytest.mark.parametrize("pattern", ["all_same", "one_empty", "random"])
def test_experts_variant_matches_reference(variant, pattern):
    """Dropless means dropless: every token on the same experts, or an expert left empty (all_same
    puts every token past the windows of two experts: windowed's overflow chunks)."""
    t, e, d, f = 300, 8, 16, 8
    gates, ids = _routing(pattern, t, e)
    rng = np.random.RandomState(1)
    x = jnp.asarray(rng.randn(t, d), jnp.float32)
    w1, w3 = (jnp.asarray(rng.randn(e, d, f) * 0.5, jnp.float32) for _ in range(2))
    w2 = jnp.asarray(rng.randn(e, f, d) * 0.5, jnp.float32)

    def value_and_grads(name):
        fn = lambda x, g, a, b, c: EXPERTS[name](x, g, ids, a, b, c)
        grads = jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=range(5))
        return jax.jit(lambda *a: (fn(*a), grads(*a)))(x, gates, w1, w3, w2)

    _close(value_and_grads(variant), value_and_grads(EXPERTS.reference), atol=1e-4)


# ---- attention ----------------------------------------------------------------------------------
B, T, H, N, R, C, V = 2, 8, 3, 4, 2, 8, 4


def _attention_args(cached: bool, seed=2):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q_nope, q_pe = jax.random.normal(ks[0], (B, T, H, N)), jax.random.normal(ks[1], (B, T, H, R))
    s = 16 if cached else T
    kv = jax.random.normal(ks[2], (B, s, C + R))
    wkv_b = jax.random.normal(ks[3], (C, H, N + V)) * 0.3
    if cached:  # queries at the ends of rows of different lengths, over cache slots 0..S-1
        q_pos = jnp.array([[3], [8]]) + jnp.arange(T)
        return q_nope, q_pe, kv, q_pos, None, wkv_b
    # row 1 left-padded by 3: its first 3 keys are masked for every query, its first 3 queries see none
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    kv_pos = jnp.where(jnp.array([[0], [3]]) <= pos, pos, 10 * T)
    return q_nope, q_pe, kv, pos, kv_pos, wkv_b


# latent_kernel reads a cache only (dispatch refuses it without one: test_attention_dispatch).
@pytest.mark.parametrize("variant,cached", [(v, c) for v in ATTENTION if v != ATTENTION.reference
                                            for c in (False, True) if c or v != "latent_kernel"])
def test_attention_variant_matches_reference(variant, cached):
    q_nope, q_pe, kv, q_pos, kv_pos, wkv_b = _attention_args(cached)
    opts = AttentionOptions(0.3, backend="interpret")

    def run(name, q_nope, q_pe, kv, wkv_b):
        return ATTENTION[name](q_nope, q_pe, kv, q_pos, kv_pos, KvWeights(wkv_b), opts)

    args = (q_nope, q_pe, kv, wkv_b)
    _close(run(variant, *args), run(ATTENTION.reference, *args), atol=1e-5)
    if variant not in FORWARD_ONLY:
        grads = lambda name: jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(run(name, *a))), argnums=range(4)))(*args)
        _close(grads(variant), grads(ATTENTION.reference))


def test_absorbed_weights_derived_once_equal_derived_per_call():
    q_nope, q_pe, kv, q_pos, kv_pos, wkv_b = _attention_args(True)
    w_k, w_v = absorbed_weights(wkv_b, V)
    opts = AttentionOptions(0.3, backend="interpret")
    for name in ("absorbed", "latent_kernel"):
        _close(ATTENTION[name](q_nope, q_pe, kv, q_pos, None, KvWeights(wkv_b, w_k, w_v), opts),
               ATTENTION[name](q_nope, q_pe, kv, q_pos, None, KvWeights(wkv_b), opts))


@pytest.mark.parametrize("variant", [v for v in CORES if v != CORES.reference])
@pytest.mark.parametrize("blocks", [1, 3])
def test_attention_core_matches_reference(variant, blocks):
    """Causal query blocks (each scores only the keys up to its end) and the hand-written backward give
    the plain softmax's values and gradients, with masked keys; with one block also over a fully
    masked query row (its uniform softmax spans the keys its block scores, so only there)."""
    t = 12
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k = jax.random.normal(ks[0], (2, 3, t, 6)), jax.random.normal(ks[1], (2, 3, t, 6))
    v = jax.random.normal(ks[2], (2, 3, t, 4))
    pos = jnp.broadcast_to(jnp.arange(t), (2, t))
    mask = visible(pos, pos, t) & (pos < jnp.array([[t], [9]]))[:, None, :]  # row 1: 3 padding keys at the end
    if blocks == 1:
        mask = mask.at[1, 4].set(False)
    run = lambda name, *a: CORES[name](*a, mask, 0.3, blocks)
    grads = lambda name: jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(run(name, *a))), argnums=range(3)))(q, k, v)
    _close(run(variant, q, k, v), run(CORES.reference, q, k, v), atol=1e-6)
    _close(grads(variant), grads(CORES.reference))


# ---- cross-entropy ------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", [v for v in CROSS_ENTROPY if v != CROSS_ENTROPY.reference])
def test_cross_entropy_variant_matches_reference(variant):
    logits = jax.random.normal(jax.random.PRNGKey(0), (24, 50)) * 3
    targets = jax.random.randint(jax.random.PRNGKey(1), (24,), 0, 50)
    both = lambda name: jax.jit(jax.value_and_grad(CROSS_ENTROPY[name]))(logits, targets)
    _close(both(variant), both(CROSS_ENTROPY.reference), atol=1e-6)


@pytest.mark.parametrize("chunks", [2, 4])
def test_head_cross_entropy_in_slices_equals_whole(chunks):
    """The head applied a slice of positions at a time (each slice rematerialised): the same loss and
    gradients for the hidden states and the head as the whole [B, T, V] logits at once."""
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    h, head = jax.random.normal(ks[0], (3, 8, 16), jnp.bfloat16), jax.random.normal(ks[1], (16, 40)) * 0.3
    targets = jax.random.randint(ks[2], (3, 8), 0, 40)
    ce = CROSS_ENTROPY["onepass"]
    reference = CROSS_ENTROPY[CROSS_ENTROPY.reference]
    whole = lambda h, w: reference(h.reshape(-1, 16).astype(jnp.float32) @ w, targets.reshape(-1))
    f = lambda n: jax.jit(jax.value_and_grad(lambda h, w: head_cross_entropy(h, w, targets, ce, n), argnums=(0, 1)))
    _close(f(chunks)(h, head), jax.jit(jax.value_and_grad(whole, argnums=(0, 1)))(h, head), atol=1e-5)
    assert "remat" in str(jax.make_jaxpr(lambda h: head_cross_entropy(h, head, targets, ce, chunks))(h))


def test_head_chunks_keep_a_slice_within_its_bytes():
    assert dispatch.head_chunks(16, 128, 256) == 1  # the quickstart: nothing to slice
    n = dispatch.head_chunks(32, 4096, 102400)  # V2-Lite, 8 rows a chip on 4 chips, traced without a mesh
    assert 32 * (4096 // n) * 102400 * 4 <= dispatch.HEAD_CHUNK_BYTES < 32 * (4096 // (n // 2)) * 102400 * 4
    mesh = jax.make_mesh((4,), ("fsdp",), devices=jax.devices()[:4], axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):  # a device holds a quarter of the rows: a quarter of the slices
        assert dispatch.head_chunks(32, 4096, 102400) == n // 4


# ---- dispatch and the runtime -------------------------------------------------------------------
def test_experts_dispatch_on_cpu():
    rt = Runtime(platform="cpu")
    pick = lambda cfg, n: dispatch.experts_variant(rt, cfg, n)
    e, k = CFG.n_routed_experts, CFG.num_experts_per_tok
    assert pick(CFG, None) == "windowed"  # expert parallelism: tokens per device not known here
    assert pick(CFG, 1) == "dense"  # T*K < E, but all experts fit in a cache: one matmul
    big = CFG.replace(hidden_size=512, moe_intermediate_size=256)  # 3 x 8 x 512 x 256 x 4 B = 12 MB
    # bound by reading weights: only the chosen experts, up to 4 pairs per expert (decoding batches)
    assert pick(big, 1) == pick(big, dispatch.GATHER_MAX_PAIRS_PER_EXPERT * e // k) == "gather"
    assert pick(big, 4 * e // k + 1) == pick(CFG, dispatch.DENSE_MAX_TOKENS - 1) == "dense"
    assert pick(CFG, dispatch.DENSE_MAX_TOKENS) == "windowed"
    assert dispatch.experts_variant(Runtime(experts="gather"), CFG, 4096) == "gather"  # asked for: taken


@pytest.mark.parametrize("target", ["gpu", "tpu"])
def test_accelerator_targets_get_their_choices_on_a_cpu_host(target, monkeypatch):
    """A program compiled here for accelerators gets the accelerator's paths, whatever the host is."""
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    rt = Runtime(platform=target)
    assert dispatch.platform(rt) == target
    assert dispatch.experts_variant(rt, CFG, 1) == dispatch.experts_variant(rt, CFG, 10_000) == "ragged"
    _, opts = dispatch.attention(rt, CFG, cached=False, q_shape=(1, 256, 8, 80), kv_shape=(1, 256, 80),
                                 kv_dtype=jnp.float32, sorted_positions=True)
    assert (opts.core, opts.blocks) == ("plain", 1)
    # long sequences: the scores one chunk of keys at a time
    _, opts = dispatch.attention(rt, CFG, cached=False, q_shape=(1, 4096, 8, 80), kv_shape=(1, 4096, 80),
                                 kv_dtype=jnp.float32, sorted_positions=True)
    assert (opts.core, opts.blocks) == ("chunked", 4096 // dispatch.KEY_CHUNK)
    if target == "gpu":  # the device kind decides; a Hopper gets the Mosaic GPU kernels
        assert dispatch.kernel_backend(rt) in ("mosaic_gpu", "triton")
        assert capability_of_kind("NVIDIA H100 80GB HBM3") == capability_of_kind("NVIDIA H800") == 9.0
        assert resolve_backend("auto", "gpu", capability_of_kind("NVIDIA H200")) == "mosaic_gpu"
        assert resolve_backend("auto", "gpu", capability_of_kind("NVIDIA A100-SXM4-80GB")) == "triton"
    if target == "tpu":  # the Mosaic TPU kernels; a decode they cannot take falls back, saying why
        assert dispatch.kernel_backend(rt) == "mosaic_tpu"
        v3 = dict(q_shape=(8, 1, 128, 576), kv_shape=(8, 4096, 576), kv_dtype=jnp.bfloat16, sorted_positions=False)
        cfg = CFG.replace(kv_lora_rank=512, qk_rope_head_dim=64)
        assert dispatch.attention(rt, cfg, cached=True, **v3)[0] == "latent_kernel"
        odd = dict(v3, q_shape=(8, 1, 128, 80), kv_shape=(8, 4096, 80))  # C = 64: not whole 128-lane tiles
        assert dispatch.attention(rt, cfg.replace(kv_lora_rank=64, qk_rope_head_dim=16), cached=True, **odd)[0] \
            == "absorbed"
        assert "multiple of 128" in dispatch.kernel_refusal("mosaic_tpu", odd["q_shape"], odd["kv_shape"],
                                                            jnp.bfloat16, 64)


def test_platform_follows_the_mesh_not_the_host(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")  # must not be asked
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        assert jax.jit(lambda: jnp.zeros(()) + (dispatch.platform(Runtime()) == "cpu"))() == 1


def test_attention_dispatch():
    cpu = Runtime(platform="cpu")
    decode = dict(q_shape=(2, 1, 8, 80), kv_shape=(2, 64, 80), kv_dtype=jnp.float32, sorted_positions=False)
    assert dispatch.attention(cpu, CFG, cached=True, **decode)[0] == "absorbed"  # CPU: no kernel
    interp = Runtime(platform="cpu", kernel_backend="interpret")
    assert dispatch.attention(interp, CFG, cached=True, **decode)[0] == "latent_kernel"
    prefill = {**decode, "q_shape": (2, dispatch.DECODE_MAX_T + 1, 8, 80)}
    assert dispatch.attention(cpu, CFG, cached=True, **prefill)[0] == "naive"
    train = dict(q_shape=(2, 128, 8, 80), kv_shape=(2, 128, 80), kv_dtype=jnp.float32)
    name, opts = dispatch.attention(cpu, CFG, cached=False, sorted_positions=True, **train)
    assert (name, opts.core, opts.blocks) == ("naive", "blocked", dispatch.QUERY_BLOCKS)
    assert dispatch.attention(cpu, CFG, cached=False, sorted_positions=False, **train)[1].blocks == 1
    # A long prefill: [B,H,T,S] float32 scores past CPU_SCORES_BYTES go through the chunked core instead.
    long = dict(q_shape=(1, 32768, 8, 80), kv_shape=(1, 32768, 80), kv_dtype=jnp.float32, sorted_positions=False)
    assert 8 * 32768 ** 2 * 4 > dispatch.CPU_SCORES_BYTES
    assert dispatch.attention(cpu, CFG, cached=True, **long)[1][1:3] == ("chunked", 32768 // dispatch.KEY_CHUNK)
    at_limit = dict(long, q_shape=(1, 8192, 8, 80), kv_shape=(1, 8192, 80))  # 2 GiB: still the blocked core
    assert dispatch.attention(cpu, CFG, cached=True, **at_limit)[1][1] == "blocked"
    with pytest.raises(ValueError, match="latent_kernel"):  # asked for where it cannot run: said so
        dispatch.attention(Runtime(attention="latent_kernel"), CFG, cached=False, sorted_positions=True, **train)


def test_runtime_validates_against_the_registries():
    assert set(choices("experts")) == {"auto", *EXPERTS.names}
    assert set(choices("attention")) == {"auto", *ATTENTION.names}
    with pytest.raises(ValueError, match="Runtime.experts = 'sparse'.*dense"):
        Runtime(experts="sparse")
    with pytest.raises(ValueError, match="ragged"):  # FP8 GEMMs run on the ragged path only: no silent override
        Runtime(fp8=True, experts="dense")
    with pytest.raises(ValueError, match="Runtime.dtype"):
        Runtime(dtype="int8")
    with pytest.raises(ValueError, match="true or false"):
        Runtime(fp8=1)
    assert Runtime(fp8=True).experts == "auto"


def test_kernels_run_on_each_devices_rows_under_a_mesh():
    """A Pallas call is not partitioned by the compiler: under a mesh the decode kernel and the FP8 linear
    run on each device's rows (`rules.local_rows`), with the same values as on one device, gradients too."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from dsv3_jax.ops.linear import linear
    from dsv3_jax.parallel.mesh import make_mesh, parse_mesh

    q_nope, q_pe, kv, q_pos, _, wkv_b = _attention_args(True)
    opts = AttentionOptions(0.3, backend="interpret")
    decode = lambda *a: ATTENTION["latent_kernel"](*a, q_pos, None, KvWeights(wkv_b), opts)
    x = jax.random.normal(jax.random.PRNGKey(3), (4, 6, 256))
    w = jax.random.normal(jax.random.PRNGKey(4), (256, 128)) / 16
    fp8 = lambda x, w: jnp.sum(jnp.sin(linear(x, w, fp8=True, backend="interpret")))
    want = decode(q_nope, q_pe, kv), jax.value_and_grad(fp8, argnums=(0, 1))(x, w)
    mesh = make_mesh(parse_mesh("fsdp=2", 2), devices=jax.devices()[:2])
    rows = lambda a: jax.device_put(a, NamedSharding(mesh, P("fsdp")))
    with jax.set_mesh(mesh):
        assert q_nope.shape[0] % 2 == 0
        text = jax.jit(decode).lower(rows(q_nope), rows(q_pe), rows(kv)).as_text()
        assert "shard_map" in text or "sdy.manual_computation" in text
        got = jax.jit(decode)(rows(q_nope), rows(q_pe), rows(kv)), jax.jit(jax.value_and_grad(fp8, argnums=(0, 1)))(
            rows(x), w)
    _close(got[0], want[0], atol=1e-5)
    (value, (dx, dw)), (want_value, (want_dx, want_dw)) = got[1], want[1]
    _close((value, dx), (want_value, want_dx), atol=1e-4)
    # The weight gradient sums each device's rows in FP8: its 1x128 tiles of dy run along the tokens a
    # device holds, so the scales (and roundings) differ from one device's; the sum is close, not equal.
    assert float(jnp.linalg.norm(dw - want_dw) / jnp.linalg.norm(want_dw)) < 5e-2


def test_8bit_weights_take_the_weight_only_gemm_on_kernel_backends():
    """An `Fp8Weight` on a kernel backend is read 8-bit by the weight-only FP8 GEMM (here Pallas' interpreter),
    under a mesh on each device's rows: the dequantise-then-matmul result, to float32 rounding."""
    from dsv3_jax.ops.linear import Fp8Weight, linear
    from dsv3_jax.parallel.mesh import make_mesh, parse_mesh

    x = jax.random.normal(jax.random.PRNGKey(5), (4, 3, 192))  # the weight's input is 2 x 96
    w = Fp8Weight.quantize(jax.random.normal(jax.random.PRNGKey(6), (2, 96, 200)) / 8, in_dims=2)
    want = linear(x, w, in_dims=2)  # "xla": dequantised, then a matmul
    got = jax.jit(lambda x: linear(x, w, in_dims=2, backend="interpret"))(x)
    assert got.shape == want.shape == (4, 3, 200)
    _close(got, want, atol=1e-5)
    with jax.set_mesh(make_mesh(parse_mesh("fsdp=2", 2), devices=jax.devices()[:2])):
        text = jax.jit(lambda x: linear(x, w, in_dims=2, backend="interpret")).lower(x).as_text()
        assert "f8E4M3" in text  # the weight enters the kernel 8-bit
        _close(jax.jit(lambda x: linear(x, w, in_dims=2, backend="interpret"))(x), want, atol=1e-5)
