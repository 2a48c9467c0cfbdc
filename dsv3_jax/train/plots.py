"""PNG plots of a run's metrics.jsonl: loss curves and per-layer expert-load heat maps.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so plotting needs no display
and never changes the process-wide matplotlib backend.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any

import numpy as np
from matplotlib import colors
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dsv3_jax.train.metrics import METRICS_FILE, read_metrics

LOSS_PNG = "loss.png"
EXPERT_LOAD_PNG = "expert_load.png"
# Expert-load colours saturate at this factor over or under the uniform share.
LOAD_COLOR_RANGE = 4.0
# (record key, legend label, line style) of the curves `plot_losses` draws when present.
_LOSS_CURVES = (
    ("loss", "train loss", "-"),
    ("mtp_loss", "train MTP loss", "-"),
    ("eval_loss", "held-out loss", "o-"),
)


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _series(records: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    points = sorted((r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)))
    steps = np.array([s for s, _ in points], dtype=np.float64)
    values = np.array([v for _, v in points], dtype=np.float64)
    return steps, values


def plot_losses(records: list[dict[str, Any]], out_png: str) -> str:
    """Train loss (and MTP loss) and held-out loss against step, on one figure."""
    fig = _new_figure(8, 4.5)
    ax = fig.add_subplot()
    drawn = 0
    for key, label, style in _LOSS_CURVES:
        steps, values = _series(records, key)
        if len(steps):
            ax.plot(steps, values, style, label=label, markersize=4, linewidth=1.2)
            drawn += 1
    if not drawn:
        raise ValueError("no record has 'loss', 'mtp_loss' or 'eval_loss'; nothing to plot")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("Training and held-out loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.savefig(out_png, dpi=100)
    return out_png


def _natural_key(name: str) -> list:
    """'layers_10' after 'layers_2'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _step_edges(steps: np.ndarray) -> np.ndarray:
    """Cell edges around each logged step, so uneven logging intervals keep their true x extent."""
    if len(steps) == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    mid = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[2 * steps[0] - mid[0]], mid, [2 * steps[-1] - mid[-1]]])


def _relative_loads(records: list[dict[str, Any]], layer: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps [n] and load / mean load [E, n] of one layer (1 = the uniform 1/E share)."""
    points = sorted((r["step"], r["expert_load"][layer]) for r in records if layer in r.get("expert_load", {}))
    steps = np.array([s for s, _ in points], dtype=np.float64)
    sizes = {len(load) for _, load in points}
    if len(sizes) != 1:
        raise ValueError(f"expert_load[{layer!r}] changes length across steps: {sorted(sizes)}")
    loads = np.array([load for _, load in points], dtype=np.float64).T
    with np.errstate(invalid="ignore", divide="ignore"):
        relative = loads / loads.mean(axis=0, keepdims=True)  # a step with no tokens -> NaN, drawn blank
    return steps, relative


def plot_expert_load(records: list[dict[str, Any]], out_png: str) -> str:
    """One heat map per MoE layer: step across, expert up, colour = load relative to uniform."""
    layers = sorted({name for r in records for name in r.get("expert_load", {})}, key=_natural_key)
    if not layers:
        raise ValueError("no record has 'expert_load' data; is the model without MoE layers?")
    data = {layer: _relative_loads(records, layer) for layer in layers}
    # Diverging around 1 on a log scale, so 2x over and 2x under look equally strong: blue under-used,
    # white balanced, red over-used. A fixed range keeps runs comparable and stops an early spike
    # (one expert taking everything at init) from washing out the imbalance that remains later.
    norm = colors.LogNorm(vmin=1 / LOAD_COLOR_RANGE, vmax=LOAD_COLOR_RANGE)
    ticks = [LOAD_COLOR_RANGE**f for f in (-1, -0.5, 0, 0.5, 1)]
    ncols = 1 if len(layers) <= 3 else min(4, math.ceil(math.sqrt(len(layers))))
    nrows = math.ceil(len(layers) / ncols)
    fig = _new_figure(6 * ncols, 3 * nrows + 0.6)
    for i, layer in enumerate(layers):
        steps, rel = data[layer]
        ax = fig.add_subplot(nrows, ncols, i + 1)
        y_edges = np.arange(rel.shape[0] + 1) - 0.5
        # An idle expert (load 0) has no logarithm; draw it in the darkest blue with the other outliers.
        shown = np.ma.masked_invalid(np.maximum(rel, np.finfo(np.float64).tiny))
        mesh = ax.pcolormesh(_step_edges(steps), y_edges, shown, cmap="RdBu_r", norm=norm)
        last = rel[:, -1][np.isfinite(rel[:, -1])]
        peak = f"{last.max():.2f}" if last.size else "n/a"
        ax.set_title(f"{layer}: max/mean at step {int(steps[-1])} = {peak}")
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
        bar = fig.colorbar(mesh, ax=ax, label="load / uniform load", extend="both")
        bar.set_ticks(ticks, labels=[f"{t:g}" for t in ticks])
        bar.minorticks_off()
    fig.suptitle("Routed-expert load per MoE layer (1 = balanced)")
    fig.savefig(out_png, dpi=100)
    return out_png


def write_plots(workdir: str) -> list[str]:
    """Plots `workdir/metrics.jsonl` into `workdir`; returns the paths written.

    A plot whose data is absent (no loss yet, or a model without MoE layers) is skipped.
    """
    records = read_metrics(os.path.join(workdir, METRICS_FILE))
    written = []
    if any(key in r for r in records for key, _, _ in _LOSS_CURVES):
        written.append(plot_losses(records, os.path.join(workdir, LOSS_PNG)))
    if any("expert_load" in r for r in records):
        written.append(plot_expert_load(records, os.path.join(workdir, EXPERT_LOAD_PNG)))
    return written
