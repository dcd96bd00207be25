"""The errors a user sees as one line instead of a traceback, and the exit codes the entry scripts give them.

DataError (cifar.py) is a UsageError's sibling for dataset files: the entry scripts treat both as exit 2.
"""


class UsageError(Exception):
    """Something the user can fix in the command line or their files; printed as one line, exit 2."""


class RunFailed(Exception):
    """A run that failed on its own (a diverging loss); printed as one line, exit 1, its saved state
    intact."""


USAGE_EXIT = 2
FAILED_EXIT = 1
INTERRUPTED_EXIT = 130
