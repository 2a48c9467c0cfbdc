"""FP8 training (Runtime.fp8, --precision=fp8): which matmuls go through the E4M3 GEMMs, how close
the numbers stay to BF16, and the training loop at fp8 (V3 report s.3.3)."""
import collections
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from dsv3_jax.config import ModelConfig
from dsv3_jax.layers.mla import MLA
from dsv3_jax.layers.mlp import MLP
from dsv3_jax.layers.moe import MoE
from dsv3_jax.model import Transformer, init_variables, variable_shapes
from dsv3_jax.runtime import Runtime
from dsv3_jax.train.loop import TrainConfig, TrainingError, model_config, run, runtime

CFG = ModelConfig.from_json("tiny")
FP32 = Runtime()
BF16 = Runtime(dtype="bfloat16")
FP8 = BF16.replace(fp8=True)
DENSE, GROUPED, KGROUPED = "_fp8_gemm", "_fp8_grouped_gemm", "fp8_kgrouped_gemm_reference"
ATTENTION = ("wq", "wq_a", "wq_b", "wkv_a", "wkv_b", "wo")


@pytest.fixture(scope="module")
def variables():
    return init_variables(CFG, jax.random.PRNGKey(1))


SHAPES = variable_shapes(CFG)  # tracing needs no values


def _tokens(shape=(2, 32), seed=1):
    return jnp.asarray(np.random.RandomState(seed).randint(0, CFG.vocab_size, shape), jnp.int32)


