"""The model zoo: every flag builds, has the published size, runs forward and backward, and reports
its cost; the baseline prints exactly as the seed's did; the options of the ResNet family (SE, CA,
non-local blocks) sit where the papers put them and leave the older models as they were."""
import hashlib
import json
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import REPO_ROOT, one_torch_thread
from model import COURSE_MODELS, FAMILIES, MODELS, build_model, count_flops
from model.coord_attention import CoordinateAttention
from model.nonlocal_block import NonLocalBlock
from model.resnet import SqueezeExcite
from reports.figures import FAMILY_COLORMAPS

# The published parameter counts of each network with the CIFAR stem (one 3x3 conv, stride 1, no max
# pool), as README's model table lists them, (10 classes, 100 classes): counted from the papers'
# constructions and checked against the upstream code with only the stem and head swapped for CIFAR.
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
    "cnn_vgg11": (9_231_114, 9_277_284),
    "cnn_vgg13": (9_416_010, 9_462_180),
    "cnn_vgg16": (14_728_266, 14_774_436),
    "cnn_vgg19": (20_040_522, 20_086_692),
    "cnn_resnext29_8x64d": (34_426_698, 34_518_948),
    "cnn_resnext29_16x64d": (68_155_210, 68_247_460),
    "cnn_resnext29_32x4d": (4_775_754, 4_868_004),
    "cnn_sknet29": (28_256_394, 28_348_644),
    "cnn_res2next29_6c24w4s": (23_613_482, 23_705_732),
    "cnn_res2net50": (23_662_930, 23_847_340),
    "cnn_scnet50": (23_528_394, 23_712_804),
    "cnn_scnet101": (42_529_226, 42_713_636),
    "cnn_ca_resnet18": (11_248_698, 11_294_868),
    "cnn_ca_resnet50": (25_438_674, 25_623_084),
    "cnn_nl_resnet18": (11_339_530, 11_385_700),
    "cnn_nl_resnet50": (30_879_306, 31_063_716),
}
# The same section's forward GFLOPs per 32x32 image (torch.utils.flop_counter).
REFERENCE_GFLOPS = {
    "cnn_vgg11": 0.306, "cnn_vgg13": 0.457, "cnn_vgg16": 0.626, "cnn_vgg19": 0.796,
    "cnn_resnext29_8x64d": 10.775, "cnn_resnext29_16x64d": 21.378, "cnn_resnext29_32x4d": 1.548,
    "cnn_sknet29": 8.063, "cnn_res2next29_6c24w4s": 7.705, "cnn_res2net50": 2.704,
    "cnn_scnet50": 2.493, "cnn_scnet101": 4.617, "cnn_ca_resnet18": 1.112, "cnn_ca_resnet50": 2.627,
    "cnn_nl_resnet18": 1.149, "cnn_nl_resnet50": 3.978,
}
NEW_MODELS = list(REFERENCE_GFLOPS)

# cnn_se_resnet18 at seed 0, recorded from the code before attention became an option (commit 9c3d4f7):
# SHA-256 over each state_dict key and its tensor's bytes, in order. Equal keys, shapes and values mean
# old checkpoints load and a seed still gives the weights it gave.
SE_RESNET18_SEED0_SHA256 = "2b088de0ea2b9418a4621bafb90d560a50e325428ca6d85b83008ce389391fe2"

BASE_CNN_PRINT = """BaseCNN(
  (conv1): Conv2d(3, 6, kernel_size=(5, 5), stride=(1, 1))
  (pool): MaxPool2d(kernel_size=2, stride=2, padding=0, dilation=1, ceil_mode=False)
  (conv2): Conv2d(6, 16, kernel_size=(5, 5), stride=(1, 1))
  (fc1): Linear(in_features=400, out_features=120, bias=True)
  (fc2): Linear(in_features=120, out_features=84, bias=True)
  (fc3): Linear(in_features=84, out_features=10, bias=True)
)"""


def build_on_meta(name: str, num_classes: int) -> nn.Module:
    """Shapes without weights: enough for sizes and FLOPs, and fast for the 65M-parameter models."""
    with torch.device("meta"):
        return build_model(name, num_classes)


def table_row(model_table: str, name: str) -> list[str]:
    """A model's cells of the model table: parameters and FLOPs for 10 classes, then for 100."""
    row = next(line for line in model_table.splitlines() if line.startswith(f"| `{name}` |"))
    return [cell.strip() for cell in row.strip("| ").split("|")][1:]


def test_flags_are_the_documented_ones_in_table_order():
    assert list(MODELS) == list(REFERENCE_PARAMETERS)
    assert list(COURSE_MODELS) == list(REFERENCE_PARAMETERS)[:15]


