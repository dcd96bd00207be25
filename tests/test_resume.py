"""What --resume puts back from last.pt, each piece on its own (the weights, the optimizer's momenta, the
schedule's position, the loss scaler, the random generators, the best epoch so far, the recipe), and the
learning-rate schedule's values step by step."""
import json
import math
import os
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_train import read_metrics, tiny_args

import train
from conftest import without_time
from model import DEFAULT_LR, MODELS
from runfolder import declarations, store
from training import flags, recording
from training.optimization import make_optimization
from training.rng_state import get_rng_state

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("keep_global_torch_settings")


def training_of(recipe: flags.Recipe, steps_per_epoch: int, amp_dtype=None) -> train.NetworkAndOptimization:
    torch.manual_seed(recipe.seed)
    net = MODELS[recipe.model].build(10)
    return train.NetworkAndOptimization(net, net, make_optimization(net, recipe, steps_per_epoch, CPU, amp_dtype), 0, 0)


def take_steps(training: train.NetworkAndOptimization, count: int) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(count):
        images = torch.randn(8, 3, 32, 32, generator=generator)
        labels = torch.randint(0, 10, (8,), generator=generator)
        training.optimization.step(training.net, images, labels)


@pytest.fixture
def saved_state():
    """A LastCheckpoint of 1 epoch (4 steps, fp16 so that the loss scaler is in use) whose every piece
    differs from what a fresh start has, and what the generators draw after it was taken."""
    recipe = flags.Recipe(model="cnn_base", epochs=3, lr=0.05)
    source = training_of(recipe, steps_per_epoch=4, amp_dtype=torch.float16)
    take_steps(source, 4)
    source.optimization.scaler.update(new_scale=1024.0)  # as if some steps had overflowed
    rng = get_rng_state(CPU)
    draws = (torch.rand(3), np.random.rand(3), random.random())
    checkpoint = declarations.LastCheckpoint(
        config={"model": "cnn_base", "dataset": "cifar10"}, epoch=1, model=source.raw_net.state_dict(),
        optimizer=source.optimization.optimizer.state_dict(),
        scheduler=source.optimization.scheduler.state_dict(),
        scaler=source.optimization.scaler.state_dict(), rng=rng,
        history=[{"epoch": "1", "lr": "0.05", "val_acc": "0.5"}], best={"epoch": 1, "val_acc": 0.5})
    return source, checkpoint, draws


def test_a_resume_puts_back_the_log_line_of_an_epoch_a_kill_left_out(cifar10_dir, tmp_path, capsys):
    """A kill between an epoch's last.pt and its log line leaves log.txt an epoch short; the resume writes the
    line back from last.pt (once, as it was), as it rewrites metrics.csv."""
    assert train.main("cifar10", tiny_args(cifar10_dir, tmp_path, epochs=2)) == 0
    log = tmp_path / "cifar10" / "cnn_base" / declarations.LOG_FILE
    lines = log.read_text().splitlines()
    [epoch_2] = [line for line in lines if line.startswith("Epoch 2/2, ")]
    log.write_text("\n".join(lines[:lines.index(epoch_2)]) + "\n")  # as if killed before the line
    assert train.main("cifar10", tiny_args(cifar10_dir, tmp_path, "--resume", epochs=3)) == 0
    resumed = log.read_text().splitlines()
    assert [line for line in resumed if line.startswith("Epoch ")] == [
        *[line for line in lines if line.startswith("Epoch 1/2, ")], epoch_2,
        *[line for line in resumed if line.startswith("Epoch 3/3, ")]]
    assert resumed.index(epoch_2) < resumed.index(next(line for line in resumed if line.startswith("Resuming")))


def test_restore_puts_back_every_piece_of_last_pt(saved_state, tmp_path):
    source, checkpoint, draws = saved_state
    fresh = training_of(flags.Recipe(model="cnn_base", epochs=3, lr=0.05, seed=7), 4, torch.float16)
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    progress = train.restore(checkpoint, fresh, SimpleNamespace(procs=SimpleNamespace(device=CPU), folder=tmp_path))

    for name, value in source.raw_net.state_dict().items():
        assert torch.equal(fresh.raw_net.state_dict()[name], value), name
    saved_momenta = [state["momentum_buffer"] for state in source.optimization.optimizer.state.values()]
    restored_momenta = [state["momentum_buffer"] for state in fresh.optimization.optimizer.state.values()]
    assert len(restored_momenta) == len(saved_momenta) > 0
    assert all(torch.equal(a, b) for a, b in zip(saved_momenta, restored_momenta))
    assert fresh.optimization.scheduler.last_epoch == 4
    assert fresh.optimization.optimizer.param_groups[0]["lr"] == source.optimization.optimizer.param_groups[0]["lr"]
    assert fresh.optimization.scaler.get_scale() == 1024.0
    assert torch.equal(torch.rand(3), draws[0])
    assert np.array_equal(np.random.rand(3), draws[1]) and random.random() == draws[2]
    assert progress.best == {"epoch": 1, "val_acc": 0.5}
    assert progress.start_epoch == 1
    assert [row["epoch"] for row in progress.history] == ["1"]
    assert set(progress.history[0]) == set(declarations.METRIC_COLUMNS)  # older rows completed with defaults


