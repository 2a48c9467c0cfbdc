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
# (record key, legend label, line style) of the curves `loss_curves` draws when present: cross-entropies
# only, so every line is on the axis it is labelled with. The training objective ("loss": next-token CE +
# lambda x MTP CE + alpha x balance loss) is not a cross-entropy; it is drawn only for a log without
# "ce" (runs from before the next-token CE was logged), labelled as the objective.
_LOSS_CURVES = (
    ("ce", "train: next-token cross-entropy (this step's batch)", "-"),
    ("mtp_loss", "train: MTP cross-entropy (the extra tokens ahead, mean over depths)", "--"),
    ("eval_loss", "held-out files: next-token cross-entropy", "o-"),
)
_OBJECTIVE_CURVE = ("loss", "train: objective (next-token + MTP + balance loss; not a cross-entropy)", ":")


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _series(records: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    points = sorted((r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)))
    steps = np.array([s for s, _ in points], dtype=np.float64)
    values = np.array([v for _, v in points], dtype=np.float64)
    return steps, values


def loss_curves(records: list[dict[str, Any]]) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """(label, line style, steps, values) of each curve `plot_losses` draws, in drawing order."""
    curves = _LOSS_CURVES
    if not any("ce" in r for r in records):
        curves = (_OBJECTIVE_CURVE, *curves[1:])
    out = []
    for key, label, style in curves:
        steps, values = _series(records, key)
        if len(steps) and (key != "mtp_loss" or values.any()):  # a model without MTP logs 0
            out.append((label, style, steps, values))
    return out


def plot_losses(records: list[dict[str, Any]], out_png: str) -> str:
    """Train and held-out next-token cross-entropy (and the train MTP cross-entropy) against step."""
    curves = loss_curves(records)
    if not curves:
        raise ValueError("no record has 'ce', 'mtp_loss', 'eval_loss' or 'loss'; nothing to plot")
    fig = _new_figure(8, 4.5)
    ax = fig.add_subplot()
    for label, style, steps, values in curves:
        ax.plot(steps, values, style, label=label, markersize=4, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("Cross-entropy on training batches and on held-out files")
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
    if loss_curves(records):
        written.append(plot_losses(records, os.path.join(workdir, LOSS_PNG)))
    if any("expert_load" in r for r in records):
        written.append(plot_expert_load(records, os.path.join(workdir, EXPERT_LOAD_PNG)))
    return written
