"""The classes each model gets wrong: the end of a run's test report (eval.json with per-class counts, CIFAR-100's
superclasses and the most confident mistakes; confusion_matrix.png and mistakes.png), the per-class heatmap of a
dataset folder, the weakest class and most common confusion of each row, and their footnotes where data is
missing."""
import json

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from test_report import make_run

import plot
import train
from cifar.dataset_files import CifarData
from reports import classes, figures, summary
from runfolder.declarations import Evaluation
from training.evaluation import most_confident_mistakes

MODELS = list(__import__("model").MODEL_FAMILIES)


def write_eval(run_dir, class_names, confusion, superclasses=None, mistakes=None):
    """An eval.json as the end of a run writes it, with the given confusion counts."""
    confusion = np.asarray(confusion)
    per_class = dict(zip(class_names, (np.diag(confusion) / confusion.sum(1)).tolist()))
    record = {"model": "m", "dataset": "cifar10", "checkpoint": "best.pt", "checkpoint_epoch": 3, "tta": False,
              "test_acc": float(np.trace(confusion) / confusion.sum()), "test_top5": 1.0, "test_loss": 1.0,
              "images": int(confusion.sum()), "per_class": per_class, "confusion_matrix": confusion.tolist(),
              "ece": 0.1, "calibration_bins": [], "mistakes": mistakes or [], "superclasses": superclasses}
    (run_dir / "eval.json").write_text(json.dumps(record))


def read_rows(dataset_dir):
    return summary.group_runs(summary.read_runs(dataset_dir, MODELS), MODELS)


# ---------------------------------------------------------------------------------------------------
# The most confident mistakes, kept on the device batch by batch


def test_most_confident_mistakes_over_batches_match_a_sort_of_the_whole_set():
    generator = torch.Generator().manual_seed(0)
    probs = torch.rand(100, 5, generator=generator, dtype=torch.float64).softmax(1)
    labels = torch.randint(0, 5, (100,), generator=generator)
    kept = torch.zeros(3, 0, dtype=torch.float64)
    for start in range(0, 100, 30):  # batches of 30, 30, 30, 10
        kept = most_confident_mistakes(kept, probs[start:start + 30], labels[start:start + 30], start)
    confidence, predicted = probs.max(1)
    wrong = (predicted != labels).nonzero().flatten().tolist()
    expected = sorted(wrong, key=lambda index: -confidence[index].item())[:16]
    assert kept[1].long().tolist() == expected
    assert kept[0].tolist() == [confidence[index].item() for index in expected]
    assert kept[2].long().tolist() == [predicted[index].item() for index in expected]


def test_fewer_mistakes_than_kept_leave_right_answers_marked_below_zero():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]], dtype=torch.float64)
    kept = most_confident_mistakes(torch.zeros(3, 0, dtype=torch.float64), probs, torch.tensor([0, 0, 0]), 10)
    assert kept[:, kept[0] >= 0].tolist() == [[0.8], [11.0], [1.0]]  # the one mistake, image 11, predicted 1
    assert (kept[0] < 0).sum() == 2


def test_superclasses_come_from_the_coarse_labels_in_the_datasets_order():
    data = CifarData(train_images=torch.zeros(4, 3, 32, 32, dtype=torch.uint8), train_labels=torch.tensor([2, 0, 1, 2]),
                     test_images=torch.zeros(0, 3, 32, 32, dtype=torch.uint8), test_labels=torch.tensor([]),
                     classes=["apple", "bus", "pear"], train_coarse_labels=torch.tensor([0, 0, 1, 0]),
                     coarse_classes=["fruit", "vehicles"])
    assert list(data.superclasses().items()) == [("apple", "fruit"), ("pear", "fruit"), ("bus", "vehicles")]
    assert CifarData(data.train_images, data.train_labels, data.test_images, data.test_labels,
                     data.classes).superclasses() is None  # CIFAR-10


# ---------------------------------------------------------------------------------------------------
# The end of a run


