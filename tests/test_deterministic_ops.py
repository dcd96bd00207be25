"""Every model's training step and evaluation, as a run takes them: scores for 100 classes, finite gradients that
reach every parameter, and, for --deterministic on CUDA, no operator that PyTorch documents as raising under
torch.use_deterministic_algorithms(True) on CUDA (with the confusion matrix of --eval-only and the mirror of --tta).
The operators are checked on the CPU, by recording every ATen operator dispatched, so it needs no GPU;
deterministic_ops.txt lists those operators and the documentation each comes from."""
import re
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from cifar.batches import BatchOptions, EvalBatches, TrainBatches
from model import MODELS, build_model
from model.nonlocal_block import NonLocalBlock
from training.evaluation import evaluate
from training.flags import Recipe, with_default_lr
from training.optimization import make_optimization

RAISING_OPS_FILE = Path(__file__).with_name("deterministic_ops.txt")

# What each condition of the file asks of an operator's arguments, named as in the operator's ATen schema.
CONDITIONS = {
    "always": lambda arguments: True,
    "weights given": lambda arguments: arguments.get("weights") is not None,
    "reduction not none": lambda arguments: arguments["reduction"] != 0,  # 0 is at::Reduction::None
    "reduce='prod'": lambda arguments: arguments["reduce"] == "prod",
    "mode='max'": lambda arguments: arguments["mode"] == 2,  # EmbeddingBag's MODE_MAX
    "quantized self": lambda arguments: arguments["self"].is_quantized,
}


class RaisingOp(NamedTuple):
    condition: str
    documentation: str


def read_raising_ops() -> dict[str, RaisingOp]:
    """The file's operators by name: 'aten.histc' (every overload) or 'aten.median.dim' (that overload)."""
    raising_ops = {}
    for line in RAISING_OPS_FILE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, condition, documentation = (field.strip() for field in line.split(" | ", 2))
            raising_ops[name] = RaisingOp(condition, documentation)
    return raising_ops


RAISING_OPS = read_raising_ops()


class OpRecorder(TorchDispatchMode):
    """Records the name of every ATen operator run under it, backward ones included, and which of them would
    raise on CUDA under deterministic algorithms, with the line of documentation that says so."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()
        self.raising: dict[str, str] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name, packet = str(func), str(func._overloadpacket)
        self.seen.add(packet)
        raising_op = RAISING_OPS.get(name) or RAISING_OPS.get(packet)
        if raising_op is not None:
            arguments = {**dict(zip((argument.name for argument in func._schema.arguments), args)), **kwargs}
            if CONDITIONS[raising_op.condition](arguments):
                self.raising[name] = raising_op.documentation
        return func(*args, **kwargs)


def test_the_list_names_real_operators_and_known_conditions():
    """A misspelt operator would never match, and a condition the test does not know would never be checked."""
    assert len(RAISING_OPS) > 20
    for name, raising_op in RAISING_OPS.items():
        namespace, packet_name, *overload = name.split(".")
        assert namespace == "aten" and hasattr(torch.ops.aten, packet_name), name
        assert not overload or overload[0] in getattr(torch.ops.aten, packet_name).overloads(), name
        assert raising_op.condition in CONDITIONS, name


def test_the_recorder_flags_a_documented_operator_and_keeps_to_its_condition():
    """Issue #18's crash, a 5x5 adaptive pooling differentiated, is flagged; bincount only with weights."""
    features = torch.randn(1, 2, 6, 6, requires_grad=True)
    with OpRecorder() as recorder:
        F.adaptive_avg_pool2d(features, 5).sum().backward()
        torch.bincount(torch.tensor([0, 1, 1]))
    assert list(recorder.raising) == ["aten._adaptive_avg_pool2d_backward.default"]
    with OpRecorder() as recorder:
        torch.bincount(torch.tensor([0, 1, 1]), weights=torch.ones(3))
    assert list(recorder.raising) == ["aten.bincount.default"]


# Gradient-free in exact arithmetic (float noise aside), so only required to be finite: a conv bias that
# the BN right after it cancels (VGG's convs, Coordinate Attention's encoder, the non-local W), phi's bias
# in a non-local block (it shifts every logit of a softmax row alike) and g's (it shifts every output
# position alike, which W's BN cancels).
GRADIENT_FREE = re.compile(r"features\.\d+\.bias|.*\.(encode|w|phi|g)\.bias")


@pytest.mark.parametrize("name", list(MODELS))
def test_a_training_step_and_evaluation_of_every_model_reach_every_parameter_and_raise_on_no_deterministic_op(name):
    torch.manual_seed(0)
    net = build_model(name, 100)  # built outside the record: initialization is neither training nor evaluation
    # A non-local block's output BN starts at zero, which stops the gradient to its theta, phi, g and W in the
    # first step; a second step, after SGD has moved that BN, must reach them too.
    steps = 2 if any(isinstance(module, NonLocalBlock) for module in net.modules()) else 1
    images = torch.randint(0, 256, (2 * steps, 3, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([3, 97] * steps)
    options = BatchOptions(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    outputs = []
    with OpRecorder() as recorder:
        train_batches = TrainBatches(images, labels, 2, options, aug="flip-crop-cutout")
        training = make_optimization(net, with_default_lr(Recipe(model=name)), len(train_batches),
                                     torch.device("cpu"), None)
        for inputs, batch_labels in train_batches:
            outputs.append(training.step(net, inputs, batch_labels))
        # One image is enough for every operator of evaluation: the mirror of --tta and the confusion matrix.
        evaluate(net, EvalBatches(images[:1], labels[:1], 1, options), None, tta=True, num_classes=100)
    # A record without the backward pass or bincount (the confusion matrix's among them) would prove nothing.
    assert {"aten.convolution_backward", "aten.bincount"} <= recorder.seen
    assert not recorder.raising, (
        f"{name} runs operators that raise under torch.use_deterministic_algorithms(True) on CUDA:\n"
        + "\n".join(f"  {op}: {documentation}" for op, documentation in recorder.raising.items()))

    assert len(outputs) == steps
    for loss, scores in outputs:
        assert scores.shape == (2, 100) and torch.isfinite(scores).all() and torch.isfinite(loss)
    # The last step's gradients: a parameter without one would be a layer left out of forward (e.g. an SE gate
    # not wired in).
    broken = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert broken == []
    unreached = [n for n, p in net.named_parameters() if not GRADIENT_FREE.fullmatch(n) and not p.grad.any()]
    assert unreached == []
