"""What `python plot.py` writes into a dataset folder (summary.md, summary.csv, comparison.png, accuracy_cost.png,
index.html) and into a results root (each dataset folder's, then the root's index.html), read from the run folders
alone.

The model registry's order and families (model.MODEL_FAMILIES) come in as an argument: the summary rows follow
--list-models order and the comparison colours each family, and the reports import no model code.
"""
from __future__ import annotations

from pathlib import Path

from core.errors import UsageError
from reports import classes, pages
from reports.cost import cost_markdown, plot_accuracy_cost
from reports.figures import model_colors, plot_comparison
from reports.summary import SUMMARY_CSV_COLUMNS, group_runs, read_runs, summary_csv, summary_markdown
from runfolder import store
from runfolder.declarations import (
    ACCURACY_COST_FILE,
    COMPARISON_FILE,
    METRICS_FILE,
    SUMMARY_CSV_FILE,
    SUMMARY_MD_FILE,
)


class PlotError(UsageError):
    """A problem with the user's files or arguments; str() is one line naming the path (exit 2)."""


def has_runs(folder: Path) -> bool:
    """Whether a folder holds run folders (a child with a metrics.csv): a dataset folder."""
    return any((child / METRICS_FILE).is_file() for child in folder.iterdir() if child.is_dir())


def summarize_dataset(dataset_dir: str | Path, families: dict[str, str], index_link: bool | None = None,
                      baseline: str | None = None) -> list[dict]:
    """Write summary.md, summary.csv, comparison.png, accuracy_cost.png (where a finished run has a final test
    accuracy), class_accuracy.png (where a run has an eval.json) and the HTML page index.html into a dataset
    folder; returns the rows (summary.csv's columns). families: model.MODEL_FAMILIES. index_link: whether the page
    links up to the results root's index.html (None: if that exists). baseline: the model the comparisons of
    summary.md and the page are limited to (None: every pair of models).

    Folders without a usable metrics.csv are reported on stderr and left out; PlotError if no run
    is left.
    """
    dataset_dir = Path(dataset_dir)
    model_names = list(families)
    records = read_runs(dataset_dir, model_names)
    if not records:
        raise PlotError(f"{dataset_dir}: no run folder with a usable metrics.csv")
    rows = group_runs(records, model_names)
    store.write_text(dataset_dir / SUMMARY_CSV_FILE, summary_csv(rows))
    class_table = classes.class_table(rows)
    # The table and its comparisons, then the sections that build on its rows.
    sections = cost_markdown(rows) + classes.class_markdown(class_table)
    store.write_text(dataset_dir / SUMMARY_MD_FILE,
                     summary_markdown(dataset_dir.name, rows, baseline) + "\n".join(sections) + "\n")
    plot_comparison(dataset_dir.name, rows, dataset_dir / COMPARISON_FILE, families)
    colors = model_colors(list(dict.fromkeys(row["model"] for row in rows)), families)
    plot_accuracy_cost(dataset_dir.name, rows, dataset_dir / ACCURACY_COST_FILE, colors)
    classes.plot_class_accuracy(dataset_dir.name, class_table, dataset_dir)
    pages.write_dataset_page(dataset_dir, rows, index_link, baseline)
    return [{column: row[column] for column in SUMMARY_CSV_COLUMNS} for row in rows]


def summarize_results(path: Path, families: dict[str, str], baseline: str | None = None) -> Path:
    """Every dataset folder of a results root, then the root's index.html; its path."""
    dataset_dirs = sorted(child for child in path.iterdir() if child.is_dir() and has_runs(child))
    if not dataset_dirs:
        raise PlotError(f"{path}: nothing to plot (no metrics.csv in it, in its folders or in "
                        "theirs); give a run folder, a dataset folder or the results root")
    summaries = {}
    for dataset_dir in dataset_dirs:
        try:
            summaries[dataset_dir] = summarize_dataset(dataset_dir, families, index_link=True,
                                                       baseline=baseline)
            print(dataset_dir / SUMMARY_MD_FILE)
        except PlotError as err:
            store.warn(str(err))
    if not summaries:
        raise PlotError(f"{path}: no dataset folder had a usable run")
    return pages.write_index(path, summaries)
