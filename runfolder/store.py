"""The run folder, results/<dataset>/<model>[-<tag>]/: how its files are written and read (their shapes are
declared in runfolder/declarations.py), checkpoints, and whether a run may start or resume. The folder's lock is
runfolder/lock.py's.

train.py writes run folders and plot.py reads them, both through this module. Every file is written to a
temporary file in the same folder and renamed over the old one, so a crash at any moment leaves the previous
version whole. Importing this module must stay cheap (plot.py uses it without training): torch is imported
only by the functions that save or load checkpoints.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from core.errors import RunFailed, UsageError
from runfolder.declarations import (
    LAST_CHECKPOINT,
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


@dataclass(frozen=True)
class FolderState:
    """What check_run_folder looked at: the size and modification time (ns) of last.pt and of metrics.csv, None
    for a file that is not there."""

    last: tuple[int, int] | None
    metrics: tuple[int, int] | None


def folder_state(run_dir: Path) -> FolderState:
    stamps = []
    for name in (LAST_CHECKPOINT, METRICS_FILE):
        try:
            stat = (run_dir / name).stat()
            stamps.append((stat.st_size, stat.st_mtime_ns))
        except OSError:
            stamps.append(None)
    return FolderState(*stamps)


def check_unchanged(run_dir: Path, checked: FolderState) -> None:
    """Refuse when another process changed the run between the checks and taking the lock."""
    if folder_state(run_dir) != checked:
        raise UsageError(f"{run_dir} changed while this run was starting (another process wrote to it); "
                         "run the command again")
