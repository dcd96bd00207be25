"""Figures and tables made from run folders: the files train.py writes are the only input.

    python plot.py results/cifar10/cnn_resnet18   # redraw one run's curves.png
    python plot.py results/cifar10                # summary.md, summary.csv, comparison.png
    python plot.py results                        # the same for every dataset folder

Also writes the HTML pages of a dataset folder and of the results root (report.py). Run folders
are read through runs.py, the module that writes them. train.py calls plot_curves()
after every epoch, so importing this module must stay cheap: no torch here (the model registry is
imported lazily, only to order summary rows and colour families).
Figures are drawn on matplotlib.figure.Figure objects with the Agg canvas and never through
pyplot, so nothing needs a display and no figure outlives the call that drew it.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import re
import sys
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize, PowerNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

import runs
from runs import RunFileError, read_json, read_metrics, warn

# What a dataset folder's summary consists of, next to its run folders.
SUMMARY_CSV_FILE = "summary.csv"
SUMMARY_MD_FILE = "summary.md"
COMPARISON_FILE = "comparison.png"
# The colour map of models the registry does not know (the registry gives each family its own).
UNKNOWN_FAMILY_COLORMAP = "Purples"
# Columns averaged over the runs of one summary row (mean, and sample std when there are several).
AVERAGED_FIELDS = ("train_acc", "best_val_acc", "best_epoch", "test_acc", "final_test_acc",
                   "train_loss", "val_loss", "seconds_per_epoch")
SUMMARY_CSV_COLUMNS = (
    ("model", "run_dirs", "runs", "finished", "parameters", "flops", "epochs", "planned_epochs")
    + tuple(column for field in AVERAGED_FIELDS for column in (field, f"{field}_std"))
)


class PlotError(Exception):
    """A problem with the user's files or arguments; str() is one line naming the path."""


# ----------------------------------------------------------------------------------------------
# Reading run folders


def known_model_names() -> list[str]:
    """Model flag names in --list-models order (the registry's order)."""
    # Imported here, not at the top: the registry imports torch, which plot_curves does not need.
    from model import MODELS
    return list(MODELS)


def split_run_name(run_name: str, model_names: list[str]) -> tuple[str, str | None]:
    """(model, tag) from a folder called <model> or <model>-<tag>, by the longest known prefix."""
    for name in sorted(model_names, key=len, reverse=True):
        if run_name == name:
            return name, None
        if run_name.startswith(name + "-"):
            return name, run_name[len(name) + 1:]
    return run_name, None


def read_run(run_dir: Path, model_names: list[str]) -> dict:
    """Everything the summary needs about one run; RunFileError if its metrics.csv is malformed."""
    metrics = read_metrics(run_dir / runs.METRICS_FILE)
    config = read_json(run_dir / runs.CONFIG_FILE) or {}
    summary = read_json(run_dir / runs.SUMMARY_FILE)
    model, tag = split_run_name(run_dir.name, model_names)
    if "model" in config:
        model, tag = str(config["model"]), config.get("tag")
    val_acc = metrics["val_acc"]
    best_index = int(np.nanargmax(val_acc)) if not np.all(np.isnan(val_acc)) else len(val_acc) - 1
    epochs_done = len(metrics["epoch"])
    planned = config.get("epochs", summary.get("epochs") if summary else None)
    return {
        "run_dir": run_dir.name,
        "model": model,
        "tag": tag,
        "validation": config.get("validation"),
        "parameters": config.get("parameters"),
        "flops": config.get("flops"),
        "finished": summary is not None,
        "epochs": epochs_done,
        "planned_epochs": int(planned) if isinstance(planned, (int, float)) else None,
        "train_acc": float(metrics["train_acc"][-1]),
        "best_val_acc": float(val_acc[best_index]),
        "best_epoch": int(metrics["epoch"][best_index]),
        "test_acc": _as_float(summary.get("test_acc")) if summary else None,
        "final_test_acc": _as_float(summary.get("final_test_acc")) if summary else None,
        "train_loss": float(metrics["train_loss"][-1]),
        "val_loss": float(metrics["val_loss"][-1]),
        "seconds_per_epoch": float(np.mean(metrics["epoch_seconds"])),
        "metrics": metrics,
    }


