"""What rank 0 writes as a run goes: config.json and the first log lines when it starts, then after every
epoch best.pt (when the epoch is the best so far), last.pt, metrics.csv, curves.png, the epoch's log line and
its TensorBoard events, in that order.

The epoch's files are written on a background thread (BackgroundWriter) from a copy of the state on
the CPU (cpu_copy), so the next epoch trains meanwhile: the loop only waits for the copy (and, should a save take
longer than an epoch, for the previous save). Every file is still written atomically and last.pt first
among the checkpoint's dependents, so a SIGKILL at any moment leaves a folder that --resume continues
exactly; a failed write is reported by the loop at its next save or at the end, with what last.pt holds.
While the run trains, curves.png is drawn in a process of its own (CurvesDrawer), every CURVES_EVERY_SECONDS
at most, the first that long after the start, and one drawing at a time: matplotlib holds Python's lock while it
draws, and drawing on the writer thread kept the training thread from launching its kernels. The end of the run
draws it once more in this process, with the test accuracy in its title. Every line the run prints also
goes to log.txt (make_print_and_log).
"""
from __future__ import annotations

import contextlib
import json
import math
import re
import select
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from runfolder import declarations, store, tensorboard_events
from runfolder.declarations import BestCheckpoint, EpochMetrics, LastCheckpoint
from training.optimization import Optimization
from training.rng_state import get_rng_state

CURVES_EVERY_SECONDS = 10.0
PROJECT_ROOT = Path(__file__).resolve().parent.parent  # where the drawing process imports reports/figures.py from
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


class CurvesDrawer:
    """Draws run folders' curves.png in a process of its own, one at a time, without waiting for it: the process
    starts at the first drawing and imports reports/figures.py (no torch) once, then draws each folder sent to it
    (figures.serve_curves). A failed drawing (WriteFailed: a full disk, say) is kept, and failure() hands it to the
    training thread at the next save; close() waits for the drawing under way. The process ignores the signals that
    stop a run (Ctrl-C reaches the run alone) and ends when its input closes: at close(), or when the run's process
    ends in any way, SIGKILL included. Not thread-safe: the writer thread draws while the epoch's files are written,
    the training thread asks for failures once they are."""

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None
        self._drawing: Path | None = None  # the curves.png being drawn
        self._failure: store.WriteFailed | None = None

    def busy(self) -> bool:
        """Whether a drawing is under way; a finished one's answer is taken in."""
        if self._drawing is not None and select.select([self._process.stdout], [], [], 0)[0]:
            self._take_answer()
        return self._drawing is not None

    def draw(self, folder: Path) -> bool:
        """Start drawing folder's curves.png, unless a drawing is under way (False)."""
        if self.busy():
            return False
        if self._process is None:
            # Its stdout carries the answers alone: whatever else prints goes to stderr.
            code = ("import sys; answers, sys.stdout = sys.stdout, sys.stderr; sys.path.insert(0, sys.argv[1]); "
                    "from reports import figures; figures.serve_curves(answers)")
            self._process = subprocess.Popen([sys.executable, "-c", code, str(PROJECT_ROOT)], stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, text=True, start_new_session=True)
        self._drawing = Path(folder) / declarations.CURVES_FILE
        try:
            self._process.stdin.write(json.dumps(str(folder)) + "\n")
            self._process.stdin.flush()
        except OSError:  # the process is gone (killed): its answer, read next, says so
            pass
        return True

    def failure(self) -> store.WriteFailed | None:
        """The failure of a finished drawing not yet handed over, if any; once."""
        self.busy()
        failure, self._failure = self._failure, None
        return failure

    def close(self) -> store.WriteFailed | None:
        """Wait for the drawing under way and end the process; the failure not yet handed over, if any."""
        if self._process is not None and self._drawing is not None:
            self._take_answer()  # which forgets the process if it ended without answering
        if self._process is not None:
            with contextlib.suppress(OSError):
                self._process.stdin.close()
            self._process.wait()
            self._process.stdout.close()
            self._process = None
        return self.failure()

    def _take_answer(self) -> None:
        answer = self._process.stdout.readline()
        if not answer:
            code = self._process.wait()
            self._process.stdout.close()
            self._process = None
            answer = json.dumps([str(self._drawing), f"the drawing process ended with exit code {code}"])
        try:
            failed = json.loads(answer)
        except ValueError:
            failed = [str(self._drawing), f"the drawing process answered {answer.strip()[:200]!r}"]
        if failed is not None and self._failure is None:
            self._failure = store.WriteFailed(Path(failed[0]), failed[1])
        self._drawing = None


def make_print_and_log(master: bool, run_dir: Path, log_lines: list[str]) -> Callable[[str], None]:
    """print_and_log(line): print it, flushed, and add it to log.txt (rank 0 only). The first line writes log.txt
    whole, atomically: log_lines (what a resume read back, completed from last.pt) and this line; every later
    line is appended, so that a line costs its own write however long the log (and the whole file is written
    again only after a failed append, or if log.txt went away). Nothing is written before the first line: a run
    refused before it takes the folder's lock writes nothing."""
    path = run_dir / declarations.LOG_FILE
    whole = False  # whether log.txt holds every line so far, so that the next can be appended

    def print_and_log(line: str) -> None:
        nonlocal whole
        if not master:
            return
        print(line, flush=True)
        log_lines.append(line)
        if whole and path.exists():
            whole = False  # until the line is in: after a failed append, the next line writes the file whole
            store.append_line(path, line)
        else:
            store.write_text(path, "\n".join(log_lines) + "\n")
        whole = True
    return print_and_log


