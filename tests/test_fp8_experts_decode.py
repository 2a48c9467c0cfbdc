"""8-bit routed experts in decoding: stacked `Fp8Weight`s go through the grouped weight-only FP8 GEMM (read 8-bit,
dequantised in the kernel) on kernel backends, here Pallas' interpreter; the dequantise-first path's results, on one
device and on meshes (per device's tokens, expert-parallel); what dispatch refuses, with its reason; and the call at
DeepSeek-V3's expert shapes compiled by libtpu for TPUs (compile-only)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.config import ModelConfig
from dsv3_jax.infer.engine import GenerateConfig, Generator
from dsv3_jax.infer.weights import convert_weights, runtime_for
from dsv3_jax.model import Transformer, init_variables
from dsv3_jax.ops import dispatch
from dsv3_jax.ops import linear as linear_op
from dsv3_jax.ops.linear import Fp8Weight
from dsv3_jax.parallel.mesh import make_mesh, parse_mesh
from dsv3_jax.runtime import Runtime

SMALL = ModelConfig.from_json("small")  # hidden 256, expert FFN 128: two 128-blocks along D, one along F
KERNEL = dict(experts="ragged", kernel_backend="interpret")


@pytest.fixture
def gemm_calls(monkeypatch):
    """Counts the grouped weight-only FP8 GEMM's calls made by the experts' grouped matmul (at trace time)."""
    calls = []
    real = linear_op.fp8_grouped_weight_gemm

    def spy(x, w, w_scale, group_sizes, **kw):
        calls.append((x.shape, w.shape, w.dtype, kw["backend"], kw.get("w_layout", "nk")))
        return real(x, w, w_scale, group_sizes, **kw)

    monkeypatch.setattr(linear_op, "fp8_grouped_weight_gemm", spy)
    return calls


def _experts(cfg, seed, t):
    """x [t, D], routing [t, K] and the experts' weights as 8-bit Fp8Weights (rows of very different magnitude,
    so a block scale read for the wrong expert or block shows)."""
    e, d, f, k = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    keys = jax.random.split(jax.random.PRNGKey(seed), 6)
    x = jax.random.normal(keys[0], (t, d))
    gates = jax.random.uniform(keys[1], (t, k))
    ids = jax.vmap(lambda key: jax.random.permutation(key, e)[:k])(jax.random.split(keys[2], t)).astype(jnp.int32)
    spread = 10.0 ** (jnp.arange(e) % 3 - 1.0)[:, None, None]
    ws = [jax.random.normal(key, shape) * spread / 8 for key, shape in zip(keys[3:], [(e, d, f), (e, d, f), (e, f, d)])]
    return x, gates, ids, [Fp8Weight.quantize(w, stacked=True) for w in ws]


def test_dispatch_says_when_8bit_experts_take_the_kernel():
    cfg = SMALL
    x, _, _, ws = _experts(cfg, 0, 4)
    refusal = lambda rt, dtype=jnp.float32, ws=ws: dispatch.fp8_experts_refusal(rt, cfg, 4, dtype, *ws)
    assert refusal(Runtime(**KERNEL)) is None
    assert refusal(Runtime(platform="tpu")) is None  # auto: ragged experts, mosaic_tpu
    assert refusal(Runtime(platform="tpu", dtype="bfloat16"), jnp.bfloat16) is None
    assert refusal(Runtime(platform="cpu", experts="ragged")) == "the kernel backend resolves to 'xla' on this platform"
    assert "'dense' experts path" in refusal(Runtime(experts="dense", kernel_backend="interpret"))
    assert "Runtime.fp8" in refusal(Runtime(fp8=True, kernel_backend="interpret"))
    assert "float16" in refusal(Runtime(**KERNEL), jnp.float16)
    assert "has no weight-only FP8 GEMM" in refusal(Runtime(platform="gpu", kernel_backend="triton"))
    dense = [w.dequantize(jnp.float32) for w in ws]
    assert "not 8-bit" in refusal(Runtime(**KERNEL), ws=dense)


def test_8bit_experts_take_the_grouped_weight_only_gemm(gemm_calls):
    """The kernel's result is the dequantise-first result (the products of f32 activations and dequantised weights
    round once either way), and each of w1, w3, w2 enters the kernel 8-bit as the model holds it, [E, in, out]
    (w_layout "kn"): a transposed copy would cost a read and a write of every expert's weight a step."""
    cfg = SMALL
    x, gates, ids, ws = _experts(cfg, 1, 6)
    e, d, f = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    want = dispatch.routed_experts(Runtime(experts="dense"), cfg, x, gates, ids, *ws)
    got = jax.jit(lambda x: dispatch.routed_experts(Runtime(**KERNEL), cfg, x, gates, ids, *ws))(x)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * float(jnp.abs(want).max()))
    k = cfg.num_experts_per_tok
    assert gemm_calls == [((6 * k, d), (e, d, f), jnp.float8_e4m3fn, "interpret", "kn")] * 2 + \
        [((6 * k, f), (e, f, d), jnp.float8_e4m3fn, "interpret", "kn")]


