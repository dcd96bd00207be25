"""The command line of main_cifar10.py / main_cifar100.py: every flag declared once with its role, the
parser built from those declarations, the checks no single flag can make, and the frozen configuration a
run is resolved into.

A flag's role is the class it is declared in:
- Recipe: what a run computes. Fixed for the run: --resume takes it from last.pt and refuses a typed
  change (only --epochs may grow). Saved in config.json and shown in the reports.
- Settings: how and where the run computes (device, precision, progress, folders). May change on
  --resume. Saved in config.json.
- Commands: what to do instead of training (--eval-only, --predict, --list-models, --summary) and their
  options. Not saved.
The namespace argparse makes goes no further than train.py's command(): command_line() types it by role, and
train.resolve turns that into a run's RunConfig.
Everything that depends on roles (resume's checks, config.json's keys, the report's settings, the flag
table of docs/training.md) is derived from these classes, so a new flag is one field here plus the code that uses it.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cifar.batches import AUGMENTATIONS
from core import course
from core.errors import IN_USE_EXIT, USAGE_EXIT, UsageError
from model import DEFAULT_LR, FAMILIES, MODELS
from runfolder import tensorboard_events
from training.devices import AMP_CHOICES, DEVICE_CHOICES

MAX_EPOCHS = 100_000
MAX_IMAGES = 50_000  # the training set of either dataset: the most a batch, subset or split can hold
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit
TAG_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
SCHEDULES = ("cosine", "constant")  # --schedule's choices: what the learning rate does after the warmup
# --recipe's choices: the defaults each names for the recipe flags not typed on the command line.
RECIPES = {course.DEFAULT_NAME: {}, course.NAME: course.RECIPE}


# ---------------------------------------------------------------------------------------------------
# Argument types: each refuses a bad value in one line that quotes it and says what is allowed.


def number(kind: type, allowed: str, within: Callable[[float], bool]) -> Callable[[str], float]:
    """A finite int or float for which within(value) holds."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or (kind is float and not math.isfinite(value)) or not within(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {allowed}")
        return value
    return parse


def count(low: int, high: int) -> Callable[[str], int]:
    return number(int, f"a whole number from {low:,} to {high:,}", lambda value: low <= value <= high)


def path_text(text: str) -> str:
    if not text or "\0" in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not a path")
    return text


def tag_text(text: str) -> str:
    if not TAG_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a plain name: 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'")
    return text


def flag(default, help: str, **argparse_options):
    """A flag's declaration: its default, its --help text and the rest of argparse's add_argument options.
    may_grow (recipe only): --resume may raise it. reported=False: left out of the HTML report's settings.
    old_default: what runs saved before the flag existed behaved as (default: its default)."""
    metadata = {"help": help, "may_grow": argparse_options.pop("may_grow", False),
                "reported": argparse_options.pop("reported", True),
                "old_default": argparse_options.pop("old_default", default), "argparse": argparse_options}
    return field(default=default, metadata=metadata)


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _recipe_help() -> str:
    def typed(name: str, value) -> str:
        if isinstance(value, bool):
            return option(name) if value else "--no-" + option(name)[2:]
        return f"{option(name)} {value:g}" if isinstance(value, float) else f"{option(name)} {value}"
    lab = " ".join(typed(name, value) for name, value in RECIPES[course.NAME].items())
    return (f"defaults of the recipe flags not typed: '{course.DEFAULT_NAME}' (each flag's own) or "
            f"'{course.NAME}' (the course lab's experiment: {lab}; the same lr for every model) "
            f"[{course.DEFAULT_NAME}]")


