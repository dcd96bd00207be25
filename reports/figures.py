"""The figures of the reports, drawn from run files alone: a run's curves.png (from its metrics.csv), a confusion
matrix and the most confident mistakes (the test report of the end of a run and of --eval-only hands over what it
measured), and a dataset folder's comparison.png (from the summary
rows of reports/summary.py). Plus serve_curves, the process that draws curves.png while a run trains
(training/recording.py's CurvesDrawer), which is why importing this module must stay cheap: no torch, no model
code (the model families that colour the comparison come in as an argument).
Figures are drawn on matplotlib.figure.Figure objects with the Agg canvas and never through
pyplot, so nothing needs a display and no figure outlives the call that drew it.
"""
from __future__ import annotations

import json
import math
import signal
import sys
from pathlib import Path
from typing import TextIO

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize, PowerNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from reports.summary import count_text, pretty_dataset, recipe_text
from runfolder import store
from runfolder.declarations import (
    CONFIG_FILE,
    CURVES_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    RunFacts,
    Summary,
    as_number,
    read_metrics,
)

# The colour map of each model family (every family of the registry has one; a test checks it), and of
# models the registry does not know.
FAMILY_COLORMAPS = {
    "base": "Greys",
    "resnet": "Blues",
    "densenet": "Greens",
    "se_resnet": "Oranges",
    "vgg": "Purples",
    "resnext": "Reds",
    "sknet": "YlOrBr",
    "res2net": "PuRd",
    "scnet": "BuGn",
    "ca_resnet": "RdPu",
    "nl_resnet": "GnBu",
}
UNKNOWN_FAMILY_COLORMAP = "Purples"


def save_figure(figure: Figure, path: Path, dpi: int) -> None:
    FigureCanvasAgg(figure)
    store.write_atomically(path, lambda out: figure.savefig(out, format="png", dpi=dpi))


# ----------------------------------------------------------------------------------------------
# One run


