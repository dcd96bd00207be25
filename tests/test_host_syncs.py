"""The training loop reads values back from the device only on the steps it schedules for it: every
train.DIVERGENCE_CHECK_STEPS steps and at the last step of an epoch. Anywhere else, on a GPU, the host would wait
for the device every step. A read is aten._local_scalar_dense (what .item(), float(), int() and bool() of a tensor
call), and a TorchDispatchMode sees every ATen op on the CPU too, so these tests need no GPU.
"""
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import train
from model import build_model
from training import optimization
from training.flags import Recipe

SCALAR_READ = torch.ops.aten._local_scalar_dense.default
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class ScalarReads(TorchDispatchMode):
    """Counts the scalar reads per training step: `step` is the step under way (0 before the first), and a step
    lasts from its call of Optimization.step to the next one, so it takes in the rest of the loop's body."""

    def __init__(self) -> None:
        super().__init__()
        self.step = 0
        self.reads: Counter[int] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is SCALAR_READ:
            self.reads[self.step] += 1
        return func(*args, **(kwargs or {}))


class FirstEpochDone(Exception):
    """Stops a run once its first epoch is recorded: what a run does after that (validation, saving, the end-of-run
    tests) takes no training step and most of a tiny run's time."""


def record_first_epoch(monkeypatch) -> ScalarReads:
    """Makes the next run record the scalar reads of its first epoch's steps, then raise FirstEpochDone."""
    recorded, real_epoch, real_step = ScalarReads(), train.train_epoch, optimization.Optimization.step

    def counted_step(self, net, inputs, labels):
        recorded.step += 1
        return real_step(self, net, inputs, labels)

    def first_epoch(run, data, training, progress, epoch):
        with recorded:
            real_epoch(run, data, training, progress, epoch)
        raise FirstEpochDone

    monkeypatch.setattr(optimization.Optimization, "step", counted_step)
    monkeypatch.setattr(train, "train_epoch", first_epoch)
    return recorded


def scheduled_steps(steps: int) -> set[int]:
    return {step for step in range(1, steps + 1) if step % train.DIVERGENCE_CHECK_STEPS == 0 or step == steps}


@pytest.fixture
def one_thread():
    """A tiny network's steps are too small to share between threads; on a busy machine two threads wait for each
    other ten times longer than one computes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_the_loop_reads_from_the_device_only_on_its_divergence_checks(cifar10_dir, tmp_path, monkeypatch,
                                                                      device, amp):
    recorded = record_first_epoch(monkeypatch)
    # 404 images in batches of 4: 101 steps, checked at steps 50 and 100 and at the last one, 101. Batches this
    # small diverge at the default --lr.
    with pytest.raises(FirstEpochDone):
        train.main("cifar10", [
            "--model", "cnn_base", "--epochs", "1", "--subset", "404", "--batch-size", "4", "--lr", "0.01",
            "--device", device, "--amp", amp, "--data-dir", str(cifar10_dir), "--results-dir", str(tmp_path),
            "--no-progress"])
    assert recorded.step == 101
    scheduled, read_on = scheduled_steps(recorded.step), set(recorded.reads)
    unscheduled = sorted(read_on - scheduled)
    assert not unscheduled, (f"--amp {amp} on {device}: scalar reads on steps {unscheduled[:10]} "
                             f"({len(unscheduled)} steps), not only on the scheduled {sorted(scheduled)}")
    assert read_on == scheduled, f"the divergence check read nothing on steps {sorted(scheduled - read_on)}"


def tiny_optimization(device: str, amp_dtype: torch.dtype | None) -> tuple[torch.nn.Module, optimization.Optimization]:
    torch.manual_seed(0)
    net = build_model("cnn_base", 10).to(device)
    return net, optimization.make_optimization(net, Recipe(lr=0.05), 10, torch.device(device), amp_dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_an_fp16_step_leaves_the_inf_check_on_the_device(device):
    """GradScaler.step reads its inf flag back with .item() unless the optimizer is fused."""
    net, fp16 = tiny_optimization(device, torch.float16)
    inputs, labels = torch.randn(8, 3, 32, 32, device=device), torch.randint(0, 10, (8,), device=device)
    with ScalarReads() as recorded:
        for _ in range(3):
            fp16.step(net, inputs, labels)
    assert not recorded.reads, f"3 fp16 steps read {sum(recorded.reads.values())} scalars back from the device"
    assert fp16.optimizer.defaults["fused"] is True


def test_on_the_cpu_only_fp16_changes_the_optimizer():
    """Fused SGD rounds differently; on the CPU the other precisions keep torch's default SGD, and their numbers
    (CUDA takes the fused one in every precision: test_host_work.py)."""
    for amp_dtype in (None, torch.bfloat16):
        assert tiny_optimization("cpu", amp_dtype)[1].optimizer.defaults["fused"] is None


def test_a_resume_keeps_the_optimizer_its_precision_asks_for():
    """load_state_dict puts back the saved options, "fused" among them, and --amp may change on --resume. An fp16
    run must resume from a last.pt saved unfused (GradScaler hands its scale to a fused optimizer, which the plain
    one refuses), and a run in another precision from an fp16 one keeps its own numbers."""
    inputs, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    plain_net, plain = tiny_optimization("cpu", None)
    plain.step(plain_net, inputs, labels)
    fp16_net, fp16 = tiny_optimization("cpu", torch.float16)
    fp16.optimizer.load_state_dict(plain.optimizer.state_dict())
    fp16.step(fp16_net, inputs, labels)
    plain.optimizer.load_state_dict(fp16.optimizer.state_dict())
    assert [group["fused"] for group in fp16.optimizer.param_groups] == [True]
    assert [group["fused"] for group in plain.optimizer.param_groups] == [None]