@pytest.mark.parametrize("mesh,chunks", [("fsdp=4", 1), ("fsdp=2,expert=2", 1), ("expert=4", 2)])
def test_8bit_experts_on_meshes(gemm_calls, monkeypatch, mesh, chunks):
    """Per device's tokens (`data_parallel`, every expert whole) and expert-parallel (each device's experts'
    8-bit values and scales, in token chunks too): the one-device result."""
    cfg = SMALL
    x, gates, ids, ws = _experts(cfg, 2, 16)
    want = dispatch.routed_experts(Runtime(experts="dense"), cfg, x, gates, ids, *ws)
    if chunks > 1:
        monkeypatch.setattr(dispatch, "EP_BUFFER_BYTES", 1)
    with jax.set_mesh(make_mesh(parse_mesh(mesh, 4), devices=jax.devices()[:4])):
        got = jax.jit(lambda x: dispatch.routed_experts(Runtime(**KERNEL), cfg, x, gates, ids, *ws))(x)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * float(jnp.abs(want).max()))
    local = cfg.n_routed_experts // (2 if "expert=2" in mesh else 4 if "expert" in mesh else 1)
    assert len(gemm_calls) == 3 and all(w[0] == local for _, w, *_ in gemm_calls)


def _decode_logits(cfg, rt, variables, tokens, cache):
    b, s = tokens.shape
    step = lambda v, w, p, c: Transformer(cfg, rt).apply(v, w, p, c, method=Transformer.step)[0]
    return jax.jit(step)(variables, tokens[:, -1:], jnp.full((b, 1), s - 1), cache)


def test_decoding_with_8bit_experts_through_the_kernel(gemm_calls):
    """A decode step of a model served with FP8 weights (bf16 compute), its routed experts through the grouped
    weight-only FP8 GEMM: the logits of the default path, which dequantises every expert first, to bf16 rounding.
    `small` cut to its dense layer and one MoE layer (the interpreter runs every kernel of a step)."""
    cfg = SMALL.replace(num_layers=2)
    variables = convert_weights(cfg, init_variables(cfg, jax.random.PRNGKey(0)), "fp8")
    b, s = 2, 12
    tokens = jax.random.randint(jax.random.PRNGKey(1), (b, s), 0, cfg.vocab_size)
    g = Generator(cfg, GenerateConfig(), runtime=runtime_for("fp8"))
    prefill = jax.jit(lambda v, t, p, c: Transformer(cfg, runtime_for("fp8")).apply(v, t, p, c,
                                                                                    method=Transformer.step)[2])
    positions = jnp.broadcast_to(jnp.arange(s - 1), (b, s - 1))
    cache = prefill(variables, tokens[:, :-1], positions, g._empty_cache(b, s, cfg.num_layers))
    want = _decode_logits(cfg, runtime_for("fp8"), variables, tokens, cache)
    assert not gemm_calls
    got = _decode_logits(cfg, runtime_for("fp8", **KERNEL), variables, tokens, cache)
    moe_layers = cfg.num_layers - cfg.first_k_dense
    assert len(gemm_calls) == 3 * moe_layers and all(c[2] == jnp.float8_e4m3fn for c in gemm_calls)
    assert all(c[0][0] == b * cfg.num_experts_per_tok for c in gemm_calls)  # one token a row: T*K rows
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert float(np.linalg.norm(got - want) / np.linalg.norm(want)) < 2e-2  # 0.7% measured


