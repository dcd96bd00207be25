"""Faults while a run writes its folder: a second process on the same folder, a full disk at each write, a
kill in the middle of saving a checkpoint. Nothing is lost: every file left is complete, the one-line error
says what is kept and how to go on, and going on gives the numbers of a run that never broke."""
import errno
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_train import assert_one_line_error, read_metrics, tiny_args

import plot
import train
from conftest import REPO_ROOT, STARTED, descendants, without_time
from core.errors import IN_USE_EXIT, TERMINATED_EXIT, FolderInUse, UsageError
from runfolder import declarations, lock, store

NO_SPACE = "No space left on device"
pytestmark = pytest.mark.usefixtures("keep_global_torch_settings")


def fault_args(data_dir, results_dir, *extra) -> list[str]:
    """Two epochs of four steps, bit-identical across runs, resumes and processes."""
    return tiny_args(data_dir, results_dir, "--deterministic", "--device", "cpu", *extra)


def as_read(history: list[dict]) -> list[dict]:
    """last.pt's history as read back from metrics.csv: every value a string."""
    return [{key: str(value) for key, value in row.items()} for row in history]


def temp_files(run_dir: Path) -> list[str]:
    return sorted(path.name for path in run_dir.iterdir() if declarations.TEMP_MARK in path.name)


def wait_until(condition, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, f"the process ended (exit {process.returncode}) before it got there"
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(cifar10_dir, tmp_path_factory) -> Path:
    """The unbroken run every broken-then-continued run must match."""
    results = tmp_path_factory.mktemp("reference")
    assert train.main("cifar10", fault_args(cifar10_dir, results)) == 0
    return results / "cifar10" / "cnn_base"


def summary_without_time(run_dir: Path) -> dict:
    summary = json.loads((run_dir / declarations.SUMMARY_FILE).read_text())
    return {key: value for key, value in summary.items() if "seconds" not in key}


# ---------------------------------------------------------------------------------------------------
# One process per folder


def test_a_folder_in_use_refuses_runs_and_eval_but_not_plot_then_sigterm_stops_its_run_now(cifar10_dir, tmp_path,
                                                                                          capsys):
    args = tiny_args(cifar10_dir, tmp_path, epochs=1000)  # stopped once checked
    run_dir = tmp_path / "cifar10" / "cnn_base"
    with open(tmp_path / "first.err", "w") as first_err:  # on one core, leaving the others to the checks
        first = subprocess.Popen([sys.executable, "main_cifar10.py", *args], cwd=REPO_ROOT,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"},
                                 stdout=subprocess.DEVNULL, stderr=first_err)
    STARTED.append(first)
    log = run_dir / declarations.LOG_FILE
    wait_until(lambda: log.exists() and "Epoch 1/1000" in log.read_text(), first)
    names_before = {path.name for path in run_dir.iterdir()}

    # The same command, under --auto-resume (its own exit code, which a sweep reads), --eval-only and plot.py
    # while the first trains, in this process (the lock is the other one's: a lock is held by a process,
    # whichever process asks).
    capsys.readouterr()
    assert train.main("cifar10", args) == 2
    assert_one_line_error(capsys.readouterr().err, "in use", f"process {first.pid} on", "--tag", "--results-dir")
    assert train.main("cifar10", [*args, "--auto-resume"]) == IN_USE_EXIT
    assert_one_line_error(capsys.readouterr().err, "in use", f"process {first.pid} on")
    assert train.main("cifar10", ["--eval-only", "--data-dir", str(cifar10_dir),
                                  "--results-dir", str(tmp_path)]) == 2
    assert_one_line_error(capsys.readouterr().err, "in use", f"process {first.pid} on")
    assert plot.main([str(run_dir)]) == 0
    assert first.poll() is None, "the first run ended before the checks were done: they prove nothing"
    # New since: the curves.png plot.py drew here (the run draws its first a while after it starts), and the
    # temporary files of the first run's writes, its drawing process's among them.
    names = {path.name for path in run_dir.iterdir()} - {declarations.CURVES_FILE}
    writers = [first.pid, *descendants(first.pid)]
    assert all(any(f".{pid}{declarations.TEMP_MARK}" in name for pid in writers) for name in names - names_before)
    assert declarations.EVAL_FILE not in names and declarations.CONFUSION_FILE not in names
    assert (run_dir / declarations.LOCK_FILE).read_text().startswith(f"process {first.pid} on ")

    # SIGTERM (what a scheduler sends) stops the run now, like Ctrl-C, keeping what was saved. (A SIGKILL,
    # which gives a process no chance to unlock, is in the checkpoint tests below and in test_train.py.)
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=60)
    stderr = (tmp_path / "first.err").read_text()
    assert first.returncode == TERMINATED_EXIT, stderr
    last = torch.load(run_dir / declarations.LAST_CHECKPOINT, weights_only=True)
    saved = last["epoch"]
    assert stderr.strip().splitlines() == [
        f"Terminated: {saved} epoch{'s' if saved != 1 else ''} saved in {run_dir}; continue with the same "
        "command and --resume"]
    # Whatever the signal interrupted: metrics.csv at most an epoch behind last.pt (--resume rewrites it from
    # last.pt), best.pt (saved before last.pt) at most an epoch ahead.
    rows = read_metrics(run_dir)
    assert len(rows) in (saved - 1, saved) and rows == as_read(last["history"][:len(rows)])
    assert torch.load(run_dir / declarations.BEST_CHECKPOINT, weights_only=True)["epoch"] <= saved + 1
    lock.refuse_if_in_use(run_dir)  # the lock went with the process


