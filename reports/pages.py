"""HTML pages of a results folder: one static page per dataset and an index linking the datasets.

The pages open from the file system and can be zipped and sent: every link is relative, nothing is
fetched (no external CSS, scripts or fonts) and images are linked only when the file is there.
Everything taken from the run files (model names, tags, class names, paths, any JSON string) goes
through html.escape, so a crafted class name or tag shows as text instead of running as markup.
The summary table is reports/summary.py's (same rows, columns and footnotes as summary.md); a few lines of inline
script sort it by a clicked column header, and without script it reads in summary.md's order. The settings
shown per run are the flags runfolder/declarations.py names as reported (REPORTED_FLAGS), as config.json holds
them.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from html import escape
from pathlib import Path
from urllib.parse import quote

from reports import classes
from reports.cost import COST_INTRO, NO_COST_LINE, cost_report
from reports.summary import (
    COMPARISON_HEADERS,
    comparison_notes,
    model_comparisons,
    no_comparisons_line,
    pretty_dataset,
    table_columns,
    table_notes,
)
from runfolder import store
from runfolder.declarations import (
    ACCURACY_COST_FILE,
    CLASS_ACCURACY_ALL_FILE,
    CLASS_ACCURACY_FILE,
    COMPARISON_FILE,
    CONFIG_FILE,
    CONFUSION_FILE,
    CURVES_FILE,
    EVAL_FILE,
    MISTAKES_FILE,
    PAGE_FILE,
    REPORTED_FLAGS,
    SUMMARY_CSV_FILE,
    SUMMARY_FILE,
    SUMMARY_MD_FILE,
    Evaluation,
    Summary,
    as_number,
)
from runfolder.store import write_text

# The settings a reader compares between runs, in this order, when config.json has them: the reported
# flags, then what the run found (validation set, GPU, processes, torch version).
SETTINGS = REPORTED_FLAGS + ("validation", "gpu_name", "world_size", "torch_version")
STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 1300px; padding: 0 1em;
       color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; vertical-align: top; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
table.sortable th { cursor: pointer; } tbody tr:nth-child(even) { background: #fafafa; }
.scroll { overflow-x: auto; } #summary td, #comparisons td { white-space: nowrap; }
#summary td:nth-child(-n+2) { white-space: normal; min-width: 8em; }
th[aria-sort=ascending]::after { content: " \\25b2"; }
th[aria-sort=descending]::after { content: " \\25bc"; }
img { max-width: 100%; height: auto; border: 1px solid #ddd; }
section.run { border-top: 2px solid #ddd; margin-top: 1.5em; }
.columns { display: flex; flex-wrap: wrap; gap: 1.5em; } .columns > div { flex: 1 1 380px; }
dl.settings { display: grid; grid-template-columns: repeat(2, max-content minmax(6em, auto));
              gap: 0.15em 0.8em; margin: 0.5em 0; }
dl.settings dt { font-weight: 600; } dl.settings dd { margin: 0; overflow-wrap: anywhere; }
.muted { color: #777; } h3 a.muted { font-size: 0.8em; font-weight: normal; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""
# Sorts a table.sortable by the data-sort values of the clicked column; empty cells stay last.
SORT_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  var headers = table.tHead.rows[0].cells;
  Array.prototype.forEach.call(headers, function (header, column) {
    header.title = "sort by this column";
    header.addEventListener("click", function () {
      var ascending = header.getAttribute("aria-sort") !== "ascending";
      Array.prototype.forEach.call(headers, function (h) { h.removeAttribute("aria-sort"); });
      header.setAttribute("aria-sort", ascending ? "ascending" : "descending");
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[column].dataset.sort, y = b.cells[column].dataset.sort;
        if (x === "" || y === "") return (x === "") - (y === "");
        var order = isNaN(x) || isNaN(y) ? x.localeCompare(y) : x - y;
        return ascending ? order : -order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""
# No network, no plugins, and only our own script: even markup that slipped past escaping could
# neither run a script nor load anything from elsewhere.
_SCRIPT_HASH = base64.b64encode(hashlib.sha256(SORT_SCRIPT.encode()).digest()).decode()
CONTENT_POLICY = (f"default-src 'none'; img-src 'self' file:; style-src 'unsafe-inline'; "
                  f"script-src 'sha256-{_SCRIPT_HASH}'")


# ----------------------------------------------------------------------------------------------
# Pieces of a page


def _href(path: str) -> str:
    """A relative link from a file path: percent-encoded (a '#' or space in a folder name would
    otherwise cut the link), then escaped for the attribute."""
    return escape(quote(path), quote=True)


def _percent(value: object) -> str:
    number = as_number(value)
    return "" if number is None else f"{100 * number:.2f}%"


def _image(path: Path, relative: str, alt: str, missing: str) -> str:
    if not path.is_file():
        return f'<p class="muted">{escape(missing)}</p>'
    return (f'<a href="{_href(relative)}"><img src="{_href(relative)}" alt="{escape(alt)}" '
            f'loading="lazy"></a>')


def _page(title: str, body: list[str], sortable: bool = False) -> str:
    script = f"<script>{SORT_SCRIPT}</script>" if sortable else ""
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_POLICY}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title>", f"<style>{STYLE}</style>", "</head>", "<body>",
        *body, script, "</body>", "</html>", ""])


# ----------------------------------------------------------------------------------------------
# The summary table


def _run_ids(rows: list[dict]) -> dict[str, str]:
    """An HTML id per run folder, readable and unique, for links from the table to the run."""
    ids: dict[str, str] = {}
    for run in (run for row in rows for run in row["members"]):
        base = "run-" + re.sub(r"[^A-Za-z0-9_.-]", "_", run["run_dir"])
        ids[run["run_dir"]] = base if base not in ids.values() else f"{base}-{len(ids)}"
    return ids


def _summary_table(rows: list[dict], run_ids: dict[str, str]) -> str:
    columns = table_columns(rows)
    headers = "".join(f'<th scope="col">{escape(column.header)}</th>' for column in columns)
    lines = ['<div class="scroll"><table class="sortable" id="summary">',
             f"<thead><tr>{headers}</tr></thead>", "<tbody>"]
    for position, row in enumerate(rows):
        cells = []
        for index, column in enumerate(columns):
            key = position if column.sort_by is None else row[column.sort_by]
            sort_key = "" if key is None else str(key)
            content = escape(column.text(row))
            if index == 0:  # the model links to its (first) run below
                content = f'<a href="#{run_ids[row["members"][0]["run_dir"]]}">{content}</a>'
            cells.append(f'<td data-sort="{escape(sort_key)}">{content}</td>')
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines.append("</tbody></table></div>")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# One run


def _settings_list(config: dict) -> str:
    if not config:
        return '<p class="muted">no readable config.json</p>'
    items = []
    for name in SETTINGS:
        if name in config:
            value = config[name]
            text = value if isinstance(value, str) else json.dumps(value)  # as config.json has it
            items.append(f"<dt>{escape(name)}</dt><dd>{escape(text)}</dd>")
    return '<dl class="settings">' + "".join(items) + "</dl>"


def _results_lines(run: dict, summary: Summary | None) -> str:
    planned = f"/{run['planned_epochs']}" if run.get("planned_epochs") else ""
    status = "finished" if run["finished"] else "unfinished"
    items = [f"{status}, {run['epochs']}{planned} epochs",
             f"best valid accuracy {_percent(run['best_val_acc'])} (epoch {run['best_epoch']})"]
    if summary is not None and as_number(summary.test_acc) is not None:
        items.append(f"test accuracy {_percent(summary.test_acc)} (best.pt, epoch "
                     f"{run['best_epoch'] if summary.best_epoch is None else summary.best_epoch}), "
                     f"{_percent(summary.final_test_acc)} (final weights)")
    else:
        items.append("no test accuracy in summary.json" if run["finished"]
                     else "no test accuracy yet (the run has not finished)")
    if run["course_report_valid_acc"] is not None:
        items.append(f"course report's valid accuracy for this model and recipe: "
                     f"{_percent(run['course_report_valid_acc'])} (the report's figure, not measured here)")
    return "<ul>" + "".join(f"<li>{escape(item)}</li>" for item in items) + "</ul>"


def reliability_diagram(evaluation: Evaluation) -> str:
    """eval.json's calibration as an inline SVG: per bin of top-1 confidence a bar of its accuracy, against the
    diagonal of perfect calibration; the ECE above it. Empty where the file has no calibration (older runs)."""
    ece, bins = as_number(evaluation.ece), evaluation.calibration_bins
    if ece is None or not isinstance(bins, list) or not bins:
        return ""
    size, pad = 200, 24
    bars = []
    for item in bins:
        low, high = (as_number(item.get(key)) if isinstance(item, dict) else None for key in ("low", "high"))
        accuracy = as_number(item.get("accuracy")) if isinstance(item, dict) else None
        if low is None or high is None or accuracy is None:
            continue
        x, width, height = pad + low * size, (high - low) * size, accuracy * size
        title = (f"confidence {low:.3f}\u2013{high:.3f}: accuracy {100 * accuracy:.1f}%, "
                 f"{item.get('count')} images")
        bars.append(f'<rect x="{x:.1f}" y="{pad + size - height:.1f}" width="{width:.1f}" height="{height:.1f}" '
                    f'fill="#4c78a8" stroke="white"><title>{escape(title)}</title></rect>')
    side = size + 2 * pad
    return (f'<figure><svg xmlns="http://www.w3.org/2000/svg" width="{side}" height="{side}" '
            f'role="img" aria-label="reliability diagram">'
            f'<rect x="{pad}" y="{pad}" width="{size}" height="{size}" fill="none" stroke="#888"/>'
            + "".join(bars)
            + f'<line x1="{pad}" y1="{pad + size}" x2="{pad + size}" y2="{pad}" stroke="#d62728" '
            'stroke-dasharray="4 3"/>'
            f'<text x="{pad}" y="{pad - 8}" font-size="11">accuracy per confidence bin</text>'
            f'<text x="{pad}" y="{side - 6}" font-size="11">top-1 confidence 0\u20131</text></svg>'
            f"<figcaption>{escape(f'reliability diagram, ECE ({len(bins)} bins) {ece:.4f}')}"
            "</figcaption></figure>")


def mistakes_section(run_dir: Path, name: str, evaluation: Evaluation) -> str:
    """The test images the network got wrong most confidently: mistakes.png's thumbnails, and eval.json's list of
    them (true and predicted class, confidence) behind a click; a muted line for an eval.json from before them."""
    mistakes = evaluation.mistakes
    if not isinstance(mistakes, list):
        return ('<p class="muted">no most confident mistakes in this eval.json (written before they were '
                "recorded; --eval-only writes them)</p>")
    lines = [(str(item.get("index")), str(item.get("true")), str(item.get("predicted")),
              _percent(item.get("confidence"))) for item in mistakes if isinstance(item, dict)]
    return "\n".join([
        f"<h4>Most confident mistakes ({len(mistakes)})</h4>",
        _image(run_dir / MISTAKES_FILE, f"{name}/{MISTAKES_FILE}", f"most confident mistakes of {name}",
               "no mistakes.png"),
        "<details><summary>as a list</summary>"
        + _scrolled_table(("test image", "true class", "predicted", "confidence"), lines) + "</details>"])


def _scrolled_table(headers: tuple[str, ...], lines: list[tuple[str, ...]], table_id: str | None = None) -> str:
    """A table of plain-text cells (escaped here) in its own sideways-scrolling box, so the page never scrolls."""
    head = "".join(f'<th scope="col">{escape(header)}</th>' for header in headers)
    body = "".join("<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in line) + "</tr>" for line in lines)
    table_id = f' id="{table_id}"' if table_id else ""
    return (f'<div class="scroll"><table{table_id}><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def _classes(dataset_dir: Path, rows: list[dict]) -> list[str]:
    """The classes each model gets wrong: the heatmap of test accuracy per class (CIFAR-100: per superclass, every
    class one click away), per row its weakest class and most common confusion, and the notes."""
    table = classes.class_table(rows)
    parts = ["<h2>Classes</h2>"]
    if table.rows:
        parts.append(_image(dataset_dir / CLASS_ACCURACY_FILE, CLASS_ACCURACY_FILE,
                            "test accuracy per class of each model", f"no {CLASS_ACCURACY_FILE}"))
        if classes.by_superclass(table):
            parts.append("<details><summary>every class</summary>"
                         + _image(dataset_dir / CLASS_ACCURACY_ALL_FILE, CLASS_ACCURACY_ALL_FILE,
                                  "test accuracy per class of each model, every class",
                                  f"no {CLASS_ACCURACY_ALL_FILE}") + "</details>")
        parts.append(_scrolled_table(classes.CLASS_HEADERS, classes.class_lines(table), "classes"))
    return parts + [_markdown_notes(classes.class_notes(table))]


def _evaluation(run_dir: Path, name: str) -> str:
    evaluation = store.read_record(run_dir / EVAL_FILE, Evaluation)
    if evaluation is None:
        return '<p class="muted">not evaluated (no usable eval.json; run it with --eval-only)</p>'
    epoch = evaluation.checkpoint_epoch
    line = (f"top-1 {_percent(evaluation.test_acc)}, top-5 {_percent(evaluation.test_top5)}, "
            f"mirror TTA {'on' if evaluation.tta is True else 'off'}"
            + (f", checkpoint of epoch {epoch}" if epoch is not None else "")
            + (f", {evaluation.images} images" if evaluation.images is not None else ""))
    parts = [f"<p>{escape(line)}</p>",
             _image(run_dir / CONFUSION_FILE, f"{name}/{CONFUSION_FILE}",
                    f"confusion matrix of {name}", "no confusion_matrix.png"),
             reliability_diagram(evaluation), mistakes_section(run_dir, name, evaluation)]
    per_class = evaluation.per_class
    if isinstance(per_class, dict) and per_class:
        rows = "".join(f"<tr><td>{escape(str(class_name))}</td><td>{_percent(accuracy)}</td></tr>"
                       for class_name, accuracy in per_class.items())
        parts.append("<details><summary>accuracy per class</summary><table><thead><tr><th>class"
                     f"</th><th>top-1</th></tr></thead><tbody>{rows}</tbody></table></details>")
    return "\n".join(part for part in parts if part)


def run_section(dataset_dir: Path, run: dict, run_id: str) -> str:
    """One run: its settings, results and curves, and its evaluation where it has one."""
    name = run["run_dir"]
    run_dir = dataset_dir / name
    return "\n".join([
        f'<section class="run" id="{run_id}">',
        f'<h3>{escape(name)} <a class="muted" href="#summary">(back to the table)</a></h3>',
        '<div class="columns"><div>',
        _results_lines(run, store.read_record(run_dir / SUMMARY_FILE, Summary)),
        _settings_list(store.read_json(run_dir / CONFIG_FILE) or {}),
        "</div><div>",
        _image(run_dir / CURVES_FILE, f"{name}/{CURVES_FILE}", f"curves of {name}",
               "no curves.png"),
        "<h4>Evaluation</h4>",
        _evaluation(run_dir, name),
        "</div></div>",
        "</section>"])


# ----------------------------------------------------------------------------------------------
# Pages


def _comparisons(rows: list[dict], baseline: str | None) -> list[str]:
    """summary.md's comparisons of models as a section of the page, or nothing when no row has two runs."""
    differences = model_comparisons(rows, baseline)
    if differences is None:
        return []
    if not differences:
        table = f"<p>{_markdown_text(no_comparisons_line(baseline))}</p>"
    else:
        table = _scrolled_table(COMPARISON_HEADERS, [(difference.sentence(), difference.test_text())
                                                     for difference in differences], "comparisons")
    return ["<h2>Comparisons</h2>", table, _markdown_notes(comparison_notes(baseline))]


