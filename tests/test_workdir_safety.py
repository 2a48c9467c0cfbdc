"""Nothing lost, nobody stranded (issue 15): a run never deletes or overwrites what it did not write,
metrics.jsonl reads as one run, and a damaged checkpoint is skipped and named, never a traceback.
Driven through train.py, `python -m dsv3_jax.export` and infer.py."""
import asyncio
import gc
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from dsv3_jax.export import export, restore_variables
from dsv3_jax.export import main as export_main
from dsv3_jax.infer.weights import CheckpointError, load_checkpoint
from dsv3_jax.train.loop import TrainConfig, TrainingError, run
from dsv3_jax.train.metrics import read_metrics
from dsv3_jax.train.workdir import MARKER, quiet_abandoned_reads

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# train.py flags of a run of seconds (later flags override these).
SMALL = ["--steps=4", "--batch_size=2", "--seq_len=16", "--checkpoint_every=2", "--eval_every=1000",
         "--sample_tokens=0"]
# train.py whose train step reports a NaN loss from step 3 on: a divergence, deterministically.
NAN_FROM_STEP_3 = """
import runpy, sys
import jax.numpy as jnp
import dsv3_jax.train.loop as loop
real = loop.jit_steps
def poisoned(*args, **kwargs):
    train, evaluate = real(*args, **kwargs)
    def train_nan(state, batch):
        state, m = train(state, batch)
        return state, {**m, "loss": jnp.where(state.step >= 3, jnp.nan, m["loss"])}
    return train_nan, evaluate
loop.jit_steps = poisoned
sys.argv[0] = "train.py"
runpy.run_path("train.py", run_name="__main__")
"""


def _tc(workdir, corpus, **kw):
    base = dict(workdir=str(workdir), data=(corpus,), steps=4, batch_size=2, seq_len=16, warmup_steps=1,
                checkpoint_every=2, eval_every=1000, log_every=1, eval_batches=1, sample_tokens=0, plots=False)
    return TrainConfig(**{**base, **kw})


