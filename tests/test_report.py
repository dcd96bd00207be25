"""reports/pages.py: the HTML pages a user opens from the file system or zips and sends."""
import base64
import dataclasses
import hashlib
import json
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

import plot
from model import MODELS
from reports import pages, summary
from runfolder import declarations

METRICS_HEADER = "epoch,lr,train_loss,train_acc,val_loss,val_acc,val_top5,epoch_seconds"
# A 1x1 PNG: the pages only link images, so any valid one will do.
TINY_PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9Q"
                            "DwADhgGAWjR9awAAAABJRU5ErkJggg==")
EVIL_TAG = "<script>alert(1)</script>"
EVIL_CLASS = "<img src=x onerror=alert(1)>"


class Page(HTMLParser):
    """What a browser would see of a page: links, images, ids, table rows, scripts and text."""

    def __init__(self, path: Path):
        super().__init__()
        self.links, self.images, self.ids, self.scripts, self.text = [], [], set(), [], []
        self.rows: list[list[str]] = []
        self._in_body, self._in_script, self._cell = False, False, None
        self.feed(path.read_text(encoding="utf-8"))

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "a":
            self.links.append(attrs["href"])
        elif tag == "img":
            self.images.append(attrs["src"])
        elif tag == "script":
            self._in_script = True
            self.scripts.append("")
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self.rows.append([])
        elif tag == "td" and self._in_body:
            self._cell = ""

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False
        elif tag == "tbody":
            self._in_body = False
        elif tag == "td" and self._cell is not None:
            self.rows[-1].append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data
            return
        self.text.append(data)
        if self._cell is not None:
            self._cell += data


def make_run(dataset_dir: Path, model: str, tag: str | None, *, seed: int = 0, epochs: int = 3,
             finished: bool = True, config_tag: str | None = None) -> Path:
    """A run folder as train.py leaves it: metrics.csv, config.json, curves.png, summary.json."""
    run_dir = dataset_dir / (model if tag is None else f"{model}-{tag}")
    run_dir.mkdir(parents=True)
    lines = [METRICS_HEADER] + [
        f"{epoch},0.1,{2 / epoch:.4f},{0.3 + 0.1 * epoch + 0.01 * seed:.4f},{2.2 / epoch:.4f},"
        f"{0.25 + 0.1 * epoch + 0.02 * seed:.4f},{0.7 + 0.05 * epoch:.4f},1.5"
        for epoch in range(1, epochs + 1)]
    (run_dir / "metrics.csv").write_text("\n".join(lines) + "\n")
    config = {"model": model, "tag": config_tag or tag, "epochs": epochs, "batch_size": 128,
              "lr": 0.05, "aug": "flip-crop", "seed": seed, "val_size": 0, "validation": "test",
              "device": "cpu", "amp": "off", "parameters": 62006, "flops": 1303440}
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "curves.png").write_bytes(TINY_PNG)
    if finished:
        (run_dir / "summary.json").write_text(json.dumps({
            "epochs": epochs, "best_epoch": epochs, "test_acc": 0.5 + 0.01 * seed,
            "final_test_acc": 0.49 + 0.01 * seed}))
    return run_dir


def evaluate(run_dir: Path, class_names: list[str]) -> None:
    """What --eval-only leaves beside best.pt."""
    (run_dir / "eval.json").write_text(json.dumps({
        "top1": 0.6123, "top5": 0.9456, "tta": True, "checkpoint_epoch": 3, "images": 10000,
        "per_class": {name: 0.5 for name in class_names}}))
    (run_dir / "confusion_matrix.png").write_bytes(TINY_PNG)


@pytest.fixture
def results(tmp_path) -> Path:
    return make_results(tmp_path)


