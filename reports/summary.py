"""The summary table of a dataset folder: its rows (the runs read from their folders, seeds of one model
grouped), its one column specification, its footnotes, and its two text forms, summary.csv and summary.md.
reports/figures.py draws the comparison figure from the same rows and reports/pages.py puts the same table in
the HTML page. The model names, in --list-models order, come in as an argument (model_names): the reports import
no model code.
"""
from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from core import course
from reports import statistics
from runfolder import store
from runfolder.declarations import (
    CONFIG_FILE,
    EVAL_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    Evaluation,
    RunFacts,
    RunFileError,
    Summary,
    as_number,
    read_metrics,
)

# Columns averaged over the runs of one summary row (mean, and sample std when there are several).
AVERAGED_FIELDS = ("train_acc", "best_val_acc", "best_epoch", "test_acc", "final_test_acc",
                   "train_loss", "val_loss", "seconds_per_epoch")
# summary.csv: the rows' raw values, one column each.
SUMMARY_CSV_COLUMNS = (
    ("model", "run_dirs", "runs", "finished", "parameters", "flops", "epochs", "planned_epochs")
    + tuple(column for field in AVERAGED_FIELDS for column in (field, f"{field}_std"))
    # The recipe (--recipe), and the course report's valid accuracy for a row of the course recipe (else empty).
    + ("recipe", "course_report_valid_acc")
    # The 95% confidence interval of the mean final test accuracy (Student's t), for a row of two runs or more.
    + ("final_test_acc_ci95_low", "final_test_acc_ci95_high")
    # The expected calibration error of --eval-only's eval.json (mean, std over the runs that have one).
    + ("ece", "ece_std")
)


def pretty_dataset(name: str) -> str:
    match = re.fullmatch(r"cifar(\d+)", name.lower())
    return f"CIFAR-{match.group(1)}" if match else name


# ---------------------------------------------------------------------------------------------------
# Reading run folders


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
    metrics = read_metrics(run_dir / METRICS_FILE)
    config = store.read_json(run_dir / CONFIG_FILE) or {}
    summary = store.read_record(run_dir / SUMMARY_FILE, Summary)
    facts = RunFacts.from_dict(config, run_dir / CONFIG_FILE, partial=True)
    evaluation = store.read_record(run_dir / EVAL_FILE, Evaluation)
    model, tag = split_run_name(run_dir.name, model_names)
    if "model" in config:
        model, tag = str(config["model"]), config.get("tag")
    val_acc = metrics["val_acc"]
    best_index = int(np.nanargmax(val_acc)) if not np.all(np.isnan(val_acc)) else len(val_acc) - 1
    epochs_done = len(metrics["epoch"])
    planned = config.get("epochs", summary.epochs if summary else None)
    dataset = str(config.get("dataset", run_dir.parent.name))
    return {
        "run_dir": run_dir.name,
        "model": model,
        "tag": tag,
        "recipe": str(config.get("recipe", course.DEFAULT_NAME)),
        "course_report_valid_acc": course_report_valid_acc(config, dataset, model),
        "validation": facts.validation,
        "parameters": _whole_number(facts.parameters),
        "flops": _whole_number(facts.flops),
        "finished": summary is not None,
        "epochs": epochs_done,
        "planned_epochs": int(planned) if isinstance(planned, (int, float)) else None,
        "train_acc": float(metrics["train_acc"][-1]),
        "best_val_acc": float(val_acc[best_index]),
        "best_epoch": int(metrics["epoch"][best_index]),
        "test_acc": as_number(summary.test_acc) if summary else None,
        "final_test_acc": as_number(summary.final_test_acc) if summary else None,
        "seed": _whole_number(config.get("seed")),
        "train_loss": float(metrics["train_loss"][-1]),
        "val_loss": float(metrics["val_loss"][-1]),
        "seconds_per_epoch": float(np.mean(metrics["epoch_seconds"])),
        "train_images": _whole_number(facts.train_images),
        "device": device_label(facts),
        "ece": as_number(evaluation.ece) if evaluation else None,  # None: not evaluated, or before calibration
        "evaluation": evaluation,  # eval.json as read (reports/classes.py's counts), or None
        "metrics": metrics,
    }


