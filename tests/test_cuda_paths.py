"""What the CUDA paths need, proved on the CPU: random-number state saved and restored for the training GPU
alone, a change of --amp on --resume, and torch.compile on static shapes that compile in the first epoch only."""
import json

import pytest
import torch
from test_train import tiny_args

import batches
import runs
import train

# ---------------------------------------------------------------------------------------------------
# Random-number state: only the training device's GPU


class FakeCuda:
    """torch.cuda's random-number functions on a machine with `count` GPUs, recording the calls."""

    def __init__(self, monkeypatch, count: int) -> None:
        self.count, self.restored = count, []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get_rng_state)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set_rng_state)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", self.unwanted)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", self.unwanted)

    def get_rng_state(self, device="cuda"):
        return torch.tensor([torch.device(device).index or 0], dtype=torch.uint8)

    def set_rng_state(self, state, device="cuda"):
        index = torch.device(device).index or 0
        if index >= self.count:
            raise IndexError(f"no GPU {index}")
        self.restored.append((int(state[0]), index))

    def unwanted(self, *args):
        raise AssertionError("every GPU's state was touched, not the training device's")


def test_the_rng_state_of_the_training_gpu_alone_is_saved_and_restored(monkeypatch):
    cuda = FakeCuda(monkeypatch, count=8)
    state = runs.get_rng_state(torch.device("cuda", 3))
    assert int(state["cuda"][0]) == 3
    one_gpu = FakeCuda(monkeypatch, count=1)  # resumed where one GPU is visible: it is cuda:0
    runs.set_rng_state(state, torch.device("cuda", 0))
    assert one_gpu.restored == [(3, 0)] and cuda.restored == []


def test_an_older_last_pt_with_every_gpus_state_resumes_on_fewer_gpus(monkeypatch):
    older = runs.get_rng_state(None)
    older["cuda"] = [torch.tensor([index], dtype=torch.uint8) for index in range(8)]  # as 2e73890 saved it
    cuda = FakeCuda(monkeypatch, count=1)
    runs.set_rng_state(older, torch.device("cuda", 0))
    assert cuda.restored == [(0, 0)]
    runs.set_rng_state(older, torch.device("cpu"))  # a CPU run of it restores no GPU state
    # saved on 2 GPUs, resumed under torchrun on 4: rank 1 takes GPU 1's state; GPUs 2 and 3 have none to take
    older["cuda"] = older["cuda"][:2]
    four = FakeCuda(monkeypatch, count=4)
    for index in (1, 2, 3):
        runs.set_rng_state(older, torch.device("cuda", index))
    assert four.restored == [(1, 1)]
    assert cuda.restored == [(0, 0)]


# ---------------------------------------------------------------------------------------------------
# --amp changed on --resume: the loss scaler starts afresh instead of loading another precision's state


@pytest.mark.parametrize("before, after", [("off", "fp16"), ("fp16", "off"), ("bf16", "fp16")])
def test_resume_may_change_amp(cifar10_dir, tmp_path, capsys, before, after):
    args = tiny_args(cifar10_dir, tmp_path, "--device", "cpu", "--lr", "0.01", epochs=1, subset=128)
    assert train.main("cifar10", [*args, "--amp", before]) == 0
    resumed = [*args, "--amp", after, "--resume", "--epochs", "2"]
    assert train.main("cifar10", resumed) == 0
    run_dir = tmp_path / "cifar10" / "cnn_base"
    assert f"--amp changed from {before} to {after} on resume" in (run_dir / "log.txt").read_text()
    assert json.loads((run_dir / "config.json").read_text())["amp"] == after
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 2
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------------
# torch.compile: static shapes, compiled in the first epoch only


def test_compiled_training_compiles_static_shapes_in_the_first_epoch_only(cifar10_dir, tmp_path, monkeypatch):
    compiled, epoch_now = [], [0]
    real_compile, real_set_epoch = torch.compile, batches.TrainBatches.set_epoch

    def record(graph, example_inputs):  # a backend that notes each graph and runs it as it is
        symbolic = [value for value in example_inputs if isinstance(value, torch.SymInt)]
        symbolic += [size for value in example_inputs if isinstance(value, torch.Tensor) for size in value.shape
                     if isinstance(size, torch.SymInt)]
        compiled.append((epoch_now[0], bool(symbolic)))
        return graph.forward

    def set_epoch(self, epoch):
        epoch_now[0] = epoch
        real_set_epoch(self, epoch)

    monkeypatch.setattr(torch, "compile", lambda net, **options: real_compile(net, backend=record, **options))
    monkeypatch.setattr(batches.TrainBatches, "set_epoch", set_epoch)
    torch._dynamo.reset()
    # 200 images in batches of 64: three full batches and a last one of 8, every epoch
    args = tiny_args(cifar10_dir, tmp_path, "--compile", "--device", "cpu", epochs=3, subset=200)
    try:
        assert train.main("cifar10", args) == 0
    finally:
        torch._dynamo.reset()
    assert compiled, "nothing was compiled"
    assert {epoch for epoch, _ in compiled} == {1}, compiled  # the full batch and the last one, then never again
    assert not any(dynamic for _, dynamic in compiled), "a graph with a dynamic batch size was compiled"
