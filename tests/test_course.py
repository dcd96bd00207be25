"""The course lab's experiment: --recipe course resolves to the report's recipe, typed flags win, a resume keeps
the recipe, and the reports show the report's figure beside course-recipe runs only (core/course.py,
core/course_report.csv, training/flags.py, reports/summary.py, reports/pages.py)."""
import csv
import dataclasses
import json
import re
import shutil

import pytest
from test_train import assert_one_line_error, read_metrics, tiny_args

import train
from core import course
from model import MODEL_FAMILIES, MODELS
from reports.folders import summarize_dataset
from training import flags
from training.optimization import lr_factor

RESOLVED_COURSE = {"recipe": "course", "epochs": 50, "batch_size": 8, "lr": 0.001, "momentum": 0.9,
                   "nesterov": False, "weight_decay": 0.0, "label_smoothing": 0.0, "warmup_epochs": 0.0,
                   "schedule": "constant", "val_size": 0, "aug": "none"}


def resolved(*argv: str) -> flags.Recipe:
    """The recipe a run of these flags trains with, as train.resolve resolves it."""
    args = flags.build_parser("cifar10").parse_args(list(argv))
    return flags.with_default_lr(flags.with_recipe_defaults(flags.typed_recipe(args), flags.flags_given(list(argv))))


@pytest.mark.parametrize("model", ["cnn_base", "cnn_resnet18"])
def test_the_course_recipe_resolves_to_the_reports_values_for_every_model(model):
    recipe = dataclasses.asdict(resolved("--recipe", "course", "--model", model))
    assert {name: recipe[name] for name in RESOLVED_COURSE} == RESOLVED_COURSE  # lr 0.001 whatever the model


def test_the_default_recipe_is_todays():
    recipe = resolved()
    assert (recipe.recipe, recipe.batch_size, recipe.lr, recipe.nesterov, recipe.weight_decay,
            recipe.warmup_epochs, recipe.schedule, recipe.aug) == ("default", 128, 0.05, True, 5e-4, 1.0, "cosine",
                                                                    "flip-crop")


def test_flags_typed_over_the_course_recipe_win():
    recipe = resolved("--recipe", "course", "--epochs", "100", "--lr", "0.01", "--nesterov", "--aug", "flip-crop",
                      "--batch-size", "64")
    assert (recipe.epochs, recipe.lr, recipe.nesterov, recipe.aug, recipe.batch_size) == (100, 0.01, True,
                                                                                          "flip-crop", 64)
    assert (recipe.momentum, recipe.weight_decay, recipe.schedule) == (0.9, 0.0, "constant")
    assert resolved("--recipe", "course", "--no-nesterov", "--weight-decay", "5e-4").weight_decay == 5e-4


