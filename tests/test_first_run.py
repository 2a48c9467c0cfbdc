"""A new user's first run, through the real commands: what train.py prints where there is no terminal,
what it says the workdir holds, the held-out loss before and after on a resumed run, infer.py echoing
the prompt, and the README's first commands."""
import os
import re
import subprocess
import sys
import types

import pytest

from dsv3_jax.infer import cli as infer_cli
from dsv3_jax.train import progress
from dsv3_jax.train.metrics import read_metrics
from dsv3_jax.train.progress import describe_workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6


def _train(workdir, corpus):
    """train.py with stdout and stderr piped (no terminal), as in a log file or CI."""
    cmd = [sys.executable, os.path.join(REPO, "train.py"), f"--workdir={workdir}", f"--data={corpus}",
           f"--steps={STEPS}", "--batch_size=4", "--seq_len=32", "--warmup_steps=1", "--eval_every=3",
           "--sample_tokens=8"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("first_run")
    (root / "corpus").mkdir()
    text = "".join(f"def f{i}(x):\n    return x * {i % 7} + {i % 5}\n\n" for i in range(300))
    for k in range(4):  # several documents, so the held-out split has its own
        (root / "corpus" / f"part{k}.py").write_text(text[k * 700:] + text[: k * 700])
    workdir = str(root / "workdir")
    return workdir, str(root / "corpus"), _train(workdir, str(root / "corpus"))


def test_without_a_terminal_progress_is_printed_as_lines(first_run):
    _, _, r = first_run
    steps = [int(s) for s in re.findall(rf"^step (\d+)/{STEPS}: objective [\d.]+, next-token cross-entropy [\d.]+, "
                                        r"[\d,]+ tokens/s, [\d:]+ elapsed(?:, [\d:]+ left)?$", r.stderr, re.M)]
    assert steps == list(range(1, STEPS + 1))  # ~10 lines a run: here, every step
    evals = re.findall(rf"^step (\d+)/{STEPS}: held-out next-token cross-entropy [\d.]+$", r.stderr, re.M)
    assert evals == ["3", "6"]


def test_a_run_ends_by_saying_what_the_workdir_holds(first_run):
    workdir, _, r = first_run
    listing = r.stdout[r.stdout.index(f"{os.path.join(workdir, '')} holds:"):]
    entries = dict(re.findall(r"^  (\S+)\s+(.+)$", listing, re.M))
    assert all(line.startswith("  ") for line in listing.rstrip().splitlines()[1:])  # the last thing printed
    assert set(entries) == {"checkpoints/", "metrics.jsonl", "loss.png", "expert_load.png", "tensorboard/"}
    assert entries["checkpoints/"] == "orbax checkpoint of step 6; the same command again resumes from step 6"
    assert f"({len(read_metrics(workdir))} lines, steps 0 to {STEPS})" in entries["metrics.jsonl"]
    assert "held-out" in entries["loss.png"] and "expert load" in entries["expert_load.png"]
    assert f"tensorboard --logdir {os.path.join(workdir, 'tensorboard')}" in entries["tensorboard/"]


def test_a_resumed_finished_run_prints_the_held_out_loss_before_and_after(first_run):
    workdir, corpus, r = first_run
    before, after = re.search(r"^held-out loss: ([\d.]+) -> ([\d.]+)$", r.stdout, re.M).groups()
    again = _train(workdir, corpus)
    assert f"already at step {STEPS}" in again.stdout
    assert f"held-out loss: {before} -> {after}" in again.stdout  # step 0 is read back from metrics.jsonl
    assert "holds:" in again.stdout


def test_the_listing_says_how_to_get_tensorboard_where_it_is_missing(first_run, monkeypatch):
    workdir, _, _ = first_run
    monkeypatch.setattr(progress.importlib.util, "find_spec", lambda name: None)
    assert "(not installed here: pip install tensorboard)" in describe_workdir(workdir)


def test_infer_echoes_the_prompt(first_run):
    workdir, _, _ = first_run
    r = subprocess.run([sys.executable, os.path.join(REPO, "infer.py"), f"--checkpoint={workdir}", "--prompt=def f",
                        "--max_new_tokens=12"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("def f") and len(r.stdout.rstrip("\n")) > len("def f")


def test_infer_batch_lines_carry_their_prompts(first_run, capsys):
    workdir, _, _ = first_run
    f = types.SimpleNamespace(checkpoint=workdir, prompt=["def f", "    return"], prompts_file=None, prompt_ids=["100"],
                              tokenizer=None, max_new_tokens=6, temperature=0.0, top_p=1.0, top_k=0, seed=0,
                              speculative="none", compare_plain=False, weights="fp32", steps_per_call=8,
                              experts="auto", attention="auto", json=True, kv_cache=None, index_cache=None)
    out = infer_cli.run(f)
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"[0] def f{out['text'][0]}", f"[1]     return{out['text'][1]}", f"[2] d{out['text'][2]}"]


def _readme() -> str:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as fh:
        return fh.read()


def test_readme_first_inference_example_samples():
    """Greedy decoding of the quickstart's tiny byte-level model falls into a loop (`)` then spaces
    for "def main("): the first example a user runs samples."""
    first = re.search(r"^python infer\.py .*$", _readme(), re.M).group(0)
    temperature = re.search(r"--temperature[ =]([\d.]+)", first)
    assert temperature and float(temperature.group(1)) > 0, first


def test_readme_says_how_to_install_tensorboard_where_it_first_names_it():
    paragraphs = _readme().split("\n\n")
    first = next(p for p in paragraphs if "tensorboard --logdir" in p)
    assert "pip install tensorboard" in first, first


def test_the_listing_names_every_entry(tmp_path):
    for d in ("checkpoints/100", "checkpoints/200", "checkpoints/corrupt-300-20260101T000000", "tensorboard", "mine"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "eval_loss": 5.5}\n{"step": 200, "loss": 2.0}\n')
    (tmp_path / "metrics.superseded-20260101T000000.jsonl").write_text('{"step": 250, "loss": 2.0}\n')
    (tmp_path / ".dsv3_jax_workdir").write_text("{}\n")
    lines = describe_workdir(str(tmp_path)).splitlines()
    assert lines[0] == f"{tmp_path}/ holds:" and len(lines) == 6  # hidden entries left out
    entries = dict(re.findall(r"^  (\S+)\s+(.+)$", "\n".join(lines[1:]), re.M))
    assert entries["checkpoints/"] == ("orbax checkpoints of steps 100, 200; the same command again resumes from step "
                                       "200; 1 that did not restore set aside as corrupt-*")
    assert entries["metrics.jsonl"].endswith("(2 lines, steps 0 to 200)")
    superseded = entries["metrics.superseded-20260101T000000.jsonl"]
    assert superseded == "lines of metrics.jsonl that a resumed or restarted run set aside"
    assert entries["mine/"] == "(not written by training)" and "tensorboard/" in entries
