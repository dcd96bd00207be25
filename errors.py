"""The errors a user sees as one line instead of a traceback, their exit codes, and the one wrapper that
turns them into that line and code for every command (train.main, plot.main, the bench scripts).

Every user-facing error derives from ProjectError and carries its exit code: UsageError (exit 2: a bad
flag, file or dataset the user can fix; DataError, RunFileError, CheckpointError and the like derive from
it) and RunFailed (exit 1: a run that failed on its own or through its surroundings, its saved state intact).
"""
from __future__ import annotations

import sys
from typing import Callable

USAGE_EXIT = 2
FAILED_EXIT = 1
INTERRUPTED_EXIT = 130  # what a shell reports for Ctrl-C (128 + SIGINT)


class ProjectError(Exception):
    """An error shown as "error: <str(err)>" in one line, ending the command with exit_code."""

    exit_code = FAILED_EXIT


class UsageError(ProjectError):
    """Something the user can fix in the command line or their files; exit 2."""

    exit_code = USAGE_EXIT


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
    except KeyboardInterrupt:
        if report:
            print(f"\n{interrupted}", file=sys.stderr)
        return INTERRUPTED_EXIT
