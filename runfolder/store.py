"""The run folder, results/<dataset>/<model>[-<tag>]/: how its files are written and read (their shapes are
declared in runfolder/declarations.py), checkpoints, whether a run may start or resume, the folder's lock, the saved
random-number state and the log.

train.py writes run folders and plot.py reads them, both through this module. Every file is written to a
temporary file in the same folder and renamed over the old one, so a crash at any moment leaves the previous
version whole. Importing this module must stay cheap (plot.py uses it without training): torch is imported
only by the functions that save or load checkpoints and random-number state.
"""
from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import random
import socket
import sys
import threading
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np

from core.errors import USAGE_EXIT, FolderInUse, RunFailed, UsageError
from runfolder.declarations import (
    LAST_CHECKPOINT,
    LOCK_FILE,
    LOG_FILE,
    METRICS_FILE,
    TEMP_MARK,
    LastCheckpoint,
    Record,
    RunFileError,
    metrics_csv,
)


class WriteFailed(RunFailed):
    """A run file could not be written (no space left, quota, I/O error, folder gone); the file keeps its
    previous complete version and no temporary file is left. str() is one line naming the file and why."""

    def __init__(self, path: Path, error: OSError | str) -> None:
        self.path = Path(path)
        self.reason = error if isinstance(error, str) else error.strerror or type(error).__name__
        super().__init__(f"cannot write {path} ({self.reason})")


def run_folder(results_dir: str | Path, dataset: str, model: str, tag: str | None) -> Path:
    return Path(results_dir) / dataset / (model if tag is None else f"{model}-{tag}")


# ---------------------------------------------------------------------------------------------------
# Writing: atomically, so a reader (or a crash mid-write) never sees half a file.


def write_atomically(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write a file through a temporary one renamed over it; WriteFailed for any OSError."""
    path = Path(path)
    # Same folder so os.replace is a rename on one filesystem; same suffix so tools that look at the
    # name see what the file is; opened with open() rather than mkstemp so the file gets the usual
    # permissions (mkstemp's are owner-only) and results stay readable by the team.
    temp_path = path.with_name(f".{path.stem}.{os.getpid()}{TEMP_MARK}{path.suffix}")
    try:
        with open(temp_path, "wb") as temp_file:
            write(temp_file)
            temp_file.flush()
            os.fsync(temp_file.fileno())  # on disk before the rename, so a power cut leaves one or the other
        os.replace(temp_path, path)
    except BaseException as err:
        with contextlib.suppress(OSError):  # the folder itself may be gone
            temp_path.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise WriteFailed(path, err) from None
        raise


def remove_file(path: Path) -> None:
    """Delete a run file if it is there; WriteFailed when the folder refuses."""
    try:
        path.unlink(missing_ok=True)
    except OSError as err:
        raise WriteFailed(path, err) from None


def remove_stale_temp_files(run_dir: Path) -> None:
    """Temporary files a killed process left (SIGKILL gives it no chance to clean up); only called by the
    process that holds the folder's lock, so no other process is writing them."""
    for temp_path in run_dir.glob(f".*{TEMP_MARK}*"):
        remove_file(temp_path)


def write_text(path: Path, text: str) -> None:
    write_atomically(path, lambda out: out.write(text.encode("utf-8")))


def append_line(path: Path, line: str) -> None:
    """Add one line to the end of a text file, on disk when this returns; WriteFailed for any OSError (a file
    that is not there among them), the file cut back to its previous end, so that it never ends in part of a
    line."""
    data = memoryview((line + "\n").encode("utf-8"))
    try:
        handle = os.open(path, os.O_WRONLY | os.O_APPEND)
    except OSError as err:
        raise WriteFailed(path, err) from None
    try:
        end = os.fstat(handle).st_size
        while data:
            data = data[os.write(handle, data):]
        os.fsync(handle)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.ftruncate(handle, end)
        if isinstance(err, OSError):
            raise WriteFailed(path, err) from None
        raise
    finally:
        os.close(handle)


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_metrics(path: Path, rows: list[dict]) -> None:
    write_text(path, metrics_csv(rows))


def save_checkpoint(path: Path, state: dict) -> None:
    import torch
    # Serialized in memory first: torch.save streaming into the file turns the OSError of a full disk
    # into a RuntimeError ("unexpected pos"), which would end the run in a traceback, not one line.
    serialized = io.BytesIO()
    torch.save(state, serialized)
    write_atomically(path, lambda out: out.write(serialized.getbuffer()))


# ---------------------------------------------------------------------------------------------------
# Reading


def read_json(path: Path) -> dict | None:
    """A JSON object, or None when the file is absent; a broken file is reported and ignored."""
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        warn(f"ignoring {path}: not valid JSON ({err})")
        return None
    if not isinstance(content, dict):
        warn(f"ignoring {path}: expected a JSON object")
        return None
    return content


def read_record(path: Path, declared: type[Record]) -> Record | None:
    """A declared JSON file (runfolder/declarations.py) of any version, for reports: None when it is absent or not
    a JSON object (reported); a field it lacks reads as None."""
    content = read_json(path)
    return None if content is None else declared.from_dict(content, path, partial=True)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def load_checkpoint(path: Path) -> dict:
    import torch
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file: truncated, not a checkpoint, wrong format
        raise UsageError(f"{path} is not a readable checkpoint ({type(err).__name__}); "
                         "restore it or start over with --overwrite") from None


# ---------------------------------------------------------------------------------------------------
# Starting and resuming


def check_run_folder(run_dir: Path, resume: bool, overwrite: bool) -> LastCheckpoint | None:
    """Decide, writing nothing, whether this run may start; returns last.pt when resuming."""
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"cannot write {run_dir}: {existing} is a file; move it or pick another "
                         "--results-dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {run_dir}: {existing} is not writable; pick another "
                         "--results-dir")
    last = run_dir / LAST_CHECKPOINT
    has_run = last.exists() or (run_dir / METRICS_FILE).exists()
    if has_run and not (resume or overwrite):
        raise UsageError(f"{run_dir} already holds a run: pass --resume to continue it or "
                         "--overwrite to start over (or another --tag)")
    if resume and not last.exists():
        raise UsageError(f"--resume: there is no {last} to continue; drop --resume "
                         "to start this run")
    if not resume:
        return None
    checkpoint = load_checkpoint(last)
    try:
        return LastCheckpoint.from_dict(checkpoint if isinstance(checkpoint, dict) else {}, last)
    except (RunFileError, TypeError):
        raise UsageError(f"{last} is not a last.pt of this project; start over with --overwrite") from None


