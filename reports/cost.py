"""Accuracy against cost of a dataset folder: each model's final test accuracy against its parameters, its FLOPs
and its measured training throughput, with the Pareto front of each (the models no other beats on both axes);
drawn as accuracy_cost.png, listed in summary.md and on the HTML page. Read from reports/summary.py's rows alone: no
torch, no model code.

What is set beside what:
- Only finished rows with a final test accuracy, grouped by recipe (--recipe; the course's with a flag typed over it
  counts as a recipe of its own) and epoch count: accuracies of other recipes or epochs do not measure the same
  thing, so each group is a row of panels of its own.
- A point's accuracy is its row's mean final test accuracy over the row's runs (seeds), the error bar their sample
  standard deviation; its cost on the parameter and FLOP axes is config.json's count.
- Throughput is training images per second: config.json's train_images over the median train_seconds of the
  epochs after the first (the first holds compilation and cuDNN autotuning, as summary.json's steady_epoch_seconds
  leaves it out), averaged over the row's runs. Images per second on two devices are not one scale: a group's
  throughput panel takes the runs of its most common device (the GPU's name or CPU, and the process count) only.
- What a panel cannot show (no parameter count, a metrics.csv older than its train_seconds column, another device)
  is left out of that panel with a footnote naming the runs, never an error.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from reports.figures import save_figure
from reports.summary import count_text, course_typed_over, pretty_dataset
from runfolder import store
from runfolder.declarations import ACCURACY_COST_FILE

NO_COST_LINE = "No finished run has a final test accuracy: nothing to set against cost yet."
COST_INTRO = (f"Final test accuracy (the mean over a model's runs; their standard deviation as error bars in "
              f"`{ACCURACY_COST_FILE}`) against each cost, for the rows of one recipe and epoch count. Pareto "
              "front: the models no other beats on both accuracy and cost, cheapest first. Throughput: training "
              "images per second over the median `train_seconds` of the epochs after the first, on one device.")


@dataclass(frozen=True)
class CostAxis:
    """One cost a model's accuracy is set against: the key of its value (_row_costs), its names in the panels and
    the text, which way is cheaper, and how a value reads."""

    key: str
    name: str
    label: str
    higher_is_better: bool
    text: Callable[[float], str]


COST_AXES = (
    CostAxis("parameters", "parameters", "parameters (log scale)", False, lambda value: count_text(int(value))),
    CostAxis("flops", "FLOPs", "FLOPs of a forward pass of one image (log scale)", False,
             lambda value: count_text(int(value))),
    CostAxis("throughput", "throughput", "training images per second (log scale; faster to the right)", True,
             lambda value: f"{value:.0f} images/s"),
)


@dataclass(frozen=True)
class CostPoint:
    """A model in a panel: its mean final test accuracy (a fraction), the standard deviation over its runs (None for
    one run) and its cost on the panel's axis."""

    model: str
    accuracy: float
    spread: float | None
    cost: float


@dataclass(frozen=True)
class CostPanel:
    """One axis of a group: its points, their Pareto front (cheapest first) and, for throughput, the device."""

    axis: CostAxis
    points: tuple[CostPoint, ...]
    front: tuple[CostPoint, ...]
    device: str | None = None

    @property
    def title(self) -> str:
        return self.axis.name + (f" on {self.device}" if self.device else "")

    def front_text(self) -> str:
        """'parameters: cnn_base (62.01K, 49.00%) → cnn_resnet18 (11.17M, 52.00%)' (plain text, from run files)."""
        if not self.points:
            return f"{self.title}: no model has it"
        return f"{self.title}: " + " \u2192 ".join(
            f"{point.model} ({self.axis.text(point.cost)}, {100 * point.accuracy:.2f}%)" for point in self.front)


@dataclass(frozen=True)
class CostGroup:
    """The rows of one recipe and epoch count: a panel per axis, and Markdown footnotes on what they leave out."""

    title: str
    panels: tuple[CostPanel, ...]
    notes: tuple[str, ...]


@dataclass(frozen=True)
class CostReport:
    """Everything the figure, summary.md and the page say: the groups, and Markdown footnotes on the rows that are
    in none."""

    groups: tuple[CostGroup, ...]
    notes: tuple[str, ...]


# ---------------------------------------------------------------------------------------------------
# Throughput and the Pareto front


def _steady_train_seconds(run: dict) -> float:
    """The median train_seconds of a run's epochs after the first (of its one epoch if it has one); NaN when an
    epoch lacks it (a metrics.csv older than the column holds NaN there)."""
    seconds = np.asarray(run["metrics"]["train_seconds"], dtype=float)
    steady = seconds[1:] if len(seconds) > 1 else seconds
    return float(np.median(steady)) if len(steady) else float("nan")


