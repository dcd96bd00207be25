"""Which classes each model gets wrong, from the runs' eval.json (the end of a run's test of best.pt, or the last
--eval-only): per summary row its confusion counts summed over its runs; a heatmap of per-class test accuracy,
rows by classes (CIFAR-100 by its 20 superclasses, the dataset's coarse labels, with a second figure of the 100
classes); and per row its weakest class and its most common confusion, for summary.md and the page.

Accuracies are counted from the confusion matrices (right answers over images), so a superclass's accuracy is
that of its images, and seeds of one model weigh by their images. Like the rest of reports/, no torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from reports.figures import save_figure
from reports.summary import pretty_dataset, run_label
from runfolder import store
from runfolder.declarations import CLASS_ACCURACY_ALL_FILE, CLASS_ACCURACY_FILE, Evaluation

# Above this many columns the heatmap's cells are too small for their numbers.
CELL_TEXT_COLUMNS = 20


@dataclass(frozen=True)
class ClassCounts:
    """A test set's confusion counts (rows the true class) with its class names, and CIFAR-100's superclasses."""

    classes: tuple[str, ...]
    confusion: np.ndarray
    superclasses: tuple[tuple[str, str], ...] | None  # (class, superclass) pairs, in eval.json's order


def class_counts(evaluation: Evaluation | None) -> ClassCounts | None:
    """An eval.json's confusion counts, or None when it has none that match its class names (not evaluated, or a
    damaged file)."""
    if evaluation is None or not isinstance(evaluation.per_class, dict) or not evaluation.per_class:
        return None
    classes = tuple(str(name) for name in evaluation.per_class)
    try:
        confusion = np.array(evaluation.confusion_matrix, dtype=float)
    except (TypeError, ValueError):
        return None
    if confusion.shape != (len(classes), len(classes)) or not np.all(np.isfinite(confusion)) \
            or np.any(confusion < 0):
        return None
    mapping = evaluation.superclasses
    superclasses = None
    if isinstance(mapping, dict) and all(name in mapping and isinstance(mapping[name], str) for name in classes):
        superclasses = tuple((name, mapping[name]) for name in mapping if name in classes)
    return ClassCounts(classes, confusion, superclasses)


@dataclass(frozen=True)
class RowClasses:
    """A summary row's confusion counts, summed over its runs that have them."""

    label: str
    row: dict
    counts: ClassCounts
    runs: int  # how many of the row's runs the counts are of


@dataclass(frozen=True)
class ClassTable:
    """What the figures and the text show: the rows with counts, and the notes on what is left out."""

    rows: list[RowClasses]
    left_out: list[str]  # Markdown notes: rows not shown, and why


def class_table(rows: list[dict]) -> ClassTable:
    """Every summary row whose runs have eval.json counts of the same classes as the first such row."""
    shown, missing, other_classes = [], [], []
    for row in rows:
        counted = [counts for counts in (class_counts(run.get("evaluation")) for run in row["members"]) if counts]
        if not counted:
            missing.append(run_label(row))
            continue
        first = shown[0].counts if shown else counted[0]
        if any(counts.classes != first.classes for counts in counted):
            other_classes.append(run_label(row))
            continue
        superclasses = counted[0].superclasses if all(counts.superclasses == counted[0].superclasses
                                                      for counts in counted) else None
        summed = ClassCounts(first.classes, sum(counts.confusion for counts in counted), superclasses)
        shown.append(RowClasses(run_label(row), row, summed, len(counted)))
    left_out = []
    if missing:
        left_out.append("Not evaluated per class (no usable `eval.json`; `--eval-only` writes one): "
                        + ", ".join(missing) + ".")
    if other_classes:
        left_out.append("Left out for classes other than the first row's: " + ", ".join(other_classes) + ".")
    partial = [item.label for item in shown if item.runs < item.row["runs"]]
    if partial:
        left_out.append("Counted over the runs that have an `eval.json` only: " + ", ".join(partial) + ".")
    return ClassTable(shown, left_out)


def accuracy_by(counts: ClassCounts, by_superclass: bool) -> tuple[list[str], np.ndarray]:
    """Column names and accuracies (right answers over images, NaN where no image): per class, or per superclass
    in the dataset's order (eval.json lists the classes superclass by superclass)."""
    right, images = np.diag(counts.confusion), counts.confusion.sum(axis=1)
    if not by_superclass:
        names = list(counts.classes)
    else:
        of_class = dict(counts.superclasses)
        names = list(dict.fromkeys(of_class.values()))
        member = np.array([[of_class[name] == group for name in counts.classes] for group in names])
        right, images = member @ right, member @ images
    with np.errstate(invalid="ignore", divide="ignore"):
        return names, np.where(images > 0, right / np.maximum(images, 1), np.nan)


