"""Metrics log (jsonl + TensorBoard), resume truncation, plots and the progress bar."""
import io
import os
import types

import numpy as np
import pytest

from dsv3_jax.train.metrics import MetricsWriter, read_metrics
from dsv3_jax.train.plots import _relative_loads, loss_curves, plot_expert_load, plot_losses, write_plots
from dsv3_jax.train.progress import Progress

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _scalars(logdir):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = event_accumulator.EventAccumulator(logdir, size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _write_run(workdir, steps, offset=0.0, **kwargs):
    with MetricsWriter(workdir, **kwargs) as writer:
        for step in steps:
            writer.write(step, {"loss": np.float32(10.0 - step + offset), "lr": float(step) * 1e-4})


def test_jsonl_round_trip_converts_types(tmp_path):
    jnp = pytest.importorskip("jax.numpy")
    record = {
        "loss": np.float32(2.5),
        "tokens": np.int64(4096),
        "grad_norm": jnp.asarray(0.75, dtype=jnp.float32),
        "expert_load": {"layers_1": np.array([0.25, 0.75], dtype=np.float32)},
        "expert_max_over_mean": {"layers_1": np.float64(1.5)},
        "nested": [np.float16(1.0), 2],
    }
    with MetricsWriter(str(tmp_path), tensorboard=False) as writer:
        writer.write(np.int32(3), record)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith('{"step": 3,')
    (back,) = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert back == {
        "step": 3,
        "loss": 2.5,
        "tokens": 4096,
        "grad_norm": 0.75,
        "expert_load": {"layers_1": [0.25, 0.75]},
        "expert_max_over_mean": {"layers_1": 1.5},
        "nested": [1.0, 2],
    }
    assert type(back["tokens"]) is int and type(back["loss"]) is float
    assert not (tmp_path / "tensorboard").exists()


def test_write_rejects_conflicting_step_and_use_after_close(tmp_path):
    writer = MetricsWriter(str(tmp_path), tensorboard=False)
    with pytest.raises(ValueError, match="step"):
        writer.write(5, {"step": 4, "loss": 1.0})
    writer.close()
    with pytest.raises(ValueError, match="close"):
        writer.write(6, {"loss": 1.0})


def test_tensorboard_scalars_and_nested_tags(tmp_path):
    with MetricsWriter(str(tmp_path)) as writer:
        for step in (1, 2):
            writer.write(step, {
                "loss": 3.0 / step,
                "expert_max_over_mean": {"layers_1": 1.0 + step, "layers_2": np.float32(2.0)},
                "expert_load": {"layers_1": [0.5, 0.5]},  # lists go to the jsonl only
                "note": "text",
            })
    scalars = _scalars(str(tmp_path / "tensorboard"))
    assert set(scalars) == {"loss", "expert_max_over_mean/layers_1", "expert_max_over_mean/layers_2"}
    assert scalars["loss"] == [(1, pytest.approx(3.0)), (2, pytest.approx(1.5))]
    assert scalars["expert_max_over_mean/layers_1"] == [(1, pytest.approx(2.0)), (2, pytest.approx(3.0))]


def test_resume_drops_later_records_and_torn_line(tmp_path):
    workdir = str(tmp_path)
    _write_run(workdir, range(1, 7))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 3.')  # killed mid-write
    assert [r["step"] for r in read_metrics(workdir)] == [1, 2, 3, 4, 5, 6]

    _write_run(workdir, range(5, 9), offset=0.5, resume_step=4)  # resumed run: losses + 0.5
    records = read_metrics(workdir)
    expected = [(s, 10.0 - s + (0.5 if s > 4 else 0.0)) for s in range(1, 9)]
    assert [(r["step"], r["loss"]) for r in records] == expected
    assert not [p for p in os.listdir(workdir) if p.endswith(".tmp")]
    # Two event files (the restart, though within the same second, did not overwrite the first),
    # and TensorBoard hides the first run's orphaned steps 5 and 6 (purge_step).
    assert len(os.listdir(tmp_path / "tensorboard")) == 2
    assert _scalars(str(tmp_path / "tensorboard"))["loss"] == [(s, pytest.approx(v)) for s, v in expected]


def test_append_without_resume_cuts_torn_line(tmp_path):
    _write_run(str(tmp_path), [1, 2], tensorboard=False)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    _write_run(str(tmp_path), [3], tensorboard=False)
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3]


def test_read_metrics_rejects_damage_before_the_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(str(path))


def _fake_records(num_steps=40, num_experts=8, layers=("layers_1", "layers_2")):
    rng = np.random.default_rng(0)
    records = []
    for step in range(1, num_steps + 1):
        record = {"step": step, "loss": 8.0 * np.exp(-step / 15) + 2.0 + 0.1 * rng.standard_normal()}
        if step % 10 == 0:
            record["eval_loss"] = 8.0 * np.exp(-step / 15) + 2.3
            record["mtp_loss"] = 8.0 * np.exp(-step / 15) + 2.6
        if step % 2 == 0:  # load logged on some steps only; imbalance decays as balancing works
            skew = np.exp(rng.standard_normal(num_experts) * 2.0 * np.exp(-step / 10))
            record["expert_load"] = {name: (skew / skew.sum()).tolist() for name in layers}
        records.append(record)
    return records


def _assert_png(path):
    image = pytest.importorskip("matplotlib.image")
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    assert os.path.getsize(path) > 10_000
    pixels = image.imread(path)
    assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 2


def test_plots_are_png_files(tmp_path):
    records = _fake_records()
    _assert_png(plot_losses(records, str(tmp_path / "loss.png")))
    _assert_png(plot_expert_load(records, str(tmp_path / "load.png")))