def _accuracy_cost(dataset_dir: Path, rows: list[dict]) -> list[str]:
    """summary.md's section "Accuracy against cost" with accuracy_cost.png: per group its Pareto fronts (plain
    text, escaped) and footnotes (Markdown), then the footnotes on the rows in no group."""
    report = cost_report(rows)
    intro = COST_INTRO if report.groups else NO_COST_LINE
    parts = ["<h2>Accuracy against cost</h2>", f"<p>{_markdown_text(intro)}</p>"]
    if report.groups:
        parts.append(_image(dataset_dir / ACCURACY_COST_FILE, ACCURACY_COST_FILE, "test accuracy against cost",
                            f"no {ACCURACY_COST_FILE}"))
    for group in report.groups:
        fronts = "".join(f"<li>Pareto front by {escape(panel.front_text())}</li>" for panel in group.panels)
        notes = "".join(f"<li>{_markdown_text(note)}</li>" for note in group.notes)
        parts += [f"<h3>{escape(group.title)}</h3>", f"<ul>{fronts}{notes}</ul>"]
    if report.notes:
        parts.append(_markdown_notes(list(report.notes)))
    return parts


def write_dataset_page(dataset_dir: Path, rows: list[dict], index_link: bool | None = None,
                       baseline: str | None = None) -> Path:
    """Write <dataset_dir>/index.html from summary.group_runs' rows; returns its path.

    index_link: link back to ../index.html; None links it when that file exists already. baseline: the model the
    comparisons are limited to (plot.py's --baseline), None for every pair.
    """
    dataset_dir = Path(dataset_dir)
    title = f"{pretty_dataset(dataset_dir.name)} results"
    if index_link is None:
        index_link = (dataset_dir.parent / PAGE_FILE).is_file()
    run_ids = _run_ids(rows)
    files = [f'<a href="{_href(file)}">{escape(file)}</a>' for file in (SUMMARY_MD_FILE, SUMMARY_CSV_FILE)
             if (dataset_dir / file).is_file()]
    body = ['<p><a href="../index.html">all datasets</a></p>' if index_link else "",
            f"<h1>{escape(title)}</h1>",
            f"<p>{_runs_of_models(rows)}. Click a column header to sort."
            + (f" The same table as {', '.join(files)}." if files else "") + "</p>",
            _summary_table(rows, run_ids),
            _markdown_notes(table_notes(rows)),
            *_comparisons(rows, baseline),
            *_accuracy_cost(dataset_dir, rows),
            _image(dataset_dir / COMPARISON_FILE, COMPARISON_FILE, "comparison of the models",
                   "no comparison.png"),
            *_classes(dataset_dir, rows),
            "<h2>Runs</h2>"]
    body += [run_section(dataset_dir, run, run_ids[run["run_dir"]])
             for row in rows for run in row["members"]]
    path = dataset_dir / PAGE_FILE
    write_text(path, _page(title, body, sortable=True))
    return path