def test_the_constant_schedule_keeps_the_rate_after_the_warmup():
    assert [lr_factor(step, 2, 10, "constant") for step in (0, 1, 2, 9, 20)] == [0.5, 1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("argv, words", [
    (["--recipe", "lab"], "invalid choice: 'lab'"),
    (["--schedule", "step"], "invalid choice: 'step'"),
])
def test_a_bad_recipe_or_schedule_ends_in_one_line(argv, words, capsys):
    assert train.main("cifar10", argv) == 2
    assert_one_line_error(capsys.readouterr().err, words)


def test_a_course_run_records_every_resolved_value_and_resume_refuses_another_recipe(cifar10_dir, tmp_path, capsys):
    argv = tiny_args(cifar10_dir, tmp_path, "--recipe", "course", epochs=1)  # --batch-size 64 typed over it
    assert train.main("cifar10", argv) == 0
    run_dir = tmp_path / "cifar10" / "cnn_base"
    config = json.loads((run_dir / "config.json").read_text())
    assert {name: config[name] for name in RESOLVED_COURSE} == {**RESOLVED_COURSE, "epochs": 1, "batch_size": 64}
    capsys.readouterr()
    assert train.main("cifar10", [*argv, "--resume", "--recipe", "default"]) == 2
    assert_one_line_error(capsys.readouterr().err, "cannot change --recipe (the run used course, got default)")
    # without --recipe, the resume keeps the course's values: the rate stays constant
    assert train.main("cifar10", tiny_args(cifar10_dir, tmp_path, "--resume", epochs=2)) == 0
    assert [float(row["lr"]) for row in read_metrics(run_dir)] == [0.001, 0.001]


def test_a_run_older_than_the_recipe_flags_resumes_as_the_default_recipe():
    saved = {**dataclasses.asdict(flags.Recipe(lr=0.05)), "dataset": "cifar10"}
    for name in ("recipe", "nesterov", "schedule"):
        del saved[name]
    typed = flags.typed_recipe(flags.build_parser("cifar10").parse_args(["--resume"]))
    recipe = flags.resume_recipe(typed, {"resume"}, saved, "cifar10")
    assert (recipe.recipe, recipe.nesterov, recipe.schedule) == ("default", True, "cosine")
    given = flags.flags_given(["--recipe", "course"])
    with pytest.raises(flags.UsageError, match=re.escape("cannot change --recipe (the run used default")):
        flags.resume_recipe(flags.with_recipe_defaults(dataclasses.replace(typed, recipe="course"), given), given,
                          saved, "cifar10")


def test_the_report_tables_are_the_15_course_models_on_both_datasets():
    figures = course.report_figures()
    course_models = {name for name, spec in MODELS.items() if spec.course}
    for dataset in ("cifar10", "cifar100"):
        assert {model for (where, model) in figures if where == dataset} == course_models
    assert len(figures) == 30
    base = figures[("cifar10", "cnn_base")]
    assert (base.report_name, base.train_acc, base.valid_acc, base.train_loss, base.valid_loss) == (
        "CNN Base", pytest.approx(0.8798), pytest.approx(0.6061), 0.3336, 2.0957)
    assert figures[("cifar10", "cnn_se_resnet18")].valid_loss == 0.7719  # as given; the report's typo
    last = figures[("cifar100", "cnn_se_resnet152")]
    assert (last.valid_acc, last.valid_loss) == (pytest.approx(0.3376), 30.4105)


def test_the_course_figure_stands_beside_course_recipe_runs_only(cifar10_dir, tmp_path):
    dataset_dir = tmp_path / "cifar10"
    assert train.main("cifar10", tiny_args(cifar10_dir, tmp_path, "--tag", "default", epochs=1)) == 0
    assert train.main("cifar10", tiny_args(cifar10_dir, tmp_path, "--recipe", "course", "--tag", "typed-over",
                                           epochs=1)) == 0
    # A run of the course recipe as it stands (50 epochs of batch 8 are too long for a test): the folder of a
    # tiny course run whose config.json says what a full one would.
    shutil.copytree(dataset_dir / "cnn_base-typed-over", dataset_dir / "cnn_base-course")
    config_path = dataset_dir / "cnn_base-course" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, **course.RECIPE, "tag": "course"}))
    summarize_dataset(dataset_dir, MODEL_FAMILIES)

    with open(dataset_dir / "summary.csv", newline="") as summary_file:
        rows = {row["run_dirs"]: row for row in csv.DictReader(summary_file)}
    assert len(rows) == 3  # three rows: recipes are never averaged together
    assert {name: (row["recipe"], row["course_report_valid_acc"]) for name, row in rows.items()} == {
        "cnn_base-default": ("default", ""), "cnn_base-typed-over": ("course", ""),
        "cnn_base-course": ("course", "0.6061")}
    markdown = (dataset_dir / "summary.md").read_text()
    header, *table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert "course report's valid acc" in header
    assert [line for line in table if "60.61%" in line] == [
        line for line in table if line.startswith("| cnn_base (course recipe) | 1 (course)")]
    assert "Only rows trained with its recipe" in markdown
    page = (dataset_dir / "index.html").read_text()
    assert "course report&#x27;s valid acc" in page and page.count("60.61%") == 2  # the table and the run


def test_without_a_course_run_there_is_no_course_column(cifar10_dir, tmp_path):
    assert train.main("cifar10", tiny_args(cifar10_dir, tmp_path, epochs=1)) == 0
    summarize_dataset(tmp_path / "cifar10", MODEL_FAMILIES)
    assert "course report" not in (tmp_path / "cifar10" / "summary.md").read_text()
    assert "course report" not in (tmp_path / "cifar10" / "index.html").read_text()