def _throughput(run: dict) -> tuple[float | None, str | None]:
    """Training images per second of a run (read_run's dict): train_images over the median train_seconds of the
    epochs after the first; or None and why it has none, in Markdown."""
    images, seconds = run.get("train_images"), _steady_train_seconds(run)
    if not isinstance(images, int) or images <= 0:
        return None, "config.json has no count of training images"
    if np.isnan(seconds):
        return None, "its metrics.csv has no `train_seconds` (it predates the column)"
    if seconds <= 0:
        return None, "its `train_seconds` are not positive"
    return images / seconds, None


def run_throughput(run: dict) -> float | None:
    """Training images per second of a run; None when train_images or train_seconds is missing, NaN or not
    positive."""
    return _throughput(run)[0]


def pareto_front(points: list[CostPoint], higher_cost_is_better: bool = False) -> list[CostPoint]:
    """The points no other point dominates: none has an accuracy as high and a cost as low (as high, when a higher
    cost is better, as for throughput), one of the two strictly. Equal points all stay. Sorted along the cost axis
    from the cheapest, so that the accuracy rises along it."""
    sign = -1.0 if higher_cost_is_better else 1.0

    def dominates(first: CostPoint, second: CostPoint) -> bool:
        return (first.accuracy >= second.accuracy and sign * first.cost <= sign * second.cost
                and (first.accuracy > second.accuracy or first.cost != second.cost))

    front = [point for point in points if not any(dominates(other, point) for other in points)]
    return sorted(front, key=lambda point: (sign * point.cost, point.accuracy, point.model))


# ---------------------------------------------------------------------------------------------------
# The groups and their panels


def _group_title(row: dict) -> str:
    """'default recipe, 50 epochs'; the course recipe with a recipe flag typed over it says so."""
    typed_over = " with flags typed over it" if course_typed_over(row) else ""
    return f"{row['recipe']} recipe{typed_over}, {row['epochs']} epochs"


def _point(row: dict, cost: float) -> CostPoint:
    return CostPoint(row["model"], row["final_test_acc"], row["final_test_acc_std"], float(cost))


def _panel(axis: CostAxis, points: list[CostPoint], device: str | None = None) -> CostPanel:
    return CostPanel(axis, tuple(points), tuple(pareto_front(points, axis.higher_is_better)), device)


def _count_panel(axis: CostAxis, rows: list[dict]) -> tuple[CostPanel, list[str]]:
    """The parameters or FLOPs panel: config.json's count of each row; rows without one are left out."""
    points = [_point(row, row[axis.key]) for row in rows if row[axis.key] and row[axis.key] > 0]
    missing = [row["model"] for row in rows if not (row[axis.key] and row[axis.key] > 0)]
    notes = [f"Left out of the {axis.name} panel, no count in config.json: {', '.join(missing)}."] if missing else []
    return _panel(axis, points), notes


def _throughput_panel(axis: CostAxis, rows: list[dict]) -> tuple[CostPanel, list[str]]:
    """The throughput panel: each row's mean over its runs on the group's most common device (ties: the first by
    name); runs without a throughput, or of another device, are left out."""
    gaps: dict[str, list[str]] = {}
    measured = []
    for row in rows:
        for run in row["members"]:
            throughput, gap = _throughput(run)
            gap = gap or (None if run.get("device") else "config.json names no device")
            if gap:
                gaps.setdefault(gap, []).append(run["run_dir"])
            else:
                measured.append((row, run, throughput))
    devices = Counter(run["device"] for _, run, _ in measured)
    device = min(devices, key=lambda name: (-devices[name], name)) if devices else None
    by_row: dict[str, list[float]] = {}
    for row, run, throughput in measured:
        if run["device"] == device:
            by_row.setdefault(row["model"], []).append(throughput)
    points = [_point(row, np.mean(by_row[row["model"]])) for row in rows if row["model"] in by_row]
    notes = [f"Left out of the throughput panel, {gap}: {', '.join(runs)}." for gap, runs in gaps.items()]
    others = [f"{run['run_dir']} ({run['device']})" for _, run, _ in measured if run["device"] != device]
    if others:
        notes.append(f"Left out of the throughput panel, trained on another device than {device}: "
                     f"{', '.join(others)}.")
    return _panel(axis, points, device), notes


def _group(rows: list[dict]) -> CostGroup:
    panels, notes = [], []
    for axis in COST_AXES:
        panel, panel_notes = (_throughput_panel if axis.key == "throughput" else _count_panel)(axis, rows)
        panels.append(panel)
        notes += panel_notes
    return CostGroup(_group_title(rows[0]), tuple(panels), tuple(notes))


