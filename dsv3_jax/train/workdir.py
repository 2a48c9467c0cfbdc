"""What a training workdir may hold, and what a run may change in it.

A run writes into a workdir only if the directory is new or empty (it is then marked as ours with
MARKER), carries the marker, or was written by an earlier version of this project before the marker
existed (its checkpoints/ holds a checkpoint of ours). Anything else (someone's plots, metrics or
checkpoints of another tool) is refused, naming what was found, before anything is written.

Under checkpoints/ orbax keeps the newest checkpoints and deletes older step folders, whatever wrote
them; so every entry there must be ours: a step folder whose meta describes a model of ours, an
unfinished save of ours (orbax's temporary suffix), or a checkpoint that would not restore, set aside
as `corrupt-<step>-<time>` (not a step name: orbax neither lists nor deletes it). Anything else stops
the run, naming it. Nothing here deletes anything.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from dsv3_jax.train.metrics import METRICS_FILE, read_metrics

MARKER = ".dsv3_jax_workdir"  # written into every workdir a run creates or adopts
CHECKPOINTS = "checkpoints"
CORRUPT_PREFIX = "corrupt-"
STEP_NAME = re.compile(r"(0|[1-9]\d*)")  # orbax's standard step folder name (no prefix, no padding)
ORBAX_TMP_NAME = re.compile(r"\d+\.orbax-checkpoint-tmp.*")  # a save that did not finish
META_FILE = os.path.join("meta", "metadata")  # the "meta" item of our checkpoints (JsonSave)
SHOWN_NAMES = 6  # names listed in a refusal before "..."
REASON_CHARS = 200  # of an exception's message in a one-line report

T = TypeVar("T")


class WorkdirError(RuntimeError):
    """A workdir or checkpoint the run must not touch or cannot use; one line for the user."""


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _names(entries: Sequence[str]) -> str:
    shown = sorted(entries)[:SHOWN_NAMES]
    return ", ".join(shown) + (", ..." if len(entries) > SHOWN_NAMES else "")


def is_our_checkpoint(path: str) -> bool:
    """A step folder this project wrote: its meta item names the model (under "model", or "config"
    in runs before the Runtime split)."""
    try:
        with open(os.path.join(path, META_FILE), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and ("model" in meta or "config" in meta)


def _foreign_in_checkpoints(checkpoints: str) -> tuple[str, str] | None:
    """(entry, why) of the first entry under checkpoints/ this project did not write, or None."""
    for name in sorted(os.listdir(checkpoints)):
        path = os.path.join(checkpoints, name)
        if STEP_NAME.fullmatch(name):
            if not os.path.isdir(path):
                return name, "a file with a checkpoint step's name"
            if not is_our_checkpoint(path):
                return name, f"a step folder without our {META_FILE}"
        elif not (os.path.isdir(path) and (ORBAX_TMP_NAME.fullmatch(name) or name.startswith(CORRUPT_PREFIX))):
            return name, "not a checkpoint of this project"
    return None


def check_checkpoints(checkpoints: str, keep: int) -> None:
    """Refuse a checkpoints/ directory holding anything but ours (orbax would delete old step folders)."""
    if not os.path.lexists(checkpoints):
        return
    if not os.path.isdir(checkpoints):
        raise WorkdirError(f"{checkpoints} is not a directory; a run keeps its checkpoints there: move it away")
    try:
        foreign = _foreign_in_checkpoints(checkpoints)
    except OSError as e:
        raise WorkdirError(f"{checkpoints}: {e.strerror}") from e
    if foreign is not None:
        name, why = foreign
        raise WorkdirError(f"{os.path.join(checkpoints, name)} was not written by this project ({why}); move it "
                           f"out of {checkpoints}/ (a run keeps only its newest {keep} checkpoints there and deletes "
                           "older step folders)")


def _is_legacy(workdir: str) -> bool:
    """A workdir of this project from before the marker: checkpoints/ holds at least one of ours."""
    checkpoints = os.path.join(workdir, CHECKPOINTS)
    if not os.path.isdir(checkpoints):
        return False
    return any(STEP_NAME.fullmatch(n) and is_our_checkpoint(os.path.join(checkpoints, n))
               for n in os.listdir(checkpoints))


def check_workdir(workdir: str) -> bool:
    """Whether `workdir` may be written by a run (True: it exists already and is ours); raises
    WorkdirError naming what is in the way. Reads only."""
    if not workdir:
        raise WorkdirError("--workdir is empty: name a directory")
    if os.path.lexists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"--workdir {workdir} exists and is not a directory")
    if not os.path.exists(workdir):
        return False
    try:
        entries = os.listdir(workdir)
        ours = MARKER in entries or (bool(entries) and _is_legacy(workdir))
    except OSError as e:
        raise WorkdirError(f"--workdir {workdir}: {e.strerror}") from e
    if entries and not ours:
        raise WorkdirError(f"--workdir {workdir} holds files ({_names(entries)}) but neither the {MARKER} marker "
                           "of a run of this project nor a checkpoint of ours: a run would mix its files into them; "
                           "use a new or empty directory")
    if ours and METRICS_FILE in entries:
        try:
            read_metrics(os.path.join(workdir, METRICS_FILE))
        except (OSError, ValueError) as e:
            raise WorkdirError(f"{e}; the run would append to it: repair it or move it away") from e
    return ours


def claim_workdir(workdir: str) -> None:
    """Create `workdir` if needed and mark it as ours (after `check_workdir` passed)."""
    marker = os.path.join(workdir, MARKER)
    try:
        os.makedirs(workdir, exist_ok=True)
        if not os.path.exists(marker):
            with open(marker, "w", encoding="utf-8") as f:
                json.dump({"written_by": "dsv3_jax train", "created": _now()}, f)
                f.write("\n")
    except OSError as e:
        raise WorkdirError(f"--workdir {workdir}: {e.strerror or e}") from e


def _now() -> str:
    return datetime.datetime.now().strftime("%Y%m%dT%H%M%S")


def reason(e: BaseException) -> str:
    """An exception as a short one-line reason (orbax and tensorstore messages run to pages). Orbax
    wraps tensorstore's error (the one that says what is wrong) in its own: the innermost cause."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = re.split(r" \[tensorstore_spec", text)[0]
    if len(text) > REASON_CHARS:
        text = text[:REASON_CHARS] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class _DropAbandonedReads:
    """A sys.unraisablehook for restoring checkpoints that may be damaged. Orbax's restore gathers
    tensorstore reads on an asyncio loop that it closes when the first read fails; reads still in
    flight finish later, and their callbacks raise "Event loop is closed" into sys.unraisablehook, a
    traceback each, at any moment after (even before the restore's own error arrives). Those alone
    are dropped; anything else goes to the hook that was there."""

    def __init__(self, previous):
        self.previous = previous

    def __call__(self, unraisable) -> None:
        e = unraisable.exc_value
        if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
            return
        self.previous(unraisable)


