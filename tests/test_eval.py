"""--eval-only: a trained run's checkpoint on the whole test set, checked against a direct computation."""
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

import train
from load_data_cifar10 import load_cifar10
from model import build_model


@pytest.fixture(scope="module")
def trained_run(cifar10_dir, tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    assert train.main("cifar10", ["--epochs", "2", "--subset", "512", "--batch-size", "64",
                                  "--data-dir", str(cifar10_dir), "--results-dir", str(results),
                                  "--no-progress"]) == 0
    return results, results / "cifar10" / "cnn_base"


def direct_test_metrics(checkpoint_path, data_dir, tta: bool):
    """Top-1, top-5 and loss of a checkpoint on the full test set, computed without the project's batches."""
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    net = build_model("cnn_base", 10)
    net.load_state_dict(checkpoint["model"])
    net.eval()
    data = load_cifar10(data_dir, download=False)
    mean = torch.tensor(checkpoint["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(checkpoint["std"]).view(1, 3, 1, 1)
    images = (data.test_images.float() / 255 - mean) / std
    with torch.no_grad():
        probs = net(images).softmax(1)
        if tta:
            probs = (probs + net(images.flip(3)).softmax(1)) / 2
    labels = data.test_labels
    top5 = probs.topk(5, dim=1).indices
    confidence = probs.max(1).values
    right = (top5[:, 0] == labels).float()
    ece = 0.0
    for k in range(15):  # equal-width bins, the last one closed at 1.0
        in_bin = (confidence > k / 15) & ((confidence <= (k + 1) / 15) if k < 14 else (confidence <= 1))
        if in_bin.any():
            ece += in_bin.float().mean().item() * abs(right[in_bin].mean() - confidence[in_bin].mean()).item()
    return {"ece": ece,"top1": (top5[:, 0] == labels).float().mean().item(),
            "top5": (top5 == labels[:, None]).any(1).float().mean().item(),
            "loss": F.nll_loss(probs.log(), labels).item(),
            "per_class": [(top5[labels == k, 0] == k).float().mean().item() for k in range(10)]}


@pytest.mark.parametrize("tta", [False, True])
def test_eval_only_matches_a_direct_computation(trained_run, cifar10_dir, capsys, tta):
    results, run_dir = trained_run
    # On the CPU in float32, like the direct computation (a GPU would evaluate in bf16).
    args = ["--eval-only", "--data-dir", str(cifar10_dir), "--results-dir", str(results),
            "--device", "cpu"]
    assert train.main("cifar10", args + (["--tta"] if tta else [])) == 0
    output = capsys.readouterr().out
    report = json.loads((run_dir / "eval.json").read_text())
    expected = direct_test_metrics(run_dir / "best.pt", cifar10_dir, tta)
    assert report["tta"] is tta and report["checkpoint"] == str(run_dir / "best.pt")
    assert report["images"] == 10_000  # the whole test set, whatever --subset the run used
    assert report["test_acc"] == pytest.approx(expected["top1"], abs=1e-4)
    assert report["test_top5"] == pytest.approx(expected["top5"], abs=1e-4)
    assert report["test_loss"] == pytest.approx(expected["loss"], rel=1e-3)
    assert list(report["per_class"].values()) == pytest.approx(expected["per_class"], abs=1e-4)
    assert f"Top-1 accuracy: {expected['top1']:.4f}" in output and "airplane" in output
    assert report["ece"] == pytest.approx(expected["ece"], abs=1e-4) and "ECE (15 bins): " in output
    assert len(report["calibration_bins"]) == 15
    assert sum(item["count"] for item in report["calibration_bins"]) == 10_000
    assert (run_dir / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_only_takes_another_checkpoint(trained_run, cifar10_dir, tmp_path):
    _, run_dir = trained_run
    elsewhere = tmp_path / "copy.pt"
    shutil.copy(run_dir / "best.pt", elsewhere)
    assert train.main("cifar10", ["--eval-only", "--checkpoint", str(elsewhere),
                                  "--data-dir", str(cifar10_dir)]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["checkpoint"] == str(elsewhere)


def test_eval_only_refuses_foreign_and_corrupt_checkpoints(trained_run, cifar10_dir, tmp_path,
                                                           capsys):
    _, run_dir = trained_run
    best = str(run_dir / "best.pt")
    assert train.main("cifar10", ["--eval-only", "--model", "cnn_resnet18", "--checkpoint", best,
                                  "--data-dir", str(cifar10_dir)]) == 2
    assert "holds a cnn_base" in capsys.readouterr().err
    assert train.main("cifar100", ["--eval-only", "--checkpoint", best,
                                   "--data-dir", str(cifar10_dir)]) == 2
    assert "10 classes" in capsys.readouterr().err
    corrupt = tmp_path / "best.pt"
    corrupt.write_bytes(b"not a checkpoint")
    assert train.main("cifar10", ["--eval-only", "--checkpoint", str(corrupt),
                                  "--data-dir", str(cifar10_dir)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "not a readable checkpoint" in error
    assert corrupt.read_bytes() == b"not a checkpoint"


def test_predict_prints_the_top5_classes_of_each_image(trained_run, cifar10_dir, tmp_path, capsys):
    from torchvision.io import encode_jpeg, write_file, write_png
    results, _ = trained_run
    generator = torch.Generator().manual_seed(0)
    png, jpeg = tmp_path / "cat.png", tmp_path / "dog.jpg"
    write_png(torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8, generator=generator), str(png))
    write_file(str(jpeg), encode_jpeg(torch.randint(0, 256, (3, 300, 200), dtype=torch.uint8,
                                                    generator=generator)))
    assert train.main("cifar10", ["--predict", str(png), str(jpeg), "--results-dir", str(results),
                                  "--data-dir", str(cifar10_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [str(png), str(jpeg)]
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    for line in lines:
        classes = [part.rsplit(" ", 1) for part in line.split(": ", 1)[1].split(", ")]
        assert len(classes) == 5 and all(name in names for name, _ in classes)
        percents = [float(percent.rstrip("%")) for _, percent in classes]
        assert percents == sorted(percents, reverse=True) and sum(percents) <= 100.05


def test_predict_refuses_a_missing_or_non_image_file_in_one_line(trained_run, cifar10_dir,
                                                                 tmp_path, capsys):
    results, _ = trained_run
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not pixels")
    for path in (tmp_path / "missing.jpg", not_an_image):
        assert train.main("cifar10", ["--predict", str(path), "--results-dir", str(results),
                                      "--data-dir", str(cifar10_dir)]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and error.startswith("error: ") and str(path) in error
