"""How a run stops: SIGTERM stops it now, as Ctrl-C does (exit 143); SIGUSR1 lets the epoch being trained finish
and be saved, then stops it (exit 75: "stop for now, resume later"); and the one line a stopped run prints. (How
it starts again, --resume or --auto-resume, is resolved with the command line: train.resolve.)

train.py calls these at its few points: around the command, at the end of every epoch, and where a stopped run
ends. Under torchrun the ranks agree at the end of every epoch, so all stop after the same one.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from core.errors import INTERRUPTED_EXIT, StopForNow, Terminated
from training.processes import Processes
from training.recording import Output

_stop_asked = threading.Event()  # set by SIGUSR1, read at the end of every epoch


def _ask_to_stop(signum, frame) -> None:
    _stop_asked.set()


def _terminate(signum, frame) -> None:
    # A second SIGTERM (a batch system signals every process of a job, a wrapper forwards the signal again)
    # must not break the way out, which settles the epoch being written and says what is kept.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


@contextlib.contextmanager
def signals_handled() -> Iterator[None]:
    """SIGUSR1 and SIGTERM handled as above while the command runs, the previous handlers put back after
    (train.main may be called inside another program, a test runner say). Only the main thread can."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _stop_asked.clear()
    previous = {number: signal.signal(number, handler)
                for number, handler in ((signal.SIGUSR1, _ask_to_stop), (signal.SIGTERM, _terminate))}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def stop_if_asked(procs: Processes, output: Output, epoch: int, epochs: int) -> None:
    """At the end of an epoch, once it is recorded: when SIGUSR1 came (to any rank), wait until its files
    are written, then stop (every rank, here). Not after the last epoch: the run is as good as finished."""
    if epoch >= epochs:
        return
    asked = _stop_asked.is_set()
    if procs.ddp:
        flag = torch.tensor([1.0 if asked else 0.0], device=procs.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        asked = bool(flag.item())
    if asked:
        failure = output.wait_returning_error()
        if failure is not None:
            raise failure
        raise StopForNow()


def stopped_line(stop: KeyboardInterrupt, folder: Path, saved: int, auto_resume: bool) -> str:
    """The one line a run stopped by Ctrl-C or a signal prints: what is kept and how to go on."""
    word = getattr(stop, "word", "Interrupted")
    how = "run the same command again" if auto_resume else "continue with the same command and --resume"
    return f"\n{word}: {saved} epoch{'s' if saved != 1 else ''} saved in {folder}; {how}"


def exit_code_of(stop: KeyboardInterrupt) -> int:
    """130 for Ctrl-C, 143 for SIGTERM, 75 for SIGUSR1."""
    return getattr(stop, "exit_code", INTERRUPTED_EXIT)
