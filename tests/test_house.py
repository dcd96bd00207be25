"""The house rules a contributor relies on: every flag has one declared role and everything derived from
roles follows it; the flag table of docs/training.md is the parser's; functions stay short, by ruff's rules
(the layers are tests/test_layers.py's). Plus the units the training loop is built from: the schedule, the flag checks
and --resume's reconciliation of the saved recipe with the typed flags."""
import argparse
import dataclasses
import math
import re

import pytest

from conftest import REPO_ROOT
from model import FAMILIES, MODELS
from reports import pages
from reports.figures import FAMILY_COLORMAPS
from runfolder.declarations import RunFacts
from training import flags
from training.optimization import lr_factor

# ---------------------------------------------------------------------------------------------------
# Flags and their roles


def test_every_flag_of_the_parser_has_exactly_one_role():
    parser = flags.build_parser("cifar10")
    dests = {action.dest for action in parser._actions if action.dest != "help"}
    declared = [name for role in flags.ROLES.values() for name in (spec.name for spec in dataclasses.fields(role))]
    assert len(declared) == len(set(declared)), "a flag is declared in two roles"
    assert dests == set(declared)


def test_resume_checks_config_and_report_follow_the_roles():
    assert flags.RECIPE_FLAGS == tuple(spec.name for spec in dataclasses.fields(flags.Recipe))
    run = flags.RunConfig(flags.Recipe(), flags.Settings(), "cifar10", "main_cifar10.py")
    # config.json holds every recipe and setting flag and no command
    assert set(run.flags()) == set(flags.RECIPE_FLAGS) | set(flags.SETTING_FLAGS)
    assert not set(run.flags()) & set(flags.COMMAND_FLAGS)
    # the report shows every recipe flag, and only flags or facts config.json has
    assert set(flags.RECIPE_FLAGS) <= set(pages.SETTINGS)
    facts = {spec.name for spec in dataclasses.fields(RunFacts)}
    assert set(pages.SETTINGS) <= set(flags.RECIPE_FLAGS) | set(flags.SETTING_FLAGS) | facts


def test_the_run_configuration_is_frozen():
    run = flags.RunConfig(flags.Recipe(), flags.Settings(), "cifar10", "main_cifar10.py")
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.recipe.lr = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.recipe = flags.Recipe()


def test_the_flag_table_of_docs_training_equals_the_parser():
    page = (REPO_ROOT / "docs" / "training.md").read_text()
    match = re.search(r"<!-- flag-table -->\n(.*?)<!-- /flag-table -->", page, re.S)
    assert match, "docs/training.md lost its flag-table markers"
    assert match.group(1).strip() == flags.flag_table_markdown()
    # and the table names every option the parser takes
    for action in flags.build_parser("cifar10")._actions:
        for option in action.option_strings:
            if option.startswith("--") and option != "--help":
                assert f"`{option}`" in match.group(1), option


def test_flags_given_sees_exactly_the_typed_flags():
    assert flags.flags_given(["--epochs", "3", "--lr=0.1", "--no-channels-last", "--resume"]) == {
        "epochs", "lr", "channels_last", "resume"}
    assert flags.flags_given(["--model", "cnn_base", "3"]) == {"model"}


def test_abbreviated_flags_are_refused(capsys):
    parser = flags.build_parser("cifar10")
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(["--ep", "100"])
    assert stop.value.code == 2
    assert "unrecognized arguments: --ep" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# Sizes