def test_the_copy_saved_each_epoch_is_written_into_the_last_epochs_copy_when_it_fits():
    """cpu_copy: tensors copied (later steps cannot change the copy), into the earlier copy's tensors where shape
    and dtype match, nested in dicts and lists alike; everything else as it is."""
    live = {"weight": torch.ones(3), "state": {0: {"momentum_buffer": torch.zeros(2)}}, "pair": [torch.ones(1)],
            "param_groups": [{"lr": 0.1, "params": [0]}]}
    first = recording.cpu_copy(live)
    live["weight"].add_(1)
    second = recording.cpu_copy(live, first)
    assert second["weight"] is first["weight"] and second["weight"] is not live["weight"]
    assert torch.equal(second["weight"], torch.full((3,), 2.0))
    assert second["state"][0]["momentum_buffer"] is first["state"][0]["momentum_buffer"]
    assert second["pair"][0] is first["pair"][0] and second["param_groups"] == live["param_groups"]
    live["weight"].add_(1)
    assert torch.equal(second["weight"], torch.full((3,), 2.0))  # a copy, not the live tensor
    other_shape = recording.cpu_copy(torch.ones(4), first["weight"])
    other_dtype = recording.cpu_copy(torch.ones(3, dtype=torch.float64), first["weight"])
    assert other_shape is not first["weight"] and other_shape.shape == (4,)
    assert other_dtype is not first["weight"] and other_dtype.dtype == torch.float64
    assert torch.equal(first["weight"], torch.full((3,), 2.0))  # left alone by copies that do not fit


# -- what check_run_folder lets start ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", [declarations.LAST_CHECKPOINT, declarations.METRICS_FILE])
def test_either_file_of_a_run_alone_makes_the_folder_a_run(tmp_path, name):
    """A kill between epoch 1's last.pt and its metrics.csv leaves last.pt alone: the same command without
    --resume must not start over on it."""
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(store.UsageError) as refused:
        store.check_run_folder(tmp_path, resume=False, overwrite=False)
    assert str(refused.value) == (f"{tmp_path} already holds a run: pass --resume to continue it or --overwrite "
                                  "to start over (or another --tag)")
    assert store.check_run_folder(tmp_path, resume=False, overwrite=True) is None


def test_a_results_folder_that_is_not_writable_is_refused_in_one_line(tmp_path, monkeypatch):
    """Refused when writing is what is denied (a root user passes the real check, so os.access is faked here)."""
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: not (os.fspath(path) == os.fspath(tmp_path)
                                                             and mode & os.W_OK) and real_access(path, mode))
    with pytest.raises(store.UsageError) as refused:
        store.check_run_folder(tmp_path / "cifar10" / "cnn_base", resume=False, overwrite=False)
    assert str(refused.value) == (f"cannot write {tmp_path / 'cifar10' / 'cnn_base'}: {tmp_path} is not writable; "
                                  "pick another --results-dir")


def test_a_last_pt_that_loads_but_is_no_checkpoint_is_refused_in_one_line(tmp_path):
    torch.save([1, 2, 3], tmp_path / declarations.LAST_CHECKPOINT)
    with pytest.raises(store.UsageError) as refused:
        store.check_run_folder(tmp_path, resume=True, overwrite=False)
    assert str(refused.value) == (f"{tmp_path / declarations.LAST_CHECKPOINT} is not a last.pt of this project; start "
                                  "over with --overwrite")


def test_a_checkpoint_saved_from_a_gpu_resumes_on_the_cpu(tmp_path, monkeypatch):
    """last.pt of older versions held the model's tensors as they were on the GPU: read onto the CPU."""
    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save({"weight": torch.arange(3.0)}, tmp_path / "last.pt")
    loaded = store.load_checkpoint(tmp_path / "last.pt")
    assert loaded["weight"].device == CPU and torch.equal(loaded["weight"], torch.arange(3.0))


def test_a_step_runs_the_forward_pass_under_the_runs_autocast():
    net, dtypes = torch.nn.Linear(4, 3), []
    net.register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    training = make_optimization(net, flags.Recipe(lr=0.05), 10, CPU, torch.bfloat16)
    training.step(net, torch.randn(2, 4), torch.tensor([0, 1]))
    assert dtypes == [torch.bfloat16]


def test_a_resumed_run_keeps_the_best_epoch_of_last_pt(cifar10_dir, tmp_path):
    """A later epoch replaces best.pt only when it beats the best so far as last.pt saved it: here a best
    no epoch can beat, so best.pt and summary.json keep epoch 1 whatever epochs 2 and 3 reach."""
    args = tiny_args(cifar10_dir, tmp_path, "--deterministic", epochs=2)
    assert train.main("cifar10", args) == 0
    run_dir = tmp_path / "cifar10" / "cnn_base"
    last = torch.load(run_dir / "last.pt", weights_only=True)
    last["best"] = {"epoch": 1, "val_acc": 1.5}
    torch.save(last, run_dir / "last.pt")
    best_before = (run_dir / "best.pt").read_bytes()

    assert train.main("cifar10", [*args[:2], "--epochs", "3", *args[4:], "--resume"]) == 0
    assert (run_dir / "best.pt").read_bytes() == best_before
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["best_epoch"], summary["best_val_acc"]) == (1, 1.5)


