"""The errors a user sees as one line instead of a traceback, their exit codes, and the one wrapper that
turns them into that line and code for every command (train.main, plot.main, the bench scripts).

Every user-facing error derives from ProjectError and carries its exit code: UsageError (exit 2: a bad
flag, file or dataset the user can fix; DataError, RunFileError, CheckpointError and the like derive from
it) and RunFailed (exit 1: a run that failed on its own or through its surroundings, its saved state intact).
FolderInUse is a UsageError with its own code under --auto-resume (73). The signals that stop a run take the
path Ctrl-C takes (Stopped, a KeyboardInterrupt) with their own codes: 130 Ctrl-C, 143 SIGTERM, 75 SIGUSR1.
"""
from __future__ import annotations

import sys
from typing import Callable

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


def run_command(command: Callable[[], int], report: bool = True,
                interrupted: str = "Interrupted; nothing new was saved") -> int:
    """command()'s exit code; a ProjectError or Ctrl-C ends it in one line on stderr (when report: under
    torchrun only rank 0 speaks) and its exit code instead of a traceback."""
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
