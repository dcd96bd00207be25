"""The whole experiment in one command: every model x dataset x --set value x seed as one plan of runs, run by
one worker per GPU (or N processes on the CPU) of this machine, or as a SLURM job array.

    python sweep.py --name lab --datasets cifar10 cifar100 --models course --seeds 0 1 2 \\
                    [--set lr=0.1,0.05] [--gpus 0,1,2,3 | --workers N] [--slurm ...] [--dry-run] \\
                    [-- flags for every run, e.g. --epochs 100 --results-dir /scratch/r]
    python sweep.py --status lab [-- --results-dir /scratch/r]

The sweep schedules nothing of its own: every run is main_<dataset>.py with --auto-resume, which starts,
resumes or skips it as its folder says, and holds the folder's lock while it trains. The sweep's own state is
files under <results-dir>/sweeps/<name>/: runs.txt (the plan, one exact command per line, in a fixed order),
claims/<i>.lock (the flock a worker holds on the run it runs, so that two sweep processes never start the same
run), records/<i>.json (each run's last exit code and error line), logs/<i>.log (its output, appended). The
run folders are the truth for what is done (summary.json) and what is unfinished (last.pt).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import io
import itertools
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import plot
from core.errors import (
    FAILED_EXIT,
    IN_USE_EXIT,
    INTERRUPTED_EXIT,
    STOPPED_EXIT,
    TERMINATED_EXIT,
    FolderInUse,
    UsageError,
    run_command,
)
from model import MODELS, models_in
from runfolder import store
from runfolder.declarations import METRICS_FILE, SUMMARY_FILE
from sweeps import slurm
from train import DATASETS
from training import flags

REPO_ROOT = Path(__file__).resolve().parent
PLAN_FILE = "runs.txt"
MAX_ATTEMPTS = 2  # a failed run is tried once more, then the workers go on without it
POLL_SECONDS = 2.0  # how often a worker with nothing to claim looks again (runs held by another process)
SET_ASIDE = {"model", "seed"}  # recipe flags the sweep's own axes set (--models, --seeds)
# Run flags the sweep sets itself, or that are not a training run.
NOT_FOR_RUNS = {"model", "seed", "tag", "resume", "overwrite", "auto_resume", *flags.COMMAND_FLAGS}
STOPPED_CODES = (STOPPED_EXIT, INTERRUPTED_EXIT, TERMINATED_EXIT)


# ---------------------------------------------------------------------------------------------------
# The plan: which runs, each as one command


@dataclass(frozen=True)
class PlannedRun:
    index: int
    dataset: str
    argv: tuple[str, ...]  # main_<dataset>.py's flags
    flags: object  # argv parsed by main_<dataset>.py's parser

    @property
    def folder(self) -> Path:
        return store.run_folder(self.flags.results_dir, self.dataset, self.flags.model, self.flags.tag)

    @property
    def name(self) -> str:
        return f"{self.dataset}/{self.folder.name}"

    def command(self) -> list[str]:
        return [sys.executable, str(REPO_ROOT / f"main_{self.dataset}.py"), *self.argv]

    def line(self) -> str:
        return shlex.join(self.command())


def parse_run_flags(dataset: str, argv: list[str], what: str):
    """argv parsed by main_<dataset>.py's own parser and checks; UsageError naming `what` otherwise."""
    refusal = io.StringIO()
    try:
        with contextlib.redirect_stderr(refusal):
            parsed = flags.build_parser(dataset).parse_args(argv)
    except SystemExit:
        reason = refusal.getvalue().strip().removeprefix("error: ").removesuffix(" (see --help)")
        raise UsageError(f"{what}: {reason}") from None
    flags.check_flags(parsed, DATASETS[dataset][1].train_size)
    return parsed


def expand_models(selections: list[str]) -> list[str]:
    names = []
    for selection in selections:
        try:
            chosen = [selection] if selection in MODELS else models_in(selection)
        except ValueError:
            raise UsageError(f"--models: {selection!r} is neither a model nor all, course or a family "
                             "(see python main_cifar10.py --list-models)") from None
        names += [name for name in chosen if name not in names]
    return names


