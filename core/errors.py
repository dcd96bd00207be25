"""The errors a user sees as one line instead of a traceback, their exit codes, and the one wrapper that
turns them into that line and code for every command (train.main, plot.main, the bench scripts).

Every user-facing error derives from ProjectError and carries its exit code: UsageError (exit 2: a bad
flag, file or dataset the user can fix; DataError, RunFileError, CheckpointError and the like derive from
it) and RunFailed (exit 1: a run that failed on its own or through its surroundings, its saved state intact).
FolderInUse is a UsageError with its own code under --auto-resume (73). The signals that stop a run take the
path Ctrl-C takes (Stopped, a KeyboardInterrupt) with their own codes: 130 Ctrl-C, 143 SIGTERM, 75 SIGUSR1.

A closed pipe is not an error (`python main_cifar10.py --list-models | head -3`): once the reader of stdout or
stderr has gone, what the command writes there goes to os.devnull and the command does the rest of its work, a
training run included, and ends with its own exit code (0 for a listing).
"""
from __future__ import annotations

import os
import sys
from typing import Callable, TextIO

USAGE_EXIT = 2
FAILED_EXIT = 1
INTERRUPTED_EXIT = 130  # what a shell reports for Ctrl-C (128 + SIGINT)
TERMINATED_EXIT = 143  # what a shell reports for SIGTERM (128 + SIGTERM): stopped now, like Ctrl-C
STOPPED_EXIT = 75  # SIGUSR1: the epoch finished and saved, "stop for now, resume later" (sysexits' EX_TEMPFAIL)
# --auto-resume, the run folder locked by another process: nothing wrong with the command, someone else is
# on it (sysexits' EX_CANTCREAT, "cannot create the output"); a sweep skips the run instead of failing it.
IN_USE_EXIT = 73


class ProjectError(Exception):
    """An error shown as "error: <str(err)>" in one line, ending the command with exit_code."""

    exit_code = FAILED_EXIT


class UsageError(ProjectError):
    """Something the user can fix in the command line or their files; exit 2."""

    exit_code = USAGE_EXIT


class FolderInUse(UsageError):
    """The run folder is locked by another process: exit 2, or IN_USE_EXIT under --auto-resume."""

    def __init__(self, message: str, exit_code: int = USAGE_EXIT) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Stopped(KeyboardInterrupt):
    """A signal that ends a run on the path Ctrl-C takes (what is saved is kept and said in one line), with
    its own exit code and first word."""

    exit_code, word = INTERRUPTED_EXIT, "Interrupted"


class Terminated(Stopped):
    """SIGTERM: stop now, like Ctrl-C."""

    exit_code, word = TERMINATED_EXIT, "Terminated"


class StopForNow(Stopped):
    """SIGUSR1: the current epoch finished and saved, the run stops to be resumed later."""

    exit_code, word = STOPPED_EXIT, "Stopped for now"


class RunFailed(ProjectError):
    """A run that failed on its own (a diverging loss) or through its surroundings (a full disk); exit 1,
    its saved state intact."""

    exit_code = FAILED_EXIT


class QuietWhenClosed:
    """sys.stdout or sys.stderr, except that once its reader has gone (a closed pipe: `| head`), what is written
    goes to os.devnull instead of raising BrokenPipeError. os.devnull takes the stream's file descriptor (as
    Python's docs advise for BrokenPipeError), so that what the stream still holds in its buffer goes there too,
    in the interpreter's final flush, and so does the output of a process started later with that descriptor."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self.to_devnull()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            self.to_devnull()

    def to_devnull(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self.stream.fileno())
        finally:
            os.close(devnull)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def quiet_closed_pipes() -> None:
    """From now on, a stdout or stderr whose reader has gone takes what is written to os.devnull: the command
    goes on and ends as it would have (the same exit code), and no BrokenPipeError traceback is printed. Why
    not end it at once, as SIGPIPE ends a Unix tool (exit 141)? A training run or a sweep piped into `tee` or
    `less` must not lose its epoch, or its runs, when that reader goes; everything it prints is in its log too."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, QuietWhenClosed):
            setattr(sys, name, QuietWhenClosed(stream))


def run_command(command: Callable[[], int], report: bool = True,
                interrupted: str = "Interrupted; nothing new was saved") -> int:
    """command()'s exit code; a ProjectError or Ctrl-C ends it in one line on stderr (when report: under
    torchrun only rank 0 speaks) and its exit code instead of a traceback. A closed stdout or stderr is not
    an error (quiet_closed_pipes)."""
    quiet_closed_pipes()
    try:
        return command()
    except ProjectError as err:
        if report:
            print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt as stop:  # Ctrl-C, or a Stopped signal
        if report:
            print(f"\n{interrupted}", file=sys.stderr)
        return getattr(stop, "exit_code", INTERRUPTED_EXIT)