def device_label(facts: RunFacts) -> str | None:
    """What a run trained on, as its throughput is compared: the GPU's name (or CPU, MPS) and the number of
    processes; None when config.json does not say."""
    if not isinstance(facts.device, str):
        return None
    name = facts.gpu_name if isinstance(facts.gpu_name, str) and facts.gpu_name else facts.device.upper()
    processes = _whole_number(facts.world_size)
    return name + (f" x {processes} processes" if processes and processes > 1 else "")


def _whole_number(value: object) -> int | None:
    """A count from config.json, or None when a damaged or crafted file holds something else there."""
    number = as_number(value)
    return None if number is None else int(number)


def course_report_valid_acc(config: dict, dataset: str, model: str) -> float | None:
    """The course report's valid accuracy of the model, for a run trained with the course's recipe as it stands:
    a run of another recipe, or of --recipe course with a recipe flag typed over it (--epochs 100, say), gets
    None, since the report's figure does not measure what it did."""
    if config.get("recipe") != course.NAME or any(config.get(name) != value
                                                  for name, value in course.RECIPE.items()):
        return None
    figures = course.report_figures().get((dataset, model))
    return figures.valid_acc if figures else None


def read_runs(dataset_dir: Path, model_names: list[str]) -> list[dict]:
    """Every run folder of a dataset folder; folders without a usable metrics.csv are reported on stderr
    and left out."""
    records = []
    for run_dir in sorted(path for path in dataset_dir.iterdir() if path.is_dir()):
        if not (run_dir / METRICS_FILE).is_file():
            store.warn(f"skipping {run_dir}: no metrics.csv")
            continue
        try:
            records.append(read_run(run_dir, model_names))
        except RunFileError as err:
            store.warn(f"skipping {err}")
    return records


# ---------------------------------------------------------------------------------------------------
# The rows and the table


def model_order_key(model: str, model_names: list[str]) -> tuple[int, str]:
    """Registry order first; models the registry does not know go last, alphabetically."""
    return (model_names.index(model), "") if model in model_names else (len(model_names), model)


def group_runs(records: list[dict], model_names: list[str]) -> list[dict]:
    """Summary rows: finished runs of one model, recipe (--recipe) and epoch count (e.g. several seeds)
    form one row.

    An unfinished run keeps a row of its own: averaging it with finished runs, or with other runs
    stopped at other epochs, would mix numbers that do not measure the same thing; so would runs of two
    recipes.
    """
    groups: dict[tuple, list[dict]] = {}
    for run in records:
        # A course run with a recipe flag typed over it (no course figure) is not the course's recipe either.
        recipe = (run["recipe"], run["course_report_valid_acc"] is None)
        key = (run["model"], True, run["epochs"], "", recipe) if run["finished"] else (
            run["model"], False, run["epochs"], run["run_dir"], recipe)
        groups.setdefault(key, []).append(run)
    order = sorted(groups, key=lambda key: (model_order_key(key[0], model_names), key[4][0] != course.DEFAULT_NAME,
                                            key[4], not key[1], key[2], key[3]))
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
            "recipe": key[4][0],
            "course_report_valid_acc": members[0]["course_report_valid_acc"],
            "members": members,
        }
        for field in (*AVERAGED_FIELDS, "ece"):
            values = [run[field] for run in members if run[field] is not None]
            row[field] = float(np.mean(values)) if values else None
            # Sample standard deviation (ddof=1): the runs are a sample of what the recipe gives.
            row[f"{field}_std"] = float(np.std(values, ddof=1)) if len(values) >= 2 else None
        interval = statistics.mean_interval([run["final_test_acc"] for run in members
                                             if run["final_test_acc"] is not None])
        row["final_test_acc_ci95_low"], row["final_test_acc_ci95_high"] = interval or (None, None)
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


def count_text(value: int | None) -> str:
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


def recipe_text(row: dict) -> str:
    """' (<name> recipe)' for a row of a --recipe other than the default, else nothing; the course's with a flag
    typed over it says so."""
    if row["recipe"] == course.DEFAULT_NAME:
        return ""
    return f" ({row['recipe']} recipe{', flags typed over it' if course_typed_over(row) else ''})"


