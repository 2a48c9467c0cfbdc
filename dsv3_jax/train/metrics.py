"""Training metrics: one JSON line per logged step, plus TensorBoard scalars.

`workdir/metrics.jsonl` is the record of a run: each `MetricsWriter.write` appends one object with
"step" first and fsyncs it, so a run killed at any point keeps every line it finished. A kill in the
middle of a line leaves a torn last line; `read_metrics` skips it and a new writer cuts it off before
appending. On resume from a checkpoint at step s, lines with step > s came from work the checkpoint
does not hold (a kill, a stop on a non-finite loss, a checkpoint set aside or deleted); a run from no
checkpoint at all (`FRESH`) supersedes every line. So that metrics.jsonl reads as one run, never
repeating a step, the writer moves those lines to `metrics.superseded-<time>.jsonl` beside it (never
deleting them) and rewrites metrics.jsonl atomically. TensorBoard is told the same through
tensorboardX's `purge_step`, which hides the orphaned events of earlier files.

Only numbers reach TensorBoard: top-level numbers under their own name and numbers one dict level
down as "outer/inner" tags. Lists (per-expert loads) and deeper structures live only in the jsonl.
"""
from __future__ import annotations

import datetime
import json
import numbers
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np
from tensorboardX import SummaryWriter

METRICS_FILE = "metrics.jsonl"
SUPERSEDED_PREFIX = "metrics.superseded-"  # + time + ".jsonl": lines a resumed or restarted run set aside
# resume_step of a run that starts from no checkpoint: every earlier line is superseded (its step-0
# evaluation included, which the new run writes again).
FRESH = -1
TENSORBOARD_DIR = "tensorboard"
# tensorboardX writes events from a background queue, so its flush() does not reach the events
# still queued; this bounds what a kill can lose from TensorBoard (never from the jsonl).
TENSORBOARD_FLUSH_SECS = 5


def to_python(value: Any) -> Any:
    """numpy/jax scalars and arrays -> python numbers and lists, recursively through dicts/lists."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_python(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "__array__"):  # np.ndarray, jax.Array (this syncs with the device)
        return np.asarray(value).tolist()
    raise TypeError(f"cannot log a value of type {type(value).__name__}: {value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def scalar_tags(record: dict[str, Any]) -> dict[str, float]:
    """The TensorBoard scalars of a converted record ("step" excluded)."""
    tags = {}
    for key, value in record.items():
        if key == "step":
            continue
        if _is_number(value):
            tags[key] = float(value)
        elif isinstance(value, dict):
            for inner, v in value.items():
                if _is_number(v):
                    tags[f"{key}/{inner}"] = float(v)
    return tags


def _parse_lines(text: str, path: str) -> tuple[list[dict], int]:
    """The records of a jsonl text, and how many characters of it are whole lines.

    A last line that does not parse (a write cut short by a kill) is dropped; a bad line anywhere
    else means the file was damaged some other way and is an error.
    """
    records, intact = [], 0
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if not line.strip():
            intact += len(line)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON and is not the last line") from None
        if not isinstance(record, dict) or "step" not in record:
            raise ValueError(f"{path}: line {i + 1} is not a metrics record with a 'step'")
        records.append(record)
        intact += len(line)
    return records, intact


def read_metrics(path: str) -> list[dict]:
    """All records of a metrics.jsonl (or of the metrics.jsonl inside a directory), in file order."""
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    with open(path, encoding="utf-8") as f:
        return _parse_lines(f.read(), path)[0]


def _atomic_write_lines(path: str, records: list[dict]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".metrics.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _superseded_path(directory: str) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    path, n = os.path.join(directory, f"{SUPERSEDED_PREFIX}{stamp}.jsonl"), 1
    while os.path.lexists(path):
        n += 1
        path = os.path.join(directory, f"{SUPERSEDED_PREFIX}{stamp}-{n}.jsonl")
    return path


def _set_aside(path: str, records: list[dict], resume_step: int) -> None:
    """Write superseded records to their own file (complete before metrics.jsonl loses them)."""
    aside = _superseded_path(os.path.dirname(os.path.abspath(path)))
    with open(aside, "x", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
    steps = f"step {records[0]['step']}" + (f" to {records[-1]['step']}" if len(records) > 1 else "")
    why = ("an earlier start that left no checkpoint" if resume_step == FRESH
           else f"steps after the checkpoint of step {resume_step}, which this run resumes from")
    print(f"note: {len(records)} line(s) of {METRICS_FILE} ({steps}) are from {why}; moved them to "
          f"{os.path.basename(aside)}", file=sys.stderr, flush=True)


def _prepare_existing(path: str, resume_step: int | None) -> None:
    """Cut a torn last line; on resume also set the records after `resume_step` aside."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        text = f.read()
    records, intact = _parse_lines(text, path)
    kept = records if resume_step is None else [r for r in records if r["step"] <= resume_step]
    superseded = [] if resume_step is None else [r for r in records if r["step"] > resume_step]
    if superseded:
        _set_aside(path, superseded, resume_step)
    # A complete last object without its "\n" stays, a torn one goes; rewriting (not patching in
    # place) means the file is never left half-repaired.
    torn = intact != len(text) or (text and not text.endswith("\n"))
    if torn or superseded:
        _atomic_write_lines(path, kept)


class MetricsWriter:
    """Appends metrics records to `workdir/metrics.jsonl` and scalars to `workdir/tensorboard`.

    `resume_step`: the step of the checkpoint a run resumes from, or FRESH for a run from no
    checkpoint; records after it are moved from the jsonl to a `metrics.superseded-*.jsonl` file and
    hidden in TensorBoard. None: append to whatever is there.
    Write from one process only (JAX process 0 in multi-host runs).
    """

    def __init__(self, workdir: str, resume_step: int | None = None, tensorboard: bool = True):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, METRICS_FILE)
        _prepare_existing(self.path, resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            purge = None if resume_step is None else resume_step + 1
            # Event files are named by the second they were opened in; the nanosecond suffix keeps
            # a restart within that second from overwriting the previous file, and still sorts it
            # after that file, which TensorBoard's purge of orphaned steps relies on.
            self._tb = SummaryWriter(
                logdir=os.path.join(workdir, TENSORBOARD_DIR),
                purge_step=purge,
                flush_secs=TENSORBOARD_FLUSH_SECS,
                filename_suffix=f".{time.time_ns()}",
            )

    def write(self, step: int, record: dict[str, Any]) -> dict[str, Any]:
        """Log `record` at `step`; returns the converted line as written."""
        if self._file is None:
            raise ValueError("MetricsWriter.write after close()")
        step = int(to_python(step))
        converted = to_python(record)
        if "step" in converted and converted.pop("step") != step:
            raise ValueError(f"record carries step {record['step']} but was written at step {step}")
        line = {"step": step, **converted}
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._tb is not None:
            for tag, value in scalar_tags(line).items():
                self._tb.add_scalar(tag, value, global_step=step)
            self._tb.flush()
        return line

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

