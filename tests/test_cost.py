"""reports/cost.py: accuracy against cost (parameters, FLOPs, measured training throughput) with each axis' Pareto
front, as accuracy_cost.png, a section of summary.md and of the HTML page; what a figure cannot show is left out
with a footnote, never a crash."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_old_runs import FIXTURE
from test_plot import assert_png
from test_report import EVIL_TAG, Page, make_run

import plot
from reports import pages
from reports.cost import NO_COST_LINE, CostPoint, pareto_front, run_throughput
from runfolder.declarations import ACCURACY_COST_FILE

H100 = "NVIDIA H100 80GB HBM3"


def costed_run(dataset_dir: Path, model: str, seed: int, *, parameters: int | None, accuracy: float,
               train_seconds: list[float] | None, gpu_name: str | None = H100) -> Path:
    """test_report's run folder of 3 epochs, with a parameter count (FLOPs 100 times it), a final test accuracy of
    accuracy + 0.01 * seed, the device it trained on (gpu_name; None: the CPU), 50,000 training images, and a
    train_seconds column in metrics.csv (None: a metrics.csv older than the column)."""
    run_dir = make_run(dataset_dir, model, f"s{seed}", seed=seed)
    config = json.loads((run_dir / "config.json").read_text())
    config.update(parameters=parameters, flops=parameters and 100 * parameters, train_images=50_000,
                  device="cuda" if gpu_name else "cpu", gpu_name=gpu_name, world_size=1)
    (run_dir / "config.json").write_text(json.dumps(config))
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps({**summary, "final_test_acc": accuracy + 0.01 * seed}))
    if train_seconds is not None:
        lines = (run_dir / "metrics.csv").read_text().splitlines()
        lines = [lines[0] + ",train_seconds"] + [f"{line},{seconds}" for line, seconds in zip(lines[1:], train_seconds)]
        (run_dir / "metrics.csv").write_text("\n".join(lines) + "\n")
    return run_dir


# Four models of two seeds each, every cost known. Mean final test accuracies 60.5, 70.5, 80.5 and 75.5%;
# throughput 50,000 / the steady epoch: 50,000, 2,500, 10,000 and 2,000 images/s. cnn_resnet34 is beaten on
# every axis by cnn_resnet18; cnn_vgg11 is on the parameter and FLOP fronts only (slower than cnn_resnet18).
FOUR_MODELS = {"cnn_base": (62_006, 0.60, 1.0), "cnn_vgg11": (9_231_114, 0.70, 20.0),
               "cnn_resnet18": (11_173_962, 0.80, 5.0), "cnn_resnet34": (21_282_122, 0.75, 25.0)}


def four_models(dataset_dir: Path) -> None:
    for model, (parameters, accuracy, seconds) in FOUR_MODELS.items():
        for seed in (0, 1):
            costed_run(dataset_dir, model, seed, parameters=parameters, accuracy=accuracy,
                       train_seconds=[9.0, seconds, seconds])


def cost_section(dataset_dir: Path) -> str:
    """summary.md's section "Accuracy against cost", up to the next section of the same level."""
    markdown = (dataset_dir / "summary.md").read_text()
    return markdown.split("## Accuracy against cost\n", 1)[1].split("\n## ", 1)[0]


def test_the_pareto_front_is_the_points_no_other_beats_on_both_axes():
    points = [CostPoint("a", 0.60, None, 1.0), CostPoint("b", 0.70, None, 5.0), CostPoint("c", 0.65, None, 6.0),
              CostPoint("d", 0.80, None, 10.0), CostPoint("e", 0.80, None, 12.0), CostPoint("f", 0.60, None, 2.0),
              CostPoint("g", 0.70, None, 5.0)]
    # c: beaten by b (cheaper, more accurate); e and f: as accurate as d and a, but dearer. b and g are equal: both
    # stay. Cheapest first.
    assert [point.model for point in pareto_front(points)] == ["a", "b", "g", "d"]
    # Throughput: higher is better, so the fastest comes first and the accuracy rises from there.
    faster = [CostPoint("a", 0.60, None, 5000.0), CostPoint("b", 0.70, None, 2000.0),
              CostPoint("c", 0.65, None, 1000.0), CostPoint("d", 0.70, None, 1500.0),
              CostPoint("e", 0.60, None, 5000.0), CostPoint("f", 0.90, None, 100.0)]
    assert [point.model for point in pareto_front(faster, higher_cost_is_better=True)] == ["a", "e", "b", "f"]
    assert [point.model for point in pareto_front(faster)] == ["f"]  # as a lower-is-better cost, f beats all
    assert pareto_front([]) == []


