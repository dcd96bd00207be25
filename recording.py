"""What rank 0 writes as a run goes: config.json and the first log lines when it starts, then after every
epoch best.pt (when the epoch is the best so far), last.pt, metrics.csv, curves.png, the epoch's log line and
its TensorBoard events, in that order.

The epoch's files are written on a background thread (runs.BackgroundWriter) from a copy of the state on
the CPU, so the next epoch trains meanwhile: the loop only waits for the copy (and, should a save take
longer than an epoch, for the previous save). Every file is still written atomically and last.pt first
among the checkpoint's dependents, so a SIGKILL at any moment leaves a folder that --resume continues
exactly; a failed write is reported by the loop at its next save or at the end, with what last.pt holds.
curves.png is drawn at most every CURVES_EVERY_SECONDS (matplotlib holds Python's lock while it draws,
which slows the training thread) and always at the end of the run.
"""
from __future__ import annotations

import math
import re
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import plot
import run_files
import runs
import tensorboard_log
from run_files import BestCheckpoint, EpochMetrics, LastCheckpoint

CURVES_EVERY_SECONDS = 10.0
EPOCH_LINE = re.compile(r"Epoch (\d+)/\d+, ")  # the start of epoch_line's lines


def epoch_line(metrics: EpochMetrics, epochs: int) -> str:
    """The line the course code printed after every epoch."""
    return (f"Epoch {metrics.epoch}/{epochs}, Train Loss: {metrics.train_loss:.4f}, "
            f"Train Accuracy: {metrics.train_acc:.4f}, Valid Loss: {metrics.val_loss:.4f}, "
            f"Valid Accuracy: {metrics.val_acc:.4f}, Time: {metrics.epoch_seconds:.2f}s")


def completed_log(log_lines: list[str], history: list[dict], epochs: int) -> list[str]:
    """log.txt's lines, with the line of every epoch last.pt's history holds but the log does not: a kill
    between an epoch's last.pt and its log line (SIGKILL, a batch system's kill after its grace period)
    loses the line, and a resume puts it back, as it rebuilds metrics.csv."""
    logged = {int(match.group(1)) for match in map(EPOCH_LINE.match, log_lines) if match}
    lines = list(log_lines)
    for row in history:
        if int(row["epoch"]) not in logged:
            try:
                lines.append(epoch_line(EpochMetrics.from_row(row), epochs))
            except ValueError:  # a row without the line's numbers: nothing to put back
                continue
    return lines


def timings(history: list[EpochMetrics]) -> dict:
    """summary.json's seconds: in all and per epoch, the first epoch (compilation, cuDNN autotuning) apart
    from the steady state (the median epoch after it), and the median wait between epochs."""
    seconds = [epoch.epoch_seconds for epoch in history]
    steady = seconds[1:] or seconds
    between = [epoch.between_seconds for epoch in history if math.isfinite(epoch.between_seconds)]
    return {"total_seconds": round(sum(seconds), 3), "seconds_per_epoch": round(sum(seconds) / len(seconds), 3),
            "first_epoch_seconds": round(seconds[0], 3), "steady_epoch_seconds": round(statistics.median(steady), 3),
            "steady_between_seconds": round(statistics.median(between), 3) if between else None}


@dataclass
class EpochFiles:
    """One epoch's files, as the CPU copies they are written from."""

    metrics: EpochMetrics  # as metrics.csv holds it
    best: dict | None  # best.pt's content, when this epoch is the best so far
    last: dict  # last.pt's content
    history: list[dict]  # metrics.csv's rows
    first_of_process: bool  # the first epoch this process trains: the end-of-run files go
    epochs: int  # of the run, for the log line


