"""hubconf.py and serving/trained_net.py: torch.hub builds every model, and loads a trained one that
normalizes its own input."""
from pathlib import Path

import pytest
import torch

import hubconf
from model import MODELS, build_model
from serving.trained_net import CheckpointError, NormalizedNet

REPO_ROOT = Path(__file__).resolve().parent.parent
MEAN, STD = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def hub_load(name: str, **kwargs):
    return torch.hub.load(str(REPO_ROOT), name, source="local", **kwargs)


def save_best(path: Path, model_name: str = "cnn_base", num_classes: int = 10,
              with_classes: bool = True) -> torch.nn.Module:
    """A best.pt as train.py writes it, of a freshly built network; returns that network."""
    torch.manual_seed(0)
    net = build_model(model_name, num_classes)
    checkpoint = {"model": net.state_dict(), "model_name": model_name, "dataset": "cifar10",
                  "num_classes": num_classes, "mean": MEAN, "std": STD, "epoch": 3,
                  "val_acc": 0.5}
    if with_classes:
        checkpoint["classes"] = CLASSES[:num_classes]
    torch.save(checkpoint, path)
    return net.eval()


def test_every_registry_model_is_an_entry_point_with_a_docstring():
    entry_points = [name for name in dir(hubconf)
                    if callable(getattr(hubconf, name)) and not name.startswith("_")]
    assert sorted(entry_points) == sorted(MODELS)
    assert hubconf.dependencies == ["torch"]
    for name in MODELS:
        docstring = getattr(hubconf, name).__doc__
        assert name in docstring and "checkpoint" in docstring


@pytest.mark.parametrize("name, num_classes", [("cnn_base", 10), ("cnn_base", 100),
                                               ("cnn_resnet18", 100)])
def test_hub_builds_a_model_for_the_class_count(name, num_classes):
    net = hub_load(name, num_classes=num_classes).eval()
    with torch.no_grad():
        assert net(torch.zeros(2, 3, 32, 32)).shape == (2, num_classes)


def test_hub_loads_a_trained_network_that_normalizes_its_input(tmp_path):
    raw_net = save_best(tmp_path / "best.pt")
    net = hub_load("cnn_base", checkpoint=str(tmp_path / "best.pt"))
    assert isinstance(net, NormalizedNet) and not net.training
    assert net.classes == CLASSES
    assert net.mean.flatten().tolist() == pytest.approx(MEAN)
    assert net.std.flatten().tolist() == pytest.approx(STD)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    normalized = (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(net(images), raw_net(normalized))
        torch.testing.assert_close(net.net(normalized), raw_net(normalized))  # the net underneath


def test_checkpoint_without_class_names_still_loads(tmp_path):
    save_best(tmp_path / "best.pt", with_classes=False)
    net = hub_load("cnn_base", num_classes=10, checkpoint=str(tmp_path / "best.pt"))
    assert net.classes is None


@pytest.mark.parametrize("name, num_classes, expected", [
    ("cnn_resnet18", None, "holds a cnn_base, not cnn_resnet18"),
    ("cnn_base", 100, "has 10 classes, not 100"),
])
def test_checkpoint_of_another_model_or_class_count_is_refused(tmp_path, name, num_classes,
                                                               expected):
    save_best(tmp_path / "best.pt")
    with pytest.raises(ValueError, match=expected):
        hub_load(name, num_classes=num_classes, checkpoint=str(tmp_path / "best.pt"))


def test_files_that_are_not_a_best_pt_are_refused_in_one_line(tmp_path):
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    torch.save({"model": {}, "epoch": 3, "history": []}, tmp_path / "last.pt")
    for path, expected in ((tmp_path / "missing.pt", "no checkpoint at"),
                           (tmp_path / "notes.pt", "not a readable checkpoint"),
                           (tmp_path / "last.pt", "not a best.pt of this project")):
        with pytest.raises(CheckpointError) as error:
            hub_load("cnn_base", checkpoint=str(path))
        assert expected in str(error.value) and str(path) in str(error.value)
        assert "\n" not in str(error.value)
