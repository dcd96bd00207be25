"""Yesterday's results stay readable: a run folder written by commit 2e73890 is plotted, reported,
resumed, evaluated, predicted with and loaded through torch.hub by today's code.

The fixture, tests/fixtures/results-2e73890/cifar10/cnn_base-old/, was made by that commit with
tests/fixtures/make_old_run.py (its docstring has the commands): a 2-epoch cnn_base on the first 300
images of the synthetic CIFAR-10 that conftest's cifar10_dir fixture builds (the same data, so it can be
resumed and evaluated here), then --eval-only. Its eval.json still has the old key names top1/top5/loss.
"""
import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import plot
import train
from conftest import REPO_ROOT
from runfolder import declarations, store
from runfolder.declarations import BestCheckpoint, Evaluation, LastCheckpoint, Summary

FIXTURE = REPO_ROOT / "tests" / "fixtures" / "results-2e73890"
OLD_RUN = Path("cifar10") / "cnn_base-old"


@pytest.fixture
def old_results(tmp_path) -> Path:
    """A copy of the fixture's results root (the tests write into it)."""
    shutil.copytree(FIXTURE, tmp_path / "results")
    return tmp_path / "results"


def old_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / declarations.METRICS_FILE, newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_broken_or_foreign_json_file_is_ignored_with_a_warning_naming_it(tmp_path, capsys):
    broken, listed = tmp_path / "broken.json", tmp_path / "listed.json"
    broken.write_text("{")
    listed.write_text("[1]")
    assert store.read_json(broken) is None and store.read_json(listed) is None
    assert store.read_json(tmp_path / "absent.json") is None  # absent: nothing to say
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"warning: ignoring {broken}: not valid JSON (")
    assert lines[1] == f"warning: ignoring {listed}: expected a JSON object"


def test_json_is_written_as_every_run_file_a_key_a_line(tmp_path):
    store.write_json(tmp_path / "record.json", {"index": 1, "exit": 0})
    assert (tmp_path / "record.json").read_text() == '{\n  "index": 1,\n  "exit": 0\n}\n'


def test_the_fixture_is_what_the_old_commit_wrote():
    run_dir = FIXTURE / OLD_RUN
    assert sum(path.stat().st_size for path in FIXTURE.rglob("*") if path.is_file()) < 1_000_000
    assert "top1" in json.loads((run_dir / declarations.EVAL_FILE).read_text())  # the old name
    assert len(old_rows(run_dir)) == 2


def test_old_files_read_through_todays_declarations():
    run_dir = FIXTURE / OLD_RUN
    summary = Summary.from_dict(json.loads((run_dir / declarations.SUMMARY_FILE).read_text()), "summary")
    evaluation = Evaluation.from_dict(json.loads((run_dir / declarations.EVAL_FILE).read_text()), "eval")
    assert summary.epochs == 2 and 0 < summary.test_acc < 1
    assert evaluation.test_acc == 0.2984 and evaluation.test_top5 == 0.7947 and evaluation.images == 10_000
    best = BestCheckpoint.from_dict(store.load_checkpoint(run_dir / declarations.BEST_CHECKPOINT), "best.pt")
    last = LastCheckpoint.from_dict(store.load_checkpoint(run_dir / declarations.LAST_CHECKPOINT), "last.pt")
    assert best.model_name == "cnn_base" and best.epoch == 2 and len(best.classes) == 10
    assert last.epoch == 2 and len(last.history) == 2
    metrics = declarations.read_metrics(run_dir / declarations.METRICS_FILE)
    assert list(metrics["epoch"]) == [1, 2]


def test_plot_and_report_an_old_results_folder(old_results, capsys):
    assert plot.main([str(old_results)]) == 0
    dataset_dir = old_results / "cifar10"
    summary = json.loads((dataset_dir / OLD_RUN.name / declarations.SUMMARY_FILE).read_text())
    table = (dataset_dir / declarations.SUMMARY_MD_FILE).read_text()
    assert "| cnn_base | 1 (old) |" in table
    assert f"{100 * summary['test_acc']:.2f}%" in table
    page = (dataset_dir / declarations.PAGE_FILE).read_text()
    assert "top-1 29.84%, top-5 79.47%" in page  # eval.json's old key names, read
    assert "skipping" not in capsys.readouterr().err


