"""channels_last, which runs on CUDA take by default, holds through every model: each convolution gets its input
map, and in the backward pass its incoming gradient, in the channels_last order, so no conv has to reorder a map
that an op before it turned back to NCHW (as torch.stack(...).sum(1) in SKNet's selective kernel once did). The
convolutions are watched on the CPU, by every ATen operator dispatched, so it needs no GPU.

Only maps are held to it (more than one channel, row and column): a pooled row or column, as Coordinate Attention
encodes, costs next to nothing to reorder, and its gradient comes back NCHW from autograd's reduction of a broadcast
product, which no model code chooses."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from cifar.batches import BatchOptions, TrainBatches
from conftest import one_torch_thread
from model import MODELS, build_model

CHANNELS_LAST_ORDER = (0, 2, 3, 1)  # N, H, W, C from the outermost dimension in: C is the one that varies fastest
NCHW_ORDER = (0, 1, 2, 3)


def is_map(tensor: torch.Tensor) -> bool:
    """An N x C x H x W tensor whose two layouts differ in more than the batch: C, H and W all above 1."""
    return tensor.dim() == 4 and min(tensor.shape[1:]) > 1


def in_channels_last_order(tensor: torch.Tensor) -> bool:
    """Whether a 4-D tensor's elements lie in the channels_last order, contiguous or not: a channel slice of a
    channels_last tensor (DenseNet's concatenation seen from its backward, Res2Net's split) lies in that order
    too. Dimensions of size 1 have no order."""
    kept = [dim for dim in range(4) if tensor.shape[dim] > 1]
    outermost_first = sorted(kept, key=lambda dim: -tensor.stride(dim))
    return outermost_first == [dim for dim in CHANNELS_LAST_ORDER if dim in kept]


class ConvLayouts(TorchDispatchMode):
    """Records every convolution's maps that are not in the channels_last order: the input of the forward, and
    the incoming gradient and the saved input of the backward, each as (operator, argument, shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()
        self.not_channels_last: list[tuple[str, str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = str(func._overloadpacket)
        # The CPU and CUDA backends (mkldnn, cudnn) are called below the dispatch a Python mode sees: only these two.
        watched = {"aten.convolution": ("input",), "aten.convolution_backward": ("grad_output", "input")}
        if packet in watched:
            self.seen.add(packet)
            arguments = {**dict(zip((argument.name for argument in func._schema.arguments), args)), **kwargs}
            for name in watched[packet]:
                tensor = arguments[name]
                if is_map(tensor) and not in_channels_last_order(tensor):
                    self.not_channels_last.append((packet, name, tuple(tensor.shape)))
        return func(*args, **kwargs)


def test_the_order_check_tells_the_two_layouts_apart_in_whole_maps_and_channel_slices():
    nchw = torch.randn(2, 8, 5, 5)
    channels_last = nchw.contiguous(memory_format=torch.channels_last)
    assert in_channels_last_order(channels_last) and not in_channels_last_order(nchw)
    assert in_channels_last_order(channels_last[:, 2:5]) and not in_channels_last_order(nchw[:, 2:5])
    assert not in_channels_last_order(channels_last.transpose(2, 3))
    assert in_channels_last_order(channels_last[:1]) and not in_channels_last_order(nchw[:1])
    assert is_map(nchw) and not any(is_map(torch.randn(shape)) for shape in ((2, 1, 5, 5), (2, 8, 5, 1), (2, 8)))


def test_the_recorder_catches_a_conv_fed_nchw_in_the_forward_and_the_backward():
    """SKNet's old mix of its two branches, a stacked sum, feeding a channels_last conv: both passes flagged."""
    conv = torch.nn.Conv2d(8, 8, 1).to(memory_format=torch.channels_last)
    near, far = (torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last).requires_grad_()
                 for _ in range(2))
    with ConvLayouts() as recorder:
        conv(torch.stack([near, far], 1).sum(1)).square().sum().backward()
    assert recorder.not_channels_last == [("aten.convolution", "input", (2, 8, 4, 4)),
                                          ("aten.convolution_backward", "input", (2, 8, 4, 4))]


@pytest.mark.parametrize("name", list(MODELS))
def test_every_convolution_of_every_model_keeps_channels_last_forward_and_backward(name):
    torch.manual_seed(0)
    net = build_model(name, 10).to(memory_format=torch.channels_last)  # as train.py makes a channels_last run
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    options = BatchOptions(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), channels_last=True)
    inputs, labels = next(iter(TrainBatches(images, torch.tensor([3, 7]), 2, options)))
    with one_torch_thread(), ConvLayouts() as recorder:
        F.cross_entropy(net(inputs), labels).backward()
    assert recorder.seen == {"aten.convolution", "aten.convolution_backward"}
    assert recorder.not_channels_last == [], (
        f"{name} feeds {len(recorder.not_channels_last)} convolution maps in NCHW order to a channels_last "
        f"network, the first: {recorder.not_channels_last[:3]}")
