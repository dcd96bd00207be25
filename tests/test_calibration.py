"""Calibration: the expected calibration error and the per-bin accuracy and confidence that --eval-only writes
into eval.json, the reliability diagram of the run's page and the ECE column of the summary table."""
import json

import pytest
import torch
from test_report import make_run, write_pages

from reports import pages, summary
from runfolder.declarations import Evaluation
from training.evaluation import CALIBRATION_BINS, bin_sums, calibration


def one_hot_confident(confidences: list[float], correct: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """Twenty-class probabilities whose top-1 is class 0 at the given confidence (the rest shared evenly), and
    labels right where asked."""
    top = torch.tensor(confidences, dtype=torch.float64)[:, None]
    probs = torch.cat([top, ((1 - top) / 19).expand(-1, 19)], 1)
    labels = torch.tensor([0 if right else 1 for right in correct])
    return probs, labels


def test_all_at_confidence_0_9_with_60_percent_right_is_ece_0_3():
    probs, labels = one_hot_confident([0.9] * 10, [True] * 6 + [False] * 4)
    result = calibration(*bin_sums(probs, labels))
    assert result.ece == pytest.approx(0.3)
    filled = [item for item in result.bins if item["count"]]
    assert len(filled) == 1 and filled[0]["count"] == 10
    assert filled[0]["accuracy"] == pytest.approx(0.6) and filled[0]["confidence"] == pytest.approx(0.9)


def test_two_bins_worked_by_hand():
    # Bin of 0.55: 4 images, 1 right -> |0.25 - 0.55| = 0.30; bin of 0.95: 6 images, all right -> |1 - 0.95| = 0.05.
    # ECE = 0.4 * 0.30 + 0.6 * 0.05 = 0.15.
    probs, labels = one_hot_confident([0.55] * 4 + [0.95] * 6, [True] + [False] * 3 + [True] * 6)
    assert calibration(*bin_sums(probs, labels)).ece == pytest.approx(0.15)


def test_fifteen_equal_width_bins_and_confidence_one_goes_into_the_last():
    probs, labels = one_hot_confident([1.0, 1 / 15 - 1e-9, 1 / 15 + 1e-9], [True, True, True])
    result = calibration(*bin_sums(probs, labels))
    assert len(result.bins) == CALIBRATION_BINS == 15
    assert [item["low"] for item in result.bins] == pytest.approx([k / 15 for k in range(15)])
    assert result.bins[-1]["high"] == pytest.approx(1.0)
    assert [item["count"] for item in result.bins] == [1, 1] + [0] * 12 + [1]
    assert result.bins[5]["accuracy"] is None and result.bins[5]["confidence"] is None  # empty, not 0


def test_an_old_eval_json_reads_and_the_page_and_table_show_no_calibration(tmp_path):
    run_dir = make_run(tmp_path / "results" / "cifar10", "cnn_base", None)
    (run_dir / "eval.json").write_text(json.dumps({"top1": 0.6, "top5": 0.9, "tta": False, "images": 10}))
    evaluation = Evaluation.from_dict(json.loads((run_dir / "eval.json").read_text()), "eval", partial=True)
    assert evaluation.ece is None and evaluation.calibration_bins is None
    rows = write_pages(tmp_path / "results")[run_dir.parent]
    assert rows[0]["ece"] is None
    page = (run_dir.parent / "index.html").read_text()
    assert "top-1 60.00%" in page and "reliability diagram" not in page
    assert "| ECE |" in (run_dir.parent / "summary.md").read_text()
    assert summary.summary_csv(rows).splitlines()[1].endswith(",,")  # ece, ece_std blank


def test_the_page_draws_a_reliability_diagram_and_the_table_an_ece(tmp_path):
    run_dir = make_run(tmp_path / "results" / "cifar10", "cnn_base", None)
    probs, labels = one_hot_confident([0.9] * 10, [True] * 6 + [False] * 4)
    result = calibration(*bin_sums(probs, labels))
    bins = [{**item, "count": "<script>alert(1)</script>"} if item["count"] else item  # crafted
            for item in result.bins]
    (run_dir / "eval.json").write_text(json.dumps({
        "test_acc": 0.6, "test_top5": 0.9, "tta": False, "images": 10, "ece": result.ece, "calibration_bins": bins}))
    rows = write_pages(tmp_path / "results")[run_dir.parent]
    page = (run_dir.parent / "index.html").read_text()
    assert "<svg" in page and "reliability diagram, ECE (15 bins) 0.3000" in page
    assert "<script>alert(1)" not in page and "&lt;script&gt;" in page
    assert page.count("<rect") == 1 + 1  # the frame and the one bin with images
    assert "0.3000" in (run_dir.parent / "summary.md").read_text()
    assert rows[0]["ece"] == pytest.approx(0.3)
    assert pages.reliability_diagram(Evaluation.from_dict({}, "eval", partial=True)) == ""