def test_functions_stay_short_and_take_few_parameters_by_ruffs_rules():
    """The limits are lint, which the test command runs (`ruff check .`) before the tests: ruff's rules for a
    function's parameters, branches and statements stay selected with their limits set in pyproject.toml, and
    only the tests are excused from any."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    lint = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["lint"]
    assert {"PLR0913", "PLR0912", "PLR0915"} <= set(lint["select"])
    assert {"max-args", "max-branches", "max-statements"} <= set(lint["pylint"])
    assert set(lint.get("per-file-ignores", {})) <= {"tests/*"}


def test_every_family_has_its_colours_and_course_is_a_registry_field():
    assert set(FAMILY_COLORMAPS) == set(FAMILIES)
    assert [name for name, spec in MODELS.items() if spec.course][:1] == ["cnn_base"]
    assert sum(spec.course for spec in MODELS.values()) == 15


# ---------------------------------------------------------------------------------------------------
# The schedule


def test_lr_factor_warms_up_linearly_per_step_then_follows_the_cosine_to_zero():
    warmup, total = 10, 110
    factors = [lr_factor(step, warmup, total) for step in range(total + 1)]
    assert factors[:warmup] == pytest.approx([(step + 1) / warmup for step in range(warmup)])
    assert factors[warmup] == pytest.approx(1.0)  # the peak right after warmup
    assert factors[warmup + 50] == pytest.approx(0.5)  # halfway through the cosine
    assert factors[warmup + 25] == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert factors[total] == pytest.approx(0.0, abs=1e-12)  # zero at the last step
    assert lr_factor(total + 5, warmup, total) == pytest.approx(0.0, abs=1e-12)  # and after it
    assert all(a >= b for a, b in zip(factors[warmup:], factors[warmup + 1:]))
    assert [lr_factor(step, 1, 2) for step in range(3)] == [1.0, 1.0, 0.0]  # one step of cosine: to zero at once


def test_lr_factor_without_warmup_starts_at_the_peak():
    assert lr_factor(0, 0, 100) == 1.0
    assert lr_factor(50, 0, 100) == pytest.approx(0.5)


def test_default_learning_rates():
    assert flags.with_default_lr(flags.Recipe(model="cnn_base")).lr == 0.05
    assert flags.with_default_lr(flags.Recipe(model="cnn_resnet18")).lr == 0.1
    assert flags.with_default_lr(flags.Recipe(model="cnn_base", lr=0.2)).lr == 0.2


# ---------------------------------------------------------------------------------------------------
# check_flags and the resume reconciliation, as units


def parsed(*argv: str) -> argparse.Namespace:
    return flags.build_parser("cifar10").parse_args(list(argv))


@pytest.mark.parametrize("argv, words", [
    (["--resume", "--overwrite"], "contradict"),
    (["--eval-only", "--resume"], "--eval-only trains nothing"),
    (["--eval-only", "--predict", "x.png"], "two commands"),
    (["--predict", "x.png", "--overwrite"], "--predict trains nothing"),
    (["--checkpoint", "best.pt"], "--checkpoint is for"),
    (["--tta"], "--tta is for --eval-only"),
    (["--subset", "20000"], "more than the 10,000"),
    (["--subset", "100", "--val-size", "100"], "leaves no training images out of 100"),
    (["--val-size", "9999"], None),
])
def test_check_flags_refuses_contradictions_and_sizes(argv, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = parsed(*argv)
    if words is None:
        flags.check_flags(args, 10_000)
        return
    with pytest.raises(flags.UsageError, match=re.escape(words)):
        flags.check_flags(args, 10_000)


def test_check_flags_refuses_a_file_for_a_folder_and_a_missing_checkpoint(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(flags.UsageError, match="--results-dir .* is a file"):
        flags.check_flags(parsed("--results-dir", str(tmp_path / "file")), 50_000)
    with pytest.raises(flags.UsageError, match="no such file"):
        flags.check_flags(parsed("--eval-only", "--checkpoint", str(tmp_path / "none.pt")), 50_000)


SAVED = {**dataclasses.asdict(flags.Recipe(lr=0.05, epochs=10, batch_size=64)), "dataset": "cifar10"}


def resumed(*argv: str, saved: dict = SAVED) -> flags.Recipe:
    return flags.resume_recipe(flags.typed_recipe(parsed(*argv)), flags.flags_given(list(argv)), saved, "cifar10")


def test_resume_takes_the_saved_recipe_over_defaults():
    recipe = resumed("--resume")
    assert (recipe.lr, recipe.epochs, recipe.batch_size) == (0.05, 10, 64)


def test_resume_accepts_the_saved_value_typed_again_and_a_larger_epoch_count():
    assert resumed("--resume", "--batch-size", "64", "--epochs", "20").epochs == 20


@pytest.mark.parametrize("argv, words", [
    (["--batch-size", "32"], "cannot change --batch-size (the run used 64, got 32)"),
    (["--lr", "0.1"], "cannot change --lr"),
    (["--seed", "1"], "cannot change --seed"),
    (["--aug", "none"], "cannot change --aug"),
    (["--epochs", "5"], "can raise --epochs but not lower it (the run has 10)"),
    (["--model", "cnn_resnet18"], "is a cifar10 cnn_base run, not cifar10 cnn_resnet18"),
])
def test_resume_refuses_a_typed_change_of_the_recipe(argv, words):
    with pytest.raises(flags.UsageError, match=re.escape(words)):
        resumed("--resume", *argv)


def test_resume_of_a_run_older_than_a_recipe_flag_reads_its_old_default():
    # A last.pt written before a recipe flag existed lacks it; the run behaved as the flag's old_default.
    older = {key: value for key, value in SAVED.items() if key != "label_smoothing"}
    assert resumed("--resume", saved=older).label_smoothing == 0.0
    with pytest.raises(flags.UsageError, match="cannot change --label-smoothing"):
        resumed("--resume", "--label-smoothing", "0.1", saved=older)


def test_mutation_testing_copies_every_file_of_the_project():
    """mutmut runs the tests in a copy of the tree holding only what pyproject.toml names: a module or package
    added to the project and not to that list breaks the copy's imports (issue #22's configuration, rerun by
    hand)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
    listed = {*config["source_paths"], *config["also_copy"]}
    files = {path.name for path in REPO_ROOT.iterdir() if path.suffix in (".py", ".csv") and path.is_file()}
    packages = {f"{path.parent.name}/" for path in REPO_ROOT.glob("*/__init__.py")}
    assert files <= listed, sorted(files - listed)
    assert packages | {"bench/"} <= listed, sorted(packages - listed)
