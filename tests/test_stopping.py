"""Stopping a run and starting it again (training/stopping.py): SIGUSR1 stops after the epoch with exit 75 (under
torchrun too), and --auto-resume starts, resumes or reports a run, whichever its folder calls for. Real
processes on the CPU. (SIGTERM, which stops a run now with exit 143, and --auto-resume on a folder in use,
exit 73, are checked on one running process in test_faults.py.)"""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import assert_one_line_error, read_metrics, snapshot, tiny_args

import train
from conftest import REPO_ROOT, STARTED, without_time
from core.errors import STOPPED_EXIT

pytestmark = pytest.mark.usefixtures("keep_global_torch_settings")  # --deterministic runs in this process


def start(args: list[str]) -> subprocess.Popen:
    STARTED.append(subprocess.Popen([sys.executable, "main_cifar10.py", *args], cwd=REPO_ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return STARTED[-1]


def wait_for_epochs(run_dir: Path, count: int, process: subprocess.Popen) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if (run_dir / "metrics.csv").exists() and len(read_metrics(run_dir)) >= count:
            return
        time.sleep(0.02)
    raise AssertionError("the run did not reach the epoch")


def test_sigusr1_finishes_the_epoch_exits_75_and_auto_resume_continues_exactly(cifar10_dir, tmp_path, capsys):
    args = tiny_args(cifar10_dir, tmp_path / "broken", "--deterministic", "--auto-resume", epochs=4, subset=1024)
    assert train.main("cifar10", tiny_args(cifar10_dir, tmp_path / "whole", "--deterministic", epochs=4,
                                           subset=1024)) == 0  # the unbroken run, in this process
    run_dir = tmp_path / "broken" / "cifar10" / "cnn_base"
    first = start(args)
    wait_for_epochs(run_dir, 1, first)
    first.send_signal(signal.SIGUSR1)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == STOPPED_EXIT, stderr
    saved = torch.load(run_dir / "last.pt", weights_only=True)["epoch"]
    assert 1 <= saved < 4 and len(read_metrics(run_dir)) == saved
    assert stderr.strip().splitlines() == [
        f"Stopped for now: {saved} epoch{'s' if saved != 1 else ''} saved in {run_dir}; run the same command again"]

    capsys.readouterr()
    assert train.main("cifar10", args) == 0  # the same command (in this process): resumes
    assert f"Resuming {run_dir} at epoch {saved + 1}/4" in capsys.readouterr().out
    assert without_time(read_metrics(run_dir)) == without_time(
        read_metrics(tmp_path / "whole" / "cifar10" / "cnn_base"))

    before = snapshot(run_dir)  # and once more: finished, says so, touches nothing
    capsys.readouterr()
    assert train.main("cifar10", args) == 0 and "already finished its 4 epochs" in capsys.readouterr().out
    assert snapshot(run_dir) == before


def test_auto_resume_refuses_a_changed_recipe_and_contradicting_flags(cifar10_dir, tmp_path, capsys):
    args = tiny_args(cifar10_dir, tmp_path, "--auto-resume", epochs=1)
    assert train.main("cifar10", args) == 0  # no run yet: starts it
    assert train.main("cifar10", [*args, "--lr", "0.2"]) == 2
    assert_one_line_error(capsys.readouterr().err, "--lr")
    for flag in ("--resume", "--overwrite"):
        assert train.main("cifar10", [*args, flag]) == 2
        assert_one_line_error(capsys.readouterr().err, "--auto-resume", flag)


def test_under_torchrun_sigusr1_to_one_rank_stops_every_rank_after_the_same_epoch(cifar10_dir, tmp_path):
    args = tiny_args(cifar10_dir, tmp_path, "--device", "cpu", epochs=50, subset=1024)
    torchrun = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "main_cifar10.py",
         *args], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    STARTED.append(torchrun)
    run_dir = tmp_path / "cifar10" / "cnn_base"
    wait_for_epochs(run_dir, 1, torchrun)
    ranks = [int(pid) for task in Path(f"/proc/{torchrun.pid}/task").iterdir()
             for pid in (task / "children").read_text().split()]
    assert len(ranks) == 2
    os.kill(max(ranks), signal.SIGUSR1)  # one rank only
    _, stderr = torchrun.communicate(timeout=120)
    saved = torch.load(run_dir / "last.pt", weights_only=True)["epoch"]
    assert saved < 50 and len(read_metrics(run_dir)) == saved
    assert f"Stopped for now: {saved} epoch" in stderr
    # torchrun reports the first rank to end as the root cause: stopped for now (75), not one that failed
    # waiting for the other; the other ended with 75 too, or by torchrun's SIGTERM as it tore the group down
    root = re.search(r"Root Cause.*?exitcode\s*:\s*(-?\d+)", stderr, re.DOTALL)
    assert root and root.group(1) == str(STOPPED_EXIT), stderr[-2000:]
    assert set(re.findall(r"exitcode\s*:\s*(-?\d+)", stderr)) <= {str(STOPPED_EXIT), "-15"}, stderr[-2000:]
    assert "terminate called" not in stderr
