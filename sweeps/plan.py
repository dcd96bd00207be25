"""A sweep's plan: every dataset x model x --set value x seed as one main_<dataset>.py command line, in a fixed
order, each checked by main_<dataset>.py's own parser before anything runs; the plan's file, runs.txt (one exact
command per line), in the sweep's folder <results-dir>/sweeps/<name>/; and whether a planned run is done (its
summary.json) or running (a process holds its folder).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import itertools
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from core.errors import FolderInUse, UsageError
from runfolder import lock, store
from runfolder.declarations import SUMMARY_FILE
from training import flags

REPO_ROOT = Path(__file__).resolve().parent.parent  # where main_<dataset>.py are
PLAN_FILE = "runs.txt"
# The sweep's folders beside runs.txt, with a file per run: <i>.lock, <i>.json, <i>.log (sweeps/workers.py)
CLAIMS_FOLDER, RECORDS_FOLDER, LOGS_FOLDER = "claims", "records", "logs"
SET_ASIDE = {"model", "seed"}  # recipe flags the sweep's own axes set (--models, --seeds)
# Run flags the sweep sets itself, or that are not a training run.
NOT_FOR_RUNS = {"model", "seed", "tag", "resume", "overwrite", "auto_resume", *flags.COMMAND_FLAGS}


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


@dataclass(frozen=True)
class Axes:
    """What a sweep varies, in the plan's order: every dataset x model x --set value x seed."""

    datasets: list[str]
    models: list[str]  # names, the selections (course, a family) already expanded
    sets: list[tuple[str, list[str]]]  # parse_sets' (recipe flag, values)
    seeds: list[int]


def parse_run_flags(dataset: str, argv: list[str], what: str, train_size: int):
    """argv parsed by main_<dataset>.py's own parser and checks (train_size: the dataset's training images);
    UsageError naming `what` otherwise."""
    refusal = io.StringIO()
    try:
        with contextlib.redirect_stderr(refusal):
            parsed = flags.build_parser(dataset).parse_args(argv)
    except SystemExit:
        reason = refusal.getvalue().strip().removeprefix("error: ").removesuffix(" (see --help)")
        raise UsageError(f"{what}: {reason}") from None
    flags.check_flags(parsed, train_size)
    return parsed


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


def set_flag(dataset: str, key: str, value: str, train_size: int) -> list[str]:
    """One --set value as main_<dataset>.py flags: on/off for an on/off flag (`--key` or nothing, or `--key` and
    `--no-key` for a flag that has both), else `--key value`, checked by the flag's own type and choices."""
    spec = next(spec for spec in dataclasses.fields(flags.Recipe) if spec.name == key)
    action = spec.metadata["argparse"].get("action")
    if action in ("store_true", argparse.BooleanOptionalAction):
        if value not in ("on", "off"):
            raise UsageError(f"--set {key}={value}: {flags.option(key)} takes on or off")
        if value == "on":
            return [flags.option(key)]
        return ["--no-" + flags.option(key).removeprefix("--")] if action is argparse.BooleanOptionalAction else []
    parse_run_flags(dataset, [flags.option(key), value], f"--set {key}={value}", train_size)
    return [flags.option(key), value]


def make_plan(axes: Axes, run_flags: list[str], train_sizes: dict[str, int]) -> list[PlannedRun]:
    """Every run in a fixed order (dataset, model, --set values, seed), each checked by main_<dataset>.py's
    parser as it will run (train_sizes: each dataset's training images); UsageError for the first that would be
    refused."""
    sets = axes.sets
    refused = flags.flags_given(run_flags) & NOT_FOR_RUNS
    if refused:
        raise UsageError(f"flags after --: {', '.join(sorted(flags.option(name) for name in refused))} "
                         "cannot be given to every run (the sweep sets the model, seed, tag and resuming)")
    both = flags.flags_given(run_flags) & {key for key, _ in sets}
    if both:
        raise UsageError(f"{flags.option(sorted(both)[0])} is given both by --set and after --; give it once")
    plan, folders = [], set()
    for dataset, model in itertools.product(axes.datasets, axes.models):
        train_size = train_sizes[dataset]
        for values in itertools.product(*(values for _, values in sets)):
            for seed in axes.seeds:
                parts = [f"{key}{value}" for (key, _), value in zip(sets, values)] + [f"s{seed}"]
                extra = [flag for (key, _), value in zip(sets, values)
                         for flag in set_flag(dataset, key, value, train_size)]
                argv = ["--model", model, "--seed", str(seed), *extra, "--tag", "-".join(parts),
                        "--auto-resume", "--no-progress", *run_flags]
                parsed = parse_run_flags(dataset, argv, f"run {dataset} {model} {'-'.join(parts)}", train_size)
                planned = PlannedRun(len(plan), dataset, tuple(argv), parsed)
                if planned.folder in folders:
                    raise UsageError(f"{planned.name} is in the plan twice; give each seed and value once")
                folders.add(planned.folder)
                plan.append(planned)
    return plan


def plan_text(plan: list[PlannedRun]) -> str:
    return "".join(run.line() + "\n" for run in plan)


# ---------------------------------------------------------------------------------------------------
# runs.txt in the sweep's folder


def sweep_folder(results_dir: str, name: str) -> Path:
    return Path(results_dir) / "sweeps" / name


def read_plan(folder: Path) -> list[PlannedRun]:
    """The plan in runs.txt, each line parsed back into its run."""
    plan = []
    for index, line in enumerate((folder / PLAN_FILE).read_text().splitlines()):
        command = shlex.split(line)
        dataset = Path(command[1]).stem.removeprefix("main_")
        plan.append(PlannedRun(index, dataset, tuple(command[2:]),
                               flags.build_parser(dataset).parse_args(command[2:])))
    return plan


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
        shutil.rmtree(folder / RECORDS_FOLDER, ignore_errors=True)
    for sub in (CLAIMS_FOLDER, RECORDS_FOLDER, LOGS_FOLDER):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text() != text:
        store.write_text(path, text)


# ---------------------------------------------------------------------------------------------------
# The run folders are the truth for what is done and what is running


def is_done(run: PlannedRun) -> bool:
    return (run.folder / SUMMARY_FILE).is_file()


def is_running(run: PlannedRun) -> bool:
    """Whether a process holds the run's folder (trains in it)."""
    try:
        lock.refuse_if_in_use(run.folder)
    except FolderInUse:
        return True
    return False