def what_is_kept(run_dir: Path, saved_epochs: int) -> str:
    """The end of the one line a failed write prints: what the folder still holds and how to go on."""
    if saved_epochs == 0:
        return "no epoch was saved; free space, then run the same command again"
    return (f"{LAST_CHECKPOINT} holds epoch {saved_epochs}; free space, then continue with the same "
            "command and --resume")


def folder_state(run_dir: Path) -> tuple:
    """What check_run_folder looked at: the size and time of last.pt and metrics.csv, or None."""
    state = []
    for name in (LAST_CHECKPOINT, METRICS_FILE):
        try:
            stat = (run_dir / name).stat()
            state.append((stat.st_size, stat.st_mtime_ns))
        except OSError:
            state.append(None)
    return tuple(state)


def check_unchanged(run_dir: Path, checked: tuple) -> None:
    """Refuse when another process changed the run between the checks and taking the lock."""
    if folder_state(run_dir) != checked:
        raise UsageError(f"{run_dir} changed while this run was starting (another process wrote to it); "
                         "run the command again")


# ---------------------------------------------------------------------------------------------------
# One process per folder: an exclusive flock on its lock file, which the OS releases when the process
# ends in any way (so a lock is never stale).


def _holder(lock_path: Path) -> str:
    """The "process <pid> on <host>" line the holder wrote; its first 200 bytes only, whatever the file."""
    with contextlib.suppress(OSError):
        with open(lock_path, "rb") as lock_file:
            holder = lock_file.read(200).decode("utf-8", "replace").split("\n")[0].strip()
        if holder and holder.isprintable():
            return holder
    return "another process"


def _in_use(run_dir: Path, lock_path: Path, exit_code: int) -> FolderInUse:
    return FolderInUse(f"{run_dir} is in use by {_holder(lock_path)}; wait for it to finish, or pass "
                       "another --tag or --results-dir", exit_code)


def refuse_if_in_use(run_dir: Path, exit_code: int = USAGE_EXIT) -> None:
    """Fail at once, writing nothing, if another process holds the folder's lock (FolderInUse, ending the
    command with exit_code)."""
    lock_path = run_dir / LOCK_FILE
    try:
        handle = open(lock_path, "rb")
    except OSError:
        return  # no lock file: nobody has ever locked the folder, or it cannot be read anyway
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(run_dir, lock_path, exit_code) from None
        except OSError:
            return
        fcntl.flock(handle, fcntl.LOCK_UN)


