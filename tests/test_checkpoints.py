"""A .pt file is a pickle, and a pickle can run code while it loads. Every place that reads a checkpoint
(--resume's last.pt, --eval-only's and --predict's best.pt or --checkpoint, torch.hub's checkpoint=) must
refuse a crafted one in one line without running it; and --eval-only must normalize with the statistics a
checkpoint was trained with, not those of the data at hand."""
import json
import os
import shutil

import pytest
import torch
from test_eval import direct_test_metrics, trained_run  # noqa: F401 (a fixture)
from test_train import assert_one_line_error

import hubconf
import train
from serving.trained_net import CheckpointError


class TouchFile:
    """Unpickling this runs a shell command that creates `path`."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch '{self.path}'",)


def crafted_checkpoint(path, real_checkpoint, marker) -> None:
    """A copy of a real checkpoint with one more entry, whose loading would run a command."""
    content = torch.load(real_checkpoint, weights_only=True)
    content["note"] = TouchFile(marker)
    torch.save(content, path)


@pytest.fixture
def marker(tmp_path, monkeypatch):
    # torch.load's default, plain pickle before torch 2.6 (requirements.txt allows 2.3) and where this variable is
    # set: every load of the project must ask for weights only itself
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    path = tmp_path / "payload-ran"
    yield path
    assert not path.exists(), "the payload of a crafted checkpoint ran"


def test_the_crafted_checkpoint_is_live(trained_run, tmp_path):  # noqa: F811
    """Loaded as plain pickle, it runs its command: the refusals below are of a real threat."""
    _, run_dir = trained_run
    live = tmp_path / "live"
    crafted_checkpoint(tmp_path / "crafted.pt", run_dir / "best.pt", live)
    torch.load(tmp_path / "crafted.pt", weights_only=False)
    assert live.exists()


def test_resume_refuses_a_crafted_last_pt(trained_run, cifar10_dir, tmp_path, marker, capsys):  # noqa: F811
    _, run_dir = trained_run
    results = tmp_path / "results"
    shutil.copytree(run_dir, results / "cifar10" / "cnn_base")
    crafted_checkpoint(results / "cifar10" / "cnn_base" / "last.pt", run_dir / "last.pt", marker)
    assert train.main("cifar10", ["--resume", "--epochs", "3", "--results-dir", str(results),
                                  "--data-dir", str(cifar10_dir), "--no-progress"]) == 2
    assert_one_line_error(capsys.readouterr().err, "last.pt")


@pytest.mark.parametrize("command", [["--eval-only"], ["--predict", "IMAGE"]])
def test_eval_only_and_predict_refuse_a_crafted_best_pt(trained_run, cifar10_dir, tmp_path, marker,  # noqa: F811
                                                       capsys, command):
    from torchvision.io import write_png
    _, run_dir = trained_run
    image = tmp_path / "image.png"
    write_png(torch.zeros(3, 32, 32, dtype=torch.uint8), str(image))
    command = [str(image) if word == "IMAGE" else word for word in command]
    crafted = tmp_path / "crafted.pt"
    crafted_checkpoint(crafted, run_dir / "best.pt", marker)
    assert train.main("cifar10", [*command, "--checkpoint", str(crafted), "--data-dir", str(cifar10_dir)]) == 2
    assert_one_line_error(capsys.readouterr().err, str(crafted))
    # and as the run's own best.pt
    results = tmp_path / "results"
    shutil.copytree(run_dir, results / "cifar10" / "cnn_base")
    crafted_checkpoint(results / "cifar10" / "cnn_base" / "best.pt", run_dir / "best.pt", marker)
    assert train.main("cifar10", [*command, "--results-dir", str(results), "--data-dir", str(cifar10_dir)]) == 2
    assert_one_line_error(capsys.readouterr().err, "best.pt")


def test_torch_hub_refuses_a_crafted_checkpoint(trained_run, tmp_path, marker):  # noqa: F811
    _, run_dir = trained_run
    crafted_checkpoint(tmp_path / "crafted.pt", run_dir / "best.pt", marker)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        hubconf.cnn_base(checkpoint=str(tmp_path / "crafted.pt"))


def test_eval_only_normalizes_with_the_checkpoints_statistics(trained_run, cifar10_dir, tmp_path):  # noqa: F811
    """A checkpoint trained on other data (other statistics) is evaluated as it was trained."""
    _, run_dir = trained_run
    checkpoint = torch.load(run_dir / "best.pt", weights_only=True)
    checkpoint["mean"], checkpoint["std"] = [0.1, 0.3, 0.6], [0.2, 0.15, 0.4]
    other = tmp_path / "other.pt"
    torch.save(checkpoint, other)
    assert train.main("cifar10", ["--eval-only", "--checkpoint", str(other), "--data-dir", str(cifar10_dir)]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    expected = direct_test_metrics(other, cifar10_dir, tta=False)
    assert report["test_acc"] == pytest.approx(expected["top1"], abs=1e-6)
    assert report["test_loss"] == pytest.approx(expected["loss"], rel=1e-4)
    unchanged = direct_test_metrics(run_dir / "best.pt", cifar10_dir, tta=False)
    assert abs(unchanged["loss"] - expected["loss"]) > 1e-3, "the statistics must matter for this to test them"
