"""What each file of a run folder holds, declared once: its name, its fields, and the default that an older
file without a field is read with.

A run folder is a file format with readers we don't control (plot.py, reports/pages.py, TensorBoard, torch.hub,
sweeps, other people's notebooks), and results/ outlives code versions. So:
- the writer builds each file from the declaration below (a dataclass, or the metrics columns), never from
  literal key strings, and every reader of this project reads it back through the same declaration;
- a field added later has a default that reproduces what the older code did, so a file written before it
  existed reads as it always meant (a metrics.csv without a newer column, a best.pt without "classes");
- a field renamed keeps its old name readable (OLD_NAMES), so eval.json files of every version read alike;
- one quantity has one name in every file: test top-1 is "test_acc" in summary.json and eval.json alike.

Importing this module is cheap (no torch): plot.py reads run folders without training.
Config.json is the one file whose keys are not all here: it holds every recipe and setting flag (declared
with their roles in training/flags.py) plus the facts of RunFacts below.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from core.errors import UsageError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.csv"
LOG_FILE = "log.txt"
CURVES_FILE = "curves.png"
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
SUMMARY_FILE = "summary.json"
EVAL_FILE = "eval.json"
CONFUSION_FILE = "confusion_matrix.png"
MISTAKES_FILE = "mistakes.png"  # thumbnails of the test images the network got wrong most confidently
LOCK_FILE = ".lock"  # held (flock) by the one process that trains or evaluates into the folder
TEMP_MARK = ".tmp"  # in the names of the temporary files that writes go through
# Files that describe a finished state of the run; a run that trains on removes them at its first new epoch.
END_OF_RUN_FILES = (SUMMARY_FILE, EVAL_FILE, CONFUSION_FILE, MISTAKES_FILE)
# What a dataset folder holds beside its run folders (plot.py writes them).
SUMMARY_CSV_FILE = "summary.csv"
SUMMARY_MD_FILE = "summary.md"
COMPARISON_FILE = "comparison.png"
CLASS_ACCURACY_FILE = "class_accuracy.png"  # test accuracy per class (CIFAR-100: per superclass) of each model
CLASS_ACCURACY_ALL_FILE = "class_accuracy_all_classes.png"  # CIFAR-100: the same for each of its 100 classes
ACCURACY_COST_FILE = "accuracy_cost.png"  # test accuracy against parameters, FLOPs and throughput
PAGE_FILE = "index.html"  # the HTML page of a dataset folder, and of the results root


class RunFileError(UsageError):
    """A run file that cannot be read as what it should be; str() is one line naming the file."""


# ---------------------------------------------------------------------------------------------------
# metrics.csv: one row per epoch. A column's format is how the writer prints it; its tensorboard tag, if
# any, is where runfolder/tensorboard_events.py puts it; a column added later gets a default for older files.


def column(fmt: str, meaning: str, tensorboard: str | None = None, default: float | None = None):
    metadata = {"fmt": fmt, "meaning": meaning, "tensorboard": tensorboard}
    if default is None:
        return field(metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True, kw_only=True)
class EpochMetrics:
    """One row of metrics.csv (and of last.pt's history, which holds the same rows as text)."""

    epoch: int = column("d", "the epoch, from 1")
    lr: float = column(".6g", "learning rate after the epoch's last step", "learning_rate")
    train_loss: float = column(".6f", "mean training loss of the epoch", "loss/train")
    train_acc: float = column(".6f", "training top-1 accuracy of the epoch", "accuracy/train")
    val_loss: float = column(".6f", "validation loss after the epoch", "loss/valid")
    val_acc: float = column(".6f", "validation top-1 accuracy after the epoch", "accuracy/valid")
    val_top5: float = column(".6f", "validation top-5 accuracy after the epoch", "accuracy/valid_top5")
    epoch_seconds: float = column(".3f", "wall time of the epoch's steps and validation", "epoch_seconds")
    train_seconds: float = column(".3f", "wall time of the epoch's training steps", "time/train_seconds",
                                  default=math.nan)
    val_seconds: float = column(".3f", "wall time of the validation after the epoch", "time/val_seconds",
                                default=math.nan)
    between_seconds: float = column(
        ".3f", "wall time from the previous epoch's validation to this epoch's first step: what the loop waits "
               "for between epochs (nan for the first epoch a process trains)", "time/between_seconds",
        default=math.nan)

    def row(self) -> dict[str, str]:
        """The row as metrics.csv and last.pt's history hold it: each value in its column's format."""
        return {spec.name: format(getattr(self, spec.name), spec.metadata["fmt"])
                for spec in dataclasses.fields(self)}

    @classmethod
    def from_row(cls, row: dict) -> EpochMetrics:
        """A row of metrics.csv or of last.pt's history (any version), as numbers."""
        row = complete_row(row)
        return cls(**{spec.name: (int if spec.type == "int" else float)(row[spec.name])
                      for spec in dataclasses.fields(cls)})


METRIC_COLUMNS = tuple(spec.name for spec in dataclasses.fields(EpochMetrics))
TENSORBOARD_TAGS = {spec.name: spec.metadata["tensorboard"] for spec in dataclasses.fields(EpochMetrics)
                    if spec.metadata["tensorboard"]}
_COLUMN_DEFAULTS = {spec.name: format(spec.default, spec.metadata["fmt"])
                    for spec in dataclasses.fields(EpochMetrics) if spec.default is not dataclasses.MISSING}


def complete_row(row: dict) -> dict:
    """A history row of any version with every column of this one: a column added since holds its default
    (so a resumed older run writes a complete metrics.csv); the values it has stay as they are."""
    return {name: row.get(name) if row.get(name) not in (None, "") else _COLUMN_DEFAULTS.get(name, "")
            for name in METRIC_COLUMNS}


def metrics_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(complete_row(row) for row in rows)
    return buffer.getvalue()


def read_metrics(path: Path) -> dict[str, np.ndarray]:
    """The columns of a metrics.csv as float arrays, a column this file predates filled with its
    default; RunFileError (naming the file) if it is malformed."""
    try:
        with open(path, newline="") as metrics_file:
            reader = csv.DictReader(metrics_file)
            present = reader.fieldnames or []
            missing = [name for name in METRIC_COLUMNS if name not in present and name not in _COLUMN_DEFAULTS]
            if missing:
                raise RunFileError(f"{path}: missing columns {', '.join(missing)}")
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise RunFileError(f"{path}: cannot be read ({err})") from None
    if not rows:
        raise RunFileError(f"{path}: no epochs recorded")
    columns: dict[str, list[float]] = {name: [] for name in METRIC_COLUMNS}
    for line_number, row in enumerate(rows, start=2):
        for name in METRIC_COLUMNS:
            text = row.get(name)
            if text in (None, ""):
                text = _COLUMN_DEFAULTS.get(name, text)
            try:
                columns[name].append(float(text))
            except (TypeError, ValueError):
                raise RunFileError(f"{path}: line {line_number}: {name} is not a number "
                                   f"({text!r})") from None
    return {name: np.array(values) for name, values in columns.items()}


# ---------------------------------------------------------------------------------------------------
# JSON files and checkpoints: a frozen dataclass each. Fields without a default were there from the start;
# a field added later must have one. to_dict() is what the writer saves, in field order.


class Record:
    """Base of the declared files: from_dict() reads any version of one, to_dict() writes this one."""

    OLD_NAMES: ClassVar[dict[str, str]] = {}  # a field's earlier name -> its name now

    def to_dict(self) -> dict[str, Any]:
        return {spec.name: getattr(self, spec.name) for spec in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, content: dict, source: str | Path, partial: bool = False):
        """Read a file's content: earlier names renamed, fields added since filled with their default,
        keys this version does not know ignored. A field that should be there and is not: RunFileError
        naming source, or with partial (reports, which show what a damaged file still has) None."""
        content = {cls.OLD_NAMES.get(key, key): value for key, value in content.items()}
        names = {spec.name for spec in dataclasses.fields(cls)}
        missing = [spec.name for spec in dataclasses.fields(cls) if spec.name not in content
                   and spec.default is dataclasses.MISSING]
        if missing and not partial:
            raise RunFileError(f"{source}: not a {cls.__name__} of this project (missing "
                               f"{', '.join(missing)})")
        return cls(**{name: None for name in missing},
                   **{key: value for key, value in content.items() if key in names})


@dataclass(frozen=True, kw_only=True)
class RunFacts(Record):
    """What config.json holds besides the flags: what the run was made of, on which machine. device, amp
    and channels_last here are the resolved values (cpu, off, false), where the flags said "auto"."""

    dataset: str
    num_classes: int
    parameters: int
    flops: int
    validation: str  # "held-out" or "test": what the epochs were validated on
    mean: list[float]  # per-channel statistics of the whole training set, as the batches normalize
    std: list[float]
    train_images: int
    val_images: int
    device: str
    gpu_name: str | None
    amp: str
    channels_last: bool
    world_size: int
    torch_version: str
    torchvision_version: str | None
    python_version: str
    classes: list[str] = None  # added after the first runs; None: the dataset's own names
    command: str = ""  # the command line that started (or last continued) the run


# The flags of config.json that the HTML report shows per run, in this order (reports/pages.py, which imports no
# training code): the recipe and the settings a reader compares between runs. training/flags.py declares each flag
# left out here reported=False, and tests/test_layers.py checks that the two agree.
REPORTED_FLAGS = ("recipe", "model", "epochs", "batch_size", "lr", "momentum", "nesterov", "weight_decay",
                  "label_smoothing", "warmup_epochs", "schedule", "val_size", "aug", "subset", "seed", "sync_bn",
                  "tag", "device", "amp", "channels_last", "compile")


@dataclass(frozen=True, kw_only=True)
class Summary(Record):
    """summary.json: written when a run has finished; its presence marks the run finished."""

    model: str
    dataset: str
    epochs: int
    best_epoch: int
    best_val_acc: float
    final_train_loss: float
    final_train_acc: float
    final_val_loss: float
    final_val_acc: float
    test_acc: float  # best.pt's top-1 on the test set
    test_top5: float
    test_loss: float
    final_test_acc: float  # the last epoch's weights on the test set
    final_test_top5: float
    final_test_loss: float
    validation: str
    total_seconds: float  # the epochs' epoch_seconds summed
    seconds_per_epoch: float  # their mean, the first epoch (compilation, autotuning) included
    first_epoch_seconds: float | None = None  # added later: None in older summaries
    steady_epoch_seconds: float | None = None  # the median epoch after the first
    steady_between_seconds: float | None = None  # the median wait between epochs


@dataclass(frozen=True, kw_only=True)
class Evaluation(Record):
    """eval.json: what --eval-only measured of a checkpoint on the test set."""

    OLD_NAMES: ClassVar[dict[str, str]] = {"top1": "test_acc", "top5": "test_top5", "loss": "test_loss"}

    model: str
    dataset: str
    checkpoint: str
    checkpoint_epoch: int | None
    tta: bool
    test_acc: float
    test_top5: float
    test_loss: float
    images: int
    per_class: dict[str, float]
    confusion_matrix: list[list[int]]
    ece: float | None = None  # added with calibration; None: evaluated before it
    calibration_bins: list[dict] | None = None  # each {"low", "high", "count", "accuracy", "confidence"}
    # Added with the classes' figures; None: evaluated before them.
    mistakes: list[dict] | None = None  # the most confident wrong answers: {"index", "true", "predicted", "confidence"}
    superclasses: dict[str, str] | None = None  # CIFAR-100: each class's superclass, from the dataset's coarse labels


@dataclass(frozen=True, kw_only=True)
class BestCheckpoint(Record):
    """best.pt: the weights of the best epoch plus what using them needs (model, classes, normalization)."""

    model: dict  # the state_dict
    model_name: str
    num_classes: int
    mean: list[float]
    std: list[float]
    dataset: str | None = None  # added after the first runs; None: unknown
    epoch: int | None = None
    val_acc: float | None = None
    classes: list[str] | None = None  # None: name them by index, or by the dataset's names


@dataclass(frozen=True, kw_only=True)
class LastCheckpoint(Record):
    """last.pt: everything a --resume needs to continue exactly where the run stopped."""

    config: dict  # config.json's content
    epoch: int  # epochs completed
    model: dict
    optimizer: dict
    scheduler: dict
    scaler: dict
    rng: dict
    history: list[dict]  # metrics.csv's rows, as text
    best: dict  # {"epoch": .., "val_acc": ..} of the best epoch so far


def json_text(record: Record) -> str:
    return json.dumps(record.to_dict(), indent=2) + "\n"


def as_number(value: object) -> float | None:
    """A JSON value as a finite float, or None when it is missing, not a number or not finite (a crafted or
    damaged file must not break a page)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)