def stop_after_epoch(monkeypatch, last_epoch: int) -> None:
    """Ctrl-C as soon as epoch `last_epoch` is recorded (its files are then written before the run ends)."""
    real_record_epoch = train.record_epoch

    def record_epoch(run, training, progress, output, metrics):
        real_record_epoch(run, training, progress, output, metrics)
        if metrics.epoch == last_epoch:
            raise KeyboardInterrupt
    monkeypatch.setattr(train, "record_epoch", record_epoch)


def test_resume_takes_the_recipe_and_schedule_from_last_pt_not_the_defaults(cifar10_dir, tmp_path, monkeypatch):
    typed = ["--lr", "0.02", "--batch-size", "32", "--aug", "none", "--momentum", "0.5", "--weight-decay", "0",
             "--warmup-epochs", "0.5", "--label-smoothing", "0.1", "--seed", "3"]
    straight = tiny_args(cifar10_dir, tmp_path / "straight", "--deterministic", *typed, epochs=3)
    assert train.main("cifar10", straight) == 0
    with monkeypatch.context() as patch:
        stop_after_epoch(patch, 1)
        broken = tiny_args(cifar10_dir, tmp_path / "broken", "--deterministic", *typed, epochs=3)
        assert train.main("cifar10", broken) == 130
    run_dir = tmp_path / "broken" / "cifar10" / "cnn_base"
    assert len(read_metrics(run_dir)) == 1
    resumed = ["--resume", "--no-progress", "--deterministic", "--data-dir", str(cifar10_dir),
               "--results-dir", str(tmp_path / "broken")]
    assert train.main("cifar10", resumed) == 0
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["lr"], config["batch_size"], config["aug"], config["seed"]) == (0.02, 32, "none", 3)
    assert without_time(read_metrics(run_dir)) == without_time(read_metrics(tmp_path / "straight" / "cifar10"
                                                                              / "cnn_base"))


# ---------------------------------------------------------------------------------------------------
# The schedule, as the optimizer sees it step by step


def learning_rates(recipe: flags.Recipe, steps_per_epoch: int) -> list[float]:
    training = training_of(recipe, steps_per_epoch)
    rates = []
    for _ in range(recipe.epochs * steps_per_epoch):
        rates.append(training.optimization.optimizer.param_groups[0]["lr"])
        training.optimization.optimizer.step()
        training.optimization.scheduler.step()
    return rates


def test_the_schedule_warms_up_per_step_then_decays_by_cosine_to_zero():
    rates = learning_rates(flags.Recipe(model="cnn_base", epochs=4, lr=0.1, warmup_epochs=1), steps_per_epoch=10)
    assert rates[:10] == pytest.approx([0.01 * (step + 1) for step in range(10)])  # warmup: 1/10 ... 10/10
    after = rates[10:]
    assert after == pytest.approx([0.05 * (1 + math.cos(math.pi * step / 30)) for step in range(30)])
    assert after[0] == pytest.approx(0.1) and after[15] == pytest.approx(0.05)
    assert 0 < after[-1] < 0.001


@pytest.mark.parametrize("momentum, nesterov", [(0.9, True), (0.9, False), (0.0, True)])
def test_the_optimizer_is_sgd_with_the_recipes_momentum_nesterov_and_weight_decay(momentum, nesterov):
    """Nesterov as the recipe asks, where there is momentum (torch refuses it without)."""
    recipe = flags.Recipe(model="cnn_base", lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=3e-4)
    optimizer = make_optimization(torch.nn.Linear(2, 2), recipe, 10, torch.device("cpu"), None).optimizer
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, torch.optim.SGD)
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (momentum, nesterov and momentum > 0,
                                                                             3e-4)


def test_no_warmup_starts_at_the_peak_and_warmup_longer_than_the_run_never_decays():
    assert learning_rates(flags.Recipe(model="cnn_base", epochs=2, lr=0.1, warmup_epochs=0), 5)[0] == 0.1
    rates = learning_rates(flags.Recipe(model="cnn_base", epochs=2, lr=0.1, warmup_epochs=5), 5)
    assert rates == pytest.approx([0.01 * (step + 1) for step in range(10)])


def test_default_learning_rates_per_model():
    assert flags.with_default_lr(flags.Recipe(model="cnn_base")).lr == MODELS["cnn_base"].lr
    assert flags.with_default_lr(flags.Recipe(model="cnn_resnet18")).lr == DEFAULT_LR == 0.1
    assert MODELS["cnn_base"].lr == 0.05 and flags.with_default_lr(flags.Recipe(model="cnn_base", lr=0.3)).lr == 0.3