def _train_py(workdir, corpus, *flags, script=None):
    program = ["-c", script] if script else [os.path.join(REPO, "train.py")]
    return subprocess.run([sys.executable, *program, f"--workdir={workdir}", f"--data={corpus}", *SMALL, *flags],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def _lines(text: str) -> list[str]:
    return text.strip().splitlines()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """A workdir of ours with checkpoints at steps 2 and 4 and a metrics line per step."""
    wd = tmp_path_factory.mktemp("trained") / "wd"
    run(_tc(wd, corpus))
    return wd


def _copy(trained, tmp_path):
    return shutil.copytree(trained, tmp_path / "wd")


def _snapshot(path) -> dict:
    """Every file and directory under `path` (relative names) with its content's hash."""
    out = {}
    for d, dirs, files in os.walk(path):
        for n in dirs:
            out[os.path.relpath(os.path.join(d, n), path)] = "dir"
        for n in files:
            with open(os.path.join(d, n), "rb") as f:
                out[os.path.relpath(os.path.join(d, n), path)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _steps_of_one_run(workdir) -> list[int]:
    steps = [r["step"] for r in read_metrics(str(workdir))]
    assert steps == sorted(set(steps)) and steps[0] == 0, steps  # one run: no step twice, from step 0
    return steps


def _superseded_lines(workdir) -> list[str]:
    return [line for p in sorted(workdir.glob("metrics.superseded-*.jsonl")) for line in _lines(p.read_text())]


# ---- 1, 8: metrics.jsonl keeps every line, and reads as one run --------------------------------------

def test_metrics_of_a_workdir_without_checkpoints_are_kept(trained, tmp_path, corpus):
    wd = _copy(trained, tmp_path)
    earlier = _lines((wd / "metrics.jsonl").read_text())
    shutil.rmtree(wd / "checkpoints")  # what a user may do to start over
    r = _train_py(wd, corpus, "--steps=2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert _steps_of_one_run(wd) == [0, 2]
    assert _superseded_lines(wd) == earlier  # every earlier line, as it was
    assert any("metrics.superseded-" in line for line in _lines(r.stderr))


def test_rerun_after_a_nan_stop_before_any_checkpoint(tmp_path, corpus):
    wd = tmp_path / "wd"
    r = _train_py(wd, corpus, "--checkpoint_every=0", script=NAN_FROM_STEP_3)
    assert r.returncode != 0
    assert _lines(r.stderr)[-1] == ("train.py: loss became nan at step 3; no checkpoint was saved, so the next run "
                                    "starts again from step 0 (lower --lr or check the data)")
    assert not [p for p in os.listdir(wd / "checkpoints") if p.isdigit()]
    first = _lines((wd / "metrics.jsonl").read_text())
    r = _train_py(wd, corpus, "--steps=2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert _steps_of_one_run(wd) == [0, 2]
    assert _superseded_lines(wd) == first


def test_nan_stop_after_a_checkpoint_names_it(tmp_path, corpus):
    r = _train_py(tmp_path / "wd", corpus, "--checkpoint_every=2", script=NAN_FROM_STEP_3)
    assert r.returncode != 0
    assert _lines(r.stderr)[-1] == ("train.py: loss became nan at step 3; the checkpoint of step 2 is kept and the "
                                    "next run resumes from it (lower --lr or check the data)")


def test_rerun_after_a_kill_before_the_first_checkpoint(tmp_path, corpus):
    wd = tmp_path / "wd"
    args = [sys.executable, os.path.join(REPO, "train.py"), f"--workdir={wd}", f"--data={corpus}", *SMALL,
            "--steps=1000000", "--checkpoint_every=0"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics, deadline = wd / "metrics.jsonl", time.time() + 240
    while time.time() < deadline and not (metrics.exists() and len(_lines(metrics.read_text())) >= 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = read_metrics(str(metrics))  # whole lines: a line the kill cut short is no record
    assert len(killed) >= 3 and not [p for p in os.listdir(wd / "checkpoints") if p.isdigit()]
    r = _train_py(wd, corpus, "--steps=10")
    assert r.returncode == 0, r.stderr[-2000:]
    assert _steps_of_one_run(wd) == [0, 10]
    assert [json.loads(line) for line in _superseded_lines(wd)] == killed


def test_damaged_metrics_is_one_line_and_kept(trained, tmp_path, corpus):
    wd = _copy(trained, tmp_path)
    text = (wd / "metrics.jsonl").read_text()
    (wd / "metrics.jsonl").write_text('{"step": 0, "eval_loss": 5.5}\n{"step": 1, "lo\n' + text)
    before = _snapshot(wd)
    with pytest.raises(TrainingError, match=r"metrics.jsonl: line 2 is not valid JSON .*repair it or move it away"):
        run(_tc(wd, corpus, steps=6))
    assert _snapshot(wd) == before


# ---- 2, 3: only what this project wrote is ours -----------------------------------------------------

@pytest.mark.parametrize("foreign", ["1/model.pt", "notes.txt"])
def test_foreign_entry_in_checkpoints_is_refused_and_kept(trained, tmp_path, corpus, foreign):
    wd = _copy(trained, tmp_path)
    path = wd / "checkpoints" / foreign
    path.parent.mkdir(exist_ok=True)
    path.write_text("theirs")
    if foreign == "notes.txt":
        (wd / MARKER).unlink()  # a workdir of an earlier version: refused before the marker is written
    before = _snapshot(wd)
    r = _train_py(wd, corpus, "--steps=8")  # saves 6 and 8: orbax's keep-3 would delete step folder 1
    assert r.returncode != 0
    named = os.path.join(wd, "checkpoints", foreign.split("/")[0])
    why = "a step folder without our meta/metadata" if "/" in foreign else "not a checkpoint of this project"
    assert _lines(r.stderr) == [f"train.py: {named} was not written by this project ({why}); move it out of "
                                f"{wd / 'checkpoints'}/ (a run keeps only its newest 3 checkpoints there and deletes "
                                "older step folders)"]
    assert _snapshot(wd) == before


def test_a_workdir_of_someone_elses_files_is_refused_untouched(tmp_path, corpus):
    wd = tmp_path / "theirs"
    (wd / "checkpoints").mkdir(parents=True)
    (wd / "checkpoints" / "model.ckpt").write_text("weights")
    (wd / "loss.png").write_bytes(b"\x89PNG theirs")
    (wd / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    before = _snapshot(wd)
    r = _train_py(wd, corpus)
    assert r.returncode != 0
    assert _lines(r.stderr) == [f"train.py: --workdir {wd} holds files (checkpoints, loss.png, metrics.jsonl) but "
                                f"neither the {MARKER} marker of a run of this project nor a checkpoint of ours: a "
                                "run would mix its files into them; use a new or empty directory"]
    assert _snapshot(wd) == before


def test_a_workdir_that_is_a_file_is_one_line(tmp_path, corpus):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    r = _train_py(path, corpus)
    assert r.returncode != 0
    assert _lines(r.stderr) == [f"train.py: --workdir {path} exists and is not a directory"]
    assert path.read_text() == "mine" and os.listdir(tmp_path) == ["notes.txt"]


def test_new_and_empty_workdirs_are_marked_and_earlier_ones_still_resume(trained, tmp_path, corpus):
    assert (trained / MARKER).is_file()  # created by a run
    wd = _copy(trained, tmp_path)
    (wd / MARKER).unlink()  # as a run of an earlier version left it
    assert run(_tc(wd, corpus, steps=6))["start_step"] == 4
    assert (wd / MARKER).is_file()
    (tmp_path / "empty").mkdir()
    run(_tc(tmp_path / "empty", corpus, steps=1, checkpoint_every=0))
    assert (tmp_path / "empty" / MARKER).is_file()


# ---- 7: a damaged newest checkpoint ----------------------------------------------------------------

def _truncate_the_array_files(ckpt):
    """Cut each array data file (ocdbt's d/ folders) of the state to half: a copy or a disk gone wrong."""
    for d, _, names in os.walk(ckpt / "state"):
        for n in names if os.path.basename(d) == "d" else ():
            with open(os.path.join(d, n), "r+b") as f:
                f.truncate(os.path.getsize(os.path.join(d, n)) // 2)


def _delete_the_manifest(ckpt):
    (ckpt / "state" / "manifest.ocdbt").unlink()


DAMAGE = {"truncated array files": _truncate_the_array_files, "deleted manifest.ocdbt": _delete_the_manifest}


@pytest.mark.parametrize("damage", DAMAGE)
def test_training_resumes_from_the_newest_checkpoint_that_restores(trained, tmp_path, corpus, damage):
    wd = _copy(trained, tmp_path)
    DAMAGE[damage](wd / "checkpoints" / "4")
    damaged = _snapshot(wd / "checkpoints" / "4")
    r = _train_py(wd, corpus, "--steps=6")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    (aside,) = (wd / "checkpoints").glob("corrupt-4-*")
    (warning,) = [line for line in _lines(r.stderr) if "does not restore" in line]
    assert warning.startswith(f"warning: checkpoint {wd / 'checkpoints' / '4'} does not restore (")
    assert warning.endswith(f"; moved it to {aside}; resuming from step 2")
    assert _snapshot(aside) == damaged  # moved, not deleted
    assert sorted(p for p in os.listdir(wd / "checkpoints") if p.isdigit()) == ["2", "4", "6"]
    assert restore_variables(str(wd))[2] == 6
    assert _steps_of_one_run(wd) == [0, 1, 2, 6]  # steps 3 and 4 went with the damaged checkpoint


def test_a_lone_damaged_checkpoint_is_named_and_left_in_place(trained, tmp_path, corpus):
    wd = _copy(trained, tmp_path)
    shutil.rmtree(wd / "checkpoints" / "2")
    _truncate_the_array_files(wd / "checkpoints" / "4")
    before = _snapshot(wd)
    with pytest.raises(TrainingError, match=r"no checkpoint in .*checkpoints restores \(step 4: ValueError: .*\); if "
                                            r"they are damaged, move them out of .*checkpoints/ to start again"):
        run(_tc(wd, corpus, steps=6))
    assert _snapshot(wd) == before


def test_resuming_with_other_batch_settings_is_one_line(trained, tmp_path, corpus):
    wd = _copy(trained, tmp_path)
    before = _snapshot(wd)
    with pytest.raises(TrainingError, match=r"saved window = 18 but this iterator has 10; .*resume with the run's "
                                            r"own --data, --seq_len and --seed, or use a new --workdir"):
        run(_tc(wd, corpus, steps=6, seq_len=8))
    assert _snapshot(wd) == before


def test_a_damaged_export_is_one_line(trained, tmp_path):
    out = tmp_path / "exp"
    export(str(trained), str(out))
    (out / "export.json").write_text("[]")
    with pytest.raises(CheckpointError, match=rf"--checkpoint {out}: {out / 'export.json'}: expected a JSON object"):
        load_checkpoint(str(out))
    (out / "export.json").write_text("{}")
    (out / "orbax" / "manifest.ocdbt").unlink()
    with pytest.raises(CheckpointError, match=rf"--checkpoint {out}: {out / 'orbax'} does not restore \(.*\); "
                                              "export the run again"):
        load_checkpoint(str(out))


@pytest.mark.parametrize("damage", DAMAGE)
def test_export_and_infer_use_the_newest_intact_checkpoint_and_say_so(trained, tmp_path, capsys, damage):
    wd = _copy(trained, tmp_path)
    DAMAGE[damage](wd / "checkpoints" / "4")
    before = _snapshot(wd)
    warning = f"warning: {wd / 'checkpoints' / '4'} does not restore ("
    done = subprocess.run([sys.executable, "-m", "dsv3_jax.export", "--workdir", str(wd), "--out",
                           str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = _lines(done.stderr)
    assert line.startswith(warning) and line.endswith("using step 2, the newest checkpoint that does (train.py on "
                                                      "this workdir moves the damaged one aside)")
    assert "exported step 2" in done.stdout
    assert export_main(["--workdir", str(wd), "--out", str(tmp_path / "out4"), "--step", "4"]) == 1
    (line,) = _lines(capsys.readouterr().err)
    assert line.startswith(f"export: {wd / 'checkpoints' / '4'} does not restore (")
    assert line.endswith("; other checkpoints: [2]")
    r = subprocess.run([sys.executable, os.path.join(REPO, "infer.py"), f"--checkpoint={wd}", "--prompt=def ",
                        "--max_new_tokens=2"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    first, last = _lines(r.stderr)  # the warning, and the speed report
    assert first.startswith(warning) and last.startswith("-- ")
    assert _snapshot(wd) == before  # export and infer only read


def test_infer_shows_no_read_only_notices(trained):
    r = subprocess.run([sys.executable, os.path.join(REPO, "infer.py"), f"--checkpoint={trained}", "--prompt=def ",
                        "--max_new_tokens=2"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [line[:3] for line in _lines(r.stderr)] == ["-- "]


# ---- a sibling: export --overwrite deletes only an earlier export -----------------------------------

def test_export_overwrite_replaces_only_an_earlier_export(trained, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert export_main(["--workdir", str(trained), "--out", str(out), "--overwrite"]) == 1
    assert _lines(capsys.readouterr().err) == [f"export: --out {out} is not an export (it holds keep.txt); "
                                               "--overwrite replaces only an earlier export: choose another directory"]
    assert os.listdir(out) == ["keep.txt"] and sorted(os.listdir(tmp_path)) == ["out"]
    assert export_main(["--workdir", str(trained), "--out", str(tmp_path / "exp"), "--step", "2"]) == 0
    assert export_main(["--workdir", str(trained), "--out", str(tmp_path / "exp"), "--overwrite"]) == 0
    assert "exported step 4" in capsys.readouterr().out


def _unretrieved(exception: Exception, as_task: bool) -> list[str]:
    """What the asyncio logger lets through, after quiet_abandoned_reads, when a task or future that
    failed with `exception` is collected with nobody having asked for its result."""
    quiet_abandoned_reads()
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage().splitlines()[0])

    async def fail():
        raise exception

    async def abandon():
        if as_task:
            task = asyncio.get_running_loop().create_task(fail())
            await asyncio.sleep(0)  # it runs and fails
            del task
        else:
            future = asyncio.get_running_loop().create_future()
            future.set_exception(exception)
        # the task or future goes out of scope here, failed and unretrieved

    keep = Keep()
    logging.getLogger("asyncio").addHandler(keep)
    try:
        asyncio.run(abandon())
        gc.collect()
    finally:
        logging.getLogger("asyncio").removeHandler(keep)
    return seen


@pytest.mark.parametrize("as_task", [True, False], ids=["task", "future"])
def test_abandoned_checkpoint_reads_are_not_logged_but_other_lost_errors_are(as_task):
    read = ValueError('NOT_FOUND: Error opening "zarr" driver: Metadata at "step/.zarray" does not exist '
                      '[tensorstore_spec=\'{"driver":"zarr"}\']')
    assert _unretrieved(read, as_task) == []
    kind = "Task" if as_task else "Future"
    assert _unretrieved(ValueError("a bug of ours"), as_task) == [f"{kind} exception was never retrieved"]