def test_throughput_is_training_images_over_the_median_epoch_after_the_first():
    def run(seconds, images=1000):
        return {"train_images": images, "metrics": {"train_seconds": np.array(seconds, dtype=float)}}

    assert run_throughput(run([9.0, 2.0, 4.0, 2.5])) == pytest.approx(1000 / 2.5)  # the 9 s warm-up left out
    assert run_throughput(run([4.0])) == pytest.approx(250.0)  # a run of one epoch: that epoch
    assert run_throughput(run([np.nan, np.nan])) is None  # a metrics.csv older than train_seconds
    assert run_throughput(run([9.0, np.nan, 2.0])) is None
    assert run_throughput(run([9.0, 0.0])) is None
    assert run_throughput(run([9.0, 2.0], images=None)) is None  # config.json without train_images


def test_plot_py_draws_accuracy_against_cost_and_lists_each_front(tmp_path, capsys):
    dataset_dir = tmp_path / "cifar10"
    four_models(dataset_dir)
    assert plot.main([str(dataset_dir)]) == 0
    image = assert_png(dataset_dir / ACCURACY_COST_FILE)
    assert image.shape[1] > 3 * image.shape[0]  # one row of three panels
    section = cost_section(dataset_dir)
    fronts = [
        "- Pareto front by parameters: cnn_base (62.01K, 60.50%) \u2192 cnn_vgg11 (9.23M, 70.50%) \u2192 "
        "cnn_resnet18 (11.17M, 80.50%)",
        "- Pareto front by FLOPs: cnn_base (6.20M, 60.50%) \u2192 cnn_vgg11 (923.11M, 70.50%) \u2192 "
        "cnn_resnet18 (1.12G, 80.50%)",
        f"- Pareto front by throughput on {H100}: cnn_base (50000 images/s, 60.50%) \u2192 "
        "cnn_resnet18 (10000 images/s, 80.50%)"]
    assert section.splitlines()[2:] == ["", "### default recipe, 3 epochs", "", *fronts]  # nothing left out
    page = (dataset_dir / "index.html").read_text()
    assert "<h2>Accuracy against cost</h2>" in page and "<h3>default recipe, 3 epochs</h3>" in page
    assert f"<li>{fronts[2][2:]}</li>" in page
    assert ACCURACY_COST_FILE in Page(dataset_dir / "index.html").images
    # After the comparisons, before comparison.png.
    assert page.index("<h2>Comparisons</h2>") < page.index("<h2>Accuracy against cost</h2>") < \
        page.index('<img src="comparison.png"')


def test_runs_without_what_a_panel_needs_are_left_out_of_it_with_a_footnote(tmp_path, capsys):
    dataset_dir = tmp_path / "cifar10"
    for seed in (0, 1):
        costed_run(dataset_dir, "cnn_base", seed, parameters=62_006, accuracy=0.6, train_seconds=[9.0, 1.0, 1.0])
    costed_run(dataset_dir, "cnn_resnet18", 0, parameters=11_173_962, accuracy=0.8, train_seconds=[9.0, 5.0, 5.0])
    costed_run(dataset_dir, "cnn_resnet18", 1, parameters=11_173_962, accuracy=0.8, train_seconds=[9.0, 50.0, 50.0],
               gpu_name=None)  # on the CPU: not on the H100's axis
    costed_run(dataset_dir, "cnn_vgg11", 0, parameters=None, accuracy=0.9, train_seconds=None)
    make_run(dataset_dir, "cnn_resnet34", "wip", epochs=2, finished=False)
    untested = make_run(dataset_dir, "cnn_densenet121", None)
    (untested / "summary.json").write_text(json.dumps({"epochs": 3, "test_acc": 0.5, "final_test_acc": "lost"}))
    assert plot.main([str(dataset_dir)]) == 0
    assert_png(dataset_dir / ACCURACY_COST_FILE)
    section = cost_section(dataset_dir)
    assert "- Pareto front by parameters: cnn_base (62.01K, 60.50%) \u2192 cnn_resnet18 (11.17M, 80.50%)" in section
    assert (f"- Pareto front by throughput on {H100}: cnn_base (50000 images/s, 60.50%) \u2192 "
            "cnn_resnet18 (10000 images/s, 80.50%)") in section  # its CPU run left out of the mean
    for note in ("- Left out of the parameters panel, no count in config.json: cnn_vgg11.",
                 "- Left out of the FLOPs panel, no count in config.json: cnn_vgg11.",
                 "- Left out of the throughput panel, its metrics.csv has no `train_seconds` (it predates the "
                 "column): cnn_vgg11-s0.",
                 f"- Left out of the throughput panel, trained on another device than {H100}: cnn_resnet18-s1 "
                 "(CPU).",
                 "- Unfinished runs are in no panel (no test accuracy yet): cnn_resnet34-wip.",
                 "- Finished runs without a final test accuracy in summary.json are in no panel: cnn_densenet121."):
        assert note in section.splitlines()
    assert "other device than NVIDIA H100 80GB HBM3: cnn_resnet18-s1 (CPU).</li>" in \
        (dataset_dir / "index.html").read_text()


