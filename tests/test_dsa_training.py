"""DeepSeek-V3.2's two training stages (V3.2 report s.2.1.1) on a tiny DSA config: the dense warm-up trains
the indexers alone, the sparse stage everything; their KL and recall reach the metrics; a run resumes
across --dsa_stage; a config without an indexer refuses the flag."""
from __future__ import annotations

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.config import ModelConfig
from dsv3_jax.runtime import Runtime
from dsv3_jax.train import cli
from dsv3_jax.train.metrics import read_metrics
from dsv3_jax.train.objective import compute_loss
from dsv3_jax.train.step import OptimConfig, init_state, is_indexer, train_step

SEQ = 32  # 4 x index_topk: the sparse stage's attention is sparse
CFG = ModelConfig.from_json("tiny").replace(index_n_heads=2, index_head_dim=16, index_topk=8)


@pytest.fixture(scope="module")
def stepped():
    """Two steps of each stage (the schedule's first lr is 0) from the same state: (state, {stage: (new
    state, the second step's metrics)})."""
    optim = OptimConfig(lr=1e-2, warmup_steps=1, total_steps=10)
    state = init_state(CFG, optim, 0)
    window = jax.random.randint(jax.random.PRNGKey(1), (2, SEQ + 1 + CFG.mtp_depth), 0, CFG.vocab_size)
    out = {}
    for stage in ("warmup", "sparse"):
        rt = Runtime(dsa_stage=stage)
        step = jax.jit(lambda s, w, rt=rt: train_step(s, w, CFG, optim, rt))
        out[stage] = step(step(state, window)[0], window)
    return state, out


def _changed(before, after) -> dict:
    """path -> whether the leaf moved."""
    flat = jax.tree_util.tree_leaves_with_path(before)
    return {jax.tree_util.keystr(p): not np.array_equal(a, b)
            for (p, a), b in zip(flat, jax.tree_util.tree_leaves(after))}


def test_warmup_trains_the_indexers_alone(stepped):
    state, out = stepped
    new, metrics = out["warmup"]
    moved = _changed(state.params, new.params)
    indexer = {jax.tree_util.keystr(p): t for p, t in jax.tree_util.tree_leaves_with_path(is_indexer(state.params))}
    assert any(indexer.values()) and not all(indexer.values())
    assert all(moved[k] for k, t in indexer.items() if t and "wq_b" in k), "an indexer's wq_b did not move"
    assert not any(moved[k] for k, t in indexer.items() if not t), [k for k, t in indexer.items() if not t and moved[k]]
    assert not any(_changed(state.router, new.router).values())  # the router biases are frozen too
    # The frozen parameters' moments keep their values; the state keeps its structure.
    assert jax.tree_util.tree_structure(new.opt_state) == jax.tree_util.tree_structure(state.opt_state)
    assert float(metrics["loss"]) == pytest.approx(3 * float(metrics["indexer_kl"]), rel=1e-5)  # 3 layers


def test_sparse_stage_trains_everything(stepped):
    state, out = stepped
    new, metrics = out["sparse"]
    moved = _changed(state.params, new.params)
    assert moved["['layers_1']['attn']['wkv_b']"] and moved["['embed']"]
    assert moved["['layers_1']['attn']['indexer']['wq_b']"]
    assert float(metrics["loss"]) > float(metrics["ce"])  # the LM loss plus the KL


@pytest.mark.parametrize("stage", ["warmup", "sparse"])
def test_kl_and_recall_are_reported(stepped, stage):
    _, out = stepped
    metrics = out[stage][1]
    kl, recall = float(metrics["indexer_kl"]), float(metrics["indexer_recall"])
    assert np.isfinite(kl) and kl > 0
    # Recall: the share of the dense attention on the selection; queries past index_topk lose some.
    assert 0.1 < recall < 1


def test_kl_gradient_reaches_only_the_indexers():
    """Sparse stage: the KL's gradient is all in the indexers' weights (their input is detached), and the LM
    loss's none of it (the top-k passes none)."""
    state = init_state(CFG, OptimConfig(), 0)
    window = jax.random.randint(jax.random.PRNGKey(2), (2, SEQ + 2), 0, CFG.vocab_size)
    rt = Runtime(dsa_stage="sparse")
    part = lambda name: jax.jit(jax.grad(lambda p: getattr(compute_loss(p, state.router, window, CFG, rt)[0], name)))
    kl, ce = part("indexer_kl")(state.params), part("ce")(state.params)
    mask = is_indexer(state.params)
    norm = lambda g, keep: sum(float(jnp.sum(x * x)) for x, m in zip(jax.tree_util.tree_leaves(g),
                                                                      jax.tree_util.tree_leaves(mask)) if m == keep)
    assert norm(kl, True) > 0 and norm(kl, False) == 0
    assert norm(ce, False) > 0 and norm(ce, True) == 0


# ---- through train.py's main --------------------------------------------------------------------

class _Flags(types.SimpleNamespace):
    def __getitem__(self, name):
        return types.SimpleNamespace(present=True)


def _flags(workdir, config, corpus, **kw):
    base = dict(config=config, workdir=workdir, data=[corpus], tokenizer="byte", steps=4, batch_size=2, seq_len=SEQ,
                lr=3e-3, warmup_steps=1, seed=0, checkpoint_every=0, eval_every=2, stop_after=None, precision="fp32",
                experts="auto", attention="auto", remat="none", scan_layers=False, grad_accum=1, moments="auto",
                sample_tokens=0, mesh="", coordinator_address=None, num_processes=None, process_id=None,
                initialization_timeout=60, heartbeat_timeout=60, dsa_stage=None)
    return _Flags(**{**base, **kw})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("dsa")
    (d / "corpus").mkdir()
    text = "".join(f"def f{i}(x):\n    return x * {i % 7} + {i % 5}\n\n" for i in range(200))
    for k in range(3):
        (d / "corpus" / f"part{k}.py").write_text(text[k * 500:] + text[: k * 500])
    (d / "tiny_dsa.json").write_text(json.dumps(CFG.to_dict()))
    return d


def test_train_py_warmup_then_sparse_resumes(files, capsys):
    workdir = str(files / "wd")
    cli.main(["train.py"], _flags(workdir, str(files / "tiny_dsa.json"), str(files / "corpus"), dsa_stage="warmup",
                                  stop_after=2))
    cli.main(["train.py"], _flags(workdir, str(files / "tiny_dsa.json"), str(files / "corpus"), dsa_stage="sparse"))
    records = [r for r in read_metrics(f"{workdir}/metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        assert np.isfinite(r["indexer_kl"]) and 0 < r["indexer_recall"] <= 1
    # Step 2 (warm-up): the objective is the KL summed over the 3 attention layers (2 blocks and MTP's).
    assert records[0]["loss"] == pytest.approx(3 * records[0]["indexer_kl"], rel=1e-5)
    assert records[1]["loss"] > records[1]["ce"]
    assert "indexer kl" in capsys.readouterr().err


def test_dsa_stage_without_an_indexer_is_refused(tmp_path, files, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train.py"], _flags(str(tmp_path / "wd"), "tiny", str(files / "corpus"), dsa_stage="warmup"))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--dsa_stage=warmup" in err[0] and "has none" in err[0]
    assert not (tmp_path / "wd").exists()  # refused before anything is written