def weakest_and_confused(counts: ClassCounts) -> tuple[str, str]:
    """The class with the lowest accuracy, and the most common confusion ("cat → dog, 18.2% of cat"), as text."""
    names, accuracy = accuracy_by(counts, by_superclass=False)
    weakest = int(np.nanargmin(accuracy)) if not np.all(np.isnan(accuracy)) else None
    off_diagonal = counts.confusion.copy()
    np.fill_diagonal(off_diagonal, 0)
    weakest_text = "" if weakest is None else f"{names[weakest]} {100 * accuracy[weakest]:.1f}%"
    if off_diagonal.max() <= 0:
        return weakest_text, "none"
    true, predicted = np.unravel_index(int(np.argmax(off_diagonal)), off_diagonal.shape)
    share = off_diagonal[true, predicted] / counts.confusion[true].sum()
    return weakest_text, f"{names[true]} \u2192 {names[predicted]}, {100 * share:.1f}% of {names[true]}"


CLASS_HEADERS = ("model", "weakest class (test acc)", "most common confusion")


def class_lines(table: ClassTable) -> list[tuple[str, str, str]]:
    """Per shown row: its label, weakest class and most common confusion."""
    return [(item.label, *weakest_and_confused(item.counts)) for item in table.rows]


def by_superclass(table: ClassTable) -> bool:
    """Whether the heatmap groups classes by superclass: when every shown row knows them (CIFAR-100)."""
    return bool(table.rows) and all(item.counts.superclasses is not None for item in table.rows)


def class_notes(table: ClassTable) -> list[str]:
    """The footnotes of the section, in Markdown (`code` only)."""
    if not table.rows:
        return table.left_out
    notes = ["Test accuracy per class from each run's `eval.json` (written at the end of a run for `best.pt`, "
             "or by the last `--eval-only`), counted over a row's runs: right answers over images."]
    if by_superclass(table):
        notes.append("The heatmap groups the classes by the dataset's 20 superclasses (its coarse labels); "
                     f"`{CLASS_ACCURACY_ALL_FILE}` shows every class.")
    return notes + table.left_out


def class_markdown(table: ClassTable) -> list[str]:
    """summary.md's section: per row its weakest class and most common confusion, and the notes."""
    lines = ["", "## Classes", ""]
    if table.rows:
        lines += ["| " + " | ".join(CLASS_HEADERS) + " |", "|---|---|---|",
                  *(f"| {label} | {weakest} | {confused} |" for label, weakest, confused in class_lines(table)), ""]
    return lines + [f"- {note}" for note in class_notes(table)]


def _draw_heatmap(path: Path, table: ClassTable, superclass: bool, title: str) -> None:
    columns, matrix = None, []
    for item in table.rows:
        columns, accuracy = accuracy_by(item.counts, superclass)
        matrix.append(100 * accuracy)
    matrix = np.array(matrix)
    rows, width = len(table.rows), len(columns)
    figure = Figure(figsize=(max(6.0, 3.5 + 0.42 * min(width, 40) + 0.17 * max(0, width - 40)), 2.2 + 0.4 * rows),
                    layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(np.ma.masked_invalid(matrix), cmap="viridis", vmin=0, vmax=100, aspect="auto",
                        interpolation="nearest")
    figure.colorbar(image, ax=axes, shrink=0.9, label="test accuracy (%)")
    axes.set_xticks(np.arange(width), columns, rotation=90 if width > 10 else 45,
                    ha="center" if width > 10 else "right", fontsize=8 if width <= CELL_TEXT_COLUMNS else 6)
    axes.set_yticks(np.arange(rows), [f"{item.label} ({item.runs} run{'s' if item.runs != 1 else ''})"
                                      for item in table.rows], fontsize=8)
    if width <= CELL_TEXT_COLUMNS:
        for row_index in range(rows):
            for column_index in range(width):
                value = matrix[row_index, column_index]
                if np.isfinite(value):
                    axes.text(column_index, row_index, f"{value:.0f}", ha="center", va="center", fontsize=7,
                              color="white" if value < 60 else "black")
    axes.set_title(title, fontsize=10, parse_math=False)
    save_figure(figure, path, dpi=100)


def plot_class_accuracy(dataset_name: str, table: ClassTable, dataset_dir: Path) -> list[str]:
    """Draw the heatmap (and, by superclass, the one of every class) into dataset_dir; the names of the files
    written. A file of an earlier plot that this one does not draw is removed, so that no stale figure stays."""
    written = []
    superclass = by_superclass(table)
    if table.rows:
        what = "superclass" if superclass else "class"
        _draw_heatmap(dataset_dir / CLASS_ACCURACY_FILE, table, superclass,
                      f"{pretty_dataset(dataset_name)}: test accuracy per {what}")
        written.append(CLASS_ACCURACY_FILE)
        if superclass:
            _draw_heatmap(dataset_dir / CLASS_ACCURACY_ALL_FILE, table, False,
                          f"{pretty_dataset(dataset_name)}: test accuracy per class")
            written.append(CLASS_ACCURACY_ALL_FILE)
    for name in (CLASS_ACCURACY_FILE, CLASS_ACCURACY_ALL_FILE):
        if name not in written:
            store.remove_file(dataset_dir / name)
    return written