def test_linear_8bit_weight_takes_the_weight_only_gemm(monkeypatch):
    """A non-stacked `Fp8Weight` on a kernel backend reaches the weight-only FP8 GEMM (the question `linear` asks
    `supports` names the operands' [M, K] and [N, K] shapes), its 8-bit values as the leaf holds them, [K, N]."""
    calls = []
    real = linear_op.fp8_weight_gemm
    spy = lambda x, q, s, **kw: calls.append((q.shape, kw["w_layout"])) or real(x, q, s, **kw)
    monkeypatch.setattr(linear_op, "fp8_weight_gemm", spy)
    x = jax.random.normal(jax.random.PRNGKey(5), (4, 3, 192))
    w = Fp8Weight.quantize(jax.random.normal(jax.random.PRNGKey(6), (2, 96, 200)) / 8, in_dims=2)
    assert w.matrix_shape == (200, 192)
    got = linear_op.linear(x, w, in_dims=2, backend="interpret")
    assert calls == [((192, 200), "kn")]
    want = linear_op.linear(x, w, in_dims=2)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- compiled by libtpu for TPUs

V3 = ModelConfig.from_json("deepseek_v3_671b")


@pytest.mark.parametrize("target", ["v5e:2x2", "tpu7x:2x2x1"])
def test_v3_expert_shapes_compile_for_tpus(target, gemm_calls):
    """A decode step's routed experts at V3's shapes (D 7168, F 2048; 8 experts a device here, not 256, to stay
    small) under an fsdp mesh of TPU devices: three grouped weight-only GEMMs on 8-bit weights, compiled."""
    pytest.importorskip("libtpu", reason="compile-only TPU targets need libtpu: pip install 'jax[tpu]==0.10.2'")
    from dsv3_jax.plan import topology_devices

    devices = topology_devices(target)
    cfg = V3  # the experts' count is the weights' (8 here); the config gives D, F and K
    e, d, f, k, t = 8, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok, 32
    mesh = make_mesh(parse_mesh(f"fsdp={len(devices)}", len(devices)), devices=devices)
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)
    fp8 = lambda a, b: Fp8Weight(sds((e, a, b), jnp.float8_e4m3fn), sds((e, b // 128, a // 128), jnp.float32),
                                 stacked=True)
    ws = (fp8(d, f), fp8(d, f), fp8(f, d))
    assert dispatch.fp8_experts_refusal(Runtime(dtype="bfloat16", platform="tpu"), cfg, t, jnp.bfloat16, *ws) is None
    temps = {}
    for backend in ("auto", "xla"):  # mosaic_tpu: the kernel; xla: every expert dequantised to bf16 first
        rt = Runtime(dtype="bfloat16", platform="tpu", kernel_backend=backend)
        with jax.set_mesh(mesh):
            fn = jax.jit(lambda x, g, i, *w, rt=rt: dispatch.routed_experts(rt, cfg, x, g, i, *w))
            args = sds((t, d), jnp.bfloat16), sds((t, k), jnp.float32), sds((t, k), jnp.int32), *ws
            temps[backend] = fn.lower(*args).compile().memory_analysis().temp_size_in_bytes / (e * d * f)
    assert [c[3] for c in gemm_calls] == ["mosaic_tpu"] * 3
    # The kernel reads the weights in place: no copy of them (measured, in a weight's 8-bit bytes: 0.011x v5e,
    # 0.009x TPU7x; 1.0x and 2.0x when they were moved to [E, out, in] first), where dequantising holds bf16 copies
    # (6.1x v5e, 10.0x TPU7x).
    assert temps["auto"] < 0.1 and temps["xla"] > 4, temps
