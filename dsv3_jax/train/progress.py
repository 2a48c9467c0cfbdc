"""What a training run shows its user: a tqdm progress bar (step, loss, tokens/s and tqdm's ETA), or
plain lines where there is no terminal to draw it on, and at the end what the workdir holds.
"""
from __future__ import annotations

import importlib.util
import os
import shlex
import sys
import time
from typing import TextIO

from tqdm import tqdm

from dsv3_jax.train.metrics import METRICS_FILE, SUPERSEDED_PREFIX, TENSORBOARD_DIR, read_metrics
from dsv3_jax.train.plots import EXPERT_LOAD_PNG, LOSS_PNG
from dsv3_jax.train.workdir import CHECKPOINTS, CORRUPT_PREFIX

# Without a bar, a line every total / PLAIN_LINES steps (unless `print_every` says otherwise), and at
# least one every PLAIN_MAX_SECS, so a log shows a slow run is alive.
PLAIN_LINES = 10
PLAIN_MAX_SECS = 60.0


class Progress:
    """Steps from `initial_step` to `total_steps`; a resumed run starts part-way along the bar.

    `disable=None` lets tqdm hide the bar when `file` (stderr) is not a terminal; plain lines, one every
    `print_every` steps (0: about PLAIN_LINES a run), then take its place, so a log or CI run still
    shows progress. Pass True on processes other than the first in a multi-host run: nothing is shown.
    Pass host floats to `update`: converting a device array there would make the loop wait for the step.
    """

    def __init__(self, total_steps: int, initial_step: int = 0, tokens_per_step: int = 0, disable: bool | None = None,
                 print_every: int = 0, file: TextIO | None = None):
        self.tokens_per_step = tokens_per_step
        self.total = total_steps
        self.file = file if file is not None else sys.stderr
        self._step = initial_step
        self._time = time.perf_counter()
        self._start = self._time
        self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True, disable=disable,
                         file=self.file)
        self.plain = disable is None and self._bar.disable  # no terminal: plain lines instead
        self.print_every = print_every or max(1, round((total_steps - initial_step) / PLAIN_LINES))
        self._pending = None
        # (step, time) of the first update (after the compilation that the first step carries) and of the
        # last plain line: the time left is timed from the first, tokens/s from the second.
        self._rate_from = self._mark = None

    def update(self, step: int, loss: float, tokens_per_s: float | None = None, ce: float | None = None,
               extra: dict[str, float] | None = None) -> None:
        """Move the bar to `step`; tokens/s defaults to tokens_per_step over the time since the last update.
        `loss` is the training objective; `ce`, if given, the step's next-token cross-entropy; `extra`, more
        of the step's numbers by name (a DSA stage's indexer KL and recall), shown after it."""
        now = time.perf_counter()
        if tokens_per_s is None:
            elapsed = now - self._time
            tokens_per_s = (step - self._step) * self.tokens_per_step / elapsed if elapsed > 0 else 0.0
        # Postfix first, so the redraw that update() may trigger already shows this step's numbers.
        self._bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        self._bar.update(step - self._step)
        self._step, self._time = step, now
        if self.plain:
            self._rate_from = self._rate_from or (step, now)
            self._mark = self._mark or (step, now)
            self._pending = (step, loss, ce, tokens_per_s, now, extra or {})
            if step % self.print_every == 0 or step == self.total or now - self._mark[1] >= PLAIN_MAX_SECS:
                self._print_pending()

    def _print_pending(self) -> None:
        step, loss, ce, tokens_per_s, now, extra = self._pending
        if step > self._mark[0]:  # the mean since the last line, evaluations and checkpoints included
            tokens_per_s = (step - self._mark[0]) * self.tokens_per_step / (now - self._mark[1])
        ce_text = f", next-token cross-entropy {ce:.4f}" if ce is not None else ""
        ce_text += "".join(f", {name} {value:.4f}" for name, value in extra.items())
        timing = f"{tqdm.format_interval(now - self._start)} elapsed"
        from_step, from_time = self._rate_from
        if step > from_step:
            timing += f", {tqdm.format_interval((now - from_time) / (step - from_step) * (self.total - step))} left"
        self._line(f"step {step}/{self.total}: objective {loss:.4f}{ce_text}, {tokens_per_s:,.0f} tokens/s, {timing}")
        self._mark, self._pending = (step, now), None

    def _line(self, msg: str) -> None:
        print(msg, file=self.file, flush=True)

    def evaluated(self, step: int, heldout_ce: float) -> None:
        """Report a held-out evaluation: above the bar, or as a plain line."""
        msg = f"step {step}/{self.total}: held-out next-token cross-entropy {heldout_ce:.4f}"
        if self.plain:
            self._line(msg)
        elif not self._bar.disable:
            self._bar.write(msg, file=self.file)

    def write(self, msg: str) -> None:
        """Print a line above the bar without breaking it."""
        self._bar.write(msg)

    def close(self) -> None:
        if self.plain and self._pending is not None:  # the last step, if its line is still owed
            self._print_pending()
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _checkpoints_text(path: str) -> str:
    names = os.listdir(path) if os.path.isdir(path) else []
    steps = sorted(int(n) for n in names if n.isdigit())
    if not steps:
        return "orbax checkpoints: none yet"
    aside = [n for n in names if n.startswith(CORRUPT_PREFIX)]
    many = "s" if len(steps) > 1 else ""
    text = (f"orbax checkpoint{many} of step{many} {', '.join(map(str, steps))}; the same command again resumes "
            f"from step {steps[-1]}")
    return text + (f"; {len(aside)} that did not restore set aside as {CORRUPT_PREFIX}*" if aside else "")