def _lr_help() -> str:
    others = ", ".join(f"{name}: {spec.lr}" for name, spec in MODELS.items() if spec.lr != DEFAULT_LR)
    return f"peak learning rate after warmup [{DEFAULT_LR}; {others}; --recipe {course.NAME}: {course.RECIPE['lr']}]"


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """What a run computes; fixed for the run."""

    recipe: str = flag(course.DEFAULT_NAME, _recipe_help(), choices=list(RECIPES))
    model: str = flag("cnn_base", "network to train (see --list-models) [cnn_base]",
                      choices=list(MODELS), metavar="MODEL")
    epochs: int = flag(50, "number of training epochs [50]", type=count(1, MAX_EPOCHS), may_grow=True)
    batch_size: int = flag(128, "global batch size, split over the processes under torchrun [128]",
                           type=count(1, MAX_IMAGES))
    lr: float | None = flag(None, _lr_help(),
                            type=number(float, "a learning rate above 0", lambda value: value > 0))
    momentum: float = flag(0.9, "SGD momentum [0.9]",
                           type=number(float, "a momentum in [0, 1)", lambda value: 0 <= value < 1))
    nesterov: bool = flag(True, "Nesterov momentum (with a --momentum above 0) [on]",
                          action=argparse.BooleanOptionalAction)
    weight_decay: float = flag(5e-4, "SGD weight decay [5e-4]",
                               type=number(float, "a weight decay of 0 or more", lambda value: value >= 0))
    label_smoothing: float = flag(0.0, "cross-entropy label smoothing [0]", type=number(
        float, "a label smoothing in [0, 1)", lambda value: 0 <= value < 1))
    warmup_epochs: float = flag(1.0, "epochs of linear learning-rate warmup before the --schedule [1]",
                                type=number(float, f"a number of epochs from 0 to {MAX_EPOCHS:,}",
                                            lambda value: 0 <= value <= MAX_EPOCHS))
    schedule: str = flag("cosine", "learning rate after the warmup: 'cosine' decay to zero at the last step, "
                                   "or 'constant' [cosine]", choices=list(SCHEDULES))
    val_size: int = flag(0, "training images held out (class balanced) for validation; 0 validates on "
                            "the test set as the course code did [0]", type=count(0, MAX_IMAGES - 1))
    aug: str = flag("flip-crop", "training augmentation [flip-crop]", choices=list(AUGMENTATIONS))
    subset: int | None = flag(None, "use only the first N training and N test images, for smoke runs "
                                    "[all]", type=count(1, MAX_IMAGES))
    seed: int = flag(0, "seed of initialization, split and batches [0]", type=count(0, MAX_SEED))
    sync_bn: bool = flag(False, "synchronized BatchNorm across torchrun processes [off]",
                         action="store_true")


@dataclass(frozen=True, kw_only=True)
class Settings:
    """How and where a run computes; may change on --resume."""

    data_dir: str = flag("data", "where the dataset is, or is downloaded to [data]", type=path_text,
                         reported=False)
    results_dir: str = flag("results", "root folder of all runs [results]", type=path_text,
                            reported=False)
    tag: str | None = flag(None, "suffix of the run folder, results/<dataset>/<model>-<tag>, e.g. a "
                                 "seed; letters, digits, '.', '_', '-' [none]", type=tag_text)
    device: str = flag("auto", "training device [auto: cuda, then mps, then cpu]",
                       choices=list(DEVICE_CHOICES))
    amp: str = flag("auto", "mixed precision autocast [auto: bf16 on CUDA from compute capability 8.0, fp16 "
                            "below it, off elsewhere]; on CUDA, off still "
                            "runs convolutions and matrix products on TF32 tensor cores (10-bit mantissa)",
                    choices=list(AMP_CHOICES))
    channels_last: bool | None = flag(None, "channels_last memory format [on for CUDA, off elsewhere]",
                                      action=argparse.BooleanOptionalAction)
    compile: bool = flag(False, "torch.compile the model [off]", action="store_true")
    dist_timeout: float = flag(60.0, "under torchrun: minutes a process waits for the others in one collective "
                                     "(rank 0's dataset download, its end-of-run tests) before the run fails [60]",
                               type=number(float, "a number of minutes above 0", lambda value: value > 0),
                               reported=False)
    deterministic: bool = flag(False, "deterministic algorithms: bit-identical reruns and resumes, "
                                      "somewhat slower [off]", action="store_true", reported=False)
    resume: bool = flag(False, "continue the run from its last.pt", action="store_true", reported=False)
    overwrite: bool = flag(False, "start the run over, replacing the one in its folder",
                           action="store_true", reported=False)
    no_progress: bool = flag(False, "no progress bar (also off when not on a terminal)",
                             action="store_true", reported=False)
    tensorboard: bool = flag(False, "also write each epoch's metrics to <run folder>/tensorboard/ (needs "
                                    "the tensorboard package) [off]", action="store_true", reported=False)
    auto_resume: bool = flag(False, "start the run, resume it or say it finished, whichever its folder calls "
                                    "for: the same command is safe to run again after any stop (sweeps use "
                                    f"it); exit {IN_USE_EXIT} when another process holds the folder",
                             action="store_true", reported=False)

    @property
    def exit_code_if_in_use(self) -> int:
        """The exit code of a run whose folder another process holds: its own under --auto-resume (a sweep skips
        that run), a usage error's otherwise."""
        return IN_USE_EXIT if self.auto_resume else USAGE_EXIT


@dataclass(frozen=True, kw_only=True)
class Commands:
    """What to do instead of training, and the options of those commands; never saved."""

    list_models: str | None = flag(
        None, "print model names, one per line, and exit: all of them, 'course' (the course's 15) or "
              "one family (" + ", ".join(FAMILIES) + ") [all]", nargs="?", const="all", metavar="WHICH")
    summary: bool = flag(False, "print the network, its parameter count and FLOPs, and exit",
                         action="store_true")
    eval_only: bool = flag(False, "evaluate the run's best.pt (or --checkpoint) on the test set and exit",
                           action="store_true")
    checkpoint: str | None = flag(None, "checkpoint for --eval-only and --predict [<run folder>/best.pt]",
                                  type=path_text)
    tta: bool = flag(False, "with --eval-only: average the predictions of each image and its mirror",
                     action="store_true")
    predict: list[str] | None = flag(
        None, "print the top-5 classes of each PNG or JPEG image (any size) by the run's best.pt (or "
              "--checkpoint) and exit", nargs="+", type=path_text, metavar="IMAGE")