def make_results(tmp_path: Path) -> Path:
    """Two datasets; CIFAR-10 has seeds of one model, an evaluated run with a crafted class name,
    a run whose config.json carries a crafted tag, a folder name that needs quoting in a link, and
    an unfinished run with a broken config.json."""
    cifar10 = tmp_path / "results" / "cifar10"
    make_run(cifar10, "cnn_base", "s0", seed=0)
    make_run(cifar10, "cnn_base", "s1", seed=1)
    evaluate(make_run(cifar10, "cnn_resnet18", None), ["airplane", EVIL_CLASS, "bird"])
    make_run(cifar10, "cnn_resnet34", "evil", config_tag=EVIL_TAG)
    make_run(cifar10, "cnn_densenet121", "a b#1", seed=2)
    unfinished = make_run(cifar10, "cnn_se_resnet18", "wip", epochs=2, finished=False)
    (unfinished / "config.json").write_text('{"model": "cnn_se_resnet18", "epochs": ')
    make_run(tmp_path / "results" / "cifar100", "cnn_base", None)
    return tmp_path / "results"


def write_pages(results: Path) -> dict[Path, list[dict]]:
    """What plot.py results does with the report: the summary files, then the pages."""
    names = list(MODELS)
    rows_by_dataset = {}
    for dataset_dir in sorted(results.iterdir()):
        runs = [summary.read_run(run_dir, names) for run_dir in sorted(dataset_dir.iterdir())]
        rows = summary.group_runs(runs, names)
        (dataset_dir / "summary.md").write_text(summary.summary_markdown(dataset_dir.name, rows))
        (dataset_dir / "comparison.png").write_bytes(TINY_PNG)
        assert pages.write_dataset_page(dataset_dir, rows, index_link=True) == \
            dataset_dir / "index.html"
        rows_by_dataset[dataset_dir] = rows
    assert pages.write_index(results, rows_by_dataset) == results / "index.html"
    return rows_by_dataset


def assert_links_resolve(page_path: Path, page: Page) -> None:
    """Every link and image is relative and lands on a file that exists, or on an id of the page."""
    for target in page.links + page.images:
        parts = urlsplit(target)
        assert not parts.scheme and not parts.netloc and not parts.path.startswith("/"), target
        if parts.path:
            assert (page_path.parent / unquote(parts.path)).is_file(), target
        else:
            assert parts.fragment in page.ids, target


def summary_md_rows(dataset_dir: Path) -> list[list[str]]:
    table = [line for line in (dataset_dir / "summary.md").read_text().splitlines()
             if line.startswith("| ")][1:]  # the first is the header
    return [line[2:-2].split(" | ") for line in table]


def test_dataset_page_shows_the_summary_table_and_every_run(results):
    rows_by_dataset = write_pages(results)
    cifar10 = results / "cifar10"
    page = Page(cifar10 / "index.html")
    assert page.rows[:len(rows_by_dataset[cifar10])] == summary_md_rows(cifar10)
    text = " ".join(page.text)
    for run_dir in (path for path in cifar10.iterdir() if path.is_dir()):
        assert run_dir.name in text
        assert f"{run_dir.name}/curves.png" in map(unquote, page.images)
    assert_links_resolve(cifar10 / "index.html", page)
    assert "comparison.png" in page.images and "../index.html" in page.links
    # The evaluated run shows its matrix and figures; the others say they were not evaluated.
    assert "cnn_resnet18/confusion_matrix.png" in page.images
    assert "top-1 61.23%, top-5 94.56%, mirror TTA on" in text
    assert text.count("not evaluated") == 5
    assert "batch_size" in text and "flip-crop" in text  # settings from config.json


def test_data_from_the_run_files_cannot_inject_markup(results):
    write_pages(results)
    html_text = (results / "cifar10" / "index.html").read_text()
    page = Page(results / "cifar10" / "index.html")
    assert page.scripts == [pages.SORT_SCRIPT]  # the sorting script and nothing else
    assert EVIL_CLASS not in html_text and "<script>alert" not in html_text
    assert "&lt;img src=x onerror=alert(1)&gt;" in html_text
    text = "".join(page.text)
    assert EVIL_TAG in text and EVIL_CLASS in text  # shown as text
    assert "http://" not in html_text and "https://" not in html_text  # nothing fetched


def crafted(field: str) -> str:
    return f'<i class="x-{field}">'