def _markdown_text(text: str) -> str:
    """A line of summary.md as HTML: escaped, its `code` as <code>."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", escape(text))


def _markdown_notes(markdown_notes: list[str]) -> str:
    """summary.md's footnotes, with their `code` as <code>."""
    notes = [_markdown_text(note) for note in markdown_notes]
    return "<ul>" + "".join(f"<li>{note}</li>" for note in notes) + "</ul>"


def _runs_of_models(rows: list[dict]) -> str:
    """'3 runs of 2 models', '1 run of 1 model': how many runs summary rows hold, and of how many models."""
    runs, models = sum(row["runs"] for row in rows), len({row["model"] for row in rows})
    return f"{runs} run{'s' if runs != 1 else ''} of {models} model{'s' if models != 1 else ''}"


def _dataset_line(rows: list[dict]) -> str:
    """How many runs the dataset has and its best test accuracy, from its summary rows."""
    line = _runs_of_models(rows)
    scored = [(row["test_acc"], row["model"]) for row in rows if as_number(row["test_acc"]) is not None]
    if scored:
        accuracy, model = max(scored)
        line += f"; best test accuracy {100 * accuracy:.2f}% ({model})"
    return line


def write_index(results_root: Path, summaries: dict[Path, list[dict]]) -> Path:
    """Write <results_root>/index.html linking each dataset's page (written before, by
    write_dataset_page), with its comparison.png; summaries: each dataset folder's summary rows
    (reports/folders.py's summarize_dataset's). Returns its path."""
    results_root = Path(results_root)
    body = ["<h1>Results</h1>", "<ul>"]
    figures = []
    for dataset_dir, rows in summaries.items():
        dataset_dir = Path(dataset_dir)
        folder = Path(os.path.relpath(dataset_dir, results_root)).as_posix()
        title = pretty_dataset(dataset_dir.name)
        page = _href(f"{folder}/{PAGE_FILE}")
        line = _dataset_line(rows)
        body.append(f'<li><a href="{page}">{escape(title)}</a>: {escape(line)}</li>')
        figures += [f'<h2><a href="{page}">{escape(title)}</a></h2>',
                    _image(dataset_dir / COMPARISON_FILE, f"{folder}/{COMPARISON_FILE}",
                           f"comparison of the models on {title}", "no comparison.png")]
    body += ["</ul>", *figures]
    path = results_root / PAGE_FILE
    write_text(path, _page("Results", body))
    return path