@dataclass
class Output:
    """What rank 0 writes besides the end-of-run files: config.json's content, the log, the epochs' files."""

    folder: Path
    config: dict
    say: Callable[[str], None]
    saved_epochs: int  # what last.pt on disk holds: what a --resume would continue from
    epoch_log: tensorboard_log.EpochLog | None = None
    notes: list[str] = field(default_factory=list)  # lines announce() says after the run's description
    copies: dict = field(default_factory=dict)  # the CPU copies of the state the last save was written from
    writer: runs.BackgroundWriter = field(default_factory=runs.BackgroundWriter)
    curves_drawn_at: float = -math.inf

    def save_epoch(self, run, training, progress, metrics: EpochMetrics, new_best: bool) -> None:
        """Start writing an epoch's files (train.py's run, training and progress) in the background, from
        copies of the state on the CPU; WriteFailed if the previous epoch's failed."""
        self.writer.wait()  # the previous epoch's files first: their copies of the state are reused for these
        optimization, config, epoch = training.optimization, self.config, metrics.epoch
        state = training.raw_net.state_dict()
        parameters = {name for name, _ in training.raw_net.named_parameters()}
        # Now, what the next forward changes (BatchNorm's statistics) and what is small; the parameters and
        # momenta, which only the optimizer's update changes, on the writer's thread while the next step's
        # forward and backward run (optimization.step waits for the copy before it updates).
        buffers = runs.cpu_copy({name: value for name, value in state.items() if name not in parameters})
        last = LastCheckpoint(
            config=config, epoch=epoch, model=None, optimizer=None,
            scheduler=runs.cpu_copy(optimization.scheduler.state_dict()),
            scaler=runs.cpu_copy(optimization.scaler.state_dict()), rng=runs.get_rng_state(run.procs.device),
            history=list(progress.history), best=dict(progress.best)).to_dict()
        files = EpochFiles(metrics, None, last, list(progress.history), epoch == progress.start_epoch + 1,
                           config["epochs"])
        optimization.copying = copied = threading.Event()

        def copy_then_write() -> None:
            try:
                model = runs.cpu_copy(state, self.copies.get("model"))  # parameters copied, buffers too (tiny)
                model.update(buffers)
                last["optimizer"] = runs.cpu_copy(optimization.optimizer.state_dict(), self.copies.get("optimizer"))
                last["model"], self.copies = model, {"model": model, "optimizer": last["optimizer"]}
            finally:
                copied.set()
            if new_best:
                files.best = BestCheckpoint(
                    model=model, model_name=config["model"], num_classes=config["num_classes"],
                    mean=config["mean"], std=config["std"], dataset=config["dataset"], epoch=epoch,
                    val_acc=metrics.val_acc, classes=config["classes"]).to_dict()
            self._write_epoch(files)

        self.writer.submit(copy_then_write)

    def _write_epoch(self, files: EpochFiles) -> None:
        folder, row = self.folder, files.history[-1]
        if files.best is not None:
            runs.save_checkpoint(folder / run_files.BEST_CHECKPOINT, files.best)
        # last.pt first: it is the truth a resume starts from, metrics.csv is rebuilt from it.
        runs.save_checkpoint(folder / run_files.LAST_CHECKPOINT, files.last)
        self.saved_epochs = files.metrics.epoch
        if files.first_of_process:
            for stale in run_files.END_OF_RUN_FILES:
                runs.remove_file(folder / stale)  # they described an older state
        runs.write_metrics(folder / run_files.METRICS_FILE, files.history)
        if time.monotonic() - self.curves_drawn_at >= CURVES_EVERY_SECONDS:
            plot.plot_curves(folder)
            self.curves_drawn_at = time.monotonic()
        self.say(epoch_line(files.metrics, files.epochs))
        if self.epoch_log is not None:  # after last.pt, so a resume never writes an epoch twice
            self.epoch_log.write(row)

    def settle(self) -> BaseException | None:
        """Wait for the epoch being written; its error, if it failed, returned instead of raised (for the
        ways out of a run that report something else)."""
        try:
            self.writer.wait()
        except BaseException as err:
            return err
        return None