def test_no_field_of_any_run_file_becomes_markup(tmp_path):
    """Every value of config.json, summary.json and eval.json replaced by markup naming its field: each is
    shown as text (or not at all), none becomes an element; and the page's policy runs only its own script."""
    dataset_dir = tmp_path / "results" / "cifar10"
    run_dir = make_run(dataset_dir, "cnn_base", "x")
    config = json.loads((run_dir / "config.json").read_text())
    config.update({name: crafted(name) for name in (*pages.SETTINGS, *config) if name != "model"})
    (run_dir / "config.json").write_text(json.dumps(config))
    summary_fields = [field.name for field in dataclasses.fields(declarations.Summary)]
    (run_dir / "summary.json").write_text(json.dumps({name: crafted(name) for name in summary_fields}))
    evaluation = {field.name: crafted(field.name) for field in dataclasses.fields(declarations.Evaluation)}
    evaluation["per_class"] = {crafted("class"): crafted("class-accuracy")}
    (run_dir / "eval.json").write_text(json.dumps(evaluation))
    write_pages(tmp_path / "results")

    html_text = (dataset_dir / "index.html").read_text()
    assert "<i " not in html_text
    text = "".join(Page(dataset_dir / "index.html").text)
    shown = [name for name in (*config, *summary_fields, *evaluation, "class") if crafted(name) in text]
    assert {"tag", "amp", "aug", "checkpoint_epoch", "images", "class"} <= set(shown)
    policy = pages.CONTENT_POLICY
    assert "default-src 'none'" in policy and "unsafe" not in policy.split("script-src")[1]
    script_hash = base64.b64encode(hashlib.sha256(pages.SORT_SCRIPT.encode()).digest()).decode()
    assert f"script-src 'sha256-{script_hash}'" in policy
    assert f'<meta http-equiv="Content-Security-Policy" content="{policy}">' in html_text
    assert Page(dataset_dir / "index.html").scripts == [pages.SORT_SCRIPT]


def test_index_links_each_dataset_page(results):
    write_pages(results)
    index = Page(results / "index.html")
    assert "cifar10/index.html" in index.links and "cifar100/index.html" in index.links
    assert_links_resolve(results / "index.html", index)
    assert "CIFAR-100" in " ".join(index.text)


def test_the_index_page_is_exactly_a_line_and_a_figure_per_dataset(tmp_path):
    """The whole page: its head (with the policy, no script: nothing to sort), a line per dataset with its runs,
    models and best test accuracy, and its comparison figure or a note that there is none."""
    results = tmp_path / "results"
    make_run(results / "cifar10", "cnn_base", "s0", seed=0)
    make_run(results / "cifar10", "cnn_base", "s1", seed=1)
    make_run(results / "cifar10", "cnn_densenet121", "a b#1", seed=2)
    make_run(results / "cifar100", "cnn_base", None, finished=False)
    rows_by_dataset = write_pages(results)
    (results / "cifar100" / "comparison.png").unlink()
    pages.write_index(results, rows_by_dataset)
    figure = ('<a href="cifar10/comparison.png"><img src="cifar10/comparison.png" '
              'alt="comparison of the models on CIFAR-10" loading="lazy"></a>')
    assert (results / "index.html").read_text().splitlines() == [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{pages.CONTENT_POLICY}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">', "<title>Results</title>",
        *f"<style>{pages.STYLE}</style>".splitlines(), "</head>", "<body>", "<h1>Results</h1>", "<ul>",
        '<li><a href="cifar10/index.html">CIFAR-10</a>: 3 runs of 2 models; best test accuracy 52.00% '
        "(cnn_densenet121)</li>",
        '<li><a href="cifar100/index.html">CIFAR-100</a>: 1 run of 1 model</li>', "</ul>",
        '<h2><a href="cifar10/index.html">CIFAR-10</a></h2>', figure,
        '<h2><a href="cifar100/index.html">CIFAR-100</a></h2>', '<p class="muted">no comparison.png</p>', "",
        "</body>", "</html>"]