def _rel(a, b) -> float:
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _cos(a, b) -> float:
    a, b = jnp.ravel(a).astype(jnp.float32), jnp.ravel(b).astype(jnp.float32)
    return float(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


def _fp8_gemms(fn, *args):
    """Counts of the FP8 GEMM calls in fn's jaxpr (any backend: the jitted wrappers are named), the
    weight operands' shapes of each kind, and the number of conversions to E4M3."""
    counts, shapes = collections.Counter(), collections.defaultdict(list)

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            name = eqn.params.get("name")
            if eqn.primitive.name in ("pjit", "jit") and name in (DENSE, GROUPED, KGROUPED):
                counts[name] += 1
                shapes[name].append(tuple(eqn.invars[2].aval.shape))
            if eqn.primitive.name == "convert_element_type" and eqn.params["new_dtype"] == jnp.float8_e4m3fn:
                counts["to_e4m3"] += 1
            for p in eqn.params.values():
                for sub in p if isinstance(p, (list, tuple)) else (p,):
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return counts, shapes


def _linear_weights(params) -> tuple[list, list]:
    """The GEMM operand B ([N, K], or [E, N, K] for routed experts) of every linear layer: attention
    projections, dense FFN, shared and routed experts. Not the embedding, head, router or eh_proj."""
    dense, grouped = [], []
    for path, w in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = ["", *(k.key for k in path)]
        if keys[-2] == "attn" and keys[-1] in ATTENTION:
            k_dims = 2 if keys[-1] == "wo" else 1  # wo [H, V, D] is read as [H*V, D]
            dense.append((math.prod(w.shape[k_dims:]), math.prod(w.shape[:k_dims])))
        elif keys[-1] in ("w1", "w2", "w3"):
            if w.ndim == 3:
                grouped.append((w.shape[0], w.shape[2], w.shape[1]))
            else:
                dense.append((w.shape[1], w.shape[0]))
    return sorted(dense), sorted(grouped)


def test_runtime_field_and_precision_flag():
    with pytest.raises(ValueError, match="Runtime.fp8"):
        Runtime(fp8=1)
    with pytest.raises(ValueError, match="Runtime.experts = 'dense'"):
        Runtime(fp8=True, experts="dense")  # FP8 runs the routed experts on the ragged path
    # Checkpoints are not tied to the precision: it is no field of the model's identity.
    assert "fp8" not in CFG.to_dict()
    tc = lambda **kw: TrainConfig(workdir="unused", **kw)
    assert model_config(tc(precision="fp8")) == model_config(tc(precision="fp32"))
    assert runtime(tc(precision="fp8")) == FP8
    assert runtime(tc(precision="bf16")) == BF16
    assert runtime(tc(precision="fp32")) == FP32
    with pytest.raises(TrainingError, match="--precision"):
        runtime(tc(precision="fp4"))
    with pytest.raises(TrainingError, match="ragged"):
        runtime(tc(precision="fp8", experts="dense"))


def test_forward_takes_fp8_gemms_for_linear_layers_only():
    """Exactly one FP8 GEMM per linear layer in the forward pass (main model and MTP block), with that
    layer's weight shape; the router, head and MTP projection have shapes of their own and are absent."""
    tokens = _tokens()
    fwd = lambda rt: lambda v, t: Transformer(CFG, rt).apply(v, t, return_mtp=True)
    counts, shapes = _fp8_gemms(fwd(FP8), SHAPES, tokens)
    dense, grouped = _linear_weights(SHAPES["params"])
    # tiny: 3 attentions x 5, one dense FFN x 3, two shared experts x 3; two MoE layers x 3 grouped
    assert (len(dense), len(grouped)) == (24, 6)
    assert sorted(shapes[DENSE]) == dense
    assert sorted(shapes[GROUPED]) == grouped
    assert counts[KGROUPED] == 0 and counts["to_e4m3"] >= 2 * (len(dense) + len(grouped))
    counts16, _ = _fp8_gemms(fwd(BF16), SHAPES, tokens)
    assert not counts16  # no FP8 at all when the flag is off
    # The absorbed path folds wkv_b into the attention core's einsums, which stay in BF16.
    absorbed, _ = _fp8_gemms(fwd(FP8.replace(attention="absorbed")), SHAPES, tokens)
    assert absorbed[DENSE] == len(dense) - 3 and absorbed[GROUPED] == len(grouped)


def test_backward_runs_dgrad_and_wgrad_in_fp8():
    tokens = _tokens()

    def loss(params, router):
        logits, mtp = Transformer(CFG, FP8).apply({"params": params, "router": router}, tokens, return_mtp=True)
        return jnp.mean(logits ** 2) + jnp.mean(mtp ** 2)

    counts, _ = _fp8_gemms(jax.grad(loss), SHAPES["params"], SHAPES["router"])
    dense, grouped = _linear_weights(SHAPES["params"])
    assert counts[DENSE] == 3 * len(dense)  # Fprop, Dgrad, Wgrad
    assert counts[GROUPED] == 2 * len(grouped) and counts[KGROUPED] == len(grouped)


def test_logits_close_to_bf16_but_not_equal(variables):
    tokens = _tokens()
    logits = {name: jax.jit(Transformer(CFG, rt).apply)(variables, tokens)
              for name, rt in (("fp32", FP32), ("bf16", BF16), ("fp8", FP8))}
    err = _rel(logits["fp8"], logits["bf16"])
    assert err < 0.05  # relative Frobenius error of the logits, FP8 vs BF16 (measured 3.1%)
    # Quantisation really happened: FP8 is further from FP32 than BF16 is (measured 3.1% vs 0.4%).
    assert _rel(logits["fp8"], logits["fp32"]) > 2 * _rel(logits["bf16"], logits["fp32"])


def _module_grads(module, variables, x, cotangent):
    def f(params, x):
        out, state = module.apply({**variables, "params": params}, x, mutable=["intermediates"])
        return jnp.sum(out.astype(jnp.float32) * cotangent), state

    (_, state), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(variables["params"], x)
    return grads, state


@pytest.mark.parametrize("layer", ["attention", "dense_ffn", "moe"])
def test_layer_gradients_close_to_bf16(layer):
    """Same inputs, same params: every weight's gradient (and the input's) under FP8 has cosine > 0.99
    with BF16's (measured >= 0.995) and a relative error < 15% (measured 6-10%: E4M3 keeps 3 mantissa
    bits). For the MoE, the routing is identical: the router runs in float32 on the same inputs."""
    rng = np.random.RandomState(2)
    x = jnp.asarray(rng.randn(2, 32, CFG.hidden_size), jnp.bfloat16)
    cotangent = jnp.asarray(rng.randn(*x.shape), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(32, dtype=jnp.int32), (2, 32))
    make = {"attention": lambda rt: MLA(CFG, rt), "moe": lambda rt: MoE(CFG, rt),
            "dense_ffn": lambda rt: MLP(CFG.hidden_size, CFG.intermediate_size, CFG.init_std, rt)}[layer]
    if layer == "attention":
        mods = {n: (lambda m: _Bound(m, positions))(make(rt)) for n, rt in (("bf16", BF16), ("fp8", FP8))}
    else:
        mods = {n: make(rt) for n, rt in (("bf16", BF16), ("fp8", FP8))}
    variables = nn.unbox(jax.jit(mods["bf16"].init)(jax.random.PRNGKey(3), x))
    if layer == "moe":
        variables = {**variables, "router": {"bias": 0.05 * jax.random.normal(jax.random.PRNGKey(4), (8,))}}
    res = {n: _module_grads(m, variables, x, cotangent) for n, m in mods.items()}
    (g16, dx16), _ = res["bf16"]
    (g8, dx8), _ = res["fp8"]
    leaves16 = jax.tree_util.tree_leaves_with_path(g16)
    leaves8 = jax.tree_util.tree_leaves(g8)
    checked = 0
    for (path, a), b in zip(leaves16, leaves8, strict=True):
        if a.ndim >= 2:  # the weights (norm scales are vectors)
            assert _cos(b, a) > 0.99 and _rel(b, a) < 0.15, path
            checked += 1
    assert checked == {"attention": 5, "dense_ffn": 3, "moe": 7}[layer]
    assert _cos(dx8, dx16) > 0.99 and _rel(dx8, dx16) < 0.15
    assert _rel(dx8, dx16) > 1e-3  # and the FP8 path really changed the numbers
    if layer == "moe":
        r16 = res["bf16"][1]["intermediates"]["routing"][0]
        r8 = res["fp8"][1]["intermediates"]["routing"][0]
        np.testing.assert_array_equal(r8.experts, r16.experts)
        np.testing.assert_array_equal(r8.scores, r16.scores)


class _Bound:
    """An MLA with its positions fixed, so that it takes (variables, x) like the other layers."""

    def __init__(self, module, positions):
        self.module, self.positions = module, positions

    def init(self, rng, x):
        return self.module.init(rng, x, self.positions)

    def apply(self, variables, x, mutable):
        return self.module.apply(variables, x, self.positions, mutable=mutable)


def test_expert_parallel_fp8_matches_single_device():
    """Under an expert mesh the local experts run the same FP8 grouped GEMMs. Float32 activations, so
    that only FP8 rounding differs: the same loss and input gradient; weight gradients close (Wgrad's
    1x128 tiles along the tokens hold other rows per device; measured ~3%)."""
    cfg = CFG.replace(hidden_size=32, moe_intermediate_size=16, n_routed_experts=16,
                      num_experts_per_tok=4, n_group=1, topk_group=1, n_shared_experts=0)
    fp8 = Runtime(fp8=True)  # float32 activations
    rng = np.random.RandomState(6)
    x = jnp.asarray(rng.randn(2, 16, 32), jnp.float32)
    cotangent = jnp.asarray(rng.randn(2, 16, 32), jnp.float32)
    variables = nn.unbox(jax.jit(MoE(cfg, fp8).init)(jax.random.PRNGKey(0), x))

    def loss(rt):
        return lambda p, x: jnp.sum(MoE(cfg, rt).apply({**variables, "params": p}, x) * cotangent)

    grad = jax.jit(jax.value_and_grad(loss(fp8), argnums=(0, 1)))
    want_loss, (want_g, want_dx) = grad(variables["params"], x)
    with jax.set_mesh(jax.make_mesh((2, 4), ("data", "expert"), axis_types=(AxisType.Auto,) * 2)):
        assert "all_to_all" in grad.lower(variables["params"], x).as_text()
        got_loss, (got_g, got_dx) = grad(variables["params"], x)
    assert abs(float(got_loss - want_loss)) < 1e-5 * abs(float(want_loss))
    assert _rel(got_dx, want_dx) < 1e-5 and _rel(got_g["router"], want_g["router"]) < 1e-5
    for name in ("w1", "w2", "w3"):
        assert _rel(got_g[name], want_g[name]) < 0.06, name
    f32_loss = jax.jit(loss(fp8.replace(fp8=False)))(variables["params"], x)
    assert abs(float(f32_loss - want_loss)) > 1e-3 * abs(float(want_loss))  # the flag reaches the experts


def test_fp32_checkpoint_resumes_and_learns_at_fp8(tmp_path, corpus):
    """Two steps at fp32 and a checkpoint; the same workdir resumed at fp8 for ten more steps learns.
    The tiny preset cut to one MoE layer without MTP (attention, shared and routed experts all in FP8),
    to keep the two compilations short."""
    model = tmp_path / "one_layer.json"
    model.write_text(json.dumps({**CFG.to_dict(), "num_layers": 1, "first_k_dense": 0, "mtp_depth": 0}))
    base = dict(workdir=str(tmp_path / "wd"), model=str(model), data=(corpus,), steps=12, batch_size=4, seq_len=32,
                lr=1e-2, warmup_steps=2, eval_every=100, log_every=3, eval_batches=1, sample_tokens=0, plots=False)
    first = run(TrainConfig(**base, stop_after=2, precision="fp32"))
    resumed = run(TrainConfig(**base, precision="fp8"))
    assert resumed["start_step"] == 2
    losses = resumed["losses"]
    assert sorted(losses) == list(range(3, 13)) and all(math.isfinite(v) for v in losses.values())
    assert losses[12] < 0.6 * losses[3]  # measured 5.07 -> 2.16
    assert resumed["eval_loss"] < 0.6 * first["first_eval_loss"]  # measured 5.57 -> 2.20