# Both processes import everything, say they are ready, then wait for one file to appear, so that their
# checks (no run in the folder, no lock held) pass in both before either takes the lock.
AT_ONCE = """
import os
import sys
import time
import train
ready, go = sys.argv[1], sys.argv[2]
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.001)
sys.exit(train.main("cifar10", sys.argv[3:]))
"""


def test_two_runs_started_at_once_on_one_folder_train_once(cifar10_dir, tmp_path):
    args = fault_args(cifar10_dir, tmp_path)
    go = tmp_path / "go"
    processes = [subprocess.Popen([sys.executable, "-c", AT_ONCE, str(tmp_path / f"ready{index}"), str(go), *args],
                                  cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for index in range(2)]
    try:
        for index, process in enumerate(processes):
            wait_until((tmp_path / f"ready{index}").exists, process)
        go.touch()
        outputs = [process.communicate(timeout=240) for process in processes]
    finally:
        for process in processes:
            process.kill()
    codes = sorted(process.returncode for process in processes)
    assert codes == [0, 2], outputs
    loser = [err for process, (_, err) in zip(processes, outputs) if process.returncode == 2][0]
    assert_one_line_error(loser)
    assert "in use" in loser or "changed" in loser or "--resume" in loser, loser
    run_dir = tmp_path / "cifar10" / "cnn_base"
    assert [row["epoch"] for row in read_metrics(run_dir)] == ["1", "2"]
    assert (run_dir / declarations.LOG_FILE).read_text().count("Epoch 1/2") == 1
    assert temp_files(run_dir) == []


# ---------------------------------------------------------------------------------------------------
# A full disk at each write


class FullDisk:
    """A file on a disk with `room` bytes left: the write that passes it writes what fits, then fails."""

    def __init__(self, file, room: int) -> None:
        self.file, self.room = file, room

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if size > self.room:
            self.file.write(memoryview(data).cast("B")[:self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, NO_SPACE)
        self.room -= size
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)


def fill_disk_at(monkeypatch, name: str, occurrence: int = 1, room: int = 64) -> None:
    """Make the occurrence-th write of the run file `name` hit a full disk, through the real
    store.write_atomically or store.append_line (log.txt's lines after its first), which must clean up after it."""
    real_write_atomically, real_append_line, real_os_write = store.write_atomically, store.append_line, os.write
    seen = []

    def write_atomically(path, write):
        if Path(path).name == name:
            seen.append(path)
            if len(seen) == occurrence:
                return real_write_atomically(path, lambda out: write(FullDisk(out, room)))
        return real_write_atomically(path, write)

    def append_line(path, line):
        if Path(path).name == name:
            seen.append(path)
            if len(seen) == occurrence:
                left = [room]

                def write(handle, data):  # FullDisk's, for os.write
                    if len(data) > left[0]:
                        real_os_write(handle, bytes(data[:left[0]]))
                        left[0] = 0
                        raise OSError(errno.ENOSPC, NO_SPACE)
                    left[0] -= len(data)
                    return real_os_write(handle, data)
                with monkeypatch.context() as patch:
                    patch.setattr(store.os, "write", write)
                    return real_append_line(path, line)
        return real_append_line(path, line)
    monkeypatch.setattr(store, "write_atomically", write_atomically)
    monkeypatch.setattr(store, "append_line", append_line)


def assert_every_file_is_whole(run_dir: Path) -> None:
    assert temp_files(run_dir) == []
    names = {path.name for path in run_dir.iterdir()}
    for name in {declarations.CONFIG_FILE, declarations.SUMMARY_FILE} & names:
        assert isinstance(json.loads((run_dir / name).read_text()), dict)
    if declarations.LOG_FILE in names:
        (run_dir / declarations.LOG_FILE).read_text(encoding="utf-8")
    if declarations.CURVES_FILE in names:
        Image.open(run_dir / declarations.CURVES_FILE).verify()
    if declarations.BEST_CHECKPOINT in names:
        assert torch.load(run_dir / declarations.BEST_CHECKPOINT, weights_only=True)["model_name"] == "cnn_base"
    if declarations.LAST_CHECKPOINT in names:
        last = torch.load(run_dir / declarations.LAST_CHECKPOINT, weights_only=True)
        if declarations.METRICS_FILE in names:
            declarations.read_metrics(run_dir / declarations.METRICS_FILE)  # parses, every column a number
            assert read_metrics(run_dir) == as_read(last["history"])
    else:
        assert declarations.METRICS_FILE not in names


@pytest.mark.parametrize("name, occurrence, saved_epochs", [
    ("config.json", 1, 0),
    ("log.txt", 1, 0),
    ("best.pt", 1, 0),
    ("last.pt", 1, 0),
    ("metrics.csv", 1, 1),
    ("summary.json", 1, 2),
    ("last.pt", 2, 1),
    ("log.txt", 3, 1),  # appended: epoch 1's line
    # At the end, after summary.json: --resume finishes the run again. While the run trains, curves.png is drawn
    # in a process of its own, which test_host_work.py fails.
    ("curves.png", 1, 2),
    # best.pt's test report, before summary.json: the run is not finished, and --resume finishes it.
    ("eval.json", 1, 2),
    ("mistakes.png", 1, 2),
], ids=["config", "log", "best", "last", "metrics", "summary", "last-epoch-2", "log-appended", "curves-at-end",
        "eval-at-end", "mistakes-at-end"])
def test_a_full_disk_at_any_write_keeps_the_run_and_the_same_command_finishes_it(
        reference, cifar10_dir, tmp_path, monkeypatch, capsys, name, occurrence, saved_epochs):
    capsys.readouterr()
    args = fault_args(cifar10_dir, tmp_path)
    run_dir = tmp_path / "cifar10" / "cnn_base"
    with monkeypatch.context() as patch:
        fill_disk_at(patch, name, occurrence)
        assert train.main("cifar10", args) == 1
    err = capsys.readouterr().err
    assert_one_line_error(err, f"error: cannot write {run_dir / name} ({NO_SPACE}); ")
    assert_every_file_is_whole(run_dir)
    last = run_dir / declarations.LAST_CHECKPOINT
    assert (torch.load(last, weights_only=True)["epoch"] if last.exists() else 0) == saved_epochs
    if saved_epochs:
        assert f"last.pt holds epoch {saved_epochs}; free space, then continue with the same command " \
               "and --resume" in err
        again = [*args, "--resume"]
    else:
        assert "no epoch was saved; free space, then run the same command again" in err
        again = args

    assert train.main("cifar10", again) == 0
    assert without_time(read_metrics(run_dir)) == without_time(read_metrics(reference))
    assert summary_without_time(run_dir) == summary_without_time(reference)
    assert (run_dir / declarations.LOG_FILE).read_text().endswith("Model Saved\n")
    assert temp_files(run_dir) == []


def test_a_write_the_kernel_refuses_is_one_line_exit_1(cifar10_dir, tmp_path):
    """No simulation: a real process whose files may not grow past 64 kB (EFBIG from the kernel, as
    ENOSPC from a full disk) fails at its first checkpoint and says so in one line."""
    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, 64_000))
    completed = subprocess.run([sys.executable, "main_cifar10.py", *fault_args(cifar10_dir, tmp_path)],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                               env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
                               preexec_fn=limit_file_size)
    run_dir = tmp_path / "cifar10" / "cnn_base"
    assert completed.returncode == 1, completed.stderr
    assert_one_line_error(completed.stderr, f"error: cannot write {run_dir / declarations.BEST_CHECKPOINT} "
                          f"({os.strerror(errno.EFBIG)}); no epoch was saved")
    assert_every_file_is_whole(run_dir)