def test_loss_plot_draws_like_with_like():
    """The objective (CE + 0.3 x MTP + balance) is not plotted against the held-out cross-entropy as if
    it were one: the train line is the next-token cross-entropy, and each label says what its line is."""
    records = [{"step": 0, "eval_loss": 5.5}]
    records += [{"step": s, "loss": 4.0 - 0.1 * s, "ce": 3.0 - 0.1 * s, "mtp_loss": 3.3 - 0.1 * s} for s in (1, 2, 3)]
    records[-1]["eval_loss"] = 2.8
    curves = {label: (list(steps), pytest.approx(list(values))) for label, _, steps, values in loss_curves(records)}
    assert curves == {
        "train: next-token cross-entropy (this step's batch)": ([1, 2, 3], [2.9, 2.8, 2.7]),
        "train: MTP cross-entropy (the extra tokens ahead, mean over depths)": ([1, 2, 3], [3.2, 3.1, 3.0]),
        "held-out files: next-token cross-entropy": ([0, 3], [5.5, 2.8]),
    }
    no_mtp = [{**r, "mtp_loss": 0.0} if "mtp_loss" in r else r for r in records]  # mtp_depth 0 logs zeros
    assert [label for label, *_ in loss_curves(no_mtp)] == ["train: next-token cross-entropy (this step's batch)",
                                                            "held-out files: next-token cross-entropy"]
    # A log from before "ce" was recorded: the objective, labelled as what it is.
    old = [{k: v for k, v in r.items() if k != "ce"} for r in records]
    assert loss_curves(old)[0][0] == "train: objective (next-token + MTP + balance loss; not a cross-entropy)"


def test_expert_load_is_relative_to_uniform():
    records = [
        {"step": 4, "expert_load": {"layers_1": [0.25, 0.25, 0.25, 0.25]}},
        {"step": 2, "expert_load": {"layers_1": [0.5, 0.25, 0.25, 0.0]}},
        {"step": 3, "loss": 1.0},
    ]
    steps, relative = _relative_loads(records, "layers_1")
    np.testing.assert_array_equal(steps, [2, 4])
    np.testing.assert_allclose(relative, [[2, 1], [1, 1], [1, 1], [0, 1]])
    records.append({"step": 5, "expert_load": {"layers_1": [1.0, 0.0]}})
    with pytest.raises(ValueError, match="length"):
        _relative_loads(records, "layers_1")


def test_plot_expert_load_without_data_raises(tmp_path):
    records = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.9}]
    with pytest.raises(ValueError, match="expert_load"):
        plot_expert_load(records, str(tmp_path / "load.png"))
    assert not (tmp_path / "load.png").exists()


def test_write_plots_from_workdir(tmp_path):
    dense, moe = tmp_path / "dense", tmp_path / "moe"
    for workdir, records in ((dense, [{k: v for k, v in r.items() if k != "expert_load"} for r in _fake_records()]),
                             (moe, _fake_records())):
        with MetricsWriter(str(workdir), tensorboard=False) as writer:
            for r in records:
                writer.write(r.pop("step"), r)
    assert write_plots(str(dense)) == [str(dense / "loss.png")]
    written = write_plots(str(moe))
    assert written == [str(moe / "loss.png"), str(moe / "expert_load.png")]
    for path in written:
        _assert_png(path)


def test_progress_reports_loss_and_throughput(monkeypatch):
    clock = iter([0.0, 1.0, 3.0, 4.0])
    fake_time = types.SimpleNamespace(perf_counter=lambda: next(clock))
    monkeypatch.setattr("dsv3_jax.train.progress.time", fake_time)
    with Progress(total_steps=10, initial_step=2, tokens_per_step=1000, disable=False) as progress:
        progress.update(3, loss=2.5)
        assert progress._bar.n == 3
        assert progress._bar.postfix == "loss=2.5000, tok_s=1,000"
        progress.update(5, loss=2.25)  # two steps in two seconds
        assert progress._bar.postfix == "loss=2.2500, tok_s=1,000"
        progress.update(6, loss=2.0, tokens_per_s=1234.0)
        assert progress._bar.postfix == "loss=2.0000, tok_s=1,234"
        assert progress._bar.n == 6


def test_progress_without_a_terminal_prints_lines(monkeypatch):
    clock = iter(float(t) for t in range(100))
    monkeypatch.setattr("dsv3_jax.train.progress.time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    out = io.StringIO()  # not a terminal: no bar, plain lines about every tenth of the run
    with Progress(total_steps=40, initial_step=10, tokens_per_step=100, file=out) as progress:
        for step in range(11, 38):  # stopped early: the last step's line is still printed
            progress.update(step, loss=3.0, tokens_per_s=999.0, ce=2.5)  # lines show the mean since the last
            if step == 30:
                progress.evaluated(step, 2.75)
    lines = out.getvalue().splitlines()
    assert lines == [
        "step 12/40: objective 3.0000, next-token cross-entropy 2.5000, 100 tokens/s, 00:02 elapsed, 00:28 left",
        *[f"step {s}/40: objective 3.0000, next-token cross-entropy 2.5000, 100 tokens/s, 00:{s - 10:02d} elapsed, "
          f"00:{40 - s:02d} left" for s in (15, 18, 21, 24, 27, 30)],
        "step 30/40: held-out next-token cross-entropy 2.7500",
        "step 33/40: objective 3.0000, next-token cross-entropy 2.5000, 100 tokens/s, 00:23 elapsed, 00:07 left",
        "step 36/40: objective 3.0000, next-token cross-entropy 2.5000, 100 tokens/s, 00:26 elapsed, 00:04 left",
        "step 37/40: objective 3.0000, next-token cross-entropy 2.5000, 100 tokens/s, 00:27 elapsed, 00:03 left",
    ]
