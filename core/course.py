"""The course lab's experiment: the recipe its report trained the course's 15 models with (--recipe course), and
the figures its report printed (core/course_report.csv), which the summary shows beside runs of that recipe.

Cheap to import (no torch): training/flags.py takes the recipe from here, reports/summary.py the figures.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

NAME = "course"  # the --recipe choice
DEFAULT_NAME = "default"  # the --recipe that runs saved before the flag existed were trained with
# From the report: plain SGD (no Nesterov, no weight decay) at a constant 0.001 for every model with momentum
# 0.9, no warmup, no augmentation (normalization only), 50 epochs, validated on the test set. The report gives
# no batch size; 8 is the one whose first epochs match its BaseCNN log (docs/course-recipe.md).
RECIPE = {"epochs": 50, "batch_size": 8, "lr": 0.001, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0,
          "label_smoothing": 0.0, "warmup_epochs": 0.0, "schedule": "constant", "val_size": 0, "aug": "none"}
REPORT_FILE = Path(__file__).resolve().parent / "course_report.csv"


@dataclass(frozen=True)
class ReportFigures:
    """One model on one dataset as the report printed it, after its 50 epochs; accuracies as fractions. valid is
    the test set."""

    report_name: str
    train_acc: float
    valid_acc: float
    train_loss: float
    valid_loss: float


def report_figures(path: Path = REPORT_FILE) -> dict[tuple[str, str], ReportFigures]:
    """The report's tables by (dataset, --model name), read from core/course_report.csv ('#' lines are comments)."""
    with open(path, newline="") as report:
        rows = csv.DictReader(line for line in report if not line.startswith("#"))
        return {(row["dataset"], row["model"]): ReportFigures(
            row["report_name"], float(row["train_acc"]) / 100, float(row["valid_acc"]) / 100,
            float(row["train_loss"]), float(row["valid_loss"])) for row in rows}