def cpu_copy(state, reuse=None):
    """A copy of a (nested) state on the CPU that later training steps cannot change: tensors copied, the
    rest as it is. reuse: an earlier copy of the same state, whose tensors are copied into instead of
    allocating new ones (fresh memory costs more than the copy itself)."""
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


def trainer_stream(device) -> torch.cuda.Stream | None:
    """The CUDA stream the training thread queues its work on; None off CUDA."""
    return torch.cuda.current_stream(device) if device.type == "cuda" else None


@contextlib.contextmanager
def on_stream(stream: torch.cuda.Stream | None) -> Iterator[None]:
    """The calling thread's work queued on stream (nothing changes for None): each thread has a current stream
    of its own, the default stream until it picks another. Checked once entered, as the copies rely on it."""
    if stream is None:
        yield
        return
    with torch.cuda.stream(stream):
        current = torch.cuda.current_stream(stream.device)
        if current != stream:
            raise RuntimeError(f"the writer thread copies on {current}, not on the training thread's {stream}")
        yield


@dataclass
class RunProgress:
    """What the loop carries from epoch to epoch, and what last.pt saves of it."""

    history: list[dict]  # metrics.csv's rows
    best: dict  # the best epoch so far and its val_acc
    start_epoch: int  # the epochs saved when this process started: 0, or those of the last.pt it resumed
    log_lines: list[str]  # log.txt's lines when this process started (completed from last.pt)
    validated_at: float | None = None  # when the last epoch's validation ended (perf_counter)


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
    print_and_log: Callable[[str], None]  # make_print_and_log's
    saved_epochs: int  # what last.pt on disk holds: what a --resume would continue from
    epoch_log: tensorboard_events.EpochLog | None = None
    notes: list[str] = field(default_factory=list)  # lines logged after the run's description when it starts
    copies: dict = field(default_factory=dict)  # the CPU copies of the state the last save was written from
    writer: BackgroundWriter = field(default_factory=BackgroundWriter)
    drawer: CurvesDrawer = field(default_factory=CurvesDrawer)
    # From the start, so that a run shorter than CURVES_EVERY_SECONDS starts no drawing process (the end draws).
    curves_drawn_at: float = field(default_factory=time.monotonic)

    def save_epoch(self, net: nn.Module, optimization: Optimization, progress: RunProgress, metrics: EpochMetrics,
                   new_best: bool) -> None:
        """Start writing an epoch's files in the background, from copies of the state on the CPU (net: the model
        whose state_dict is saved); WriteFailed if the previous epoch's failed, or a drawing of curves.png."""
        self.writer.wait()  # the previous epoch's files first: their copies of the state are reused for these
        failure = self.drawer.failure()
        if failure is not None:
            raise failure
        config, epoch, device = self.config, metrics.epoch, optimization.device
        state = net.state_dict()
        parameters = {name for name, _ in net.named_parameters()}
        # Now, what the next forward changes (BatchNorm's statistics) and what is small; the parameters and
        # momenta, which only the optimizer's update changes, on the writer's thread while the next step's
        # forward and backward run (optimization.step waits for the copy before it updates).
        buffers = cpu_copy({name: value for name, value in state.items() if name not in parameters})
        last = LastCheckpoint(
            config=config, epoch=epoch, model=None, optimizer=None,
            scheduler=cpu_copy(optimization.scheduler.state_dict()),
            scaler=cpu_copy(optimization.scaler.state_dict()), rng=get_rng_state(device),
            history=list(progress.history), best=dict(progress.best)).to_dict()
        files = EpochFiles(metrics, None, last, list(progress.history), epoch == progress.start_epoch + 1,
                           config["epochs"])
        optimization.copying = copied = threading.Event()
        # The copies queue on the training thread's stream, after the update that made the values copied, where
        # the writer thread's own (the default stream) could read them before it ends.
        stream = trainer_stream(device)

        def copy_then_write() -> None:
            try:
                with on_stream(stream):
                    model = cpu_copy(state, self.copies.get("model"))  # parameters copied, buffers too (tiny)
                    model.update(buffers)
                    last["optimizer"] = cpu_copy(optimization.optimizer.state_dict(), self.copies.get("optimizer"))
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
            store.save_checkpoint(folder / declarations.BEST_CHECKPOINT, files.best)
        # last.pt first: it is the truth a resume starts from, metrics.csv is rebuilt from it.
        store.save_checkpoint(folder / declarations.LAST_CHECKPOINT, files.last)
        self.saved_epochs = files.metrics.epoch
        if files.first_of_process:
            for stale in declarations.END_OF_RUN_FILES:
                store.remove_file(folder / stale)  # they described an older state
        store.write_metrics(folder / declarations.METRICS_FILE, files.history)
        if time.monotonic() - self.curves_drawn_at >= CURVES_EVERY_SECONDS and self.drawer.draw(folder):
            self.curves_drawn_at = time.monotonic()
        self.print_and_log(epoch_line(files.metrics, files.epochs))
        if self.epoch_log is not None:  # after last.pt, so a resume never writes an epoch twice
            self.epoch_log.write(row)

    def wait(self) -> None:
        """Until the epoch being written is written and curves.png drawn (the drawing process ends); WriteFailed
        if either failed."""
        try:
            self.writer.wait()
        finally:
            failure = self.drawer.close()
        if failure is not None:
            raise failure

    def wait_returning_error(self) -> BaseException | None:
        """wait(), its error, if any, returned instead of raised (for the ways out of a run that report
        something else)."""
        try:
            self.wait()
        except BaseException as err:
            return err
        return None