def test_a_lock_file_that_cannot_be_written_still_locks(tmp_path):
    """The holder's name cannot be written on a full disk; the lock holds all the same."""
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    (tmp_path / declarations.LOCK_FILE).symlink_to("/dev/full")
    held = lock.lock_run_folder(tmp_path)
    with pytest.raises(UsageError, match="in use by another process"):
        lock.refuse_if_in_use(tmp_path)
    held.close()
    lock.refuse_if_in_use(tmp_path)


def test_a_lock_names_its_holder_alone_and_both_ways_of_meeting_it_refuse_with_that_line(tmp_path):
    """Each new holder rewrites the holder's line (a refused process names the live holder, not an earlier one);
    checking for the lock and taking it both refuse with the whole line and the exit code they were given."""
    lock.lock_run_folder(tmp_path).close()
    held = lock.lock_run_folder(tmp_path)  # the folder locked again, by a resume, say
    holder = f"process {os.getpid()} on {socket.gethostname()}"
    assert (tmp_path / declarations.LOCK_FILE).read_text() == holder + "\n"
    for attempt in (lock.refuse_if_in_use, lock.lock_run_folder):
        with pytest.raises(FolderInUse) as refused:
            attempt(tmp_path, IN_USE_EXIT)
        assert str(refused.value) == (f"{tmp_path} is in use by {holder}; wait for it to finish, or pass another "
                                      "--tag or --results-dir")
        assert refused.value.exit_code == IN_USE_EXIT
    held.close()


