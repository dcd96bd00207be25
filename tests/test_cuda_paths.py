"""What the CUDA paths need, proved on the CPU: random-number state saved and restored for the training GPU
alone, a change of --amp on --resume, torch.compile of one static graph in the first epoch only (the last,
smaller batch uncompiled), flag combinations that cannot work refused or made to work, the precision chosen by
the GPU's compute capability, and torchrun's timeout, buckets and a sweep's share of the cores."""
import datetime
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from test_train import read_metrics, tiny_args

import train
from cifar import batches
from conftest import REPO_ROOT, message_lines
from sweeps.workers import worker_environments
from training import devices, flags, processes, rng_state

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
    state = rng_state.get_rng_state(torch.device("cuda", 3))
    assert int(state["cuda"][0]) == 3
    one_gpu = FakeCuda(monkeypatch, count=1)  # resumed where one GPU is visible: it is cuda:0
    rng_state.set_rng_state(state, torch.device("cuda", 0))
    assert one_gpu.restored == [(3, 0)] and cuda.restored == []


def test_an_older_last_pt_with_every_gpus_state_resumes_on_fewer_gpus(monkeypatch):
    older = rng_state.get_rng_state(None)
    older["cuda"] = [torch.tensor([index], dtype=torch.uint8) for index in range(8)]  # as 2e73890 saved it
    cuda = FakeCuda(monkeypatch, count=1)
    rng_state.set_rng_state(older, torch.device("cuda", 0))
    assert cuda.restored == [(0, 0)]
    rng_state.set_rng_state(older, torch.device("cpu"))  # a CPU run of it restores no GPU state
    # saved on 2 GPUs, resumed under torchrun on 4: rank 1 takes GPU 1's state; GPUs 2 and 3 have none to take
    older["cuda"] = older["cuda"][:2]
    four = FakeCuda(monkeypatch, count=4)
    for index in (1, 2, 3):
        rng_state.set_rng_state(older, torch.device("cuda", index))
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


class RecordingBackend:
    """A torch.compile backend that notes each graph (the epoch it was compiled in, whether its batch size is
    symbolic, Inductor's deterministic switch at that moment) and runs it as it is."""

    def __init__(self, monkeypatch) -> None:
        self.graphs, self.epoch_now = [], 0
        real_set_epoch = batches.TrainBatches.set_epoch

        def set_epoch(batches_self, epoch):
            self.epoch_now = epoch
            real_set_epoch(batches_self, epoch)

        monkeypatch.setattr(batches.TrainBatches, "set_epoch", set_epoch)
        monkeypatch.setattr(train, "COMPILE_BACKEND", self)

    def __call__(self, graph, example_inputs):
        symbolic = [value for value in example_inputs if isinstance(value, torch.SymInt)]
        symbolic += [size for value in example_inputs if isinstance(value, torch.Tensor) for size in value.shape
                     if isinstance(size, torch.SymInt)]
        batch = [value.shape[0] for value in example_inputs
                 if isinstance(value, torch.Tensor) and tuple(value.shape[1:]) == (3, 32, 32)]  # the images
        self.graphs.append({"epoch": self.epoch_now, "dynamic": bool(symbolic), "batch": batch[:1],
                            "deterministic": torch._inductor.config.deterministic})
        return graph.forward


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    deterministic = torch._inductor.config.deterministic
    yield
    torch._dynamo.reset()
    torch._inductor.config.deterministic = deterministic


def test_compiled_training_compiles_one_static_graph_in_the_first_epoch_only(cifar10_dir, tmp_path, monkeypatch,
                                                                            fresh_dynamo):
    backend = RecordingBackend(monkeypatch)
    # 200 images in batches of 64: three full batches and a last one of 8, every epoch
    args = tiny_args(cifar10_dir, tmp_path, "--compile", "--device", "cpu", epochs=3, subset=200)
    assert train.main("cifar10", args) == 0
    # The full batch alone: the last batch of 8 runs on the uncompiled network, in every epoch.
    assert backend.graphs == [{"epoch": 1, "dynamic": False, "batch": [64], "deterministic": False}]


def test_the_last_smaller_batch_still_trains_and_the_figures_match_an_uncompiled_run(cifar10_dir, tmp_path,
                                                                                    monkeypatch, fresh_dynamo):
    RecordingBackend(monkeypatch)  # runs each graph as traced: the same arithmetic as eager mode on the CPU
    args = tiny_args(cifar10_dir, tmp_path, "--device", "cpu", epochs=2, subset=200)
    assert train.main("cifar10", [*args, "--compile", "--tag", "compiled"]) == 0
    assert train.main("cifar10", [*args, "--tag", "eager"]) == 0
    compiled = read_metrics(tmp_path / "cifar10" / "cnn_base-compiled")
    eager = read_metrics(tmp_path / "cifar10" / "cnn_base-eager")
    columns = ("train_loss", "train_acc", "val_loss", "val_acc")
    for with_compile, without in zip(compiled, eager, strict=True):
        assert [float(with_compile[name]) for name in columns] == pytest.approx(
            [float(without[name]) for name in columns], rel=1e-5, abs=1e-6)


def test_deterministic_compile_sets_inductors_own_deterministic_mode(cifar10_dir, tmp_path, monkeypatch,
                                                                    fresh_dynamo, keep_global_torch_settings):
    backend = RecordingBackend(monkeypatch)
    # torch 2.14's use_deterministic_algorithms sets Inductor's switch too; older ones (requirements.txt allows
    # them) do not, and the run must set it itself.
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda mode, warn_only=False:
                        torch._C._set_deterministic_algorithms(mode, warn_only=warn_only))
    args = tiny_args(cifar10_dir, tmp_path, "--compile", "--deterministic", "--device", "cpu", epochs=1, subset=128)
    assert train.main("cifar10", args) == 0
    assert [graph["deterministic"] for graph in backend.graphs] == [True]


