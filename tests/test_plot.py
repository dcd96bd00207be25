"""plot.py and the reports it writes (reports/figures.py, reports/folders.py): curves of one run, summaries of a
dataset folder, and the command line over results/."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

import plot
from conftest import message_lines
from model import MODEL_FAMILIES, MODELS
from reports.figures import plot_confusion_matrix, plot_curves
from reports.folders import summarize_dataset
from runfolder.store import RunFileError

REPO_ROOT = Path(__file__).resolve().parent.parent
METRICS_HEADER = "epoch,lr,train_loss,train_acc,val_loss,val_acc,val_top5,epoch_seconds"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_run(dataset_dir: Path, model: str, *, tag: str | None = None, epochs: int = 6,
             planned_epochs: int | None = None, ceiling: float = 0.8, seed: int = 0,
             finished: bool = True, with_config: bool = True) -> Path:
    """A run folder as train.py writes it, with plausible rising accuracy and falling loss."""
    run_dir = dataset_dir / (model if tag is None else f"{model}-{tag}")
    run_dir.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    lines = [METRICS_HEADER]
    for epoch in range(1, epochs + 1):
        progress = 1 - np.exp(-epoch / 3)
        train_acc = min(0.999, ceiling * progress + 0.1 + rng.uniform(0, 0.02))
        val_acc = ceiling * progress + rng.uniform(-0.02, 0.02)
        lines.append(f"{epoch},0.1,{2.3 * (1 - progress) + 0.1:.5f},{train_acc:.5f},"
                     f"{2.3 * (1 - progress) + 0.3:.5f},{val_acc:.5f},{min(1, val_acc + 0.15):.5f},"
                     f"{10 + rng.uniform(0, 2):.3f}")
    (run_dir / "metrics.csv").write_text("\n".join(lines) + "\n")
    if with_config:
        config = {"model": model, "dataset": dataset_dir.name, "tag": tag, "seed": seed,
                  "epochs": planned_epochs or epochs, "parameters": 1_000_000 + 1000 * len(model),
                  "flops": 50_000_000 + len(model), "validation": "held-out"}
        (run_dir / "config.json").write_text(json.dumps(config))
    if finished:
        (run_dir / "summary.json").write_text(json.dumps({"test_acc": ceiling - 0.01 * seed,
                                                          "final_test_acc": ceiling - 0.02 * seed,
                                                          "epochs": epochs}))
    return run_dir


def read_metrics_rows(run_dir: Path) -> list[dict[str, float]]:
    with open(run_dir / "metrics.csv") as metrics_file:
        return [{key: float(value) for key, value in row.items()}
                for row in csv.DictReader(metrics_file)]


def read_summary_csv(dataset_dir: Path) -> list[dict[str, str]]:
    with open(dataset_dir / "summary.csv") as summary_file:
        return list(csv.DictReader(summary_file))


def assert_png(path: Path) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    return matplotlib.image.imread(path)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "plot.py", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)


def test_plot_curves_writes_a_png_of_the_documented_size_and_no_temp_files(tmp_path):
    run_dir = make_run(tmp_path / "cifar10", "cnn_resnet18")

    path = plot_curves(run_dir)

    assert path == run_dir / "curves.png"
    image = assert_png(path)
    assert image.shape[:2] == (480, 1200)  # 10 x 4 inches at 120 dpi
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json", "curves.png", "metrics.csv",
                                                         "summary.json"]


def test_plot_curves_needs_only_metrics_csv_and_draws_a_single_epoch(tmp_path):
    run_dir = make_run(tmp_path / "cifar100", "cnn_base", epochs=1, finished=False,
                       with_config=False)
    assert_png(plot_curves(run_dir))


def test_plot_curves_reports_a_malformed_metrics_csv_by_path(tmp_path):
    run_dir = make_run(tmp_path / "cifar10", "cnn_base")
    (run_dir / "metrics.csv").write_text(METRICS_HEADER + "\n1,0.1,oops,0.1,2.0,0.1,0.5,3.0\n")
    with pytest.raises(RunFileError, match="metrics.csv.*train_loss"):
        plot_curves(run_dir)


@pytest.mark.parametrize("num_classes", [10, 100])
def test_confusion_matrix_png_grows_with_the_class_count(tmp_path, num_classes):
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 5, size=(num_classes, num_classes))
    counts += 50 * np.eye(num_classes, dtype=int)
    counts[1] = 0  # a class absent from the evaluated images must not divide by zero
    path = tmp_path / "confusion_matrix.png"

    plot_confusion_matrix(counts, [f"class{i}" for i in range(num_classes)], path, "test set")

    height, width = assert_png(path).shape[:2]
    assert min(height, width) >= (700 if num_classes == 10 else 2000)


def test_dataset_summary_rows_match_each_runs_files(tmp_path):
    dataset_dir = tmp_path / "cifar10"
    runs = {model: make_run(dataset_dir, model, ceiling=ceiling, seed=seed)
            for seed, (model, ceiling) in enumerate([("cnn_resnet18", 0.85), ("cnn_base", 0.7)])}

    returned = summarize_dataset(dataset_dir, MODEL_FAMILIES)

    for name in ("summary.md", "summary.csv", "comparison.png"):
        assert (dataset_dir / name).stat().st_size > 0
    assert_png(dataset_dir / "comparison.png")
    rows = {row["model"]: row for row in read_summary_csv(dataset_dir)}
    assert [row["model"] for row in returned] == list(rows)
    for model, run_dir in runs.items():
        metrics = read_metrics_rows(run_dir)
        best = max(metrics, key=lambda epoch_row: epoch_row["val_acc"])
        config = json.loads((run_dir / "config.json").read_text())
        summary = json.loads((run_dir / "summary.json").read_text())
        row = rows[model]
        assert int(row["runs"]) == 1 and row["finished"] == "1" and row["best_val_acc_std"] == ""
        assert int(row["parameters"]) == config["parameters"]
        assert int(row["flops"]) == config["flops"]
        assert int(row["epochs"]) == len(metrics)
        assert float(row["train_acc"]) == pytest.approx(metrics[-1]["train_acc"])
        assert float(row["train_loss"]) == pytest.approx(metrics[-1]["train_loss"])
        assert float(row["val_loss"]) == pytest.approx(metrics[-1]["val_loss"])
        assert float(row["best_val_acc"]) == pytest.approx(best["val_acc"])
        assert float(row["best_epoch"]) == best["epoch"]
        assert float(row["test_acc"]) == pytest.approx(summary["test_acc"])
        assert float(row["final_test_acc"]) == pytest.approx(summary["final_test_acc"])
        assert float(row["seconds_per_epoch"]) == pytest.approx(
            np.mean([epoch_row["epoch_seconds"] for epoch_row in metrics]))
    markdown = (dataset_dir / "summary.md").read_text()
    assert f"{100 * float(rows['cnn_resnet18']['test_acc']):.2f}%" in markdown


def test_tagged_runs_of_one_model_become_one_row_with_mean_std_and_count(tmp_path):
    dataset_dir = tmp_path / "cifar10"
    seeds = [make_run(dataset_dir, "cnn_resnet18", tag=f"s{seed}", seed=seed) for seed in range(3)]
    make_run(dataset_dir, "cnn_base")

    summarize_dataset(dataset_dir, MODEL_FAMILIES)

    rows = {row["model"]: row for row in read_summary_csv(dataset_dir)}
    assert len(rows) == 2
    group = rows["cnn_resnet18"]
    test_accs = [json.loads((run_dir / "summary.json").read_text())["test_acc"]
                 for run_dir in seeds]
    best_accs = [max(epoch_row["val_acc"] for epoch_row in read_metrics_rows(run_dir))
                 for run_dir in seeds]
    assert int(group["runs"]) == 3
    assert float(group["test_acc"]) == pytest.approx(np.mean(test_accs))
    assert float(group["test_acc_std"]) == pytest.approx(np.std(test_accs, ddof=1))
    assert float(group["best_val_acc"]) == pytest.approx(np.mean(best_accs))
    assert float(group["best_val_acc_std"]) == pytest.approx(np.std(best_accs, ddof=1))
    assert group["run_dirs"].split(";") == [run_dir.name for run_dir in seeds]
    markdown_row = next(line for line in (dataset_dir / "summary.md").read_text().splitlines()
                        if line.startswith("| cnn_resnet18 "))
    mean, std = 100 * np.mean(test_accs), 100 * np.std(test_accs, ddof=1)
    assert f"{mean:.2f} \u00b1 {std:.2f}%" in markdown_row
    assert "ddof=1" in (dataset_dir / "summary.md").read_text()


def test_rows_follow_the_model_registry_order_and_unknown_models_go_last(tmp_path):
    dataset_dir = tmp_path / "cifar100"
    registry_order = list(MODELS)
    for model in ["zzz_custom", registry_order[-1], "aaa_custom", registry_order[3],
                  registry_order[0]]:
        make_run(dataset_dir, model)

    rows = summarize_dataset(dataset_dir, MODEL_FAMILIES)

    assert [row["model"] for row in rows] == [registry_order[0], registry_order[3],
                                              registry_order[-1], "aaa_custom", "zzz_custom"]


def test_model_and_tag_come_from_the_folder_name_when_config_json_is_missing(tmp_path):
    dataset_dir = tmp_path / "cifar10"
    # Tags may hold dashes themselves; the folder name is split after the known model name.
    for tag in ("seed-1", "seed-2"):
        make_run(dataset_dir, "cnn_se_resnet18", tag=tag, with_config=False)
    make_run(dataset_dir, "my_own_net-v2", with_config=False)

    rows = summarize_dataset(dataset_dir, MODEL_FAMILIES)

    assert [(row["model"], row["runs"]) for row in rows] == [("cnn_se_resnet18", 2),
                                                             ("my_own_net-v2", 1)]


def test_unfinished_runs_are_marked_and_have_no_test_accuracy(tmp_path):
    dataset_dir = tmp_path / "cifar10"
    make_run(dataset_dir, "cnn_densenet121", epochs=12, planned_epochs=50, finished=False)
    make_run(dataset_dir, "cnn_base")

    summarize_dataset(dataset_dir, MODEL_FAMILIES)

    rows = {row["model"]: row for row in read_summary_csv(dataset_dir)}
    assert rows["cnn_densenet121"]["finished"] == "0"
    assert rows["cnn_densenet121"]["test_acc"] == ""
    assert rows["cnn_densenet121"]["epochs"] == "12"
    assert rows["cnn_densenet121"]["planned_epochs"] == "50"
    assert "(unfinished, 12/50 epochs)" in (dataset_dir / "summary.md").read_text()


def test_broken_run_folders_are_skipped_with_a_warning_and_the_rest_summarized(tmp_path, capsys):
    dataset_dir = tmp_path / "cifar10"
    make_run(dataset_dir, "cnn_base")
    (dataset_dir / "cnn_resnet18").mkdir()  # crashed before its first epoch
    for name, content in [("cnn_resnet34", "epoch,lr,train_loss\n1,0.1,2.0\n"),
                          ("cnn_resnet50", METRICS_HEADER + "\n"),
                          ("cnn_resnet101", METRICS_HEADER + "\n1,0.1,2,0.1,2,nope,0.5,3\n")]:
        make_run(dataset_dir, name)
        (dataset_dir / name / "metrics.csv").write_text(content)

    assert plot.main([str(dataset_dir)]) == 0

    warnings = capsys.readouterr().err.splitlines()
    assert f"warning: skipping {dataset_dir / 'cnn_resnet18'}: no metrics.csv" in warnings
    for name in ("cnn_resnet34", "cnn_resnet50", "cnn_resnet101"):
        assert sum(str(dataset_dir / name / "metrics.csv") in line for line in warnings) == 1
    assert "Traceback" not in "\n".join(warnings)
    assert [row["model"] for row in read_summary_csv(dataset_dir)] == ["cnn_base"]


def test_cli_redraws_one_runs_curves(tmp_path, capsys):
    run_dir = make_run(tmp_path / "cifar10", "cnn_base")
    assert plot.main([str(run_dir)]) == 0
    assert_png(run_dir / "curves.png")


def test_cli_on_a_missing_path_exits_2_with_one_line(capsys):
    assert plot.main(["results/no_such_dataset_folder"]) == 2
    err = capsys.readouterr().err
    assert len(message_lines(err)) == 1
    assert "no_such_dataset_folder" in err


def test_cli_on_a_folder_with_nothing_to_plot_exits_2(tmp_path, capsys):
    (tmp_path / "cifar10" / "empty_run").mkdir(parents=True)
    assert plot.main([str(tmp_path)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_cli_on_the_results_root_summarizes_every_dataset_folder(tmp_path):
    make_run(tmp_path / "cifar10", "cnn_base")
    make_run(tmp_path / "cifar10", "cnn_resnet18", finished=False)
    make_run(tmp_path / "cifar100", "cnn_densenet121")

    result = run_cli(str(tmp_path))

    assert result.returncode == 0, result.stderr
    for dataset in ("cifar10", "cifar100"):
        for name in ("summary.md", "summary.csv", "comparison.png"):
            assert (tmp_path / dataset / name).is_file()
    assert len(read_summary_csv(tmp_path / "cifar10")) == 2