def test_a_run_folder_that_cannot_be_made_or_locked_says_why(tmp_path, monkeypatch, capsys):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UsageError) as refused:
        lock.lock_run_folder(tmp_path / "a-file" / "run")
    assert str(refused.value) == (f"cannot create {tmp_path / 'a-file' / 'run'} ({os.strerror(errno.ENOTDIR)}); "
                                  "pick another --results-dir")

    def no_locks(handle, operation):  # a file system without locks, as some network ones are
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(lock.fcntl, "flock", no_locks)
    capsys.readouterr()
    lock.lock_run_folder(tmp_path / "run").close()  # runs all the same, and says so
    assert capsys.readouterr().err == (f"warning: cannot lock {tmp_path / 'run' / declarations.LOCK_FILE} "
                                       f"({os.strerror(errno.ENOLCK)}); make sure no other process uses "
                                       f"{tmp_path / 'run'}\n")


def test_the_holder_named_by_a_refusal_is_read_from_any_lock_file_without_failing(tmp_path):
    """The line a refused run prints names the lock's holder as it wrote itself; a lock file gone by the time it
    is read, or holding bytes that are not UTF-8 (written by something else), still gives that line."""
    lock_path = tmp_path / declarations.LOCK_FILE
    assert lock._holder(lock_path) == "another process"  # gone
    lock_path.write_bytes(b"process 12 on \xffhost\nmore")
    assert lock._holder(lock_path) == "process 12 on \ufffdhost"
    lock_path.write_bytes(b"x" * 1000)  # no end of line: its first 200 bytes, not a line as long as the file
    assert lock._holder(lock_path) == "x" * 200


def test_a_run_file_that_cannot_be_removed_is_one_line_naming_it(tmp_path):
    blocker = tmp_path / declarations.SUMMARY_FILE
    blocker.mkdir()  # unlink(2) of a folder fails (EISDIR on Linux), also for root
    with pytest.raises(store.WriteFailed) as failed:
        store.remove_file(blocker)
    assert str(failed.value) == f"cannot write {blocker} ({os.strerror(errno.EISDIR)})"
    store.remove_file(tmp_path / "absent.json")  # nothing there: nothing to do


def test_a_run_file_that_cannot_be_written_is_one_line_naming_it(tmp_path):
    """Under a file where its folder should be; and an OSError without a message (as some libraries raise) is
    named by its class."""
    (tmp_path / "a-file").write_text("")
    with pytest.raises(store.WriteFailed) as failed:
        store.write_text(tmp_path / "a-file" / "summary.json", "{}")
    assert str(failed.value) == f"cannot write {tmp_path / 'a-file' / 'summary.json'} ({os.strerror(errno.ENOTDIR)})"
    assert str(store.WriteFailed(tmp_path / "summary.json", BlockingIOError())) == (
        f"cannot write {tmp_path / 'summary.json'} (BlockingIOError)")


def test_a_folder_changed_between_the_checks_and_the_lock_is_refused(tmp_path):
    """What a second process saves between a run's checks of its folder and its taking the lock is seen."""
    (tmp_path / declarations.METRICS_FILE).write_text("epoch\n1\n")
    checked = store.folder_state(tmp_path)
    store.check_unchanged(tmp_path, checked)  # nothing changed: the run goes on
    (tmp_path / declarations.METRICS_FILE).write_text("epoch\n1\n2\n")  # another process saved an epoch
    with pytest.raises(UsageError) as refused:
        store.check_unchanged(tmp_path, checked)
    assert str(refused.value) == (f"{tmp_path} changed while this run was starting (another process wrote to "
                                  "it); run the command again")