def test_every_family_is_listed_with_its_own_colour_map():
    assert list(FAMILIES) == list(dict.fromkeys(spec.family for spec in MODELS.values()))
    assert len(set(FAMILY_COLORMAPS.values())) == len(FAMILIES) == len(FAMILY_COLORMAPS)


# The sizes and costs are read from the table the session computes once (count_parameters and count_flops
# of every model built on the meta device, for 10 and 100 classes); counting them again here took 13 s.
@pytest.mark.parametrize("name", list(REFERENCE_PARAMETERS))
def test_parameter_count_matches_reference(name, model_table):
    params_10, _, params_100, _ = table_row(model_table, name)
    assert (params_10, params_100) == tuple(f"{count:,}" for count in REFERENCE_PARAMETERS[name])


def pinned_outputs(name: str) -> dict:
    """What tests/fixtures/model_outputs.json holds for every model (rebuild it with make_model_outputs.py there):
    the root mean square of each parameter of a seeded network as built (its initialization), and its scores in
    training mode for two seeded images (what it computes).
    Training mode, in float64, on one thread (two add up in another order). In eval mode an untrained network's
    batch norm, its running statistics still 0 and 1, normalizes nothing, and the deep networks' scores grow into
    the millions as differences of far larger numbers: a CPU that adds up in another order (AVX-512's oneDNN
    convolutions against AVX2's) or draws the initialization's last bit otherwise (one without AVX2) moved
    SCNet-101's scores by up to 17% of the largest. Normalized by their batch, the worst model's scores move by
    4e-4 of the largest when the last bits are drawn otherwise, and not at all between AVX2 and AVX-512."""
    torch.manual_seed(0)
    net = build_model(name, 10).double()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)).double()
    with torch.no_grad(), one_torch_thread():
        return {"init_rms": [parameter.pow(2).mean().sqrt().item() for parameter in net.parameters()],
                "scores": net.train()(images).tolist()}


PINNED = json.loads((Path(__file__).parent / "fixtures" / "model_outputs.json").read_text())


def test_every_model_is_pinned():
    assert sorted(PINNED) == sorted(MODELS)


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_computes_the_scores_it_was_pinned_with(name):
    """A change to a network that changes how it starts (another initialization, a parameter added or removed)
    or what it computes (an activation dropped, a block skipped) fails here; a change meant to do so updates the
    fixture in the same commit."""
    outputs, pinned = pinned_outputs(name), PINNED[name]
    assert len(outputs["init_rms"]) == len(pinned["init_rms"])
    torch.testing.assert_close(torch.tensor(outputs["init_rms"], dtype=torch.float64),
                               torch.tensor(pinned["init_rms"], dtype=torch.float64), rtol=1e-4, atol=0)
    scores = torch.tensor(outputs["scores"], dtype=torch.float64)
    expected = torch.tensor(pinned["scores"], dtype=torch.float64)
    assert scores.shape == (2, 10)
    torch.testing.assert_close(scores, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())


# Every model's training step at 100 classes (its scores, and gradients that reach every parameter) is checked
# in test_deterministic_ops.py, in the step that records its operators.


def test_base_cnn_prints_as_the_seed_did():
    assert str(build_model("cnn_base", 10)) == BASE_CNN_PRINT
    expected_100 = BASE_CNN_PRINT.replace("out_features=10,", "out_features=100,")
    assert str(build_model("cnn_base", 100)) == expected_100


def blocks_of(net: nn.Module) -> list[nn.Module]:
    return [block for stage in (net.layer1, net.layer2, net.layer3, net.layer4) for block in stage]


@pytest.mark.parametrize("attention,gate", [("se", SqueezeExcite), ("ca", CoordinateAttention)])
@pytest.mark.parametrize("depth", ["18", "50"])
def test_attention_option_adds_a_gate_to_every_block_of_the_same_resnet(attention, gate, depth):
    plain = build_on_meta(f"cnn_resnet{depth}", 10)
    gated = build_on_meta(f"cnn_{attention}_resnet{depth}", 10)
    assert type(plain) is type(gated)
    assert [type(block) for block in blocks_of(plain)] == [type(block) for block in blocks_of(gated)]
    assert all(type(block.se) is nn.Identity for block in blocks_of(plain))
    assert all(type(getattr(block, attention)) is gate for block in blocks_of(gated))
    # The gated network is the plain one plus the gates, under the block's "se" or "ca".
    gate_free = [k for k in gated.state_dict() if not re.search(rf"\.{attention}\.", k)]
    assert gate_free == list(plain.state_dict())


def test_se_resnet18_keeps_its_checkpoint_keys_and_seeded_weights():
    torch.manual_seed(0)
    digest = hashlib.sha256()
    for key, tensor in build_model("cnn_se_resnet18", 10).state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    assert digest.hexdigest() == SE_RESNET18_SEED0_SHA256