def test_each_run_has_a_readable_id_of_its_own_and_links_are_quoted(tmp_path):
    dataset_dir = tmp_path / "cifar10"
    for tag in ("a b#1", "a_b_1", 'q"<'):  # the first two make the same readable id
        make_run(dataset_dir, "cnn_base", tag)
    names = list(MODELS)
    rows = summary.group_runs([summary.read_run(run_dir, names) for run_dir in sorted(dataset_dir.iterdir())], names)
    assert pages._run_ids(rows) == {"cnn_base-a b#1": "run-cnn_base-a_b_1", "cnn_base-a_b_1": "run-cnn_base-a_b_1-1",
                                     'cnn_base-q"<': "run-cnn_base-q__"}
    html_text = pages.write_dataset_page(dataset_dir, rows).read_text()
    assert 'src="cnn_base-a%20b%231/curves.png"' in html_text and 'src="cnn_base-q%22%3C/curves.png"' in html_text
    assert pages._href('a"b&c') == "a%22b%26c" and pages._href("x'y") == "x%27y"
    assert html_text.count("<script>") == 1  # the sorting script of a table page


def test_each_run_section_says_exactly_what_its_files_hold(tmp_path):
    """A run's section, line by line: its results (finished or not, epochs done of planned, best epoch, test
    accuracies), its settings as config.json has them, its curves and its evaluation or their absence."""
    dataset_dir = tmp_path / "cifar10"
    evaluate(make_run(dataset_dir, "cnn_resnet18", None, seed=1), ["airplane", "bird"])
    unfinished = make_run(dataset_dir, "cnn_base", "wip", epochs=2, finished=False)
    config = json.loads((unfinished / "config.json").read_text())
    (unfinished / "config.json").write_text(json.dumps({**config, "epochs": 5}))
    (make_run(dataset_dir, "cnn_vgg11", "broken") / "config.json").write_text("{")
    names = list(MODELS)
    rows = summary.group_runs([summary.read_run(run_dir, names) for run_dir in sorted(dataset_dir.iterdir())], names)
    ids = pages._run_ids(rows)
    sections = {run["run_dir"]: pages.run_section(dataset_dir, run, ids[run["run_dir"]]).splitlines()
                for row in rows for run in row["members"]}

    def settings(model, epochs, seed, tag):
        values = {"model": model, "epochs": epochs, "batch_size": 128, "lr": 0.05, "val_size": 0, "aug": "flip-crop",
                  "seed": seed, "tag": tag, "device": "cpu", "amp": "off", "validation": "test"}
        return '<dl class="settings">' + "".join(f"<dt>{name}</dt><dd>{value}</dd>" for name, value in values.items()) \
            + "</dl>"

    def section(name, results, settings_html, evaluation):
        return [f'<section class="run" id="run-{name}">',
                f'<h3>{name} <a class="muted" href="#summary">(back to the table)</a></h3>',
                '<div class="columns"><div>', "<ul>" + "".join(f"<li>{item}</li>" for item in results) + "</ul>",
                settings_html, "</div><div>",
                f'<a href="{name}/curves.png"><img src="{name}/curves.png" alt="curves of {name}" loading="lazy"></a>',
                "<h4>Evaluation</h4>", *evaluation, "</div></div>", "</section>"]

    not_evaluated = ['<p class="muted">not evaluated (no usable eval.json; run it with --eval-only)</p>']
    assert sections["cnn_base-wip"] == section(
        "cnn_base-wip", ["unfinished, 2/5 epochs", "best valid accuracy 45.00% (epoch 2)",
                         "no test accuracy yet (the run has not finished)"],
        settings("cnn_base", 5, 0, "wip"), not_evaluated)
    assert sections["cnn_resnet18"] == section(
        "cnn_resnet18", ["finished, 3/3 epochs", "best valid accuracy 57.00% (epoch 3)",
                         "test accuracy 51.00% (best.pt, epoch 3), 50.00% (final weights)"],
        settings("cnn_resnet18", 3, 1, "null"),
        ["<p>top-1 61.23%, top-5 94.56%, mirror TTA on, checkpoint of epoch 3, 10000 images</p>",
         '<a href="cnn_resnet18/confusion_matrix.png"><img src="cnn_resnet18/confusion_matrix.png" '
         'alt="confusion matrix of cnn_resnet18" loading="lazy"></a>',
         '<p class="muted">no most confident mistakes in this eval.json (written before they were recorded; '
         "--eval-only writes them)</p>",
         "<details><summary>accuracy per class</summary><table><thead><tr><th>class</th><th>top-1</th></tr></thead>"
         "<tbody><tr><td>airplane</td><td>50.00%</td></tr><tr><td>bird</td><td>50.00%</td></tr></tbody></table>"
         "</details>"])
    assert sections["cnn_vgg11-broken"] == section(
        "cnn_vgg11-broken", ["finished, 3/3 epochs", "best valid accuracy 55.00% (epoch 3)",
                             "test accuracy 50.00% (best.pt, epoch 3), 49.00% (final weights)"],
        '<p class="muted">no readable config.json</p>', not_evaluated)
    table = pages._summary_table(rows, ids).splitlines()
    assert table[:3] == ['<div class="scroll"><table class="sortable" id="summary">', table[1], "<tbody>"]
    assert table[-1] == "</tbody></table></div>" and len(table) == 3 + len(rows) + 1


