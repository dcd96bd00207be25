"""The model zoo: every flag builds, has the published size, runs forward and backward, and reports
its cost; the baseline prints exactly as the seed's did."""
import math

import pytest
import torch
from torch import nn

from model import MODELS, build_model, count_flops, count_parameters, model_table_markdown

# The spec: /work/shared/REFERENCE.md, "Parameter counts", as (10 classes, 100 classes).
REFERENCE_PARAMETERS = {
    "cnn_base": (62_006, 69_656),
    "cnn_resnet18": (11_173_962, 11_220_132),
    "cnn_resnet34": (21_282_122, 21_328_292),
    "cnn_resnet50": (23_520_842, 23_705_252),
    "cnn_resnet101": (42_512_970, 42_697_380),
    "cnn_resnet152": (58_156_618, 58_341_028),
    "cnn_densenet121": (6_956_298, 7_048_548),
    "cnn_densenet169": (12_493_322, 12_643_172),
    "cnn_densenet201": (18_104_330, 18_277_220),
    "cnn_densenet264": (30_667_786, 30_909_796),
    "cnn_se_resnet18": (11_263_042, 11_309_212),
    "cnn_se_resnet34": (21_443_318, 21_489_488),
    "cnn_se_resnet50": (26_051_834, 26_236_244),
    "cnn_se_resnet101": (47_290_682, 47_475_092),
    "cnn_se_resnet152": (64_785_658, 64_970_068),
}

BASE_CNN_PRINT = """BaseCNN(
  (conv1): Conv2d(3, 6, kernel_size=(5, 5), stride=(1, 1))
  (pool): MaxPool2d(kernel_size=2, stride=2, padding=0, dilation=1, ceil_mode=False)
  (conv2): Conv2d(6, 16, kernel_size=(5, 5), stride=(1, 1))
  (fc1): Linear(in_features=400, out_features=120, bias=True)
  (fc2): Linear(in_features=120, out_features=84, bias=True)
  (fc3): Linear(in_features=84, out_features=10, bias=True)
)"""

EVERY_BUILD = [(name, classes) for name in REFERENCE_PARAMETERS for classes in (10, 100)]


def build_on_meta(name: str, num_classes: int) -> nn.Module:
    """Shapes without weights: enough for sizes and FLOPs, and fast for the 65M-parameter models."""
    with torch.device("meta"):
        return build_model(name, num_classes)


def test_flags_are_the_documented_ones_in_table_order():
    assert list(MODELS) == list(REFERENCE_PARAMETERS)


@pytest.mark.parametrize("name,num_classes", EVERY_BUILD)
def test_parameter_count_matches_reference(name, num_classes):
    expected = REFERENCE_PARAMETERS[name][0 if num_classes == 10 else 1]
    assert count_parameters(build_on_meta(name, num_classes)) == expected


@pytest.mark.parametrize("name,num_classes", EVERY_BUILD)
def test_every_model_maps_a_batch_to_class_scores(name, num_classes):
    torch.manual_seed(0)
    net = build_model(name, num_classes).eval()
    with torch.no_grad():
        scores = net(torch.randn(2, 3, 32, 32))
    assert scores.shape == (2, num_classes) and torch.isfinite(scores).all()


@pytest.mark.parametrize("name", ["cnn_base", "cnn_resnet18", "cnn_densenet121", "cnn_se_resnet50"])
def test_one_training_step_gives_finite_scores_and_gradients_everywhere(name):
    torch.manual_seed(0)
    net = build_model(name, 100)
    scores = net(torch.randn(2, 3, 32, 32))
    assert scores.shape == (2, 100) and torch.isfinite(scores).all()
    nn.functional.cross_entropy(scores, torch.tensor([1, 97])).backward()
    # A parameter without a gradient would be a layer left out of forward (e.g. an SE gate not wired in).
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


def test_base_cnn_prints_as_the_seed_did():
    assert str(build_model("cnn_base", 10)) == BASE_CNN_PRINT
    expected_100 = BASE_CNN_PRINT.replace("out_features=10,", "out_features=100,")
    assert str(build_model("cnn_base", 100)) == expected_100


def test_se_option_adds_gates_to_the_same_resnet():
    plain, se = build_model("cnn_resnet18", 10), build_model("cnn_se_resnet18", 10)
    assert type(plain) is type(se)
    assert type(plain.layer1[0]) is type(se.layer1[0])
    assert not any("se." in n for n, _ in plain.named_parameters())
    assert any("se." in n for n, _ in se.named_parameters())


def test_unknown_model_name_lists_the_choices():
    with pytest.raises(ValueError) as error:
        build_model("cnn_resnet19", 10)
    message = str(error.value)
    assert "cnn_resnet19" in message and "\n" not in message
    assert all(name in message for name in MODELS)


def test_resnet18_costs_1_11_gflops_per_image():
    assert round(count_flops(build_on_meta("cnn_resnet18", 10)) / 1e9, 2) == 1.11


def test_count_flops_keeps_the_training_mode():
    net = build_on_meta("cnn_resnet18", 10)
    count_flops(net)
    assert net.training and all(module.training for module in net.modules())
    net.eval()
    count_flops(net)
    assert not any(module.training for module in net.modules())


@pytest.mark.parametrize("name", ["cnn_base", "cnn_resnet18", "cnn_densenet121", "cnn_se_resnet50"])
def test_larger_images_are_accepted(name):
    net = build_on_meta(name, 100)
    assert net(torch.empty(1, 3, 64, 64, device="meta")).shape == (1, 100)
    assert count_flops(net, image_size=64) > 3 * count_flops(net)


@pytest.mark.parametrize("name", ["cnn_base", "cnn_resnet18", "cnn_densenet121"])
def test_initialization_is_kaiming_convs_and_unit_batchnorm(name):
    torch.manual_seed(0)
    net = build_model(name, 10)
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert (name == "cnn_base" or norms) and all((m.weight == 1).all() and (m.bias == 0).all() for m in norms)
    widest = max((m for m in net.modules() if isinstance(m, nn.Conv2d)), key=lambda m: m.weight.numel())
    fan_out = widest.out_channels * widest.kernel_size[0] * widest.kernel_size[1]
    assert widest.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.05)


def test_model_table_lists_every_flag_with_its_size_and_cost():
    lines = model_table_markdown().splitlines()
    assert lines[0].startswith("| model | params (10 classes) |")
    rows = lines[2:]
    assert [row.split("|")[1].strip() for row in rows] == [f"`{name}`" for name in MODELS]
    assert "| `cnn_resnet18` | 11,173,962 | 1.111 G | 11,220,132 | 1.111 G |" in rows
