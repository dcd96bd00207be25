"""One process per run folder: an exclusive flock on the folder's lock file, which the OS releases when the
process ends in any way (so a lock is never stale). A training run holds it from its first write to its end,
--eval-only while it writes eval.json; every other process refuses the folder meanwhile, writing nothing.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path
from typing import BinaryIO

from core.errors import USAGE_EXIT, FolderInUse, UsageError
from runfolder.declarations import LOCK_FILE
from runfolder.store import warn


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
