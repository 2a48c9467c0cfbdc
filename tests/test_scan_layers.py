"""Scanned layers (issue 14): `Runtime(scan_layers=True)` compiles each stack of blocks once, as one
`nn.scan` over parameters stacked on a leading "layers" axis. The layout changes, the function does
not: the same initial values for a seed, the same logits, losses, gradients and updates as the
per-layer model, alone and with remat, on one device and on a mesh; `stack_layers` and
`unstack_layers` carry any variables-shaped tree between the two layouts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from dsv3_jax.config import ModelConfig
from dsv3_jax.export import restore_variables
from dsv3_jax.model import (
    DENSE_STACK,
    MOE_STACK,
    Transformer,
    init_variables,
    logical_axes,
    stack_layers,
    stacks,
    unstack_layers,
    variable_shapes,
)
from dsv3_jax.parallel.mesh import make_mesh, parse_mesh
from dsv3_jax.parallel.rules import batch_sharding
from dsv3_jax.runtime import Runtime
from dsv3_jax.train.loop import TrainConfig, run
from dsv3_jax.train.step import OptimConfig, init_state, init_state_sharded, jit_steps, state_shardings

CFG = ModelConfig.from_json("tiny")
SCAN = Runtime(scan_layers=True)


def _window(rows=4, seed=0, t=16):
    return jnp.asarray(np.random.RandomState(seed).randint(0, CFG.vocab_size, (rows, t + 1 + CFG.mtp_depth)),
                       jnp.int32)


def _close_trees(got, want, tol):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=tol,
                                   atol=tol * max(1e-6, float(jnp.abs(w).max())))


def test_stacks_cover_every_layer_once():
    cfg = CFG.replace(num_layers=5, first_k_dense=2)
    assert {k: list(v) for k, v in stacks(cfg).items()} == {DENSE_STACK: [0, 1], MOE_STACK: [2, 3, 4]}
    assert list(stacks(cfg.replace(first_k_dense=0))) == [MOE_STACK]


def test_layout_round_trip_and_shapes():
    """The scanned init equals the per-layer init stacked; the shapes and logical axes match the
    scanned model's own; unstacking gives back every value exactly."""
    plain = init_variables(CFG, jax.random.PRNGKey(0))
    scanned = init_variables(CFG, jax.random.PRNGKey(0), runtime=SCAN)
    shapes = variable_shapes(CFG, SCAN)
    assert jax.tree_util.tree_structure(scanned) == jax.tree_util.tree_structure(shapes)
    leaves = jax.tree_util.tree_leaves
    assert all(a.shape == b.shape for a, b in zip(leaves(scanned), leaves(shapes), strict=True))
    n_moe = len(stacks(CFG)[MOE_STACK])
    assert scanned["params"][MOE_STACK]["ffn"]["w1"].shape[0] == n_moe
    assert scanned["router"][MOE_STACK]["ffn"]["bias"].shape == (n_moe, CFG.n_routed_experts)
    assert "layers_0" not in scanned["params"] and "mtp_0" in scanned["params"]
    axes = logical_axes(CFG, SCAN)["params"][MOE_STACK]["ffn"]["w1"]
    assert axes == PartitionSpec("layers", "expert", "embed", "mlp")
    _close_trees(unstack_layers(scanned, CFG), plain, 0.0)
    # numpy trees (host-side checkpoints) stay numpy
    host = stack_layers(jax.tree_util.tree_map(np.asarray, plain), CFG)
    assert isinstance(host["params"][MOE_STACK]["ffn"]["w1"], np.ndarray)


def test_partial_stack_is_refused():
    plain = init_variables(CFG, jax.random.PRNGKey(0))["params"]  # a config one MoE layer longer
    with pytest.raises(ValueError, match=MOE_STACK):
        stack_layers(plain, CFG.replace(num_layers=CFG.num_layers + 1))


def test_scanned_logits_equal_per_layer():
    plain = init_variables(CFG, jax.random.PRNGKey(1))
    tokens = _window()[:, :16]
    want, want_mtp = Transformer(CFG).apply(plain, tokens, return_mtp=True)
    got, got_mtp = Transformer(CFG, SCAN).apply(stack_layers(plain, CFG), tokens, return_mtp=True)
    _close_trees((got, got_mtp), (want, want_mtp), 1e-5)
    # explicit (unsorted) positions take the same path
    pos = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32)[::-1], tokens.shape)
    _close_trees(Transformer(CFG, SCAN).apply(stack_layers(plain, CFG), tokens, pos),
                 Transformer(CFG).apply(plain, tokens, pos), 1e-5)