def lock_run_folder(run_dir: Path, exit_code: int = USAGE_EXIT) -> BinaryIO:
    """Create the folder if needed and take its lock for as long as the returned file stays open (until
    the process ends); FolderInUse (ending the command with exit_code) if another process holds it."""
    lock_path = run_dir / LOCK_FILE
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(lock_path, "a+b", buffering=0)  # unbuffered: close() has nothing left to flush
    except OSError as err:
        raise UsageError(f"cannot create {run_dir} ({err.strerror}); pick another "
                         "--results-dir") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise _in_use(run_dir, lock_path, exit_code) from None
    except OSError as err:  # a file system without locks (some network ones): run, but say so
        warn(f"cannot lock {lock_path} ({err.strerror}); make sure no other process uses {run_dir}")
        return handle
    # The holder's name is only what a refused process prints; the flock is the lock. So a full disk
    # here is no reason to stop: the run's next write reports it, saying what is kept.
    with contextlib.suppress(OSError):
        handle.truncate(0)
        handle.write(f"process {os.getpid()} on {socket.gethostname()}\n".encode())
    return handle


# ---------------------------------------------------------------------------------------------------
# Random-number state and the log


def get_rng_state(device=None) -> dict:
    """The global generators' states; of the GPUs, only the training device's (a run may be resumed with
    fewer GPUs visible)."""
    import torch
    _, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    python_version, python_internal, python_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": [numpy_keys.tolist(), numpy_pos, numpy_has_gauss, numpy_gauss],
             "python": [python_version, list(python_internal), python_gauss]}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device=None) -> None:
    # Batches draw from their own (seed, epoch) generator; these only matter to code that uses the
    # global generators (dropout, say), restored so that a resumed run behaves like an unbroken one.
    import torch
    torch.set_rng_state(state["torch"])
    numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = state["numpy"]
    np.random.set_state(("MT19937", np.array(numpy_keys, dtype=np.uint32), numpy_pos,
                         numpy_has_gauss, numpy_gauss))
    python_version, python_internal, python_gauss = state["python"]
    random.setstate((python_version, tuple(python_internal), python_gauss))
    cuda_state = state.get("cuda")
    if isinstance(cuda_state, (list, tuple)):  # older runs saved every visible GPU's; take the device's
        index = (device.index or 0) if device is not None else 0
        cuda_state = cuda_state[index] if index < len(cuda_state) else None
    if cuda_state is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda_state, device)


def cpu_copy(state, reuse=None):
    """A copy of a (nested) state on the CPU that later training steps cannot change: tensors copied, the
    rest as it is. reuse: an earlier copy of the same state, whose tensors are copied into instead of
    allocating new ones (fresh memory costs more than the copy itself)."""
    import torch
    if isinstance(state, torch.Tensor):
        if (isinstance(reuse, torch.Tensor) and reuse.shape == state.shape and reuse.dtype == state.dtype
                and reuse.device.type == "cpu"):
            return reuse.copy_(state.detach())
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        reuse = reuse if isinstance(reuse, dict) else {}
        return {key: cpu_copy(value, reuse.get(key)) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        reuse = reuse if isinstance(reuse, (list, tuple)) and len(reuse) == len(state) else [None] * len(state)
        return type(state)(cpu_copy(value, old) for value, old in zip(state, reuse))
    return state


class BackgroundWriter:
    """Runs the writes of one epoch on a thread of its own while the next epoch trains. One job at a time:
    submit() first waits for the previous one, so files are written in order and a save never overtakes
    another. A job's WriteFailed is raised by the next submit() or wait(), on the training thread. Each
    file is still written atomically, so a SIGKILL at any moment leaves every file whole."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, job: Callable[[], None]) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(job,), name="run-writer")
        self._thread.start()

    def _run(self, job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as err:  # handed to the training thread by wait()
            self._error = err

    def wait(self) -> None:
        """Until the job in flight is done; its error, if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error


def make_logger(master: bool, run_dir: Path, log_lines: list[str]) -> Callable[[str], None]:
    """say(line): print it, flushed, and add it to log.txt (rank 0 only). The first line said writes log.txt
    whole, atomically: log_lines (what a resume read back, completed from last.pt) and this line; every later
    line is appended, so that a line costs its own write however long the log (and the whole file is written
    again only after a failed append, or if log.txt went away). Nothing is written before the first line: a run
    refused before it takes the folder's lock writes nothing."""
    path = run_dir / LOG_FILE
    whole = False  # whether log.txt holds every line so far, so that the next can be appended

    def say(line: str) -> None:
        nonlocal whole
        if not master:
            return
        print(line, flush=True)
        log_lines.append(line)
        if whole and path.exists():
            whole = False  # until the line is in: after a failed append, the next line writes the file whole
            append_line(path, line)
        else:
            write_text(path, "\n".join(log_lines) + "\n")
        whole = True
    return say
