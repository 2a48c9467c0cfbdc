"""A tqdm progress bar for the training loop: step, loss, tokens/s and tqdm's own ETA."""
from __future__ import annotations

import time

from tqdm import tqdm


class Progress:
    """Steps from `initial_step` to `total_steps`; a resumed run starts part-way along the bar.

    `disable=None` lets tqdm hide the bar when stderr is not a terminal; pass True on processes
    other than the first in a multi-host run. Pass host floats to `update`: converting a device
    array there would make the loop wait for the step.
    """

    def __init__(self, total_steps: int, initial_step: int = 0, tokens_per_step: int = 0, disable: bool | None = None):
        self.tokens_per_step = tokens_per_step
        self._step = initial_step
        self._time = time.perf_counter()
        self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True, disable=disable)

    def update(self, step: int, loss: float, tokens_per_s: float | None = None) -> None:
        """Move the bar to `step`; tokens/s defaults to tokens_per_step over the time since the last update."""
        now = time.perf_counter()
        if tokens_per_s is None:
            elapsed = now - self._time
            tokens_per_s = (step - self._step) * self.tokens_per_step / elapsed if elapsed > 0 else 0.0
        # Postfix first, so the redraw that update() may trigger already shows this step's numbers.
        self._bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        self._bar.update(step - self._step)
        self._step, self._time = step, now

    def write(self, msg: str) -> None:
        """Print a line above the bar without breaking it."""
        self._bar.write(msg)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
