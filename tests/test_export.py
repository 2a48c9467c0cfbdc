"""Export of a real training run: the variables restored, the orbax and HF outputs, the CLI, refusals."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import dsv3_jax.export as export_module
from dsv3_jax.config import ModelConfig
from dsv3_jax.export import ExportError, export, load_exported, main, restore_variables
from dsv3_jax.hf import load_hf_checkpoint
from dsv3_jax.model import Transformer
from dsv3_jax.train.loop import TrainConfig, run
from dsv3_jax.train.step import OptimConfig, init_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS = np.random.RandomState(0).randint(0, 256, (2, 12)).astype(np.int32)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    (root / "corpus").mkdir()
    text = "".join(f"def f{i}(x):\n    return x * {i % 7} + {i % 5}\n\n" for i in range(120))
    for k in range(3):
        (root / "corpus" / f"part{k}.py").write_text(text[k * 500:] + text[: k * 500])
    tc = TrainConfig(workdir=str(root / "wd"), data=(str(root / "corpus"),), steps=3, batch_size=2, seq_len=16,
                     warmup_steps=1, checkpoint_every=2, eval_batches=1, eval_every=1000, log_every=1,
                     sample_tokens=0, plots=False)
    run(tc)  # checkpoints at steps 2 and 3
    return str(root / "wd")


@pytest.fixture(scope="module")
def restored(workdir):
    return restore_variables(workdir)


@pytest.fixture(scope="module")
def exported(workdir, tmp_path_factory):
    return export(workdir, str(tmp_path_factory.mktemp("exp") / "out"), hf=True)


_apply_cache = {}


def _logits(cfg: ModelConfig, variables: dict) -> np.ndarray:
    if cfg not in _apply_cache:  # one compile per config
        _apply_cache[cfg] = jax.jit(Transformer(cfg).apply)
    return np.asarray(_apply_cache[cfg](variables, jnp.asarray(TOKENS)))


def _equal(a, b) -> bool:
    same_tree = jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    return same_tree and all(np.array_equal(x, y) and np.asarray(x).dtype == np.asarray(y).dtype
                             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _snapshot(path) -> dict:
    """Every file and directory under `path`, with sizes and modification times."""
    paths = [os.path.join(d, n) for d, dirs, files in os.walk(path) for n in dirs + files]
    return {p: (os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths}


def test_restore_equals_the_trained_state(workdir, restored):
    cfg, variables, step, tokenizer = restored
    assert tokenizer == "byte"  # the run's tokenizer spec travels in the checkpoint's meta
    assert step == 3
    assert cfg == ModelConfig.from_json("tiny")  # the full config, name included
    # The loop's own way back: the whole train state against an abstract one built from init_state.
    fresh = jax.eval_shape(lambda: init_state(cfg, OptimConfig(total_steps=3, warmup_steps=1), 0))
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, fresh)
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state",),
                               options=ocp.CheckpointManagerOptions(read_only=True)) as mgr:
        state = mgr.restore(3, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    assert _equal(variables, {"params": state.params, "router": state.router})
    assert any(np.abs(b).max() > 0 for b in jax.tree_util.tree_leaves(variables["router"]))  # biases moved
    assert all(isinstance(x, np.ndarray) for x in jax.tree_util.tree_leaves(variables))


def test_step_selection(workdir, restored):
    _, variables2, step, _ = restore_variables(workdir, step=2)
    assert step == 2
    assert not np.array_equal(variables2["params"]["embed"], restored[1]["params"]["embed"])
    with pytest.raises(ExportError, match=r"no checkpoint of step 7; available steps: \[2, 3\]"):
        restore_variables(workdir, step=7)


def test_empty_checkpoints_directory(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(ExportError, match="no checkpoint"):
        restore_variables(str(tmp_path))
    assert os.listdir(tmp_path / "checkpoints") == []


def test_orbax_export_round_trip(restored, exported):
    cfg, variables, _, _ = restored
    assert sorted(os.listdir(exported["out"])) == ["export.json", "hf", "model_config.json", "orbax"]
    with open(exported["config"]) as f:
        assert json.load(f) == cfg.to_dict()
    assert ModelConfig.from_json(exported["config"]) == cfg
    with open(os.path.join(exported["out"], "export.json")) as f:
        assert json.load(f)["step"] == 3
    cfg2, variables2 = load_exported(exported["out"])
    assert cfg2 == cfg and _equal(variables2, variables)
    assert np.array_equal(_logits(cfg2, variables2), _logits(cfg, variables))


def test_hf_export_loads_to_the_same_logits(restored, exported):
    cfg, variables, _, _ = restored
    hf_cfg, hf_variables = load_hf_checkpoint(exported["hf"])
    # config.json carries every field the forward pass reads; the training-only ones take their
    # defaults (the name is a label, not compared). Equal configs then share one compiled forward.
    assert hf_cfg.replace(bias_update_speed=cfg.bias_update_speed) == cfg
    ref = _logits(cfg, variables)
    np.testing.assert_allclose(_logits(cfg, hf_variables), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_transformers_reads_the_hf_export(restored, exported):
    pytest.importorskip("transformers")
    import torch
    from transformers import DeepseekV3ForCausalLM

    cfg, variables, _, _ = restored
    model = DeepseekV3ForCausalLM.from_pretrained(exported["hf"]).eval()
    with torch.no_grad():
        theirs = model(torch.as_tensor(TOKENS, dtype=torch.long)).logits.float().numpy()
    ours = _logits(cfg, variables)
    assert float(np.abs(ours - theirs).max() / np.abs(theirs).max()) < 1e-4


def test_existing_destination_is_refused_and_untouched(workdir, restored, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ExportError, match="exists and is not empty"):
        export(workdir, str(out))
    assert sorted(os.listdir(tmp_path)) == before and os.listdir(out) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(ExportError, match="is not an export .*keep.txt.*--overwrite replaces only an earlier export"):
        export(workdir, str(out), overwrite=True)  # --overwrite deletes only what an export wrote
    assert sorted(os.listdir(tmp_path)) == before and os.listdir(out) == ["keep.txt"]
    (out / "keep.txt").unlink()
    export(workdir, str(out), step=2)
    export(workdir, str(out), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == before
    assert _equal(load_exported(str(out))[1], restored[1])


def test_a_failed_export_leaves_nothing_half_written(workdir, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "save_hf_checkpoint", broken)
    with pytest.raises(OSError, match="disk full"):
        export(workdir, str(tmp_path / "new"), hf=True)
    assert os.listdir(tmp_path) == []
    export(workdir, str(tmp_path / "old"))  # an earlier export, which --overwrite may replace
    before = _snapshot(tmp_path / "old")
    with pytest.raises(OSError, match="disk full"):
        export(workdir, str(tmp_path / "old"), hf=True, overwrite=True)
    assert os.listdir(tmp_path) == ["old"] and _snapshot(tmp_path / "old") == before


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "dsv3_jax.export", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_cli_exports_then_refuses_to_clobber(workdir, tmp_path):
    out = str(tmp_path / "out")
    done = _cli("--workdir", workdir, "--out", out, "--step", "2")
    assert done.returncode == 0, done.stderr
    assert "exported step 2" in done.stdout
    assert _equal(load_exported(out)[1], restore_variables(workdir, step=2)[1])
    before = _snapshot(out)
    again = _cli("--workdir", workdir, "--out", out)
    assert again.returncode != 0
    assert again.stderr.strip().splitlines() == [f"export: --out {out} exists and is not empty "
                                                 "(pass --overwrite to replace it)"]
    assert _snapshot(out) == before


def test_cli_missing_workdir_is_one_line(tmp_path):
    done = _cli("--workdir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"))
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [f"export: workdir {tmp_path / 'nowhere'}: no such directory"]
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("args,message", [
    (["--out", "{tmp}/out"], "--workdir is required"),
    (["--workdir", "{wd}"], "--out is required"),
    (["--workdir", "{tmp}", "--out", "{tmp}/out"], "no checkpoints/ directory"),
    (["--workdir", "{wd}", "--out", "{tmp}/out", "--step", "5"], r"available steps: [2, 3]"),
    (["--workdir", "{wd}", "--out", "{wd}", "--overwrite"], "would overlap the training run's checkpoints"),
    (["--workdir", "{wd}", "--out", "{wd}/checkpoints/x"], "would overlap the training run's checkpoints"),
    (["--workdir", "{wd}", "--out", "{tmp}/out", "--hf_weights", "fp4"], "--hf_weights"),
    (["--workdir", "{wd}", "--out", "{tmp}/out", "--bogus"], "bogus"),
])
def test_cli_bad_input_is_one_clear_line(workdir, tmp_path, capsys, args, message):
    before = _snapshot(workdir)
    code = main([a.format(tmp=tmp_path, wd=workdir) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("export: ") and message in err[0]
    assert not os.path.exists(tmp_path / "out")
    assert _snapshot(workdir) == before


def test_training_checkpoints_are_only_read(workdir, tmp_path):
    before = _snapshot(workdir)
    restore_variables(workdir)
    export(workdir, str(tmp_path / "out"), step=2, hf=True, hf_weights="bfloat16")
    assert _snapshot(workdir) == before
