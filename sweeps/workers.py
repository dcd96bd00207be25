"""A sweep on one machine: one worker per GPU (or N on the CPU), each in its own environment, claims the next run
nobody runs, runs its command to the end and records how it ended; a failed run is tried once more.

The workers' state is files in the sweep's folder: claims/<i>.lock (the flock a worker holds on the run it runs,
so that two sweep processes never start the same run), records/<i>.json (each run's last exit code and error
line), logs/<i>.log (its output, appended).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from core.errors import (
    FAILED_EXIT,
    IN_USE_EXIT,
    INTERRUPTED_EXIT,
    STOPPED_EXIT,
    TERMINATED_EXIT,
    UsageError,
)
from runfolder import store
from sweeps.plan import CLAIMS_FOLDER, LOGS_FOLDER, RECORDS_FOLDER, PlannedRun, is_done, is_running

MAX_ATTEMPTS = 2  # a failed run is tried once more, then the workers go on without it
POLL_SECONDS = 2.0  # how often a worker with nothing to claim looks again (runs held by another process)
STOPPED_CODES = (STOPPED_EXIT, INTERRUPTED_EXIT, TERMINATED_EXIT)


# ---------------------------------------------------------------------------------------------------
# Each run's log and record


def log_path(folder: Path, run: PlannedRun) -> Path:
    return folder / LOGS_FOLDER / f"{run.index}.log"


def record_path(folder: Path, run: PlannedRun) -> Path:
    return folder / RECORDS_FOLDER / f"{run.index}.json"


def read_record(folder: Path, run: PlannedRun) -> dict:
    return store.read_json(record_path(folder, run)) or {}


def last_error_line(log: Path, offset: int) -> str:
    """The last "error: ..." line the run wrote after offset, else its last line."""
    with contextlib.suppress(OSError):
        with open(log, "rb") as handle:
            handle.seek(offset)
            lines = [line.strip() for line in handle.read().decode("utf-8", "replace").splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error: ")]
        return (errors or lines or [""])[-1][:300]
    return ""


# ---------------------------------------------------------------------------------------------------
# Workers claim runs and run them


@dataclass
class Workers:
    """What the workers of one sweep process share."""

    plan: list[PlannedRun]
    folder: Path
    failures: dict = dataclasses.field(default_factory=dict)  # run index: failed attempts in this process
    children: dict = dataclasses.field(default_factory=dict)  # worker name: its run's process
    stopping: threading.Event = dataclasses.field(default_factory=threading.Event)
    mutex: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def settled(self, run: PlannedRun) -> bool:
        return is_done(run) or self.failures.get(run.index, 0) >= MAX_ATTEMPTS

    def claim_next(self):
        """The next run nobody runs, with its claim held (an open file with a flock), or None."""
        for run in self.plan:
            if self.settled(run) or is_running(run):
                continue
            claim = open(self.folder / CLAIMS_FOLDER / f"{run.index}.lock", "a+b")
            try:
                fcntl.flock(claim, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                claim.close()
                continue
            if self.settled(run):  # finished by another process between the two looks
                claim.close()
                continue
            return run, claim
        return None


def work(workers: Workers, name: str, env: dict) -> None:
    """One worker: claim the next run, run it, record how it ended; until every run is done or failed twice,
    or the sweep stops."""
    while not workers.stopping.is_set():
        taken = workers.claim_next()
        if taken is None:
            if all(workers.settled(run) for run in workers.plan):
                return
            time.sleep(POLL_SECONDS)  # the rest run in other processes: wait for them
            continue
        run, claim = taken
        with claim:
            code = run_one(workers, run, name, env)
        if code not in (0, IN_USE_EXIT) and not workers.stopping.is_set():
            with workers.mutex:
                workers.failures[run.index] = workers.failures.get(run.index, 0) + 1


def run_one(workers: Workers, run: PlannedRun, name: str, env: dict) -> int:
    """Run one planned command to its end, its output appended to its log; record and report its exit."""
    log = log_path(workers.folder, run)
    started = time.monotonic()
    with open(log, "ab") as output:
        offset = output.tell()
        output.write(f"=== {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} worker {name}, pid "
                     f"{os.getpid()}: {run.line()}\n".encode())
        output.flush()
        say(f"[{name}] start {run.index + 1}/{len(workers.plan)} {run.name}")
        with workers.mutex:
            if workers.stopping.is_set():
                return STOPPED_EXIT
            # A session of its own: Ctrl-C in the terminal reaches the sweep only, which asks the runs to
            # stop after their epoch (SIGUSR1).
            process = subprocess.Popen(run.command(), stdout=output, stderr=subprocess.STDOUT, env=env,
                                       start_new_session=True)
            workers.children[name] = process
        code = process.wait()
        with workers.mutex:
            workers.children.pop(name, None)
    error = "" if code == 0 else last_error_line(log, offset)
    # Whatever ends a run while the sweep stops (SIGUSR1 may even come before the run could handle it) is a
    # stop, not a failure: the run resumes when the sweep is started again.
    stopped = code != 0 and workers.stopping.is_set()
    store.write_json(record_path(workers.folder, run),
                     {"run": str(run.folder), "exit": code, "error": error, "stopped": stopped, "worker": name,
                      "seconds": round(time.monotonic() - started, 1)})
    say(f"[{name}] {describe_exit(STOPPED_EXIT if stopped else code, error)}: {run.index + 1}/{len(workers.plan)} "
        f"{run.name}")
    return code


def describe_exit(code: int, error: str) -> str:
    if code == 0:
        return "done"
    if code == IN_USE_EXIT:
        return "held by another process, left to it"
    if code in STOPPED_CODES:
        return f"stopped (exit {code}), resumes when the sweep is started again"
    return f"failed (exit {code}): {error}"


def say(line: str) -> None:
    print(line, flush=True)


def run_here(plan: list[PlannedRun], folder: Path, environments: dict[str, dict]) -> int:
    """The workers, until every run is done or failed twice; Ctrl-C or SIGTERM asks the runs to stop after
    their epoch (SIGUSR1) and waits, a second one stops them now (SIGTERM)."""
    workers = Workers(plan, folder)
    stopped_by = []

    def stop(signum, frame) -> None:
        stopped_by.append(signum)
        workers.stopping.set()
        again = len(stopped_by) > 1
        with workers.mutex:
            children = list(workers.children.values())
        say(f"\nStopping: {len(children)} run(s) " + ("stop now (SIGTERM)" if again else
            "finish their epoch and save it (SIGUSR1); Ctrl-C again stops them now"))
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM if again else signal.SIGUSR1)

    previous = {number: signal.signal(number, stop) for number in (signal.SIGINT, signal.SIGTERM)}
    threads = [threading.Thread(target=work, args=(workers, name, env), name=name, daemon=True)
               for name, env in environments.items()]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.2)  # in slices, so that the signal handler runs meanwhile
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if stopped_by:
        return TERMINATED_EXIT if stopped_by[0] == signal.SIGTERM else INTERRUPTED_EXIT
    return 0 if all(is_done(run) for run in plan) else FAILED_EXIT


# ---------------------------------------------------------------------------------------------------
# Each worker's environment: its GPU, its share of the cores


def worker_environments(args) -> dict[str, dict]:
    """Each worker's name and environment for --gpus/--workers (args.gpus, args.workers): one per GPU
    (CUDA_VISIBLE_DEVICES=that GPU), or N on the CPU (no GPU visible, the CPU's cores shared); one on the CPU
    where neither is given and there is no GPU. UsageError for a GPU that is not there."""
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    workers = 1 if args.workers is None and args.gpus is None and visible == 0 else args.workers
    if workers is not None:
        base = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **thread_shares(workers)}
        return {f"cpu{number}": base for number in range(workers)}
    wanted = range(visible) if args.gpus is None else args.gpus
    missing = [gpu for gpu in wanted if gpu >= visible]
    if missing:
        choice = f"pick from 0 to {visible - 1}" if visible else "there is none"
        raise UsageError(f"--gpus {','.join(map(str, wanted))}: no GPU {missing[0]} here ({choice}); "
                         "--workers N runs on the CPU")
    # The ids are positions among the visible GPUs; CUDA_VISIBLE_DEVICES may already narrow those down.
    names = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(visible)))).split(",")
    shares = thread_shares(len(wanted))
    return {f"gpu{gpu}": {**os.environ, "CUDA_VISIBLE_DEVICES": names[gpu].strip(), **shares} for gpu in wanted}


def thread_shares(workers: int) -> dict[str, str]:
    """Each worker's share of the machine's cores, for its math threads and for torch.compile's compiling
    processes (each of 8 compiling runs would otherwise start as many as the machine has cores); a value the
    user already set is kept."""
    share = str(max(1, (os.cpu_count() or 1) // workers))
    return {name: os.environ.get(name, share) for name in ("OMP_NUM_THREADS", "TORCHINDUCTOR_COMPILE_THREADS")}