def _as_float(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _save_figure(figure: Figure, path: Path, dpi: int) -> None:
    FigureCanvasAgg(figure)
    runs.write_atomically(path, lambda out: figure.savefig(out, format="png", dpi=dpi))


# ----------------------------------------------------------------------------------------------
# One run


def pretty_dataset(name: str) -> str:
    match = re.fullmatch(r"cifar(\d+)", name.lower())
    return f"CIFAR-{match.group(1)}" if match else name


def plot_curves(run_dir: str | Path) -> Path:
    """Draw <run_dir>/curves.png (loss and accuracy per epoch) from metrics.csv; return its path."""
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir / runs.METRICS_FILE)
    config = read_json(run_dir / runs.CONFIG_FILE) or {}
    summary = read_json(run_dir / runs.SUMMARY_FILE)
    epochs = metrics["epoch"]
    run_name = run_dir.name
    if "model" in config:
        run_name = str(config["model"]) + (f" ({config['tag']})" if config.get("tag") else "")
    title = f"{run_name} on {pretty_dataset(str(config.get('dataset', run_dir.parent.name)))}"
    planned = config.get("epochs")
    title += f" \u2014 epoch {len(epochs)}" + (f"/{planned}" if planned else "")
    if summary and _as_float(summary.get("test_acc")) is not None:
        title += f", test accuracy {100 * summary['test_acc']:.2f}%"

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
    path = run_dir / runs.CURVES_FILE
    _save_figure(figure, path, dpi=120)
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
    _save_figure(figure, Path(path), dpi=120)


# ----------------------------------------------------------------------------------------------
# A dataset folder


def model_order_key(model: str, model_names: list[str]) -> tuple[int, str]:
    """Registry order first; models the registry does not know go last, alphabetically."""
    return (model_names.index(model), "") if model in model_names else (len(model_names), model)


def group_runs(records: list[dict], model_names: list[str]) -> list[dict]:
    """Summary rows: finished runs of one model and epoch count (e.g. several seeds) form one row.

    An unfinished run keeps a row of its own: averaging it with finished runs, or with other runs
    stopped at other epochs, would mix numbers that do not measure the same thing.
    """
    groups: dict[tuple, list[dict]] = {}
    for run in records:
        key = (run["model"], True, run["epochs"], "") if run["finished"] else (
            run["model"], False, run["epochs"], run["run_dir"])
        groups.setdefault(key, []).append(run)
    order = sorted(groups, key=lambda key: (model_order_key(key[0], model_names), not key[1],
                                            key[2], key[3]))
    rows = []
    for key in order:
        members = sorted(groups[key], key=lambda run: run["run_dir"])
        row = {
            "model": key[0],
            "run_dirs": ";".join(run["run_dir"] for run in members),
            "tags": [run["tag"] for run in members],
            "runs": len(members),
            "finished": key[1],
            "parameters": next((run["parameters"] for run in members if run["parameters"]), None),
            "flops": next((run["flops"] for run in members if run["flops"]), None),
            "epochs": key[2],
            "planned_epochs": members[0]["planned_epochs"],
            "validation": sorted({str(run["validation"]) for run in members if run["validation"]}),
            "members": members,
        }
        for field in AVERAGED_FIELDS:
            values = [run[field] for run in members if run[field] is not None]
            row[field] = float(np.mean(values)) if values else None
            # Sample standard deviation (ddof=1): the runs are a sample of what the recipe gives.
            row[f"{field}_std"] = float(np.std(values, ddof=1)) if len(values) >= 2 else None
        rows.append(row)
    return rows


def _csv_value(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return f"{value:.10g}"
    return str(value)


def summary_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SUMMARY_CSV_COLUMNS)
    for row in rows:
        writer.writerow([_csv_value(row[column]) for column in SUMMARY_CSV_COLUMNS])
    return buffer.getvalue()


def _count(value: int | None) -> str:
    if value is None:
        return ""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if value >= limit:
            return f"{value / limit:.2f}{suffix}"
    return str(value)


def _mean_std(row: dict, field: str, scale: float = 1.0, digits: int = 2, unit: str = "") -> str:
    mean, std = row[field], row[f"{field}_std"]
    if mean is None:
        return ""
    if std is None:
        return f"{scale * mean:.{digits}f}{unit}"
    return f"{scale * mean:.{digits}f} \u00b1 {scale * std:.{digits}f}{unit}"


