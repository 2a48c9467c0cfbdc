"""The training loop end to end on a tiny corpus: learning, exact resume, clean failures."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dsv3_jax.train.loop import TrainConfig, TrainingError, run
from dsv3_jax.train.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    text = "".join(f"def f{i}(x):\n    return x * {i % 7} + {i % 5}\n\n" for i in range(400))
    for k in range(4):  # several documents, so the held-out split has its own
        (d / f"part{k}.py").write_text(text[k * 1000:] + text[: k * 1000])
    return str(d)


def _tc(tmp_path, corpus, **kw):
    base = dict(workdir=str(tmp_path / "wd"), data=(corpus,), steps=12, batch_size=4, seq_len=32,
                warmup_steps=2, eval_every=6, log_every=3, eval_batches=1, sample_tokens=0, plots=False)
    return TrainConfig(**{**base, **kw})


def test_learns_and_writes_its_outputs(tmp_path, corpus):
    s = run(_tc(tmp_path, corpus, steps=40, lr=1e-2, eval_every=20, plots=True, sample_tokens=8))
    assert s["eval_loss"] < 0.7 * s["first_eval_loss"]
    wd = tmp_path / "wd"
    records = read_metrics(str(wd / "metrics.jsonl"))
    logged = [r for r in records if "loss" in r]
    for key in ("step", "loss", "mtp_loss", "lr", "grad_norm", "tokens_per_s", "expert_max_over_mean"):
        assert key in logged[-1]
    assert set(logged[-1]["expert_load"]) == {"layers_1", "mtp_0/block"}
    assert sorted(os.listdir(wd / "checkpoints")) == ["40"]
    assert (wd / "loss.png").stat().st_size > 1000 and (wd / "expert_load.png").stat().st_size > 1000
    assert os.listdir(wd / "tensorboard")
    assert s["sample"].startswith("def ")


def test_resume_gives_identical_losses(tmp_path, corpus):
    full = run(_tc(tmp_path / "a", corpus))["losses"]
    first = run(_tc(tmp_path / "b", corpus, stop_after=6, checkpoint_every=4))["losses"]
    resumed = run(_tc(tmp_path / "b", corpus, checkpoint_every=4))
    assert resumed["start_step"] == 6
    assert {**first, **resumed["losses"]} == full  # bit-identical, step by step
    steps = [r["step"] for r in read_metrics(str(tmp_path / "b" / "wd" / "metrics.jsonl")) if "loss" in r]
    assert steps == sorted(set(steps))  # no step logged twice


@pytest.mark.parametrize("change,message", [
    ({"data": ("/no/such/file.txt",)}, "matches no text file"),
    ({"seq_len": 4096}, "above the config's max_position_embeddings"),
    ({"model": "no_such_preset"}, "no config file"),
    ({"precision": "fp4"}, "--precision"),
])
def test_bad_input_is_one_clear_error(tmp_path, corpus, change, message):
    with pytest.raises(TrainingError, match=message):
        run(_tc(tmp_path, corpus, **change))


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(TrainingError, match="empty"):
        run(_tc(tmp_path, str(tmp_path / "empty.txt")))


def test_other_config_in_workdir_is_refused_and_kept(tmp_path, corpus):
    run(_tc(tmp_path, corpus, steps=3))
    before = sorted(os.listdir(tmp_path / "wd" / "checkpoints"))
    with pytest.raises(TrainingError, match="another model config"):
        run(_tc(tmp_path, corpus, steps=6, model=_other_config(tmp_path)))
    assert sorted(os.listdir(tmp_path / "wd" / "checkpoints")) == before


def _other_config(tmp_path) -> str:
    path = tmp_path / "other.json"
    cfg = json.load(open(os.path.join(REPO, "configs", "tiny.json")))
    path.write_text(json.dumps({**cfg, "num_layers": 3}))
    return str(path)


def test_nan_loss_stops_without_touching_checkpoints(tmp_path, corpus):
    run(_tc(tmp_path, corpus, steps=3))
    with pytest.raises(TrainingError, match="non-finite at step 4"):
        run(_tc(tmp_path, corpus, steps=8, lr=float("nan"), checkpoint_every=1))
    assert sorted(os.listdir(tmp_path / "wd" / "checkpoints")) == ["3"]


def test_cli_exit_code_and_message(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), f"--workdir={tmp_path}",
                        "--data=/no/such/dir"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].startswith("train.py: corpus spec '/no/such/dir'")


def test_sigkill_then_resume(tmp_path, corpus):
    """Kill the trainer mid-run: the checkpoints left all load, and resuming finishes the run."""
    args = [sys.executable, os.path.join(REPO, "train.py"), f"--workdir={tmp_path}", f"--data={corpus}",
            "--steps=400", "--batch_size=4", "--seq_len=32", "--checkpoint_every=5", "--eval_every=1000"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and len([p for p in os.listdir(ckpt) if p.isdigit()] if ckpt.exists() else []) < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(int(p) for p in os.listdir(ckpt) if p.isdigit())
    assert done, "no checkpoint was written before the kill"
    s = run(TrainConfig(workdir=str(tmp_path), data=(corpus,), steps=done[-1] + 5, batch_size=4, seq_len=32,
                        checkpoint_every=5, eval_every=1000, eval_batches=1, sample_tokens=0, plots=False))
    assert s["start_step"] == done[-1]