ROLES = {"recipe": Recipe, "setting": Settings, "command": Commands}
RECIPE_FLAGS = tuple(spec.name for spec in dataclasses.fields(Recipe))
SETTING_FLAGS = tuple(spec.name for spec in dataclasses.fields(Settings))
COMMAND_FLAGS = tuple(spec.name for spec in dataclasses.fields(Commands))
# What the HTML report shows of a run's config.json, in this order: runfolder/declarations.py's REPORTED_FLAGS, which
# the reports read (they import no training code); tests/test_layers.py checks that the two agree.
REPORTED_FLAGS = tuple(spec.name for role in (Recipe, Settings) for spec in dataclasses.fields(role)
                       if spec.metadata["reported"])


# ---------------------------------------------------------------------------------------------------
# The parser


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (exit 2), not the whole usage block."""

    def __init__(self, *args, **kwargs) -> None:
        # No abbreviations: "--ep 100" would otherwise set --epochs without being seen as typed.
        super().__init__(*args, allow_abbrev=False, **kwargs)
        # argparse takes "-1e-4" and "-inf" for flags (only "-5" and "-0.5" for negative numbers), so
        # the error would be "expected one argument" instead of quoting the bad value. argparse has no public
        # way to say what a negative number looks like: tests/test_flags.py's "-1e-4" and "-inf" cases fail if a
        # Python release stops reading this attribute.
        self._negative_number_matcher = re.compile(
            r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)

    def error(self, message: str):
        self.exit(USAGE_EXIT, f"error: {message} (see --help)\n")


ROLE_TITLES = {"recipe": "recipe (fixed for a run; --resume takes it from last.pt and refuses a change, "
                         "but --epochs may grow)",
               "setting": "settings (may change on --resume)",
               "command": "commands (instead of training)"}


def build_parser(dataset: str) -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=f"main_{dataset}.py",
        description=f"Train, evaluate or describe one of {len(MODELS)} CNNs on {dataset.upper()}.")
    for role, declared in ROLES.items():
        group = parser.add_argument_group(ROLE_TITLES[role])
        for spec in dataclasses.fields(declared):
            group.add_argument(option(spec.name), dest=spec.name, default=spec.default,
                               help=spec.metadata["help"], **spec.metadata["argparse"])
    return parser


def flags_given(argv: list[str]) -> set[str]:
    """Names of the flags typed on the command line, to tell them from defaults (the parser takes no
    abbreviations, so a typed flag is its full name)."""
    typed = {token.split("=", 1)[0] for token in argv if token.startswith("--")}
    return {spec.name for role in ROLES.values() for spec in dataclasses.fields(role)
            if typed & set(option_strings(spec))}


def option_strings(spec: dataclasses.Field) -> list[str]:
    """A declared flag's options: --name, and --no-name for an on/off flag."""
    if spec.metadata["argparse"].get("action") is argparse.BooleanOptionalAction:
        return [option(spec.name), "--no-" + option(spec.name)[2:]]
    return [option(spec.name)]


