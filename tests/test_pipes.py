"""A closed pipe is not an error: every command's output can be piped into `head` and the command ends as it would
have, quietly (no BrokenPipeError traceback, no "Exception ignored"), with its own exit code: 0 for a listing, 2
for a bad flag. A training run or a sweep whose reader has gone goes on to its end, its lines still in its logs.

Each command runs with its stdout a pipe whose reader is already gone: what `command | head -1` meets once head
has its line, made certain instead of a matter of timing (a reader that reads a line first may get the whole
output before the command's first write fails, and the test would pass against the bug). stdout is
block-buffered, as it is for a user (without PYTHONUNBUFFERED): a listing's lines then fail only in the
interpreter's final flush, a flushed line (the sweep's plan, a run's epoch lines) in the command itself.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_sweep import run_flags

from conftest import REPO_ROOT, message_lines

ENV = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}


def into_closed_pipe(*command: str, stderr_too: bool = False) -> subprocess.CompletedProcess:
    """command run with its stdout (and stderr, when stderr_too) a pipe nobody reads any more; stderr captured
    otherwise."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        return subprocess.run([sys.executable, *command], cwd=REPO_ROOT, stdout=writer,
                              stderr=writer if stderr_too else subprocess.PIPE, text=True, env=ENV, timeout=600)
    finally:
        os.close(writer)


def assert_quiet(completed: subprocess.CompletedProcess, code: int = 0) -> None:
    assert message_lines(completed.stderr) == [], completed.stderr
    assert completed.returncode == code, completed.stderr


@pytest.mark.parametrize("command", [
    ["main_cifar10.py", "--list-models"],
    ["main_cifar100.py", "--list-models", "resnet"],
    ["main_cifar10.py", "--summary"],
    ["plot.py", "--help"],
], ids=lambda command: " ".join(command))
def test_a_listing_into_a_closed_pipe_ends_quietly_with_exit_0(command):
    assert_quiet(into_closed_pipe(*command))


def test_a_sweeps_plan_into_a_closed_pipe_ends_quietly_with_exit_0(tmp_path):
    assert_quiet(into_closed_pipe("sweep.py", "--name", "lab", "--models", "course", "--seeds", "0", "1",
                                  "--dry-run", "--", "--results-dir", str(tmp_path)))
    assert not tmp_path.joinpath("sweeps").exists()  # --dry-run writes nothing, closed pipe or not


def test_an_error_into_a_closed_pipe_keeps_its_exit_code():
    """`sweep.py ... 2>&1 | head -1`: the error line cannot be shown, the exit code still says what it was."""
    completed = into_closed_pipe("sweep.py", "--name", "lab", "--models", "cnn_nope", "--dry-run", stderr_too=True)
    assert completed.returncode == 2


def test_a_training_run_whose_reader_has_gone_trains_to_its_end(cifar10_dir, tmp_path):
    """`main_cifar10.py ... | tee out.txt`, tee gone: the run does not lose its epoch; it trains to its end, its
    lines in log.txt."""
    completed = into_closed_pipe("main_cifar10.py", "--model", "cnn_base", "--no-progress",
                                 *run_flags(cifar10_dir, tmp_path, epochs=2, subset=300))
    assert_quiet(completed)
    run_dir = tmp_path / "cifar10" / "cnn_base"
    assert (run_dir / "summary.json").is_file()
    log = (run_dir / "log.txt").read_text()
    assert "Epoch 1/2" in log and "Epoch 2/2" in log and "Model Saved" in log


@pytest.fixture(scope="module")
def sweep_into_closed_pipe(cifar10_dir, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """A sweep of one run on the CPU, its stdout a pipe nobody reads, and its results folder."""
    results = tmp_path_factory.mktemp("piped")
    completed = into_closed_pipe("sweep.py", "--name", "piped", "--workers", "1", "--",
                                 *run_flags(cifar10_dir, results, epochs=1, subset=300))
    return completed, results


def test_a_sweep_whose_reader_has_gone_runs_its_runs(sweep_into_closed_pipe):
    completed, results = sweep_into_closed_pipe
    assert_quiet(completed)
    assert (results / "cifar10" / "cnn_base-s0" / "summary.json").is_file()
    assert json.loads((results / "sweeps" / "piped" / "records" / "0.json").read_text())["exit"] == 0
    assert (results / "cifar10" / "summary.md").is_file()  # plot.py's summary at the end


def test_a_sweeps_status_into_a_closed_pipe_ends_quietly_with_exit_0(sweep_into_closed_pipe):
    _, results = sweep_into_closed_pipe
    assert_quiet(into_closed_pipe("sweep.py", "--status", "piped", "--", "--results-dir", str(results)))


def test_plot_into_a_closed_pipe_ends_quietly_with_exit_0(sweep_into_closed_pipe):
    _, results = sweep_into_closed_pipe
    (results / "cifar10" / "summary.md").unlink()
    assert_quiet(into_closed_pipe("plot.py", str(results / "cifar10")))
    assert (results / "cifar10" / "summary.md").is_file()  # written again: the work is done, its line dropped