def run_label(row: dict) -> str:
    """The model; for an unfinished run its folder and progress instead."""
    if row["finished"]:
        return row["model"]
    progress = str(row["epochs"]) + (f"/{row['planned_epochs']}" if row["planned_epochs"] else "")
    return f"{row['run_dirs']} (unfinished, {progress} epochs)"


# The columns of summary.md (and of the HTML report's table), one cell each per summary row.
SUMMARY_COLUMNS = ("model", "runs", "parameters", "FLOPs", "epochs", "train acc",
                   "best valid acc (epoch)", "test acc", "final test acc", "train loss",
                   "valid loss", "s/epoch")


def summary_cells(row: dict) -> list[tuple[str, object]]:
    """(text, sort key) per SUMMARY_COLUMNS column of one summary row; the model's sort key is empty
    (its order is the registry's, the rows' own)."""
    tags = [tag if tag else "untagged" for tag in row["tags"]]
    run_cell = str(row["runs"]) + (f" ({', '.join(map(str, tags))})" if any(row["tags"]) else "")
    epochs = [run["best_epoch"] for run in row["members"]]
    best_epochs = str(min(epochs)) + (f"\u2013{max(epochs)}" if max(epochs) != min(epochs) else "")
    return [
        (run_label(row), ""),
        (run_cell, row["runs"]),
        (_count(row["parameters"]), row["parameters"]),
        (_count(row["flops"]), row["flops"]),
        (str(row["epochs"]), row["epochs"]),
        (_mean_std(row, "train_acc", 100, unit="%"), row["train_acc"]),
        (f"{_mean_std(row, 'best_val_acc', 100, unit='%')} ({best_epochs})", row["best_val_acc"]),
        (_mean_std(row, "test_acc", 100, unit="%"), row["test_acc"]),
        (_mean_std(row, "final_test_acc", 100, unit="%"), row["final_test_acc"]),
        (_mean_std(row, "train_loss", digits=4), row["train_loss"]),
        (_mean_std(row, "val_loss", digits=4), row["val_loss"]),
        (_mean_std(row, "seconds_per_epoch", digits=1), row["seconds_per_epoch"]),
    ]


def summary_markdown(dataset_name: str, rows: list[dict]) -> str:
    lines = [
        f"# {pretty_dataset(dataset_name)} results",
        "",
        "| " + " | ".join(SUMMARY_COLUMNS) + " |",
        "|---|" + "---:|" * (len(SUMMARY_COLUMNS) - 1),
    ]
    for row in rows:
        lines.append("| " + " | ".join(text for text, _ in summary_cells(row)) + " |")
    lines += [
        "",
        "- Train accuracy and the losses are from the last recorded epoch; best valid accuracy is "
        "the highest over epochs, with its epoch; when a run finishes it measures the test accuracy "
        "of the weights of that best epoch (test acc) and of the last epoch (final test acc).",
        "- Rows with several runs (e.g. seeds given as `--tag`) show mean \u00b1 sample standard "
        "deviation (ddof=1) over the runs; a row of one run shows no \u00b1.",
    ]
    if any("test" in row["validation"] for row in rows):
        lines.append("- Some runs validate on the test set (`validation: test` in config.json): "
                     "their best valid accuracy was picked on the test set, so it is optimistic.")
    if not all(row["finished"] for row in rows):
        lines.append("- Unfinished runs show their last recorded epoch and no test accuracy.")
    return "\n".join(lines) + "\n"


def model_colors(models: list[str]) -> dict[str, tuple]:
    """One colour per model: the family's colour map (from the registry), the depth rank the shade;
    models the registry does not know share one colour map."""
    from model import FAMILIES, MODELS
    family = {model: MODELS[model].family if model in MODELS else None for model in models}
    colors = {}
    for name in dict.fromkeys(family.values()):
        members = [model for model in models if family[model] == name]
        cmap = colormaps[FAMILIES.get(name, UNKNOWN_FAMILY_COLORMAP)]
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
            axes.plot(run["metrics"]["epoch"], 100 * run["metrics"]["val_acc"], label=label,
                      color=colors[row["model"]], linewidth=1.3,
                      linestyle="-" if row["finished"] else "--")
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
        details = [f"{_count(row['parameters'])} params"] if row["parameters"] else []
        details += [f"{row['runs']} runs"] if row["runs"] > 1 else []
        if not row["finished"]:
            planned = f"/{row['planned_epochs']}" if row["planned_epochs"] else ""
            details.append(f"unfinished {row['epochs']}{planned} epochs")
        name = row["model"] if row["finished"] else row["run_dirs"]
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