def course_typed_over(row: dict) -> bool:
    """Whether a row is of --recipe course with a recipe flag typed over it (so no course figure is its)."""
    return row["recipe"] == course.NAME and row["course_report_valid_acc"] is None


def run_label(row: dict) -> str:
    """The model and a recipe other than the default; for an unfinished run its folder and progress instead."""
    if row["finished"]:
        return row["model"] + recipe_text(row)
    progress = str(row["epochs"]) + (f"/{row['planned_epochs']}" if row["planned_epochs"] else "")
    return f"{row['run_dirs']} (unfinished, {progress} epochs){recipe_text(row)}"


def _runs_cell(row: dict) -> str:
    tags = [tag if tag else "untagged" for tag in row["tags"]]
    return str(row["runs"]) + (f" ({', '.join(map(str, tags))})" if any(row["tags"]) else "")


def _best_cell(row: dict) -> str:
    epochs = [run["best_epoch"] for run in row["members"]]
    best_epochs = str(min(epochs)) + (f"\u2013{max(epochs)}" if max(epochs) != min(epochs) else "")
    return f"{_mean_std(row, 'best_val_acc', 100, unit='%')} ({best_epochs})"


@dataclass(frozen=True)
class TableColumn:
    """One column of summary.md and of the HTML page's table: its header, the cell's text of a row, and
    the row's field that the page sorts it by (None: the rows' own order)."""

    header: str
    text: Callable[[dict], str]
    sort_by: str | None


def _percent_of(name: str) -> Callable[[dict], str]:
    return lambda row: _mean_std(row, name, 100, unit="%")


def _final_test_cell(row: dict) -> str:
    """Mean ± std of the final test accuracy, and its 95% interval where the row has one."""
    low, high = row["final_test_acc_ci95_low"], row["final_test_acc_ci95_high"]
    interval = "" if low is None else f" (CI {100 * low:.2f}–{100 * high:.2f})"
    return _mean_std(row, "final_test_acc", 100, unit="%") + interval


TABLE_COLUMNS = (
    TableColumn("model", run_label, None),
    TableColumn("runs", _runs_cell, "runs"),
    TableColumn("parameters", lambda row: count_text(row["parameters"]), "parameters"),
    TableColumn("FLOPs", lambda row: count_text(row["flops"]), "flops"),
    TableColumn("epochs", lambda row: str(row["epochs"]), "epochs"),
    TableColumn("train acc", _percent_of("train_acc"), "train_acc"),
    TableColumn("best valid acc (epoch)", _best_cell, "best_val_acc"),
    TableColumn("test acc", _percent_of("test_acc"), "test_acc"),
    TableColumn("final test acc", _final_test_cell, "final_test_acc"),
    TableColumn("train loss", lambda row: _mean_std(row, "train_loss", digits=4), "train_loss"),
    TableColumn("valid loss", lambda row: _mean_std(row, "val_loss", digits=4), "val_loss"),
    TableColumn("s/epoch", lambda row: _mean_std(row, "seconds_per_epoch", digits=1), "seconds_per_epoch"),
    TableColumn("ECE", lambda row: _mean_std(row, "ece", digits=4), "ece"),
)
# Shown only when a row has a figure of the course report: runs of the course recipe.
COURSE_COLUMN = TableColumn(
    "course report's valid acc",
    lambda row: "" if row["course_report_valid_acc"] is None else f"{100 * row['course_report_valid_acc']:.2f}%",
    "course_report_valid_acc")


def table_columns(rows: list[dict]) -> tuple[TableColumn, ...]:
    """The columns of summary.md and the HTML table for these rows: the course report's beside the final test
    accuracy when a row has one."""
    if not any(row["course_report_valid_acc"] is not None for row in rows):
        return TABLE_COLUMNS
    at = next(index for index, column in enumerate(TABLE_COLUMNS) if column.sort_by == "final_test_acc") + 1
    return TABLE_COLUMNS[:at] + (COURSE_COLUMN,) + TABLE_COLUMNS[at:]