def test_sync_bn_with_compile_is_refused_in_one_line(cifar10_dir, tmp_path, capsys):
    args = tiny_args(cifar10_dir, tmp_path, "--compile", "--sync-bn", "--device", "cpu", epochs=1, subset=128)
    assert train.main("cifar10", args) == 2
    lines = message_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "--sync-bn and --compile" in lines[0] and "drop one" in lines[0]
    assert not (tmp_path / "cifar10").exists()


def test_a_resumed_sync_bn_run_refuses_compile(cifar10_dir, tmp_path, capsys):
    args = tiny_args(cifar10_dir, tmp_path, "--device", "cpu", epochs=1, subset=128)
    assert train.main("cifar10", [*args, "--sync-bn"]) == 0
    before = (tmp_path / "cifar10" / "cnn_base" / "last.pt").read_bytes()
    capsys.readouterr()
    assert train.main("cifar10", [*args, "--resume", "--epochs", "2", "--compile"]) == 2
    assert "--sync-bn and --compile" in capsys.readouterr().err
    assert (tmp_path / "cifar10" / "cnn_base" / "last.pt").read_bytes() == before


# ---------------------------------------------------------------------------------------------------
# Precision by the GPU's compute capability


@pytest.mark.parametrize("capability, expected", [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"),
                                                  ((9, 0), "bf16"), ((12, 0), "bf16")])
def test_auto_precision_is_bf16_from_compute_capability_8_and_fp16_with_the_scaler_below(monkeypatch, capability,
                                                                                         expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    name, dtype = devices.resolve_amp("auto", torch.device("cuda", 0))
    assert name == expected and dtype == devices.AMP_DTYPES[expected]
    for typed in devices.AMP_CHOICES[1:]:  # --amp typed wins whatever the GPU
        assert devices.resolve_amp(typed, torch.device("cuda", 0)) == (typed, devices.AMP_DTYPES[typed])
    assert devices.resolve_amp("auto", torch.device("cpu")) == ("off", None)


# ---------------------------------------------------------------------------------------------------
# torchrun: the process group's timeout, DDP's buckets, and a sweep's share of the cores


def test_the_process_group_waits_as_long_as_dist_timeout_says(monkeypatch):
    seen = {}
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **options: seen.update(options))
    processes.start_processes("cpu", False, 90.0)
    assert seen["timeout"] == datetime.timedelta(minutes=90)
    default = flags.build_parser("cifar10").parse_args([]).dist_timeout
    processes.start_processes("cpu", False, default)
    assert seen["timeout"] >= datetime.timedelta(minutes=30)  # NCCL's own 10 minutes is too short for a download


def test_ddp_keeps_the_gradients_in_its_buckets(monkeypatch, tmp_path):
    file_store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=file_store, rank=0, world_size=1)
    try:
        run = SimpleNamespace(
            recipe=flags.Recipe(lr=0.1, model="cnn_base", sync_bn=False), channels_last=False, amp_dtype=None,
            procs=processes.Processes(True, 0, 1, 0, torch.device("cpu")),
            config=SimpleNamespace(settings=flags.Settings(compile=False)))
        training = train.build_training(run, 10, 4)
        assert isinstance(training.net, torch.nn.parallel.DistributedDataParallel)
        assert training.net.gradient_as_bucket_view
    finally:
        processes.end_processes()


# A process that joins a group, trains with DDP (which imports torch._dynamo, and with it
# torch.distributed.nn.functional) and leaves the group: whether the group is freed then.
LEAVES_THE_GROUP = """
import sys, weakref
import torch
from training import processes
store = torch.distributed.FileStore(sys.argv[1], 1)
torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
group = weakref.ref(torch.distributed.group.WORLD)
net = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
net(torch.ones(1, 2)).sum().backward()
del net
processes.end_processes()
print("freed" if group() is None else "still held")
"""


def test_leaving_the_process_group_frees_it_so_that_gloos_threads_end_before_exit(tmp_path):
    """Nothing may hold the group once end_processes has left it: its gloo threads end only when it is freed, and
    still running at interpreter exit they can abort the process (pytorch/pytorch#179291). torch.distributed.nn's
    collectives take the group as their default when that module is first imported after the group started;
    training/processes.py imports it before. In a process of its own: in this one, any earlier test may have
    imported the module first."""
    completed = subprocess.run([sys.executable, "-c", LEAVES_THE_GROUP, str(tmp_path / "store")], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip() == "freed"
    assert "terminate called" not in completed.stderr


@pytest.mark.parametrize("gpus, cores, share", [(8, 64, "8"), (8, 4, "1"), (1, 16, "16")])
def test_each_sweep_worker_gets_its_share_of_the_cores_for_math_and_for_compiling(monkeypatch, gpus, cores, share):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    for name in ("OMP_NUM_THREADS", "TORCHINDUCTOR_COMPILE_THREADS", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    environments = worker_environments(SimpleNamespace(workers=None, gpus=None))
    assert len(environments) == gpus
    for env in environments.values():
        assert env["OMP_NUM_THREADS"] == share and env["TORCHINDUCTOR_COMPILE_THREADS"] == share
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "3")  # what the user set is kept
    cpu_workers = worker_environments(SimpleNamespace(workers=2, gpus=None))
    assert {env["TORCHINDUCTOR_COMPILE_THREADS"] for env in cpu_workers.values()} == {"3"}
    assert {env["OMP_NUM_THREADS"] for env in cpu_workers.values()} == {str(max(1, cores // 2))}