def plot_curves(run_dir: str | Path) -> Path:
    """Draw <run_dir>/curves.png (loss and accuracy per epoch) from metrics.csv; return its path."""
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir / METRICS_FILE)
    config = store.read_json(run_dir / CONFIG_FILE) or {}
    summary = store.read_record(run_dir / SUMMARY_FILE, Summary)
    epochs = metrics["epoch"]
    run_name = run_dir.name
    if "model" in config:
        run_name = str(config["model"]) + (f" ({config['tag']})" if config.get("tag") else "")
    dataset = RunFacts.from_dict(config, run_dir / CONFIG_FILE, partial=True).dataset or run_dir.parent.name
    title = f"{run_name} on {pretty_dataset(str(dataset))}"
    planned = config.get("epochs")
    title += f" \u2014 epoch {len(epochs)}" + (f"/{planned}" if planned else "")
    if summary and as_number(summary.test_acc) is not None:
        title += f", test accuracy {100 * summary.test_acc:.2f}%"

    figure = Figure(figsize=(10, 4), layout="constrained")
    loss_axes, acc_axes = figure.subplots(1, 2)
    # Markers only while there are few points: a single epoch would otherwise draw nothing.
    style = {"marker": "o", "markersize": 3} if len(epochs) <= 30 else {}
    loss_axes.plot(epochs, metrics["train_loss"], label="train", color="tab:blue", **style)
    loss_axes.plot(epochs, metrics["val_loss"], label="valid", color="tab:orange", **style)
    acc_axes.plot(epochs, 100 * metrics["train_acc"], label="train", color="tab:blue", **style)
    acc_axes.plot(epochs, 100 * metrics["val_acc"], label="valid", color="tab:orange", **style)
    if not np.all(np.isnan(metrics["val_acc"])):
        best = int(np.nanargmax(metrics["val_acc"]))
        for axes in (loss_axes, acc_axes):
            axes.axvline(epochs[best], color="grey", linestyle=":", linewidth=1)
        acc_axes.plot(epochs[best], 100 * metrics["val_acc"][best], "*", color="tab:red",
                      markersize=12, label=f"best valid {100 * metrics['val_acc'][best]:.2f}% "
                                           f"(epoch {int(epochs[best])})")
    loss_axes.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    acc_axes.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    for axes in (loss_axes, acc_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend(loc="best", fontsize=9)
    figure.suptitle(title)
    path = run_dir / CURVES_FILE
    save_figure(figure, path, dpi=120)
    return path


def plot_confusion_matrix(matrix, class_names: list[str], path: str | Path, title: str) -> None:
    """Draw a confusion matrix (rows = true class, counts) normalized per row, as a PNG at path."""
    counts = np.asarray(matrix, dtype=float)
    if counts.shape != (len(class_names), len(class_names)):
        raise ValueError(f"confusion matrix of shape {counts.shape} does not match "
                         f"{len(class_names)} class names")
    row_totals = counts.sum(axis=1, keepdims=True)
    percent = 100 * np.divide(counts, row_totals, out=np.zeros_like(counts), where=row_totals > 0)
    num_classes = len(class_names)
    few_classes = num_classes <= 20
    # Cells stay about 0.18 in (13 pt) wide, so 100 names fit at 7 pt; numbers in cells only while
    # they fit. With many classes the confusions worth seeing are a few percent, which a linear
    # colour scale leaves white, hence the square-root scale there.
    side = max(6.0, 0.18 * num_classes + 3)
    label_size = 10 if few_classes else 7
    norm = Normalize(0, 100) if few_classes else PowerNorm(0.5, 0, 100)
    figure = Figure(figsize=(side + 1.2, side), layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(percent, cmap="Blues", norm=norm, interpolation="nearest")
    colorbar = figure.colorbar(image, ax=axes, shrink=0.8)
    heading_size = 10 if few_classes else 16  # on a 20-inch figure 10 pt headings get lost
    if few_classes:
        colorbar.set_label("share of the true class (%)")
    else:
        colorbar.set_ticks([0, 1, 5, 10, 25, 50, 75, 100])
        colorbar.set_label("share of the true class (%), square-root scale", fontsize=heading_size)
    ticks = np.arange(num_classes)
    axes.set_xticks(ticks, class_names, rotation=90, fontsize=label_size)
    axes.set_yticks(ticks, class_names, fontsize=label_size)
    axes.set_xlabel("predicted class", fontsize=heading_size)
    axes.set_ylabel("true class", fontsize=heading_size)
    axes.set_title(title, fontsize=heading_size + 2)
    if few_classes:
        for true_index in range(num_classes):
            for predicted_index in range(num_classes):
                value = percent[true_index, predicted_index]
                axes.text(predicted_index, true_index, f"{value:.1f}", ha="center", va="center",
                          fontsize=8, color="white" if value > 50 else "black")
    save_figure(figure, Path(path), dpi=120)


def plot_mistakes(mistakes: list[dict], thumbnails: list, path: str | Path, title: str) -> None:
    """Thumbnails (uint8 32 x 32 x 3) of the test images a network got wrong most confidently, 4 to a row, each
    with its true and predicted class and the confidence, as a PNG at path; mistakes: eval.json's."""
    columns = 4
    rows = max(1, math.ceil(len(mistakes) / columns))
    figure = Figure(figsize=(2.1 * columns, 2.3 * rows + 0.5), layout="constrained")
    grid = np.atleast_1d(figure.subplots(rows, columns)).ravel()
    for axes in grid:
        axes.set_axis_off()
    for axes, item, image in zip(grid, mistakes, thumbnails):
        axes.imshow(image, interpolation="nearest")
        # parse_math=False: a class name with '$' is text, not mathtext.
        axes.set_title(f"true: {item['true']}\npredicted: {item['predicted']}\n{100 * item['confidence']:.1f}% sure",
                       fontsize=8, parse_math=False)
    if not mistakes:
        grid[0].text(0, 0.5, "no mistakes", fontsize=10)
    figure.suptitle(title, fontsize=10)
    save_figure(figure, Path(path), dpi=100)


# ----------------------------------------------------------------------------------------------
# A dataset folder


def model_colors(models: list[str], families: dict[str, str]) -> dict[str, tuple]:
    """One colour per model: the family's colour map (families: the registry's, model.MODEL_FAMILIES), the depth
    rank the shade; models the registry does not know share one colour map."""
    family = {model: families.get(model) for model in models}
    colors = {}
    for name in dict.fromkeys(family.values()):
        members = [model for model in models if family[model] == name]
        cmap = colormaps[FAMILY_COLORMAPS.get(name, UNKNOWN_FAMILY_COLORMAP)]
        # Shades from 0.45 to 0.95 of the map: lighter ones vanish on white.
        shades = np.linspace(0.45, 0.95, len(members)) if len(members) > 1 else [0.8]
        for model, shade in zip(members, shades):
            colors[model] = cmap(shade)
    return colors


def _draw_validation_curves(axes, rows: list[dict], colors: dict[str, tuple]) -> None:
    labelled_models = set()
    for row in rows:
        for run in row["members"]:
            # One legend entry per model: seeds of one model share its colour.
            label = None if row["model"] in labelled_models else row["model"]
            labelled_models.add(row["model"])
            epochs = run["metrics"]["epoch"]
            # A run of one epoch is a point, which a line alone would not draw.
            axes.plot(epochs, 100 * run["metrics"]["val_acc"], label=label,
                      color=colors[row["model"]], linewidth=1.3, marker="o" if len(epochs) == 1 else None,
                      markersize=5, linestyle="-" if row["finished"] else "--")
    if not all(row["finished"] for row in rows):
        axes.plot([], [], color="grey", linestyle="--", label="unfinished run")
    axes.set(xlabel="epoch", ylabel="validation accuracy (%)",
             title="Validation accuracy per epoch (every run)")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    # Outside the axes: with 15 models any legend inside would cover curves.
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


def _draw_best_accuracy_bars(axes, rows: list[dict], colors: dict[str, tuple]) -> None:
    positions = np.arange(len(rows))
    best = np.array([100 * row["best_val_acc"] for row in rows])
    spread = np.array([100 * (row["best_val_acc_std"] or 0.0) for row in rows])
    bars = axes.barh(positions, best, color=[colors[row["model"]] for row in rows])
    with_spread = spread > 0
    axes.errorbar(best[with_spread], positions[with_spread], xerr=spread[with_spread], fmt="none",
                  ecolor="black", capsize=3, linewidth=1)
    for bar, row in zip(bars, rows):
        if not row["finished"]:
            bar.set_hatch("//")
            bar.set_edgecolor("white")
    tick_labels = []
    for row in rows:
        details = [f"{count_text(row['parameters'])} params"] if row["parameters"] else []
        details += [f"{row['runs']} runs"] if row["runs"] > 1 else []
        if not row["finished"]:
            planned = f"/{row['planned_epochs']}" if row["planned_epochs"] else ""
            details.append(f"unfinished {row['epochs']}{planned} epochs")
        name = row["model"] + recipe_text(row) if row["finished"] else row["run_dirs"]
        tick_labels.append(name + ("\n" + ", ".join(details) if details else ""))
    axes.set_yticks(positions, tick_labels, fontsize=8)
    axes.invert_yaxis()  # first summary row at the top, as in summary.md
    # Differences between models are a few points: start the axis near the lowest bar, print each
    # value so the truncated bars are never read as ratios, and leave room right for that text.
    ends = best + spread
    low = 0.0
    if not np.all(np.isnan(best)):
        low = max(0.0, 5 * math.floor((np.nanmin(best - spread) - 5) / 5))
    top = 100.0 if np.all(np.isnan(ends)) else float(np.nanmax(ends))
    axes.set_xlim(low, top + 0.25 * (top - low) + 1)
    axes.set_xticks([tick for tick in axes.get_xticks() if low <= tick <= 100])
    for position, value, error, end in zip(positions, best, spread, ends):
        text = f"{value:.2f}%" + (f" \u00b1 {error:.2f}" if error else "")
        axes.text(end + 0.01 * (top - low) + 0.2, position, text, va="center", fontsize=8)
    axes.set(xlabel=f"best validation accuracy (%), axis from {low:g}%",
             title="Best validation accuracy per model")
    axes.grid(axis="x", alpha=0.3)


def plot_comparison(dataset_name: str, rows: list[dict], path: Path, families: dict[str, str]) -> None:
    """Best validation accuracy per summary row, and validation accuracy per epoch of every run, each model in
    its family's colours (families: model.MODEL_FAMILIES)."""
    models = list(dict.fromkeys(row["model"] for row in rows))
    colors = model_colors(models, families)
    figure = Figure(figsize=(15, max(5.0, 0.34 * len(rows) + 2)), layout="constrained")
    # Bars first: their long tick labels then sit at the figure's left edge instead of leaving a
    # gap beside the curves' legend.
    bar_axes, curve_axes = figure.subplots(1, 2, width_ratios=[1, 1.1])
    _draw_best_accuracy_bars(bar_axes, rows, colors)
    _draw_validation_curves(curve_axes, rows, colors)
    run_count = sum(row["runs"] for row in rows)
    figure.suptitle(f"{pretty_dataset(dataset_name)}: {run_count} runs of {len(models)} models")
    save_figure(figure, path, dpi=110)


# ----------------------------------------------------------------------------------------------
# The drawing process of a run


def serve_curves(answers: TextIO) -> None:
    """The drawing process of training/recording.py's CurvesDrawer: for every line of its input (a run folder, as
    a JSON string), draw the folder's curves.png and answer a line to `answers`: null, or the JSON list
    [path, reason] of what could not be written. Ends when its input does."""
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(number, signal.SIG_IGN)
    for line in sys.stdin:
        folder = Path(json.loads(line))
        try:
            plot_curves(folder)
            answer = None
        except store.WriteFailed as err:
            answer = [str(err.path), err.reason]
        except Exception as err:  # a bug, or a file of the folder broken meanwhile: said, never a hang
            answer = [str(folder / CURVES_FILE), f"drawing failed: {type(err).__name__}: {err}"]
        print(json.dumps(answer), file=answers, flush=True)