def cost_report(rows: list[dict]) -> CostReport:
    """The groups of summary.group_runs' rows (finished, with a final test accuracy; one group per recipe and epoch
    count, in the rows' order) and the footnotes on the rows left out of all of them."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if row["finished"] and row["final_test_acc"] is not None:
            groups.setdefault(_group_title(row), []).append(row)
    notes = []
    unfinished = [row["run_dirs"] for row in rows if not row["finished"]]
    if unfinished:
        notes.append(f"Unfinished runs are in no panel (no test accuracy yet): {', '.join(unfinished)}.")
    untested = [row["run_dirs"] for row in rows if row["finished"] and row["final_test_acc"] is None]
    if untested:
        notes.append(f"Finished runs without a final test accuracy in summary.json are in no panel: "
                     f"{', '.join(untested)}.")
    return CostReport(tuple(_group(members) for members in groups.values()), tuple(notes))


# ---------------------------------------------------------------------------------------------------
# summary.md and the figure


def cost_markdown(rows: list[dict]) -> list[str]:
    """summary.md's section "Accuracy against cost": per group its Pareto fronts and footnotes, then the rows in no
    group; Markdown, `code` only."""
    report = cost_report(rows)
    lines = ["", "## Accuracy against cost", "", COST_INTRO if report.groups else NO_COST_LINE]
    for group in report.groups:
        lines += ["", f"### {group.title}", "", *(f"- Pareto front by {panel.front_text()}" for panel in group.panels),
                  *(f"- {note}" for note in group.notes)]
    if report.notes:
        lines += ["", *(f"- {note}" for note in report.notes)]
    return lines


def _draw_panel(axes, panel: CostPanel, group_title: str, colors: dict[str, tuple]) -> None:
    # parse_math=False: a model, recipe or GPU name with a '$' is text, not mathtext.
    axes.set_title(f"{group_title}\n{panel.title}", fontsize=10, parse_math=False)
    if not panel.points:
        axes.text(0.5, 0.5, f"no model has its {panel.axis.name}\n(see summary.md)", ha="center", va="center",
                  transform=axes.transAxes, color="grey")
        axes.set(xticks=[], yticks=[])
        return
    for point in panel.points:
        accuracy = 100 * point.accuracy
        axes.errorbar(point.cost, accuracy, yerr=None if point.spread is None else 100 * point.spread, fmt="o",
                      color=colors.get(point.model, "tab:grey"), markeredgecolor="black", markeredgewidth=0.5,
                      ecolor="black", elinewidth=1, capsize=3, zorder=3)
        axes.annotate(point.model, (point.cost, accuracy), xytext=(4, 4), textcoords="offset points", fontsize=7,
                      parse_math=False)
    axes.plot([point.cost for point in panel.front], [100 * point.accuracy for point in panel.front],
              color="tab:red", linestyle="--", linewidth=1.2, marker="o", markersize=11, markerfacecolor="none",
              zorder=2, label="Pareto front")  # rings round its points: a front of one point shows too
    # Half a decade of room each side: the names fit, and the axis spans a power of ten to label (the minor
    # ticks' labels, which matplotlib adds on a shorter axis, run into each other).
    costs = [point.cost for point in panel.points]
    axes.set_xscale("log")
    axes.set_xlim(min(costs) / 10 ** 0.5, max(costs) * 10 ** 0.5)
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.set(xlabel=panel.axis.label, ylabel="final test accuracy (%)")
    axes.grid(alpha=0.3, which="both")
    axes.legend(loc="best", fontsize=8)


def plot_accuracy_cost(dataset_name: str, rows: list[dict], path: Path, colors: dict[str, tuple]) -> bool:
    """Draw the panels of cost_report(rows), a row of them per group, as a PNG at path (colors: the model's colour,
    figures.model_colors); False, and no file there (a stale one removed), when no group has a point."""
    report = cost_report(rows)
    if not report.groups:
        store.remove_file(Path(path))
        return False
    figure = Figure(figsize=(16, 4.8 * len(report.groups)), layout="constrained")
    grid = figure.subplots(len(report.groups), len(COST_AXES), squeeze=False)
    for group, axes_row in zip(report.groups, grid):
        for panel, axes in zip(group.panels, axes_row):
            _draw_panel(axes, panel, group.title, colors)
    figure.suptitle(f"{pretty_dataset(dataset_name)}: final test accuracy against cost")
    save_figure(figure, Path(path), dpi=110)
    return True