@pytest.mark.parametrize("remat", ["none", "full", "save_dots"])
def test_scanned_train_step_equals_per_layer(remat):
    """Two optimizer steps: the same metrics (per-layer expert loads included), parameters, moments and
    router biases, whatever the remat policy inside the scan."""
    optim = OptimConfig()
    plain_train, _ = jit_steps(CFG, optim)
    scan_train, scan_eval = jit_steps(CFG, optim, runtime=Runtime(scan_layers=True, remat=remat))
    a, b = init_state(CFG, optim, 0), init_state(CFG, optim, 0, SCAN)
    for seed in range(2):
        a, ma = plain_train(a, _window(seed=seed))
        b, mb = scan_train(b, _window(seed=seed))
        assert sorted(mb["expert_load"]) == sorted(ma["expert_load"])
        _close_trees({k: v for k, v in mb.items() if k != "params_finite"},
                     {k: v for k, v in ma.items() if k != "params_finite"}, 1e-5)
    _close_trees(unstack_layers(b.params, CFG), a.params, 1e-5)
    _close_trees(unstack_layers(b.router, CFG), a.router, 1e-6)
    _close_trees(unstack_layers(b.opt_state, CFG), a.opt_state, 1e-5)
    assert np.isfinite(float(scan_eval(b, _window(seed=3))["eval_loss"]))


def test_scanned_step_on_a_mesh_matches_one_device():
    """fsdp x expert on 4 fake devices: the stacked weights shard as their per-layer leaves do (the
    "layers" axis whole), and the step gives the single-device numbers."""
    optim = OptimConfig()
    mesh = make_mesh(parse_mesh("fsdp=2,expert=2", 4), devices=jax.devices()[:4])
    shardings = state_shardings(CFG, optim, mesh, SCAN)
    w1 = shardings.params[MOE_STACK]["ffn"]["w1"].spec
    assert w1[0] is None and w1[1] == "expert"
    state = init_state_sharded(CFG, optim, 0, shardings, SCAN)
    train, _ = jit_steps(CFG, optim, shardings, batch_sharding(mesh), runtime=SCAN)
    window = _window(rows=8)
    with jax.set_mesh(mesh):
        got, m = train(state, jax.device_put(window, batch_sharding(mesh)))
    want, mw = jit_steps(CFG, optim)[0](init_state(CFG, optim, 0), window)
    np.testing.assert_allclose(float(m["loss"]), float(mw["loss"]), rtol=1e-5)
    _close_trees(unstack_layers(got.params, CFG), want.params, 1e-4)


def test_decoding_asks_for_the_per_layer_layout():
    scanned = init_variables(CFG, jax.random.PRNGKey(0), runtime=SCAN)
    with pytest.raises(ValueError, match="per-layer layout"):
        Transformer(CFG, SCAN).prepare_decode(scanned)


def test_scanned_training_resumes_either_layout_and_exports_per_layer(tmp_path):
    """train.py's --scan_layers: the losses of a per-layer run, step for step (to float rounding); a
    checkpoint of either layout resumes in the other; export and infer read the per-layer variables."""
    corpus = tmp_path / "corpus.py"
    corpus.write_text("".join(f"def f{i}(x):\n    return x * {i % 7}\n\n" for i in range(300)))
    base = dict(data=(str(corpus),), steps=8, batch_size=4, seq_len=32, warmup_steps=2, eval_every=4,
                eval_batches=1, sample_tokens=0, plots=False)
    plain = run(TrainConfig(workdir=str(tmp_path / "plain"), **base))["losses"]
    first = run(TrainConfig(workdir=str(tmp_path / "mixed"), scan_layers=True, stop_after=4, checkpoint_every=4,
                            **base))
    second = run(TrainConfig(workdir=str(tmp_path / "mixed"), scan_layers=False, stop_after=2, checkpoint_every=2,
                             **base))  # a scanned checkpoint resumed per layer
    third = run(TrainConfig(workdir=str(tmp_path / "mixed"), scan_layers=True, **base))  # and back
    assert (second["start_step"], third["start_step"]) == (4, 6)
    got = {**first["losses"], **second["losses"], **third["losses"]}
    assert sorted(got) == sorted(plain)
    # The layouts round differently (a scan sums in another order), and eight steps of training amplify
    # that to ~3e-4; a layer misplaced in a conversion would move the loss by far more.
    np.testing.assert_allclose([got[k] for k in sorted(got)], [plain[k] for k in sorted(plain)], rtol=2e-3)
    np.testing.assert_allclose([got[k] for k in sorted(got)][:3], [plain[k] for k in sorted(plain)][:3], rtol=1e-5)
    cfg, variables, step, _ = restore_variables(str(tmp_path / "mixed"))
    assert step == 8 and "layers_1" in variables["params"] and MOE_STACK not in variables["params"]
    # the per-layer tree of a per-layer run (values: the losses above; the step tests compare them)
    plain_vars = restore_variables(str(tmp_path / "plain"))[1]
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(plain_vars)
    assert all(a.shape == b.shape for a, b in zip(jax.tree_util.tree_leaves(variables),
                                                  jax.tree_util.tree_leaves(plain_vars), strict=True))