def flag_table_markdown() -> str:
    """The flag table of docs/training.md: every flag, its role and its --help text."""
    lines = ["| flag | role | what it does |", "|---|---|---|"]
    for role, declared in ROLES.items():
        for spec in dataclasses.fields(declared):
            text = spec.metadata["help"].replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
            names = " / ".join(f"`{name}`" for name in option_strings(spec))
            lines.append(f"| {names} | {role} | {text} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Checks between flags, the command line typed, and the frozen configuration


def check_flags(args: argparse.Namespace, train_size: int) -> None:
    """What no single flag's type can see: flags that contradict each other, sizes beyond the dataset's,
    paths that cannot serve. Reads nothing but the file system's metadata and writes nothing."""
    contradictions = (
        (args.resume and args.overwrite,
         "--resume and --overwrite contradict each other: pass one of them"),
        (args.eval_only and (args.resume or args.overwrite),
         "--eval-only trains nothing, so --resume and --overwrite mean nothing with it; drop them"),
        (args.eval_only and args.predict, "--eval-only and --predict are two commands; pass one of them"),
        (args.predict and (args.resume or args.overwrite),
         "--predict trains nothing, so --resume and --overwrite mean nothing with it; drop them"),
        (args.auto_resume and (args.resume or args.overwrite or args.eval_only or args.predict),
         "--auto-resume starts or resumes a training run by itself; drop --resume, --overwrite, --eval-only "
         "and --predict"),
        (args.checkpoint and not (args.eval_only or args.predict),
         "--checkpoint is for --eval-only and --predict; to continue a run use --resume"),
    )
    for contradicts, message in contradictions:
        if contradicts:
            raise UsageError(message)
    if args.tensorboard:
        tensorboard_events.require_tensorboard()
    if args.tta and not args.eval_only:
        raise UsageError("--tta is for --eval-only; add --eval-only or drop --tta")
    check_sizes(args, train_size)
    for flag_name, path in (("--data-dir", args.data_dir), ("--results-dir", args.results_dir)):
        if Path(path).exists() and not Path(path).is_dir():
            raise UsageError(f"{flag_name} {path} is a file; pass a folder")
    if args.checkpoint and not Path(args.checkpoint).is_file():
        raise UsageError(f"--checkpoint {args.checkpoint}: no such file; pass the path of a best.pt")


def check_sizes(args: argparse.Namespace, train_size: int) -> None:
    if args.subset is not None and args.subset > train_size:
        raise UsageError(f"--subset {args.subset} is more than the {train_size:,} training images; pass "
                         "a smaller number or leave it out")
    images = train_size if args.subset is None else args.subset
    if args.val_size >= images:
        raise UsageError(f"--val-size {args.val_size} leaves no training images out of {images:,}; pass "
                         "a smaller number")


@dataclass(frozen=True)
class CommandLine:
    """The command line typed by role, as parsed: the recipe flags as typed or defaulted (--recipe's defaults and
    a resumed run's saved recipe are train.resolve's to apply), the settings, the commands, which flags were typed
    and the command line's text."""

    dataset: str
    recipe: Recipe
    settings: Settings
    commands: Commands
    given: frozenset[str]  # flags_given's names
    text: str  # "main_<dataset>.py" and the arguments, as config.json's command records it


def command_line(args: argparse.Namespace, dataset: str, argv: list[str]) -> CommandLine:
    """The namespace argparse made of argv, typed by role."""
    def role_of(declared: type):
        return declared(**{spec.name: getattr(args, spec.name) for spec in dataclasses.fields(declared)})
    return CommandLine(dataset, role_of(Recipe), role_of(Settings), role_of(Commands), frozenset(flags_given(argv)),
                       " ".join([f"main_{dataset}.py", *argv]))


@dataclass(frozen=True)
class RunConfig:
    """A training run's flags, resolved once (train.resolve): the recipe (on --resume the saved run's, with --lr's
    default filled in from the model), the settings as typed (with --resume set by --auto-resume when the folder
    holds a last.pt), the dataset and the command line."""

    recipe: Recipe
    settings: Settings
    dataset: str
    command: str

    def flags(self) -> dict:
        """Every recipe and setting flag by name, as config.json holds them."""
        return {**dataclasses.asdict(self.recipe), **dataclasses.asdict(self.settings)}


def typed_recipe(args: argparse.Namespace) -> Recipe:
    return Recipe(**{name: getattr(args, name) for name in RECIPE_FLAGS})


def with_recipe_defaults(typed: Recipe, given: set[str]) -> Recipe:
    """The typed recipe with its --recipe's defaults for the flags not typed: typed flags win."""
    return dataclasses.replace(typed, **{name: value for name, value in RECIPES[typed.recipe].items()
                                         if name not in given})


def resume_recipe(typed: Recipe, given: set[str], saved: dict, dataset: str) -> Recipe:
    """The recipe of a resumed run: the saved one, where a flag older than the saved run holds its
    old_default; a typed flag that would change it is refused (--epochs may grow)."""
    if saved.get("model") != typed.model or saved.get("dataset") != dataset:
        raise UsageError(f"last.pt in this folder is a {saved.get('dataset')} {saved.get('model')} run, "
                         f"not {dataset} {typed.model}; pick the matching --model or --overwrite")
    values = {}
    for spec in dataclasses.fields(Recipe):
        name, saved_value = spec.name, saved.get(spec.name, spec.metadata["old_default"])
        typed_value = getattr(typed, name)
        if name in given and typed_value != saved_value:
            if not spec.metadata["may_grow"]:
                raise UsageError(f"--resume cannot change {option(name)} (the run used {saved_value}, got "
                                 f"{typed_value}); drop the flag or start over with --overwrite")
            if typed_value < saved_value:
                raise UsageError(f"--resume can raise {option(name)} but not lower it (the run has "
                                 f"{saved_value}); drop the flag or start over with --overwrite")
            saved_value = typed_value
        values[name] = saved_value
    return Recipe(**values)


def with_default_lr(recipe: Recipe) -> Recipe:
    if recipe.lr is not None:
        return recipe
    return dataclasses.replace(recipe, lr=MODELS[recipe.model].lr)