def test_only_unfinished_runs_give_no_figure_and_a_line_saying_so(tmp_path, capsys):
    dataset_dir = tmp_path / "cifar10"
    make_run(dataset_dir, "cnn_base", "wip", epochs=2, finished=False)
    (dataset_dir / ACCURACY_COST_FILE).write_bytes(b"stale")  # from an earlier plot, when a run had finished
    assert plot.main([str(dataset_dir)]) == 0
    assert not (dataset_dir / ACCURACY_COST_FILE).exists()
    assert cost_section(dataset_dir).splitlines() == [
        "", NO_COST_LINE, "", "- Unfinished runs are in no panel (no test accuracy yet): cnn_base-wip."]
    page = Page(dataset_dir / "index.html")
    assert ACCURACY_COST_FILE not in page.images and NO_COST_LINE in page.text


def test_runs_of_other_epochs_or_recipes_are_groups_of_their_own(tmp_path, capsys):
    dataset_dir = tmp_path / "cifar10"
    four_models(dataset_dir)
    longer = make_run(dataset_dir, "cnn_base", "long", epochs=5)
    config = json.loads((longer / "config.json").read_text())
    (longer / "config.json").write_text(json.dumps({**config, "recipe": "fast"}))
    assert plot.main([str(dataset_dir)]) == 0
    section = cost_section(dataset_dir)
    assert "### default recipe, 3 epochs" in section and "### fast recipe, 5 epochs" in section
    assert section.split("### fast recipe, 5 epochs")[1].count("cnn_resnet18") == 0
    image = assert_png(dataset_dir / ACCURACY_COST_FILE)
    assert image.shape[1] < 2 * image.shape[0]  # two rows of panels


def test_an_old_results_folder_still_plots_its_costs(tmp_path, capsys):
    shutil.copytree(FIXTURE, tmp_path / "results")
    assert plot.main([str(tmp_path / "results")]) == 0
    dataset_dir = tmp_path / "results" / "cifar10"
    assert_png(dataset_dir / ACCURACY_COST_FILE)
    lines = cost_section(dataset_dir).splitlines()
    assert any(line.startswith("- Pareto front by parameters: cnn_base (62.01K, ") for line in lines)
    assert "- Pareto front by throughput: no model has it" in lines
    assert ("- Left out of the throughput panel, its metrics.csv has no `train_seconds` (it predates the column): "
            "cnn_base-old.") in lines


def test_crafted_names_in_the_cost_section_show_as_text(tmp_path, capsys):
    dataset_dir = tmp_path / "cifar10"
    costed_run(dataset_dir, "cnn_base", 0, parameters=62_006, accuracy=0.6, train_seconds=[9.0, 1.0, 1.0])
    evil = costed_run(dataset_dir, "evil", 0, parameters=1_000, accuracy=0.7, train_seconds=[9.0, 1.0, 1.0],
                      gpu_name="<b>$gpu</b>")
    config = json.loads((evil / "config.json").read_text())
    (evil / "config.json").write_text(json.dumps({**config, "model": EVIL_TAG}))
    make_run(dataset_dir, "cnn_vgg11", "<i>", finished=False)
    assert plot.main([str(dataset_dir)]) == 0
    assert_png(dataset_dir / ACCURACY_COST_FILE)
    html_text = (dataset_dir / "index.html").read_text()
    section = html_text.split("<h2>Accuracy against cost</h2>")[1].split("<h2>")[0]
    assert "&lt;script&gt;alert(1)&lt;/script&gt; (1.00K, 70.00%)" in section
    assert "&lt;b&gt;$gpu&lt;/b&gt;" in section and "cnn_vgg11-&lt;i&gt;" in section
    assert "<script>alert" not in html_text and "<i>" not in html_text and "<b>" not in html_text
    assert Page(dataset_dir / "index.html").scripts == [pages.SORT_SCRIPT]
