"""TensorBoard event files of a run, <run folder>/tensorboard/, holding exactly the epochs trained.

The events are derived data: the metrics history that last.pt holds can always rebuild them. So on
opening, the history is written into a fresh folder that then replaces the old one, and each new
epoch is appended and flushed. A resumed run, even one killed (SIGKILL) after writing metrics.csv
and before writing the epoch's events, or after the events and before last.pt, so continues the
same curves with no epoch missing and none twice.

tensorboard is an optional package: this module imports without it, and require_tensorboard()
says in one line how to install it.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

from core.errors import UsageError
from runfolder.declarations import TENSORBOARD_TAGS

TENSORBOARD_DIR = "tensorboard"
# metrics.csv column -> TensorBoard tag, declared with the columns. Train and valid share a section
# ("loss/", "accuracy/").
SCALAR_TAGS = TENSORBOARD_TAGS


class TensorBoardMissing(UsageError):
    """--tensorboard without the tensorboard package; str() is one line saying how to install it."""


def require_tensorboard() -> None:
    """Raise TensorBoardMissing unless torch.utils.tensorboard can be used; call it before training
    starts, so a missing package stops the run at once instead of after the first epoch."""
    try:
        import tensorboard  # noqa: F401  (only checking that it is there)
    except ImportError:
        raise TensorBoardMissing("--tensorboard needs the tensorboard package; install it with "
                                 "`pip install tensorboard` or leave out --tensorboard") from None


class EpochLog:
    """The event files of one run: EpochLog(run_dir, history), then write(row) after every epoch,
    then close(). Only the process that writes the run folder (rank 0) should open one."""

    def __init__(self, run_dir: Path, history: list[dict]) -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        run_dir = Path(run_dir)
        self.folder = run_dir / TENSORBOARD_DIR
        fresh = run_dir / f".{TENSORBOARD_DIR}.new"
        stale = run_dir / f".{TENSORBOARD_DIR}.old"
        for leftover in (fresh, stale):  # from a process killed while swapping
            shutil.rmtree(leftover, ignore_errors=True)
        rebuilt = SummaryWriter(str(fresh))
        for row in history:
            write_scalars(rebuilt, row)
        rebuilt.close()
        # Two renames, not one: a folder cannot be renamed over one that has files in it. A kill
        # between them leaves no tensorboard/ folder, which the next open rebuilds like any other.
        if self.folder.exists():
            self.folder.rename(stale)
        fresh.rename(self.folder)
        shutil.rmtree(stale, ignore_errors=True)
        self.writer = SummaryWriter(str(self.folder))

    def write(self, row: dict) -> None:
        """One epoch's row of metrics.csv, on disk when this returns."""
        write_scalars(self.writer, row)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def write_scalars(writer, row: dict) -> None:
    """The scalars of one metrics.csv row (values as strings or numbers), at step = its epoch."""
    epoch = int(row["epoch"])
    for column, tag in SCALAR_TAGS.items():
        value = row.get(column)
        if value not in (None, "") and math.isfinite(float(value)):  # nan: not measured (an older run)
            writer.add_scalar(tag, float(value), global_step=epoch)