def table_notes(rows: list[dict]) -> list[str]:
    """The footnotes under the table, in Markdown (`code` only), for summary.md and the HTML page alike."""
    notes = [
        "Train accuracy and the losses are from the last recorded epoch; best valid accuracy is "
        "the highest over epochs, with its epoch; when a run finishes it measures the test accuracy "
        "of the weights of that best epoch (test acc) and of the last epoch (final test acc).",
        "Rows with several runs (e.g. seeds given as `--tag`) show mean \u00b1 sample standard "
        "deviation (ddof=1) over the runs; a row of one run shows no \u00b1.",
    ]
    if any(row["final_test_acc_ci95_low"] is not None for row in rows):
        notes.append("CI: the 95% confidence interval of the mean final test accuracy over the row's runs "
                     "(Student's t, n - 1 degrees of freedom); a row of one run has none and takes part in no "
                     "comparison of models.")
    if any("test" in row["validation"] for row in rows):
        notes.append("Some runs validate on the test set (`validation: test` in config.json): "
                     "their best valid accuracy was picked on the test set, so it is optimistic.")
    if not all(row["finished"] for row in rows):
        notes.append("Unfinished runs show their last recorded epoch and no test accuracy.")
    if any(row["recipe"] != course.DEFAULT_NAME for row in rows):
        notes.append("Runs of another `--recipe` than the default are rows of their own, named after it.")
    if any(row["course_report_valid_acc"] is not None for row in rows):
        notes.append("course report's valid acc: the figure the course lab's report printed for the model after "
                     "its 50 epochs (its valid set is the test set: compare it with final test acc), not measured "
                     "here. Only rows trained with its recipe, `--recipe course` with no recipe flag typed over "
                     "it, show one; the other rows' recipes differ from the report's.")
    return notes


def model_comparisons(rows: list[dict], baseline: str | None = None) -> list[statistics.Difference] | None:
    """The pairwise comparisons of the rows' models (statistics.comparisons), or None when no row has two runs or
    more (then there is no comparison section at all)."""
    if not any(statistics.has_seeds(row) for row in rows):
        return None
    return statistics.comparisons(rows, run_label, baseline)


COMPARISON_HEADERS = ("comparison (final test acc)", "test")


def comparison_notes(baseline: str | None = None) -> list[str]:
    """The footnotes under the comparisons, in Markdown (`code` only)."""
    against = f"each model against `--baseline {baseline}`" if baseline else "every pair of models"
    return [f"The difference in mean final test accuracy, {against}, where both have two finished runs or more "
            "of the same recipe and epoch count, with its 95% confidence interval: paired by seed when both ran "
            "the same seeds (the same seed gives the same split and batch order), Welch's otherwise. Within seed "
            "noise: the interval contains 0."]


def no_comparisons_line(baseline: str | None = None) -> str:
    """What the comparisons section says when no pair qualifies, in Markdown (`code` only)."""
    return ("No two models have two finished runs or more each of one recipe and epoch count"
            + (f", with `--baseline {baseline}` one of them." if baseline else "."))


def comparisons_markdown(differences: list[statistics.Difference], baseline: str | None = None) -> list[str]:
    if not differences:
        lines = [no_comparisons_line(baseline)]
    else:
        lines = ["| " + " | ".join(COMPARISON_HEADERS) + " |", "|---|---|",
                 *(f"| {difference.sentence()} | {difference.test_text()} |" for difference in differences)]
    return ["", "## Comparisons", "", *lines, "", *(f"- {note}" for note in comparison_notes(baseline))]


def summary_markdown(dataset_name: str, rows: list[dict], baseline: str | None = None) -> str:
    columns = table_columns(rows)
    lines = [
        f"# {pretty_dataset(dataset_name)} results",
        "",
        "| " + " | ".join(column.header for column in columns) + " |",
        "|---|" + "---:|" * (len(columns) - 1),
    ]
    for row in rows:
        lines.append("| " + " | ".join(column.text(row) for column in columns) + " |")
    lines += ["", *(f"- {note}" for note in table_notes(rows))]
    differences = model_comparisons(rows, baseline)
    if differences is not None:
        lines += comparisons_markdown(differences, baseline)
    return "\n".join(lines) + "\n"