def plot_comparison(dataset_name: str, rows: list[dict], path: Path) -> None:
    """Best validation accuracy per summary row, and validation accuracy per epoch of every run."""
    models = list(dict.fromkeys(row["model"] for row in rows))
    colors = model_colors(models)
    figure = Figure(figsize=(15, max(5.0, 0.34 * len(rows) + 2)), layout="constrained")
    # Bars first: their long tick labels then sit at the figure's left edge instead of leaving a
    # gap beside the curves' legend.
    bar_axes, curve_axes = figure.subplots(1, 2, width_ratios=[1, 1.1])
    _draw_best_accuracy_bars(bar_axes, rows, colors)
    _draw_validation_curves(curve_axes, rows, colors)
    run_count = sum(row["runs"] for row in rows)
    figure.suptitle(f"{pretty_dataset(dataset_name)}: {run_count} runs of {len(models)} models")
    _save_figure(figure, path, dpi=110)


def summarize_dataset(dataset_dir: str | Path, index_link: bool | None = None) -> list[dict]:
    """Write summary.md, summary.csv, comparison.png and the HTML page index.html into a dataset
    folder; returns the rows (summary.csv's columns). index_link: whether the page links up to
    the results root's index.html (None: if that exists).

    Folders without a usable metrics.csv are reported on stderr and left out; PlotError if no run
    is left.
    """
    import report  # here, not at the top: report imports this module
    dataset_dir = Path(dataset_dir)
    model_names = known_model_names()
    records = []
    for run_dir in sorted(path for path in dataset_dir.iterdir() if path.is_dir()):
        if not (run_dir / runs.METRICS_FILE).is_file():
            warn(f"skipping {run_dir}: no metrics.csv")
            continue
        try:
            records.append(read_run(run_dir, model_names))
        except RunFileError as err:
            warn(f"skipping {err}")
    if not records:
        raise PlotError(f"{dataset_dir}: no run folder with a usable metrics.csv")
    rows = group_runs(records, model_names)
    runs.write_text(dataset_dir / SUMMARY_CSV_FILE, summary_csv(rows))
    runs.write_text(dataset_dir / SUMMARY_MD_FILE, summary_markdown(dataset_dir.name, rows))
    plot_comparison(dataset_dir.name, rows, dataset_dir / COMPARISON_FILE)
    report.write_dataset_page(dataset_dir, rows, index_link)
    return [{column: row[column] for column in SUMMARY_CSV_COLUMNS} for row in rows]


# ----------------------------------------------------------------------------------------------
# Command line


def _has_runs(folder: Path) -> bool:
    return any((child / runs.METRICS_FILE).is_file() for child in folder.iterdir() if child.is_dir())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Redraw a run's curves, or summarize and compare "
                                                 "the runs of a dataset folder or a results root.")
    parser.add_argument("path", type=Path,
                        help="a run folder (results/cifar10/cnn_resnet18), a dataset folder "
                             "(results/cifar10) or the results root (results)")
    args = parser.parse_args(argv)
    path: Path = args.path
    try:
        if not path.is_dir():
            raise PlotError(f"{path}: no such folder; give a run folder, a dataset folder or the "
                            "results root")
        if (path / runs.METRICS_FILE).is_file():
            print(plot_curves(path))
            return 0
        if _has_runs(path):
            summarize_dataset(path)
            print(path / SUMMARY_MD_FILE)
            return 0
        dataset_dirs = sorted(child for child in path.iterdir()
                              if child.is_dir() and _has_runs(child))
        if not dataset_dirs:
            raise PlotError(f"{path}: nothing to plot (no metrics.csv in it, in its folders or in "
                            "theirs); give a run folder, a dataset folder or the results root")
        summaries = {}
        for dataset_dir in dataset_dirs:
            try:
                summaries[dataset_dir] = summarize_dataset(dataset_dir, index_link=True)
                print(dataset_dir / SUMMARY_MD_FILE)
            except PlotError as err:
                warn(str(err))
        if not summaries:
            raise PlotError(f"{path}: no dataset folder had a usable run")
        import report  # here, not at the top: report imports this module
        print(report.write_index(path, summaries))
        return 0
    except (PlotError, RunFileError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except runs.WriteFailed as err:
        print(f"error: {err}; the files written before are complete; free space and run it again",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