@pytest.mark.parametrize("name,after_blocks", [
    ("cnn_nl_resnet18", [(2, 2), (3, 2)]),
    ("cnn_nl_resnet50", [(2, 2), (2, 4), (3, 2), (3, 4), (3, 6)]),
])
def test_non_local_blocks_sit_where_the_paper_puts_them(name, after_blocks):
    net = build_on_meta(name, 10)
    found = []
    for stage_number, stage in enumerate((net.layer1, net.layer2, net.layer3, net.layer4), start=1):
        residual_blocks = 0
        for module in stage:
            if isinstance(module, NonLocalBlock):
                found.append((stage_number, residual_blocks))
            else:
                residual_blocks += 1
    assert found == after_blocks


@pytest.mark.parametrize("name", ["cnn_nl_resnet18", "cnn_nl_resnet50"])
def test_non_local_blocks_start_as_the_identity(name):
    torch.manual_seed(0)
    net = build_model(name, 10)
    blocks = [m for m in net.modules() if isinstance(m, NonLocalBlock)]
    assert all((block.bn.weight == 0).all() and (block.bn.bias == 0).all() for block in blocks)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        scores = net(images)
        for stage in (net.layer2, net.layer3):
            for index, module in enumerate(stage):
                if isinstance(module, NonLocalBlock):
                    stage[index] = nn.Identity()
        assert torch.equal(net(images), scores)


def test_unknown_model_name_lists_the_choices():
    with pytest.raises(ValueError) as error:
        build_model("cnn_resnet19", 10)
    message = str(error.value)
    assert "cnn_resnet19" in message and "\n" not in message
    assert all(name in message for name in MODELS)


def test_resnet18_costs_1_11_gflops_per_image():
    assert round(count_flops(build_on_meta("cnn_resnet18", 10)) / 1e9, 2) == 1.11


@pytest.mark.parametrize("name", NEW_MODELS)
def test_flops_match_reference(name, model_table):
    flops_10 = table_row(model_table, name)[1]
    assert flops_10.endswith(" G") and float(flops_10[:-2]) == pytest.approx(REFERENCE_GFLOPS[name], rel=0.005)


def test_count_flops_keeps_the_training_mode():
    net = build_on_meta("cnn_resnet18", 10)
    count_flops(net)
    assert net.training and all(module.training for module in net.modules())
    net.eval()
    count_flops(net)
    assert not any(module.training for module in net.modules())


@pytest.mark.parametrize("name", ["cnn_base", "cnn_resnet18", "cnn_densenet121", "cnn_se_resnet50",
                                  *NEW_MODELS])
def test_larger_images_are_accepted(name, model_table):
    net = build_on_meta(name, 100)
    # Two images: SKNet's squeeze BN, on 1x1 maps, needs more than one value per channel in training.
    assert net(torch.empty(2, 3, 64, 64, device="meta")).shape == (2, 100)
    number, unit = table_row(model_table, name)[3].split()  # 32x32 images, 100 classes: "1.111 G", "1.303 M"
    assert count_flops(net, image_size=64) > 3 * float(number) * {"G": 1e9, "M": 1e6}[unit]


@pytest.mark.parametrize("name", ["cnn_base", "cnn_resnet18", "cnn_densenet121", "cnn_vgg11",
                                  "cnn_resnext29_32x4d", "cnn_scnet50"])
def test_initialization_is_kaiming_convs_and_unit_batchnorm(name):
    torch.manual_seed(0)
    net = build_model(name, 10)
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert (name == "cnn_base" or norms) and all((m.weight == 1).all() and (m.bias == 0).all() for m in norms)
    widest = max((m for m in net.modules() if isinstance(m, nn.Conv2d)), key=lambda m: m.weight.numel())
    fan_out = widest.out_channels * widest.kernel_size[0] * widest.kernel_size[1]
    assert widest.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.05)


def test_model_table_lists_every_flag_with_its_size_and_cost(model_table):
    lines = model_table.splitlines()
    assert lines[0].startswith("| model | params (10 classes) |")
    rows = lines[2:]
    assert [row.split("|")[1].strip() for row in rows] == [f"`{name}`" for name in MODELS]
    assert "| `cnn_resnet18` | 11,173,962 | 1.111 G | 11,220,132 | 1.111 G |" in rows


# Here, beside the other users of the session's model table: with pytest-xdist a test file runs in one worker,
# and the table (half a minute of counting) is then made once.
def test_readme_model_table_equals_what_the_code_computes(model_table):
    readme = (REPO_ROOT / "README.md").read_text()
    match = re.search(r"<!-- model-table -->\n(.*?)<!-- /model-table -->", readme, re.S)
    assert match, "README.md lost its model-table markers"
    assert match.group(1) == model_table