def parse_sets(sets: list[str]) -> list[tuple[str, list[str]]]:
    """--set KEY=V1,V2 as (recipe flag, values); the values are checked by the flag's own parser later."""
    parsed = []
    for text in sets:
        key, _, values = text.partition("=")
        key = key.strip().removeprefix("--").replace("-", "_")
        if key in SET_ASIDE:
            raise UsageError(f"--set {text}: {flags.option(key)} is set by --{key}s; use that")
        if key not in flags.RECIPE_FLAGS or not values:
            raise UsageError(f"--set {text}: expected KEY=V1,V2 with KEY one of the recipe flags "
                             f"({', '.join(name for name in flags.RECIPE_FLAGS if name not in SET_ASIDE)})")
        parsed.append((key, [value.strip() for value in values.split(",")]))
    return parsed


def set_flag(dataset: str, key: str, value: str) -> list[str]:
    """One --set value as main_<dataset>.py flags: on/off for an on/off flag, else `--key value`, checked by
    the flag's own type and choices."""
    spec = next(spec for spec in dataclasses.fields(flags.Recipe) if spec.name == key)
    if spec.metadata["argparse"].get("action") == "store_true":
        if value not in ("on", "off"):
            raise UsageError(f"--set {key}={value}: {flags.option(key)} takes on or off")
        return [flags.option(key)] if value == "on" else []
    parse_run_flags(dataset, [flags.option(key), value], f"--set {key}={value}")
    return [flags.option(key), value]


def make_plan(args, run_flags: list[str]) -> list[PlannedRun]:
    """Every run in a fixed order (dataset, model, --set values, seed), each checked by main_<dataset>.py's
    parser as it will run; UsageError for the first that would be refused."""
    sets, models = parse_sets(args.set or []), expand_models(args.models)
    refused = flags.flags_given(run_flags) & NOT_FOR_RUNS
    if refused:
        raise UsageError(f"flags after --: {', '.join(sorted(flags.option(name) for name in refused))} "
                         "cannot be given to every run (the sweep sets the model, seed, tag and resuming)")
    both = flags.flags_given(run_flags) & {key for key, _ in sets}
    if both:
        raise UsageError(f"{flags.option(sorted(both)[0])} is given both by --set and after --; give it once")
    plan, folders = [], set()
    for dataset, model in itertools.product(args.datasets, models):
        for values in itertools.product(*(values for _, values in sets)):
            for seed in args.seeds:
                parts = [f"{key}{value}" for (key, _), value in zip(sets, values)] + [f"s{seed}"]
                extra = [flag for (key, _), value in zip(sets, values) for flag in set_flag(dataset, key, value)]
                argv = ["--model", model, "--seed", str(seed), *extra, "--tag", "-".join(parts),
                        "--auto-resume", "--no-progress", *run_flags]
                parsed = parse_run_flags(dataset, argv, f"run {dataset} {model} {'-'.join(parts)}")
                planned = PlannedRun(len(plan), dataset, tuple(argv), parsed)
                if planned.folder in folders:
                    raise UsageError(f"{planned.name} is in the plan twice; give each seed and value once")
                folders.add(planned.folder)
                plan.append(planned)
    return plan


def read_plan(folder: Path) -> list[PlannedRun]:
    """The plan in runs.txt, each line parsed back into its run."""
    plan = []
    for index, line in enumerate((folder / PLAN_FILE).read_text().splitlines()):
        command = shlex.split(line)
        dataset = Path(command[1]).stem.removeprefix("main_")
        plan.append(PlannedRun(index, dataset, tuple(command[2:]),
                               flags.build_parser(dataset).parse_args(command[2:])))
    return plan


def plan_text(plan: list[PlannedRun]) -> str:
    return "".join(run.line() + "\n" for run in plan)


# ---------------------------------------------------------------------------------------------------
# The sweep's folder and the records of its runs


def sweep_folder(results_dir: str, name: str) -> Path:
    return Path(results_dir) / "sweeps" / name


