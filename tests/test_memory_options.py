"""What makes real sizes fit (issue 14), each tested against the plain step on CPU: rematerialisation
policies (the same gradients), gradient accumulation (the same step, in microbatches) and AdamW
moments in BF16 (the documented rounding of the optimizer state, nothing else)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import Transformer, init_variables
from dsv3_jax.ops.remat import NONE, OFFLOAD_ATTENTION, REMAT
from dsv3_jax.runtime import Runtime
from dsv3_jax.train.loop import BF16_MOMENTS_MIN_PARAMS, TrainConfig, TrainingError, optim_config, run
from dsv3_jax.train.step import OptimConfig, accumulated_gradients, init_state, jit_steps

CFG = ModelConfig.from_json("tiny")


def _window(rows=4, seed=0):
    t = 16 + 1 + CFG.mtp_depth
    return jnp.asarray(np.random.RandomState(seed).randint(0, CFG.vocab_size, (rows, t)), jnp.int32)


def _close_trees(got, want, tol):
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol * max(1e-6, float(jnp.abs(w).max())))


@pytest.mark.parametrize("policy", [p for p in REMAT if p not in (NONE, OFFLOAD_ATTENTION)])
def test_remat_policy_keeps_loss_and_gradients(policy):
    """Same loss and gradients as no remat (MTP block included), and the program really rematerialises."""
    variables = init_variables(CFG, jax.random.PRNGKey(0))
    tokens = _window()[:, :16]

    def value_and_grad(rt):
        def loss(params):
            logits, mtp = Transformer(CFG, rt).apply({**variables, "params": params}, tokens, return_mtp=True)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + jnp.mean(jax.nn.log_softmax(mtp)[..., 1])
        return jax.value_and_grad(loss)

    plain = jax.jit(value_and_grad(Runtime()))(variables["params"])
    f = value_and_grad(Runtime(remat=policy))
    assert "remat" in str(jax.make_jaxpr(f)(variables["params"]))  # the blocks are checkpointed
    assert "remat" not in str(jax.make_jaxpr(value_and_grad(Runtime()))(variables["params"]))
    _close_trees(jax.jit(f)(variables["params"]), plain, 1e-5)


def test_offload_is_refused_on_cpu_with_its_reason():
    variables = init_variables(CFG, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="pinned host memory"):
        Transformer(CFG, Runtime(remat=OFFLOAD_ATTENTION)).apply(variables, _window()[:, :16])


@pytest.mark.parametrize("n", [2, 4])
def test_gradient_accumulation_equals_the_whole_batch(n):
    """Every loss term is a mean over equal-sized microbatches: the parts, the expert loads and the
    gradients of n microbatches average to the whole batch's."""
    state = init_state(CFG, OptimConfig(), 0)
    window = _window(rows=8, seed=1)
    whole = jax.jit(lambda w: accumulated_gradients(state.params, state.router, w, CFG, OptimConfig()))(window)
    micro = jax.jit(lambda w: accumulated_gradients(state.params, state.router, w, CFG,
                                                    OptimConfig(grad_accum=n)))(window)
    _close_trees(micro, whole, 2e-5)
    with pytest.raises(ValueError, match="does not split"):
        accumulated_gradients(state.params, state.router, window[:6], CFG, OptimConfig(grad_accum=4))


def test_bf16_moments_round_the_state_only():
    """The moments are stored in BF16 (half the bytes), in the same state tree as float32's, and the
    first steps' losses follow the float32 run's to within BF16 rounding of the state."""
    f32, bf16 = OptimConfig(warmup_steps=1), OptimConfig(warmup_steps=1, moments_dtype="bfloat16")
    states = {o: init_state(CFG, o, 0) for o in (f32, bf16)}
    assert (jax.tree_util.tree_structure(states[f32].opt_state)
            == jax.tree_util.tree_structure(states[bf16].opt_state))
    floats = lambda o: [x.dtype for x in jax.tree_util.tree_leaves(states[o].opt_state) if x.ndim]
    assert set(floats(f32)) == {jnp.dtype("float32")} and set(floats(bf16)) == {jnp.dtype("bfloat16")}
    losses = {}
    for o in (f32, bf16):
        train, _ = jit_steps(CFG, o)
        state, losses[o] = jax.tree_util.tree_map(jnp.copy, states[o]), []
        for k in range(4):
            state, m = train(state, _window(seed=k))
            losses[o].append(float(m["loss"]))
    assert losses[f32][0] == losses[bf16][0]  # the same parameters before the first update
    np.testing.assert_allclose(losses[bf16], losses[f32], rtol=2e-3)
    assert losses[bf16] != losses[f32]  # and the rounding does reach the weights


def test_moments_auto_follows_the_model_size(tmp_path):
    tc = TrainConfig(workdir=str(tmp_path))
    assert optim_config(tc, CFG).moments_dtype == "float32"
    lite = ModelConfig.from_json("deepseek_v2_lite_16b")
    assert lite.total_params >= BF16_MOMENTS_MIN_PARAMS
    assert optim_config(tc, lite).moments_dtype == "bfloat16"
    assert optim_config(TrainConfig(workdir="x", moments="float32"), lite).moments_dtype == "float32"
    with pytest.raises(TrainingError, match="--grad_accum=3: must be a positive integer dividing --batch_size"):
        optim_config(TrainConfig(workdir="x", batch_size=16, grad_accum=3), CFG)


def test_training_run_with_every_option_resumes_exactly(tmp_path):
    """remat, microbatches and BF16 moments together through the training loop, stopped and resumed:
    the same losses as one uninterrupted run."""
    text = "".join(f"def f{i}(x):\n    return x * {i % 7}\n\n" for i in range(300))
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.py").write_text(text)
    (tmp_path / "corpus" / "b.py").write_text(text[::-1])
    kw = dict(data=(str(tmp_path / "corpus"),), steps=6, batch_size=4, seq_len=32, warmup_steps=1, eval_every=3,
              eval_batches=1, sample_tokens=0, plots=False, remat="full", grad_accum=2, moments="bfloat16")
    full = run(TrainConfig(workdir=str(tmp_path / "full"), **kw))["losses"]
    first = run(TrainConfig(workdir=str(tmp_path / "split"), stop_after=3, checkpoint_every=3, **kw))["losses"]
    rest = run(TrainConfig(workdir=str(tmp_path / "split"), **kw))["losses"]
    assert {**first, **rest} == full