@pytest.fixture(scope="module")
def cifar100_run(cifar100_dir, tmp_path_factory):
    """A one-epoch CIFAR-100 run of 300 images, as the end of a run leaves it, and the folder plotted."""
    results = tmp_path_factory.mktemp("results")
    assert train.main("cifar100", ["--epochs", "1", "--subset", "300", "--batch-size", "100",
                                   "--data-dir", str(cifar100_dir), "--results-dir", str(results),
                                   "--no-progress"]) == 0
    assert plot.main([str(results / "cifar100")]) == 0
    return results / "cifar100"


def test_the_end_of_a_run_writes_the_test_report_of_best_pt(cifar100_run):
    run_dir = cifar100_run / "cnn_base"
    report = json.loads((run_dir / "eval.json").read_text())
    summary_json = json.loads((run_dir / "summary.json").read_text())
    assert report["checkpoint"] == str(run_dir / "best.pt") and report["checkpoint_epoch"] == 1
    assert report["test_acc"] == summary_json["test_acc"] and report["images"] == 300 and report["tta"] is False
    confusion = np.array(report["confusion_matrix"])
    assert confusion.shape == (100, 100) and confusion.sum() == 300
    assert report["test_acc"] == pytest.approx(np.trace(confusion) / 300)
    # The synthetic CIFAR-100's coarse label of fine class k is k // 5.
    assert report["superclasses"] == {f"fine{k}": f"coarse{k // 5}" for k in range(100)}
    mistakes = report["mistakes"]
    assert len(mistakes) == 16 and all(item["true"] != item["predicted"] for item in mistakes)
    confidences = [item["confidence"] for item in mistakes]
    assert confidences == sorted(confidences, reverse=True)
    wrong = confusion.sum() - np.trace(confusion)
    assert wrong >= 16
    for name in ("confusion_matrix.png", "mistakes.png"):
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_cifar100_folder_gets_a_superclass_heatmap_and_every_class_one_click_away(cifar100_run):
    for name in ("class_accuracy.png", "class_accuracy_all_classes.png"):
        assert (cifar100_run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (cifar100_run / "index.html").read_text()
    assert '<img src="class_accuracy.png"' in page
    assert '<details><summary>every class</summary><a href="class_accuracy_all_classes.png">' in page
    assert '<h4>Most confident mistakes (16)</h4>' in page and 'src="cnn_base/mistakes.png"' in page
    markdown = (cifar100_run / "summary.md").read_text()
    assert "## Classes" in markdown and "20 superclasses" in markdown


def test_a_single_epoch_run_is_a_marker_in_the_validation_plot(cifar100_run):
    rows = read_rows(cifar100_run)
    axes = Figure().subplots()
    figures._draw_validation_curves(axes, rows, {"cnn_base": "black"})
    line = next(line for line in axes.get_lines() if len(line.get_xdata()) == 1)
    assert line.get_marker() == "o"


# ---------------------------------------------------------------------------------------------------
# The table of classes, from constructed counts


def test_superclass_accuracy_is_counted_over_the_images_of_its_classes(tmp_path):
    dataset_dir = tmp_path / "cifar100"
    names = ["apple", "pear", "bus"]
    # apple 8/10 right, pear 1/5 right (4 taken for apple), bus 6/10 right (4 taken for pear).
    confusion = [[8, 2, 0], [4, 1, 0], [0, 4, 6]]
    # Superclass by superclass, in the dataset's order of superclasses (CifarData.superclasses).
    superclasses = {"bus": "vehicles", "apple": "fruit", "pear": "fruit"}
    write_eval(make_run(dataset_dir, "cnn_base", "s1", seed=1), names, confusion, superclasses=superclasses)
    write_eval(make_run(dataset_dir, "cnn_base", "s2", seed=2), names, confusion, superclasses=superclasses)
    table = classes.class_table(read_rows(dataset_dir))
    assert [item.runs for item in table.rows] == [2] and classes.by_superclass(table)
    columns, accuracy = classes.accuracy_by(table.rows[0].counts, by_superclass=True)
    assert columns == ["vehicles", "fruit"]
    assert accuracy.tolist() == pytest.approx([12 / 20, 18 / 30])  # fruit: not the mean of 0.8 and 0.2
    assert classes.class_lines(table) == [("cnn_base", "pear 20.0%", "pear \u2192 apple, 80.0% of pear")]


def test_rows_without_counts_or_with_other_classes_are_left_out_with_a_footnote(tmp_path):
    dataset_dir = tmp_path / "cifar10"
    write_eval(make_run(dataset_dir, "cnn_base", None), ["cat", "dog"], [[3, 1], [2, 2]])
    write_eval(make_run(dataset_dir, "cnn_resnet18", None), ["a", "b", "c"], np.eye(3) * 5)
    make_run(dataset_dir, "cnn_vgg11", None)  # never evaluated
    (make_run(dataset_dir, "cnn_vgg13", None) / "eval.json").write_text("{not json")  # damaged
    unfinished = make_run(dataset_dir, "cnn_se_resnet18", "wip", epochs=2, finished=False)
    assert plot.main([str(dataset_dir)]) == 0
    table = classes.class_table(read_rows(dataset_dir))
    assert [item.label for item in table.rows] == ["cnn_base"]
    notes = classes.class_notes(table)
    assert any("cnn_resnet18" in note and "classes other than" in note for note in notes)
    missing = next(note for note in notes if note.startswith("Not evaluated per class"))
    assert all(name in missing for name in ("cnn_vgg11", "cnn_vgg13", unfinished.name))
    assert not classes.by_superclass(table)
    assert (dataset_dir / "class_accuracy.png").is_file()
    assert not (dataset_dir / "class_accuracy_all_classes.png").exists()
    markdown = (dataset_dir / "summary.md").read_text()
    assert "| cnn_base | dog 50.0% | dog \u2192 cat, 50.0% of dog |" in markdown


def test_no_counts_at_all_draws_no_heatmap_removes_a_stale_one_and_says_why(tmp_path):
    dataset_dir = tmp_path / "cifar10"
    make_run(dataset_dir, "cnn_base", None)
    (dataset_dir / "class_accuracy.png").write_bytes(b"stale")
    assert plot.main([str(dataset_dir)]) == 0
    assert not (dataset_dir / "class_accuracy.png").exists()
    page = (dataset_dir / "index.html").read_text()
    assert "<h2>Classes</h2>" in page and "Not evaluated per class" in page and "class_accuracy.png" not in page
    assert "Not evaluated per class" in (dataset_dir / "summary.md").read_text()


def test_class_names_and_mistakes_from_eval_json_are_escaped(tmp_path):
    dataset_dir = tmp_path / "cifar10"
    evil = '<img src=x onerror="alert(1)">'
    run_dir = make_run(dataset_dir, "cnn_base", None)
    mistakes = [{"index": 3, "true": evil, "predicted": "dog", "confidence": 0.99}]
    write_eval(run_dir, [evil, "dog"], [[1, 3], [0, 4]], mistakes=mistakes)
    assert plot.main([str(dataset_dir)]) == 0
    page = (dataset_dir / "index.html").read_text()
    assert evil not in page
    assert page.count("&lt;img src=x onerror=&quot;alert(1)&quot;&gt;") >= 2  # the classes table and the mistakes
    assert "<td>99.00%</td>" in page


def test_an_eval_json_from_before_the_counts_reads_and_is_footnoted(tmp_path):
    dataset_dir = tmp_path / "cifar10"
    run_dir = make_run(dataset_dir, "cnn_base", None)
    (run_dir / "eval.json").write_text(json.dumps({"top1": 0.6, "top5": 0.9, "tta": False,
                                                   "per_class": {"cat": 0.5, "dog": 0.7}}))
    record = Evaluation.from_dict(json.loads((run_dir / "eval.json").read_text()), "eval.json", partial=True)
    assert record.mistakes is None and record.superclasses is None and classes.class_counts(record) is None
    assert plot.main([str(dataset_dir)]) == 0
    page = (dataset_dir / "index.html").read_text()
    assert "no most confident mistakes in this eval.json" in page and "Not evaluated per class" in page
