"""Sharded training agrees with one device: meshes, checkpoints moved between meshes, and two
processes of four devices each against one process of eight."""
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from jax.sharding import PartitionSpec as P

from dsv3_jax.config import ModelConfig
from dsv3_jax.parallel.mesh import make_mesh, parse_mesh
from dsv3_jax.train.loop import TrainConfig, TrainingError, run
from dsv3_jax.train.metrics import read_metrics
from dsv3_jax.train.step import OptimConfig, state_shardings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EP_MESH, TP_MESH = "data=2,expert=4", "data=2,fsdp=2,tensor=2"
SETTINGS = dict(steps=4, batch_size=8, seq_len=32, warmup_steps=2)


def _tc(workdir, corpus, **kw):
    base = dict(workdir=str(workdir), data=(corpus,), **SETTINGS, eval_every=4, log_every=2, eval_batches=1,
                sample_tokens=0, plots=False)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    """mesh -> (summary, workdir) of a 4-step run, each run once per module. The expert-parallel
    run checkpoints every 2 steps, so its step-2 checkpoint can be resumed elsewhere."""
    done = {}

    def get(mesh):
        if mesh not in done:
            wd = tmp_path_factory.mktemp("run")
            done[mesh] = run(_tc(wd, corpus, mesh=mesh, checkpoint_every=2)), wd
        return done[mesh]

    return get


def _close(a, b, rel=1e-4):
    return abs(a - b) <= rel * abs(b)


def _assert_same_losses(got: dict, want: dict):
    assert got.keys() == want.keys()
    bad = {s: (got[s], want[s]) for s in want if not _close(got[s], want[s])}
    assert not bad, f"losses differ (got, want): {bad}"


@pytest.mark.parametrize("mesh", [EP_MESH, TP_MESH])
def test_mesh_gives_the_losses_of_one_device(runs, mesh):
    one = runs("")[0]["losses"]
    assert sorted(one) == [1, 2, 3, 4] and one[4] < one[1]
    _assert_same_losses(runs(mesh)[0]["losses"], one)


def test_parameters_are_really_sharded(runs):
    ep, tp = runs(EP_MESH)[0], runs(TP_MESH)[0]
    assert ep["mesh"] == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    assert ep["param_specs"]["layers_1/ffn/w1"] == P("expert", None, None)
    assert ep["param_specs"]["mtp_0/block/ffn/w2"] == P("expert", None, None)
    assert tp["param_specs"]["embed"] == P("tensor", "fsdp")
    assert tp["param_specs"]["layers_1/ffn/w1"] == P(None, "fsdp", "tensor")
    # No "embed" in its logical axes: ZeRO-3 spreads it over fsdp all the same (rules.spread), and a
    # dense weight over the expert axis too
    assert tp["param_specs"]["layers_0/attn/wq_b"] == P("fsdp", "tensor", None)
    assert ep["param_specs"]["layers_0/attn/wq_b"] != P()
    assert "param_specs" not in runs("")[0]  # no mesh: the single-device path


def test_optimizer_state_follows_the_parameters():
    cfg = ModelConfig.from_json("tiny")
    sh = state_shardings(cfg, OptimConfig(), make_mesh(parse_mesh(TP_MESH, 8)))
    adam = sh.opt_state[1][0]
    for moment in (adam.mu, adam.nu):
        assert moment["layers_1"]["ffn"]["w1"] == sh.params["layers_1"]["ffn"]["w1"]
        assert moment["embed"].spec == P("tensor", "fsdp")
    assert adam.count.spec == P() and sh.step.spec == P()


@pytest.mark.parametrize("mesh", ["data=8"])
def test_checkpoint_resumes_on_another_mesh(runs, tmp_path, corpus, mesh):
    summary, wd = runs(EP_MESH)
    shutil.copytree(wd, tmp_path / "wd")
    shutil.rmtree(tmp_path / "wd" / "checkpoints" / "4")  # as if stopped after step 2
    resumed = run(_tc(tmp_path / "wd", corpus, mesh=mesh))
    assert resumed["start_step"] == 2
    _assert_same_losses(resumed["losses"], {s: summary["losses"][s] for s in (3, 4)})
    assert resumed["param_specs"]["layers_1/ffn/w1"] == P(None, None, None)


@pytest.mark.parametrize("change,message", [
    ({"mesh": "data=3"}, "--mesh: .*multiply to 3, but there are 8 devices"),
    ({"mesh": "data=2,pipe=4"}, "--mesh: .*unknown axis 'pipe'"),
    ({"mesh": "data=8", "batch_size": 4}, "--batch_size=4 does not split over the mesh's 8 batch shards"),
])
def test_bad_mesh_is_one_clear_error(tmp_path, corpus, change, message):
    with pytest.raises(TrainingError, match=message):
        run(_tc(tmp_path, corpus, **change))