def test_resume_continues_an_old_run(old_results, cifar10_dir):
    run_dir = old_results / OLD_RUN
    before = old_rows(run_dir)
    argv = ["--model", "cnn_base", "--tag", "old", "--resume", "--epochs", "3", "--data-dir",
            str(cifar10_dir), "--results-dir", str(old_results), "--no-progress"]
    assert train.main("cifar10", argv) == 0
    after = old_rows(run_dir)
    # the old rows as they were, in the old columns; the columns added since hold their default (nan)
    assert [{key: row[key] for key in before[0]} for row in after[:2]] == before
    assert [row["epoch"] for row in after] == ["1", "2", "3"] and after[0]["train_seconds"] == "nan"
    assert "Resuming" in (run_dir / declarations.LOG_FILE).read_text()
    config = json.loads((run_dir / declarations.CONFIG_FILE).read_text())
    assert (config["subset"], config["batch_size"], config["epochs"]) == (300, 64, 3)  # the saved recipe
    assert json.loads((run_dir / declarations.SUMMARY_FILE).read_text())["epochs"] == 3


def test_eval_only_of_an_old_best_pt_gives_its_old_figures(old_results, cifar10_dir, capsys):
    run_dir = old_results / OLD_RUN
    old_eval = json.loads((run_dir / declarations.EVAL_FILE).read_text())
    argv = ["--model", "cnn_base", "--tag", "old", "--eval-only", "--data-dir", str(cifar10_dir),
            "--results-dir", str(old_results), "--device", "cpu"]
    assert train.main("cifar10", argv) == 0
    new_eval = json.loads((run_dir / declarations.EVAL_FILE).read_text())
    assert new_eval["test_acc"] == pytest.approx(old_eval["top1"], abs=1e-9)
    assert new_eval["test_top5"] == pytest.approx(old_eval["top5"], abs=1e-9)
    assert new_eval["test_loss"] == pytest.approx(old_eval["loss"], rel=1e-5)
    assert new_eval["confusion_matrix"] == old_eval["confusion_matrix"]


def test_predict_and_torch_hub_load_an_old_best_pt(old_results, tmp_path, capsys):
    best_pt = old_results / OLD_RUN / declarations.BEST_CHECKPOINT
    image = tmp_path / "square.png"
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    pixels[8:24, 8:24] = 200
    Image.fromarray(pixels).save(image)
    argv = ["--model", "cnn_base", "--predict", str(image), "--checkpoint", str(best_pt), "--device", "cpu"]
    assert train.main("cifar10", argv) == 0
    assert "square.png" in capsys.readouterr().out
    net = torch.hub.load(str(REPO_ROOT), "cnn_base", source="local", checkpoint=str(best_pt))
    assert net.classes[0] == "airplane" and net.epoch == 2
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_a_metrics_csv_older_than_a_column_reads_with_its_default(tmp_path, monkeypatch):
    # Today every column is as old as the project; pretend val_top5 came later, with a default, and read a
    # file written before it (as a column added tomorrow will be read).
    monkeypatch.setitem(declarations._COLUMN_DEFAULTS, "val_top5", "nan")
    old = tmp_path / "metrics.csv"
    old.write_text("epoch,lr,train_loss,train_acc,val_loss,val_acc,epoch_seconds\n1,0.1,2.0,0.2,2.1,0.3,1.5\n")
    metrics = declarations.read_metrics(old)
    assert np.isnan(metrics["val_top5"][0]) and metrics["val_acc"][0] == 0.3
    # and a history row of an older last.pt is written out complete
    assert declarations.complete_row({"epoch": 1, "val_acc": "0.3"})["val_top5"] == "nan"
    monkeypatch.delitem(declarations._COLUMN_DEFAULTS, "val_top5")
    with pytest.raises(declarations.RunFileError, match="missing columns val_top5"):
        declarations.read_metrics(old)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