def test_a_full_disk_during_eval_only_is_one_line_exit_1(reference, tmp_path, cifar10_dir, monkeypatch,
                                                         capsys):
    name = declarations.EVAL_FILE
    run_dir = tmp_path / "cifar10" / "cnn_base"
    shutil.copytree(reference, run_dir)
    best = (run_dir / declarations.BEST_CHECKPOINT).read_bytes()
    report = (run_dir / name).read_bytes()  # the end of the run's test report, which --eval-only would replace
    capsys.readouterr()
    fill_disk_at(monkeypatch, name)
    assert train.main("cifar10", ["--eval-only", "--data-dir", str(cifar10_dir), "--results-dir",
                                  str(tmp_path)]) == 1
    assert_one_line_error(capsys.readouterr().err, f"error: cannot write {run_dir / name} ({NO_SPACE})",
                          "untouched", "evaluate again")
    assert (run_dir / name).read_bytes() == report
    assert (run_dir / declarations.BEST_CHECKPOINT).read_bytes() == best
    assert_every_file_is_whole(run_dir)
    lock.refuse_if_in_use(run_dir)  # the lock is let go after a failure


# ---------------------------------------------------------------------------------------------------
# SIGKILL in the middle of saving a checkpoint; the lock it held is not stale


# Runs training with the target file's occurrence-th write stopped halfway: half its bytes in the
# temporary file, a marker file made, then a wait for the SIGKILL.
KILL_IN_SAVE = """
import io
import os
import sys
import time
from runfolder import store
import train

target, occurrence, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3]
real_write_atomically = store.write_atomically
saves = 0

def write_atomically(path, write):
    global saves
    if os.path.basename(path) == target:
        saves += 1
        if saves == occurrence:
            def write_half_then_hang(out):
                whole = io.BytesIO()
                write(whole)
                out.write(whole.getvalue()[:len(whole.getvalue()) // 2])
                out.flush()
                open(marker, "w").close()
                time.sleep(600)
            return real_write_atomically(path, write_half_then_hang)
    return real_write_atomically(path, write)

store.write_atomically = write_atomically
sys.exit(train.main("cifar10", sys.argv[4:]))
"""


def test_a_kill_while_saving_a_checkpoint_loses_nothing_and_resume_takes_over_its_lock(
        reference, cifar10_dir, tmp_path, capsys):
    rows = read_metrics(reference)
    assert float(rows[1]["val_acc"]) > float(rows[0]["val_acc"]), "epoch 2 must save best.pt again"
    # Killed in the save of last.pt, and in that of best.pt: two processes at once, a folder each.
    killed = {}
    for name in (declarations.LAST_CHECKPOINT, declarations.BEST_CHECKPOINT):
        marker = tmp_path / f"inside-{name}"
        STARTED.append(subprocess.Popen(
            [sys.executable, "-c", KILL_IN_SAVE, name, "2", str(marker), *fault_args(cifar10_dir, tmp_path / name)],
            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        killed[name] = STARTED[-1], marker
    for process, marker in killed.values():
        wait_until(marker.exists, process)
    for process, _ in killed.values():
        process.kill()
        process.wait()

    for name, (process, _) in killed.items():
        run_dir = tmp_path / name / "cifar10" / "cnn_base"
        assert temp_files(run_dir) == [f".{Path(name).stem}.{process.pid}{declarations.TEMP_MARK}.pt"]
        assert torch.load(run_dir / declarations.LAST_CHECKPOINT, weights_only=True)["epoch"] == 1
        best_epoch = 1 if name == declarations.BEST_CHECKPOINT else 2  # saved before last.pt
        assert torch.load(run_dir / declarations.BEST_CHECKPOINT, weights_only=True)["epoch"] == best_epoch
        assert (run_dir / declarations.LOCK_FILE).read_text().startswith(f"process {process.pid} on ")

        capsys.readouterr()
        assert train.main("cifar10", [*fault_args(cifar10_dir, tmp_path / name), "--resume"]) == 0
        assert "Resuming" in capsys.readouterr().out
        assert without_time(read_metrics(run_dir)) == without_time(read_metrics(reference))
        assert summary_without_time(run_dir) == summary_without_time(reference)
        assert temp_files(run_dir) == []