class _DropAbandonedTasks(logging.Filter):
    """The same reads, wrapped in asyncio tasks and futures whose error nobody retrieves once the
    restore has failed: asyncio logs "Task exception was never retrieved" (or "Future ...") for each
    when it is collected, whichever of orbax's coroutines (`async_deserialize`) or tensorstore's
    futures (`_wrap_awaitable`) held it. Only those whose exception is a tensorstore read error are
    dropped; any other unretrieved exception is still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        abandoned = message.startswith(("Task exception was never retrieved", "Future exception was never retrieved"))
        return not (abandoned and _is_tensorstore_read(record, message))


def _is_tensorstore_read(record: logging.LogRecord, message: str) -> bool:
    e = record.exc_info[1] if record.exc_info else None
    text = str(e) if e is not None else message
    return "tensorstore_spec" in text or "coro=<_wrap_awaitable()" in message


def quiet_abandoned_reads() -> None:
    """Install `_DropAbandonedReads` and `_DropAbandonedTasks` (once), before restoring what may fail."""
    if not isinstance(sys.unraisablehook, _DropAbandonedReads):
        sys.unraisablehook = _DropAbandonedReads(sys.unraisablehook)
    tasks = logging.getLogger("asyncio")
    if not any(isinstance(f, _DropAbandonedTasks) for f in tasks.filters):
        tasks.addFilter(_DropAbandonedTasks())


def restore_newest(steps: Sequence[int], attempt: Callable[[int], T], where: str,
                   passthrough: tuple[type[BaseException], ...] = ()) -> tuple[int, T, list[tuple[int, str]]]:
    """The newest of `steps` whose `attempt(step)` succeeds: (step, its result, [(newer step, why it
    failed)]). An exception of a `passthrough` type is the user's problem, not the checkpoint's, and
    propagates. If none succeeds, WorkdirError names each step and why: nothing is then known to be
    corrupt rather than unreadable by this code."""
    quiet_abandoned_reads()
    failed = []
    for step in sorted(steps, reverse=True):
        try:
            return step, attempt(step), failed
        except passthrough:
            raise
        except Exception as e:  # orbax and tensorstore raise ValueError, OSError, RuntimeError, ...
            failed.append((step, reason(e)))
    detail = "; ".join(f"step {s}: {why}" for s, why in failed)
    raise WorkdirError(f"no checkpoint in {where} restores ({detail})")


def set_aside(checkpoints: str, step: int) -> str:
    """Rename checkpoints/<step> to corrupt-<step>-<time> (not a step name: orbax leaves it alone)."""
    base = os.path.join(checkpoints, f"{CORRUPT_PREFIX}{step}-{_now()}")
    target, n = base, 1
    while os.path.lexists(target):
        n += 1
        target = f"{base}-{n}"
    os.rename(os.path.join(checkpoints, str(step)), target)
    return target
