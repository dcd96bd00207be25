"""The training loop as users drive it: main_cifar10.py / main_cifar100.py on tiny runs (CPU)."""
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from conftest import REPO_ROOT, message_lines, without_time, write_pickle
from runfolder import declarations, store
from training import recording

EPOCH_LINE = re.compile(r"^Epoch (\d+)/(\d+), Train Loss: \d+\.\d{4}, Train Accuracy: \d\.\d{4}, "
                        r"Valid Loss: \d+\.\d{4}, Valid Accuracy: \d\.\d{4}, Time: \d+\.\d{2}s$")
# --deterministic in this process (the references of the process tests) is put back for the other modules
pytestmark = pytest.mark.usefixtures("keep_global_torch_settings")

RUN_FILES = ["config.json", "metrics.csv", "log.txt", "curves.png", "last.pt", "best.pt",
             "summary.json"]


def tiny_args(data_dir, results_dir, *extra, model="cnn_base", epochs=2, subset=256):
    return ["--model", model, "--epochs", str(epochs), "--subset", str(subset), "--batch-size", "64",
            "--data-dir", str(data_dir), "--results-dir", str(results_dir), "--no-progress", *extra]


def run_script(args, script="main_cifar10.py", env=None, **kwargs):
    return subprocess.run([sys.executable, script, *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, env=env, timeout=300, **kwargs)


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def snapshot(folder: Path) -> dict:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


def assert_one_line_error(stderr: str, *words: str) -> None:
    lines = message_lines(stderr)
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith("error: ")
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture(scope="module")
def finished_run(cifar10_dir, tmp_path_factory):
    """One finished two-epoch BaseCNN run, shared by the tests that only read it."""
    results = tmp_path_factory.mktemp("results")
    completed = run_script(tiny_args(cifar10_dir, results, "--tag", "t1"))
    assert completed.returncode == 0, completed.stderr
    return results / "cifar10" / "cnn_base-t1", completed.stdout


def test_a_run_writes_every_file_with_the_documented_contents(finished_run):
    run_dir, stdout = finished_run
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), name
    rows = read_metrics(run_dir)
    assert list(rows[0]) == list(declarations.METRIC_COLUMNS)
    assert [int(row["epoch"]) for row in rows] == [1, 2]
    for row in rows:
        for column in ("train_acc", "val_acc", "val_top5"):
            assert 0.0 <= float(row[column]) <= 1.0
        assert float(row["val_top5"]) >= float(row["val_acc"])
        assert float(row["epoch_seconds"]) == pytest.approx(
            float(row["train_seconds"]) + float(row["val_seconds"]), abs=0.002)
        assert float(row["train_seconds"]) > 0 and float(row["val_seconds"]) > 0
    # the wait between epochs is timed from the second epoch on; the first has none in this process
    assert rows[0]["between_seconds"] == "nan" and 0 <= float(rows[1]["between_seconds"]) < 5
    assert float(rows[-1]["lr"]) < float(rows[0]["lr"])  # cosine decay towards zero
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"] == "cnn_base" and config["dataset"] == "cifar10"
    assert config["parameters"] == 62006 and config["flops"] > 0
    assert config["validation"] == "test" and config["seed"] == 0 and config["tag"] == "t1"
    assert config["torch_version"] == torch.__version__
    assert abs(config["mean"][0] - 0.2) < 0.3 and len(config["std"]) == 3
    summary = json.loads((run_dir / "summary.json").read_text())
    best_row = max(rows, key=lambda row: float(row["val_acc"]))
    assert summary["best_epoch"] == int(best_row["epoch"])
    assert summary["best_val_acc"] == pytest.approx(float(best_row["val_acc"]))
    assert summary["final_val_acc"] == pytest.approx(float(rows[-1]["val_acc"]))
    for key in ("test_acc", "test_top5", "test_loss", "final_train_loss", "final_train_acc",
                "final_val_loss", "total_seconds", "seconds_per_epoch", "first_epoch_seconds",
                "steady_epoch_seconds", "steady_between_seconds"):
        assert isinstance(summary[key], float), key
    checkpoint = torch.load(run_dir / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 2 and {"model", "optimizer", "scheduler", "scaler", "rng"} <= set(checkpoint)
    assert torch.load(run_dir / "best.pt", weights_only=True)["model_name"] == "cnn_base"
    assert not [path for path in run_dir.iterdir() if ".tmp" in path.name]


def test_epoch_lines_use_the_course_format(finished_run):
    run_dir, stdout = finished_run
    epoch_lines = [line for line in stdout.splitlines() if line.startswith("Epoch ")]
    assert len(epoch_lines) == 2
    for line in epoch_lines:
        assert EPOCH_LINE.match(line), line
    assert "Training Finished" in stdout and stdout.rstrip().endswith("Model Saved")
    log = (run_dir / "log.txt").read_text()
    assert epoch_lines[0] in log and "Model Saved" in log
    assert "Validation uses the test set" in log


def test_a_held_out_split_is_recorded_and_used(cifar10_dir, tmp_path):
    assert train.main("cifar10", tiny_args(cifar10_dir, tmp_path, "--val-size", "50",
                                           epochs=1)) == 0
    config = json.loads((tmp_path / "cifar10" / "cnn_base" / "config.json").read_text())
    assert config["validation"] == "held-out"
    assert config["val_images"] == 50 and config["train_images"] == 206


def test_resume_after_sigkill_gives_the_same_metrics(cifar10_dir, tmp_path, capsys):
    args = ["--model", "cnn_base", "--epochs", "4", "--subset", "2048", "--batch-size", "16",
            "--data-dir", str(cifar10_dir), "--no-progress", "--deterministic",
            "--device", "cpu"]
    assert train.main("cifar10", [*args, "--results-dir", str(tmp_path / "reference")]) == 0  # in this process

    results = tmp_path / "killed"
    run_dir = results / "cifar10" / "cnn_base"
    process = subprocess.Popen([sys.executable, "main_cifar10.py", *args, "--results-dir",
                                str(results)], cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        # Killed as soon as epoch 2 is saved (metrics.csv is written after last.pt), so in epoch 3, which
        # takes hundreds of steps: the checks after the kill say whether it came there.
        deadline = time.time() + 240
        while not ((run_dir / "metrics.csv").exists() and len(read_metrics(run_dir)) >= 2):
            assert process.poll() is None and time.time() < deadline, "the run ended or stalled before epoch 2"
            time.sleep(0.01)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert len(read_metrics(run_dir)) == 2 and torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 2, \
        "the kill came after epoch 3 was saved, not in it"

    capsys.readouterr()
    assert train.main("cifar10", [*args, "--results-dir", str(results), "--resume"]) == 0  # in this process
    assert f"Resuming {run_dir} at epoch 3/4" in capsys.readouterr().out

    assert without_time(read_metrics(run_dir)) == without_time(
        read_metrics(tmp_path / "reference" / "cifar10" / "cnn_base"))


def test_the_log_prints_each_line_at_once_and_rewrites_log_txt(tmp_path, monkeypatch):
    """Printed with a flush (a sweep's or SLURM's log file gets each epoch's line as it comes, not at exit), and
    log.txt holds every line so far; a rank other than 0 says nothing."""
    flushed = []
    monkeypatch.setattr(sys.stdout, "flush", lambda: flushed.append(True))
    print_and_log = recording.make_print_and_log(True, tmp_path, [])
    print_and_log("a")
    print_and_log("b")
    assert len(flushed) == 2 and (tmp_path / declarations.LOG_FILE).read_text() == "a\nb\n"
    recording.make_print_and_log(False, tmp_path, [])("c")
    assert len(flushed) == 2 and (tmp_path / declarations.LOG_FILE).read_text() == "a\nb\n"


def test_resume_of_a_finished_run_says_so(finished_run, tmp_path):
    run_dir, _ = finished_run
    before = snapshot(run_dir)
    assert train.main("cifar10", ["--model", "cnn_base", "--tag", "t1", "--resume", "--results-dir",
                                  str(run_dir.parent.parent), "--no-progress"]) == 0
    assert snapshot(run_dir) == before


def test_resume_can_raise_epochs(cifar10_dir, tmp_path, capsys):
    assert train.main("cifar10", tiny_args(cifar10_dir, tmp_path, epochs=1)) == 0
    assert train.main("cifar10", tiny_args(cifar10_dir, tmp_path, "--resume", epochs=2)) == 0
    run_dir = tmp_path / "cifar10" / "cnn_base"
    assert [row["epoch"] for row in read_metrics(run_dir)] == ["1", "2"]
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == 2


def test_overwrite_starts_over_and_says_so(cifar10_dir, tmp_path, capsys):
    assert train.main("cifar10", tiny_args(cifar10_dir, tmp_path, epochs=2)) == 0
    assert train.main("cifar10", tiny_args(cifar10_dir, tmp_path, "--overwrite", epochs=1)) == 0
    run_dir = tmp_path / "cifar10" / "cnn_base"
    assert len(read_metrics(run_dir)) == 1
    assert "--overwrite: starting" in (run_dir / "log.txt").read_text()


@pytest.mark.parametrize("extra, words", [
    (["--epochs", "0"], ["--epochs"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--lr", "0"], ["--lr"]),
    (["--lr", "-1"], ["--lr"]),
    (["--val-size", "256"], ["--val-size"]),
    (["--val-size", "-1"], ["--val-size"]),
    (["--subset", "0"], ["--subset"]),
    (["--subset", "60000"], ["--subset"]),
    (["--resume"], ["--resume", "last.pt"]),
    (["--resume", "--overwrite"], ["--resume", "--overwrite"]),
])
def test_bad_flags_end_in_one_line_and_exit_2(cifar10_dir, tmp_path, capsys, extra, words):
    assert train.main("cifar10", tiny_args(cifar10_dir, tmp_path, *extra)) == 2
    assert_one_line_error(capsys.readouterr().err, *words)
    assert not (tmp_path / "cifar10").exists()


def test_a_data_dir_that_is_a_file_is_refused(tmp_path, capsys):
    not_a_folder = tmp_path / "data.txt"
    not_a_folder.write_text("x")
    assert train.main("cifar10", tiny_args(not_a_folder, tmp_path / "results")) == 2
    assert_one_line_error(capsys.readouterr().err, "--data-dir", "file")


def test_a_results_dir_that_cannot_be_written_is_refused(cifar10_dir, tmp_path, capsys):
    blocker = tmp_path / "results"
    blocker.write_text("a file where the results folder should be")
    assert train.main("cifar10", tiny_args(cifar10_dir, blocker)) == 2
    assert_one_line_error(capsys.readouterr().err, "--results-dir")
    assert blocker.read_text() == "a file where the results folder should be"


def test_a_results_dir_without_write_permission_is_refused(cifar10_dir, tmp_path, capsys, monkeypatch):
    # The tests run as root, who may write anywhere: the permission check is made to say no.
    monkeypatch.setattr(store.os, "access", lambda path, mode: Path(path) != tmp_path)
    assert train.main("cifar10", tiny_args(cifar10_dir, tmp_path / "results")) == 2
    assert_one_line_error(capsys.readouterr().err, f"{tmp_path} is not writable", "--results-dir")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_refused(cifar10_dir, tmp_path, capsys):
    assert train.main("cifar10", tiny_args(cifar10_dir, tmp_path, "--device", "cuda")) == 2
    assert_one_line_error(capsys.readouterr().err, "cuda")


def test_an_existing_run_is_never_touched_without_resume_or_overwrite(finished_run, cifar10_dir):
    run_dir, _ = finished_run
    before = snapshot(run_dir)
    completed = run_script(tiny_args(cifar10_dir, run_dir.parent.parent, "--tag", "t1"))
    assert completed.returncode == 2
    assert_one_line_error(completed.stderr, "--resume", "--overwrite")
    assert snapshot(run_dir) == before


def test_resume_refuses_a_changed_recipe_and_foreign_or_corrupt_checkpoints(finished_run, tmp_path,
                                                                            capsys, cifar10_dir):
    run_dir, _ = finished_run
    results = run_dir.parent.parent
    assert train.main("cifar10", ["--tag", "t1", "--resume", "--batch-size", "32", "--epochs", "3",
                                  "--results-dir", str(results), "--data-dir", str(cifar10_dir)]) == 2
    assert_one_line_error(capsys.readouterr().err, "--batch-size")

    foreign = tmp_path / "cifar10" / "cnn_resnet18"
    foreign.mkdir(parents=True)
    (foreign / "last.pt").write_bytes((run_dir / "last.pt").read_bytes())
    assert train.main("cifar10", ["--model", "cnn_resnet18", "--resume", "--epochs", "3",
                                  "--results-dir", str(tmp_path), "--data-dir", str(cifar10_dir)]) == 2
    assert_one_line_error(capsys.readouterr().err, "cnn_base")

    corrupt = tmp_path / "cifar10" / "cnn_base"
    corrupt.mkdir(parents=True)
    (corrupt / "last.pt").write_bytes((run_dir / "last.pt").read_bytes()[:1000])
    assert train.main("cifar10", ["--resume", "--results-dir", str(tmp_path),
                                  "--data-dir", str(cifar10_dir)]) == 2
    assert_one_line_error(capsys.readouterr().err, "last.pt", "is not a readable checkpoint", "--overwrite")
    assert len((corrupt / "last.pt").read_bytes()) == 1000

    torch.save({"epoch": 2}, corrupt / "last.pt")  # a checkpoint, but not one this project wrote
    assert train.main("cifar10", ["--resume", "--results-dir", str(tmp_path),
                                  "--data-dir", str(cifar10_dir)]) == 2
    assert_one_line_error(capsys.readouterr().err, f"{corrupt / 'last.pt'} is not a last.pt of this project",
                          "--overwrite")


def test_a_diverging_loss_stops_with_exit_1(cifar10_dir, tmp_path, capsys):
    assert train.main("cifar10", tiny_args(cifar10_dir, tmp_path, "--lr", "1e8", "--warmup-epochs", "0")) == 1
    assert_one_line_error(capsys.readouterr().err, "NaN", "epoch 1", "step", "--lr")


def torchrun(args):
    """main_cifar10.py under torchrun, two processes; a free port of its own for every call (--standalone:
    rendezvous on localhost:0), never a fixed one that another run may hold."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "main_cifar10.py", *args]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


def test_torchrun_two_processes_write_one_run_with_the_numbers_of_one_process(cifar10_dir, tmp_path):
    """Two processes on half a batch each learn what one process learns on the whole batch (the same images,
    the gradients averaged), up to the order of floating-point sums."""
    args = tiny_args(cifar10_dir, tmp_path / "two", "--device", "cpu", "--deterministic", subset=200)
    completed = torchrun(args)  # gloo on the CPU, so that this runs on a one-GPU machine too
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "terminate called" not in completed.stderr  # a rank aborting at exit
    run_dir = tmp_path / "two" / "cifar10" / "cnn_base"
    assert [path.name for path in run_dir.parent.iterdir()] == ["cnn_base"]
    assert json.loads((run_dir / "config.json").read_text())["world_size"] == 2
    assert completed.stdout.count("Model Saved") == 1

    assert train.main("cifar10", tiny_args(cifar10_dir, tmp_path / "one", "--device", "cpu", "--deterministic",
                                           subset=200)) == 0
    one, two = read_metrics(tmp_path / "one" / "cifar10" / "cnn_base"), read_metrics(run_dir)
    assert [row["epoch"] for row in two] == ["1", "2"]
    for row_one, row_two in zip(one, two, strict=True):
        for column in ("lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5"):
            assert float(row_two[column]) == pytest.approx(float(row_one[column]), rel=1e-4, abs=1e-6), column


def test_torchrun_refuses_a_batch_size_the_processes_cannot_share(cifar10_dir, tmp_path):
    completed = torchrun(tiny_args(cifar10_dir, tmp_path, "--device", "cpu", "--batch-size", "63"))
    assert completed.returncode != 0
    # Every rank refuses with the usage exit code (2), but only rank 0 prints why, and torchrun stops the
    # other rank as soon as one ends: so not rank 0's message but the exit code of the first rank to end,
    # which torchrun reports as the root cause, whichever rank that is.
    root_cause = re.search(r"Root Cause.*?exitcode\s*:\s*(-?\d+)", completed.stderr, re.DOTALL)
    assert root_cause and root_cause.group(1) == "2", completed.stderr[-3000:]
    assert "terminate called" not in completed.stderr
    assert not (tmp_path / "cifar10").exists()


def test_cifar100_runs_with_100_classes(cifar100_dir, tmp_path):
    assert train.main("cifar100", tiny_args(cifar100_dir, tmp_path, epochs=1)) == 0
    config = json.loads((tmp_path / "cifar100" / "cnn_base" / "config.json").read_text())
    assert config["num_classes"] == 100 and config["parameters"] == 69656


def test_ctrl_c_stops_cleanly_and_says_how_to_continue(cifar10_dir, tmp_path):
    args = tiny_args(cifar10_dir, tmp_path, epochs=50, subset=4096)
    process = subprocess.Popen([sys.executable, "main_cifar10.py", *args], cwd=REPO_ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "cifar10" / "cnn_base"
    try:
        deadline = time.time() + 240
        while not (run_dir / "metrics.csv").exists():
            assert process.poll() is None and time.time() < deadline, "the run ended or stalled before epoch 1"
            time.sleep(0.02)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()  # never left running when the test fails or times out
        process.wait()
    assert process.returncode == 130
    assert "Traceback" not in stderr
    saved = torch.load(run_dir / "last.pt", weights_only=True)["epoch"]
    assert saved >= 1
    assert f"Interrupted: {saved} epoch{'s' if saved != 1 else ''} saved in {run_dir}" in stderr
    assert "--resume" in stderr


def test_a_damaged_dataset_ends_in_one_line_and_is_left_alone(tmp_path, capsys):
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    write_pickle(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)]})
    (folder / "data_batch_1").write_bytes(b"\x80\x02}q\x00(X")  # a pickle cut short
    assert train.main("cifar10", tiny_args(tmp_path / "data", tmp_path / "results")) == 2
    assert_one_line_error(capsys.readouterr().err, "data_batch_1")
    assert (folder / "data_batch_1").read_bytes() == b"\x80\x02}q\x00(X"
    assert not (tmp_path / "results").exists()