# -- several processes ---------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _launch(workdir, corpus, *flags, processes=2):
    """`processes` train.py processes of 4 CPU devices each, joined into one run; any still running
    at the end of the block are killed. Their output goes to files beside the workdir (a full pipe
    could block a process): see `_output`."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    args = [sys.executable, os.path.join(REPO, "train.py"), f"--workdir={workdir}", f"--data={corpus}",
            *(f"--{k}={v}" for k, v in SETTINGS.items()), "--eval_every=4", "--checkpoint_every=0",
            f"--coordinator_address=127.0.0.1:{_free_port()}", f"--num_processes={processes}",
            "--heartbeat_timeout=10", *flags]
    procs = []
    for i in range(processes):
        out, err = (open(f"{workdir}.{i}.{kind}", "w") for kind in ("out", "err"))
        with out, err:
            procs.append(subprocess.Popen([*args, f"--process_id={i}"], cwd=REPO, env=env, stdout=out, stderr=err))
        procs[-1].logs = f"{workdir}.{i}"
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


# gloo's C++ code prints "[Gloo] Rank 0 is connected to 3 peer ranks. Expected number of connected peer
# ranks is : 3" straight to stdout, from several threads, one streamed piece at a time, so the pieces
# of two such lines can interleave in any order. For messages and for finding our own lines, whole
# lines are removed by pattern (to a fixpoint: removing one can join the halves of another); to tell
# that a process printed nothing of its own, every piece gloo writes is removed wherever it lands
# (pattern removal left a residue of reordered pieces: a flaky failure, twice).
_GLOO_CHATTER = re.compile(r"\[Gloo\]( Rank)?\s*|\d+ is connected to \d+ peer ranks\. "
                           r"Expected number of connected peer ranks is : \d+\n?")
_GLOO_PIECES = re.compile(r"\[Gloo\]|Rank|is connected to|peer ranks\.?|Expected number of connected|is :|\d+|\s+")


def _without_chatter(text: str) -> str:
    while (cleaner := _GLOO_CHATTER.sub("", text)) != text:
        text = cleaner
    return text


def _only_chatter(text: str) -> bool:
    """True when `text` holds nothing but gloo's pieces (and whitespace), however they interleave."""
    return not _GLOO_PIECES.sub("", text)


def _output(proc) -> tuple[str, str]:
    """(stdout, stderr) of a finished `_launch` process, without gloo's connection chatter."""
    return tuple(_without_chatter(open(f"{proc.logs}.{kind}", errors="replace").read()) for kind in ("out", "err"))


def test_two_processes_match_one(runs, tmp_path, corpus):
    with _launch(tmp_path / "wd", corpus, f"--mesh={EP_MESH}") as procs:
        for p in procs:
            p.wait(timeout=400)
    outs = [_output(p) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "held-out loss" in outs[0][0] and _only_chatter(outs[1][0])  # process 0 reports, alone
    logged = {r["step"]: r["loss"] for r in read_metrics(str(tmp_path / "wd")) if "loss" in r}
    assert list(logged) == [4]  # one writer: no line twice
    assert _close(logged[4], runs(EP_MESH)[0]["losses"][4])
    assert sorted(os.listdir(tmp_path / "wd" / "checkpoints")) == ["4"]


def test_a_dead_process_stops_the_other(runs, tmp_path, corpus):
    """Two processes restore the one-process checkpoint, train and save step 5 together; then
    process 1 is killed, and process 0 must exit with an error, not wait forever."""
    _, wd = runs(EP_MESH)
    shutil.copytree(wd, tmp_path / "wd")
    with _launch(tmp_path / "wd", corpus, f"--mesh={EP_MESH}", "--steps=100000", "--checkpoint_every=1",
                 "--eval_every=100000") as procs:
        saved = tmp_path / "wd" / "checkpoints" / "5"
        deadline = time.time() + 300
        while time.time() < deadline and not saved.exists():
            assert all(p.poll() is None for p in procs), _output(procs[0])[1][-3000:]
            time.sleep(0.2)
        assert saved.exists(), "the processes never saved step 5"
        procs[1].send_signal(signal.SIGKILL)
        killed = time.time()
        try:
            procs[0].wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("process 0 still runs 60 s after process 1 died")
    assert procs[0].returncode != 0
    assert time.time() - killed < 60
    # Which layer notices first is a race: jax's coordination service (a missed heartbeat, a failed
    # barrier) or gloo itself, whose collective aborts the process when the peer's socket closes.
    err = _output(procs[0])[1]
    noticed = ("another process has probably died", "detected fatal errors", "gloo::EnforceNotMet")
    assert any(m in err for m in noticed), err[-3000:]