PINNED_PAGE = Path(__file__).parent / "fixtures" / "report_page.html"


def pinned_page(root: Path) -> str:
    """The CIFAR-10 page of make_results' folder, with a second evaluation that lacks what it may lack (TTA off,
    no epoch or image count, no per-class figures, no confusion matrix): what tests/fixtures/report_page.html
    holds (rebuild it with make_report_page.py there)."""
    results = make_results(root)
    (results / "cifar10" / "cnn_base-s1" / "eval.json").write_text(json.dumps({"top1": 0.5, "top5": 0.875,
                                                                                "tta": False}))
    write_pages(results)
    return (results / "cifar10" / "index.html").read_text()


def test_the_dataset_page_is_the_one_pinned(tmp_path):
    """Every line of a dataset page: a change to what it says or how (a word, a tag, a sort key) fails here; a
    change meant to do so rebuilds the fixture in the same commit."""
    assert pinned_page(tmp_path) == PINNED_PAGE.read_text()


def test_page_without_optional_files_links_nothing_missing(tmp_path):
    dataset_dir = tmp_path / "cifar10"
    run_dir = make_run(dataset_dir, "cnn_base", None, finished=False)
    (run_dir / "curves.png").unlink()
    names = list(MODELS)
    rows = summary.group_runs([summary.read_run(run_dir, names)], names)
    page_path = pages.write_dataset_page(dataset_dir, rows)
    page = Page(page_path)
    assert page.images == [] and "../index.html" not in page.links  # no results/index.html yet
    assert_links_resolve(page_path, page)
    assert "no curves.png" in " ".join(page.text)
    body = page_path.read_text().split("<body>\n")[1].splitlines()
    assert body[:3] == ["", "<h1>CIFAR-10 results</h1>", "<p>1 run of 1 model. Click a column header to sort.</p>"]
    assert '<p class="muted">no comparison.png</p>' in body
    for name in ("summary.md", "summary.csv"):
        (dataset_dir / name).write_text("x")
    (tmp_path / "index.html").write_text("x")  # results/index.html now exists: linked without being asked
    body = pages.write_dataset_page(dataset_dir, rows).read_text().split("<body>\n")[1].splitlines()
    assert body[:3] == ['<p><a href="../index.html">all datasets</a></p>', "<h1>CIFAR-10 results</h1>",
                        "<p>1 run of 1 model. Click a column header to sort. The same table as "
                        '<a href="summary.md">summary.md</a>, <a href="summary.csv">summary.csv</a>.</p>']


def test_plot_py_on_the_results_root_writes_every_page(results, capsys):
    assert plot.main([str(results)]) == 0
    page_files = [results / "index.html", results / "cifar10" / "index.html",
             results / "cifar100" / "index.html"]
    for page_path in page_files:
        assert_links_resolve(page_path, Page(page_path))
    assert str(results / "index.html") in capsys.readouterr().out