def _metrics_text(path: str) -> str:
    try:
        records = read_metrics(path)
    except (OSError, ValueError) as e:
        return f"the run's record, one JSON line per logged step (unreadable: {e})"
    steps = f", steps {records[0]['step']} to {records[-1]['step']}" if records else ""
    return f"one JSON line per logged step: losses, lr, tokens/s, expert load ({len(records)} lines{steps})"


def _tensorboard_text(path: str) -> str:
    text = f"the same scalars for TensorBoard: tensorboard --logdir {shlex.quote(path)}"
    if importlib.util.find_spec("tensorboard") is None:
        text += " (not installed here: pip install tensorboard)"
    return text


# Entry of a workdir -> what it is (given the entry's path), for the names a run writes.
_DESCRIBE = {
    CHECKPOINTS: _checkpoints_text,
    METRICS_FILE: _metrics_text,
    TENSORBOARD_DIR: _tensorboard_text,
    LOSS_PNG: lambda _: "train vs held-out next-token cross-entropy (and the MTP cross-entropy) against step",
    EXPERT_LOAD_PNG: lambda _: "each MoE layer's routed-expert load against step (1 = balanced)",
}


def describe_workdir(workdir: str) -> str:
    """What is where in a workdir after a run, one line per entry (hidden entries left out)."""
    if not os.path.isdir(workdir):
        return f"{workdir} does not exist"
    lines = [f"{os.path.join(workdir, '')} holds:"]
    entries = sorted(n for n in os.listdir(workdir) if not n.startswith("."))
    width = max((len(n) + 1 for n in entries), default=0)
    for name in entries:
        path = os.path.join(workdir, name)
        shown = name + ("/" if os.path.isdir(path) else "")
        if name in _DESCRIBE:
            what = _DESCRIBE[name](path)
        elif name.startswith(SUPERSEDED_PREFIX):
            what = f"lines of {METRICS_FILE} that a resumed or restarted run set aside"
        else:
            what = "(not written by training)"
        lines.append(f"  {shown:<{width}}  {what}")
    return "\n".join(lines)