def is_other_plan(folder: Path, plan: list[PlannedRun], overwrite: bool) -> bool:
    """Whether the folder holds another plan; UsageError for that without --overwrite."""
    path = folder / PLAN_FILE
    other = path.is_file() and path.read_text() != plan_text(plan)
    if other and not overwrite:
        raise UsageError(f"sweep {folder.name} in {folder.parent} already has another plan ({path}); pass "
                         "--overwrite to replace it, or another --name")
    return other


def write_plan(folder: Path, plan: list[PlannedRun], overwrite: bool) -> None:
    """runs.txt and the sweep's folders; --overwrite of another plan forgets its records (the run folders and
    logs stay)."""
    text, path = plan_text(plan), folder / PLAN_FILE
    if is_other_plan(folder, plan, overwrite):
        shutil.rmtree(folder / "records", ignore_errors=True)
    for sub in ("claims", "records", "logs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text() != text:
        store.write_text(path, text)


def log_path(folder: Path, run: PlannedRun) -> Path:
    return folder / "logs" / f"{run.index}.log"


def read_record(folder: Path, run: PlannedRun) -> dict:
    return store.read_json(folder / "records" / f"{run.index}.json") or {}


def last_error_line(log: Path, offset: int) -> str:
    """The last "error: ..." line the run wrote after offset, else its last line."""
    with contextlib.suppress(OSError):
        with open(log, "rb") as handle:
            handle.seek(offset)
            lines = [line.strip() for line in handle.read().decode("utf-8", "replace").splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error: ")]
        return (errors or lines or [""])[-1][:300]
    return ""


def is_done(run: PlannedRun) -> bool:
    return (run.folder / SUMMARY_FILE).is_file()


def is_running(run: PlannedRun) -> bool:
    """Whether a process holds the run's folder (trains in it)."""
    try:
        store.refuse_if_in_use(run.folder)
    except FolderInUse:
        return True
    return False


# ---------------------------------------------------------------------------------------------------
# One machine: workers claim runs and run them


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
            claim = open(self.folder / "claims" / f"{run.index}.lock", "a+b")
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
    store.write_json(workers.folder / "records" / f"{run.index}.json",
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


def worker_environments(args) -> dict[str, dict]:
    """Each worker's name and environment: one per GPU (CUDA_VISIBLE_DEVICES=that GPU), or --workers N on the
    CPU (no GPU visible, the CPU's cores shared); UsageError for a GPU that is not there."""
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.workers is None and args.gpus is None and visible == 0:
        args.workers = 1
    if args.workers is not None:
        base = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **thread_shares(args.workers)}
        return {f"cpu{number}": base for number in range(args.workers)}
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
# --status: a table of every run


def run_state(run: PlannedRun, record: dict, queued: dict[int, str]) -> tuple[str, str]:
    """(state, note) of a run: done, running, failed (with its last error line) or waiting."""
    if is_done(run):
        return "done", ""
    if is_running(run) or queued.get(run.index) == "RUNNING":
        return "running", ""
    code, stopped = record.get("exit"), record.get("stopped") or record.get("exit") in STOPPED_CODES
    if code is not None and code not in (0, IN_USE_EXIT) and not stopped:
        return "failed", f"exit {code}: {record.get('error', '')}"
    if run.index in queued:
        return "waiting", f"SLURM {queued[run.index].lower()}"
    return "waiting", "stopped, resumes" if stopped else ""


def status_table(plan: list[PlannedRun], folder: Path) -> str:
    queued = slurm.queued_tasks(folder)
    lines = ["| # | run | state | epochs | test acc | note |", "|---:|---|---|---:|---:|---|"]
    for run in plan:
        state, note = run_state(run, read_record(folder, run), queued)
        summary = store.read_json(run.folder / SUMMARY_FILE) if state == "done" else None
        metrics = run.folder / METRICS_FILE
        epochs = max(0, len(metrics.read_text().splitlines()) - 1) if metrics.is_file() else 0
        accuracy = f"{summary['final_test_acc']:.4f}" if summary and "final_test_acc" in summary else ""
        lines.append(f"| {run.index} | {run.name} | {state} | {epochs}/{run.flags.epochs} | {accuracy} | "
                     f"{note.replace('|', '/')} |")
    counts = {state: sum(f"| {state} |" in line for line in lines[2:]) for state in ("done", "running",
                                                                                      "failed", "waiting")}
    return "\n".join(lines) + "\n" + ", ".join(f"{count} {state}" for state, count in counts.items())


def show_status(name: str, run_flags: list[str]) -> int:
    results_dir = parse_run_flags("cifar10", run_flags, "flags after --").results_dir
    folder = sweep_folder(results_dir, name)
    if not (folder / PLAN_FILE).is_file():
        raise UsageError(f"no sweep {name!r} in {Path(results_dir) / 'sweeps'}; pass its --results-dir after --")
    print(status_table(read_plan(folder), folder))
    return 0


# ---------------------------------------------------------------------------------------------------
# The command line


def build_parser() -> flags.OneLineParser:
    parser = flags.OneLineParser(prog="sweep.py", description="Run every model x dataset x seed x --set value "
                               "with --auto-resume, on this machine's GPUs or CPU, or as a SLURM job array.")
    add = parser.add_argument
    add("--name", type=flags.tag_text, help="the sweep's name: its folder is <results-dir>/sweeps/<name>/")
    add("--status", type=flags.tag_text, metavar="NAME", help="print a table of every run of sweep NAME and exit")
    add("--datasets", nargs="+", choices=list(DATASETS), default=["cifar10"], help="[cifar10]")
    add("--models", nargs="+", default=["cnn_base"], help="model names, all, course or a family [cnn_base]")
    add("--seeds", nargs="+", type=flags.count(0, flags.MAX_SEED), default=[0], help="[0]")
    add("--set", action="append", metavar="KEY=V1,V2", help="a recipe flag's values to sweep, e.g. lr=0.1,0.05")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--gpus", type=gpu_list, help="GPUs to use, one worker each [every visible GPU]")
    where.add_argument("--workers", type=flags.count(1, 256), help="N worker processes on the CPU")
    add("--dry-run", action="store_true", help="print the plan and stop, writing nothing")
    add("--overwrite", action="store_true", help="replace the sweep's plan when it differs")
    slurm.add_flags(parser)
    return parser


def gpu_list(text: str) -> list[int]:
    try:
        gpus = [int(part) for part in text.split(",")]
    except ValueError:
        gpus = []
    if not gpus or min(gpus) < 0 or len(set(gpus)) != len(gpus):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of GPU numbers such as 0,1,2,3")
    return gpus


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    try:
        args = build_parser().parse_args(argv[:split])
    except SystemExit as done:
        return done.code
    return run_command(lambda: sweep(args, argv[split + 1:]))


def sweep(args, run_flags: list[str]) -> int:
    """Check everything (nothing is written before), print and write the plan, then run it here or submit it."""
    if args.status:
        return show_status(args.status, run_flags)
    if not args.name:
        raise UsageError("--name is missing: name the sweep (its folder is <results-dir>/sweeps/<name>/)")
    plan = make_plan(args, run_flags)
    environments = None if args.slurm else worker_environments(args)
    folder = sweep_folder(plan[0].flags.results_dir, args.name)
    is_other_plan(folder, plan, args.overwrite)  # refused before anything is written
    print(plan_text(plan), end="", flush=True)
    if args.dry_run:
        return 0
    write_plan(folder, plan, args.overwrite)
    if args.slurm:
        return slurm.submit(args, folder, len(plan))
    say(f"{len(plan)} runs, {len(environments)} worker(s): {', '.join(environments)}; plan in {folder / PLAN_FILE}")
    code = run_here(plan, folder, environments)
    print(status_table(plan, folder))
    for dataset in dict.fromkeys(run.dataset for run in plan):
        dataset_dir = Path(plan[0].flags.results_dir) / dataset
        if any(is_done(run) for run in plan if run.dataset == dataset):
            plot.main([str(dataset_dir)])
    return code


if __name__ == "__main__":
    sys.exit(main())
