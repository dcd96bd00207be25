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

This file is the command line; the sweep itself is in sweeps/: plan.py (the plan and runs.txt), workers.py (the
workers of this machine, their claims, records and logs), status.py (--status) and slurm.py (--slurm).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import plot
from core.errors import UsageError, quiet_closed_pipes, run_command
from model import MODELS, models_in
from sweeps import slurm
from sweeps.plan import (
    PLAN_FILE,
    Axes,
    is_done,
    is_other_plan,
    make_plan,
    parse_run_flags,
    parse_sets,
    plan_text,
    sweep_folder,
    write_plan,
)
from sweeps.status import show_status, status_table
from sweeps.workers import run_here, say, worker_environments
from train import DATASETS
from training import flags

TRAIN_SIZES = {dataset: spec.train_size for dataset, (_, spec) in DATASETS.items()}  # for the runs' flag checks


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


def expand_models(selections: list[str]) -> list[str]:
    """--models as model names, each once: a name as it is, all, course or a family as its models."""
    names = []
    for selection in selections:
        try:
            chosen = [selection] if selection in MODELS else models_in(selection)
        except ValueError:
            raise UsageError(f"--models: {selection!r} is neither a model nor all, course or a family "
                             "(see python main_cifar10.py --list-models)") from None
        names += [name for name in chosen if name not in names]
    return names


def main(argv: list[str] | None = None) -> int:
    quiet_closed_pipes()  # before --help prints
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
        results_dir = parse_run_flags("cifar10", run_flags, "flags after --", TRAIN_SIZES["cifar10"]).results_dir
        return show_status(results_dir, args.status)
    if not args.name:
        raise UsageError("--name is missing: name the sweep (its folder is <results-dir>/sweeps/<name>/)")
    sets = parse_sets(args.set or [])
    plan = make_plan(Axes(args.datasets, expand_models(args.models), sets, args.seeds), run_flags, TRAIN_SIZES)
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
