"""Misuse of the command line: every bad flag, value or combination ends in one line naming the flag, exit 2,
before anything is loaded or written (nothing new in the data folder, the results folder or the working
directory, where a stray relative results/ or data/ would appear)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import assert_one_line_error

import train
from conftest import REPO_ROOT

FILE, FOLDER, MISSING = "{file}", "{folder}", "{missing}"  # stand-ins for paths made in each test's tmp dir

BAD_COMMAND_LINES = [
    # id, flags added to a valid tiny command line (a repeated flag's last value wins), words of the error
    ("epochs-zero", ["--epochs", "0"], ["--epochs"]),
    ("epochs-negative", ["--epochs", "-5"], ["--epochs"]),
    ("epochs-fraction", ["--epochs", "1.5"], ["--epochs"]),
    ("epochs-word", ["--epochs", "ten"], ["--epochs"]),
    ("epochs-empty", ["--epochs", ""], ["--epochs"]),
    ("epochs-absurd", ["--epochs", str(10**30)], ["--epochs"]),
    ("epochs-above-max", ["--epochs", "100001"], ["--epochs"]),
    ("epochs-no-value", ["--epochs"], ["--epochs"]),
    ("batch-size-zero", ["--batch-size", "0"], ["--batch-size"]),
    ("batch-size-above-dataset", ["--batch-size", "50001"], ["--batch-size"]),
    ("batch-size-float-text", ["--batch-size", "1e3"], ["--batch-size"]),
    ("lr-zero", ["--lr", "0"], ["--lr"]),
    ("lr-negative", ["--lr", "-0.1"], ["--lr"]),
    ("lr-nan", ["--lr", "nan"], ["--lr"]),
    ("lr-inf", ["--lr", "inf"], ["--lr"]),
    ("lr-overflows-to-inf", ["--lr", "1e400"], ["--lr"]),
    ("lr-empty", ["--lr", ""], ["--lr"]),
    ("lr-word", ["--lr", "fast"], ["--lr"]),
    ("momentum-one", ["--momentum", "1"], ["--momentum"]),
    ("momentum-negative", ["--momentum", "-0.1"], ["--momentum"]),
    ("momentum-nan", ["--momentum", "NaN"], ["--momentum"]),
    # "-1e-4" and "-inf" quoted as values, not taken for flags: training/flags.py's OneLineParser tells argparse
    # (through a private attribute: these two fail if a Python release stops reading it) what a number looks like
    ("weight-decay-negative", ["--weight-decay", "-1e-4"], ["--weight-decay", "'-1e-4' is not"]),
    ("weight-decay-inf", ["--weight-decay", "inf"], ["--weight-decay"]),
    ("label-smoothing-one", ["--label-smoothing", "1"], ["--label-smoothing"]),
    ("label-smoothing-nan", ["--label-smoothing", "nan"], ["--label-smoothing"]),
    ("warmup-negative", ["--warmup-epochs", "-1"], ["--warmup-epochs"]),
    ("warmup-above-max", ["--warmup-epochs", "100001"], ["--warmup-epochs"]),
    ("warmup-inf", ["--warmup-epochs", "-inf"], ["--warmup-epochs", "'-inf' is not"]),
    ("warmup-nan", ["--warmup-epochs", "nan"], ["--warmup-epochs"]),
    ("val-size-negative", ["--val-size", "-1"], ["--val-size"]),
    ("val-size-whole-dataset", ["--val-size", "50000"], ["--val-size"]),
    ("val-size-equals-subset", ["--val-size", "256"], ["--val-size", "256"]),
    ("val-size-above-subset", ["--val-size", "300"], ["--val-size"]),
    ("subset-zero", ["--subset", "0"], ["--subset"]),
    ("subset-above-dataset", ["--subset", "50001"], ["--subset"]),
    ("subset-absurd", ["--subset", str(10**30)], ["--subset"]),
    ("seed-negative", ["--seed", "-1"], ["--seed"]),
    ("seed-above-32-bits", ["--seed", str(2**32)], ["--seed"]),
    ("tag-slash", ["--tag", "a/b"], ["--tag"]),
    ("tag-dot-dot", ["--tag", ".."], ["--tag"]),
    ("tag-escape", ["--tag", "../escape"], ["--tag"]),
    ("tag-empty", ["--tag", ""], ["--tag"]),
    ("tag-leading-dot", ["--tag", ".hidden"], ["--tag"]),
    ("tag-space", ["--tag", "a b"], ["--tag"]),
    ("tag-too-long", ["--tag", "a" * 65], ["--tag"]),
    ("tag-nul", ["--tag", "a\0b"], ["--tag"]),
    ("model-unknown", ["--model", "cnn_resnet19"], ["--model"]),
    ("aug-unknown", ["--aug", "mixup"], ["--aug"]),
    ("device-unknown", ["--device", "tpu"], ["--device"]),
    ("amp-unknown", ["--amp", "fp8"], ["--amp"]),
    ("unknown-flag", ["--learning-rate", "0.1"], ["--learning-rate"]),
    ("list-models-unknown", ["--list-models", "transformers"], ["--list-models"]),
    ("data-dir-empty", ["--data-dir", ""], ["--data-dir"]),
    ("data-dir-nul", ["--data-dir", "da\0ta"], ["--data-dir"]),
    ("data-dir-is-a-file", ["--data-dir", FILE], ["--data-dir", FILE]),
    ("results-dir-empty", ["--results-dir", ""], ["--results-dir"]),
    ("results-dir-is-a-file", ["--results-dir", FILE], ["--results-dir", FILE]),
    ("results-dir-below-a-file", ["--results-dir", FILE + "/runs"], ["--results-dir", FILE]),
    ("resume-and-overwrite", ["--resume", "--overwrite"], ["--resume", "--overwrite"]),
    ("resume-without-a-run", ["--resume"], ["--resume"]),
    ("eval-only-and-resume", ["--eval-only", "--resume"], ["--eval-only", "--resume"]),
    ("eval-only-and-overwrite", ["--eval-only", "--overwrite"], ["--eval-only", "--overwrite"]),
    ("checkpoint-without-eval-only", ["--checkpoint", FILE], ["--checkpoint"]),
    ("tta-without-eval-only", ["--tta"], ["--tta"]),
    ("checkpoint-is-a-folder", ["--eval-only", "--checkpoint", FOLDER], ["--checkpoint", FOLDER]),
    ("checkpoint-missing", ["--eval-only", "--checkpoint", MISSING], ["--checkpoint", MISSING]),
    ("checkpoint-empty", ["--eval-only", "--checkpoint", ""], ["--checkpoint"]),
    ("checkpoint-not-a-checkpoint", ["--eval-only", "--checkpoint", FILE], [FILE, "checkpoint"]),
    ("eval-only-before-training", ["--eval-only"], ["best.pt", "--checkpoint"]),
    ("device-cuda-without-cuda", ["--device", "cuda"], ["--device cuda"]),
]
NEEDS_NO_CUDA = {"device-cuda-without-cuda"}


def tree(*roots) -> dict:
    """Every file and folder under roots with its size and modification time: any file created, changed
    or removed, even a temporary one created and deleted again (its folder's time changes), shows."""
    entries = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            stat = path.lstat()
            entries[str(path)] = (path.is_dir(), stat.st_size, stat.st_mtime_ns)
    return entries


@pytest.fixture
def workdir(tmp_path):
    """An empty working directory holding a file and a folder the bad paths point at."""
    (tmp_path / "not-a-folder.txt").write_text("a file, not a folder nor a checkpoint")
    (tmp_path / "a-folder").mkdir()
    return tmp_path


def command_line(data_dir, workdir, extra) -> tuple[list[str], dict]:
    """A tiny valid run with the default (relative) --results-dir, then the bad flags; and the paths the
    stand-ins became."""
    paths = {FILE: str(workdir / "not-a-folder.txt"), FOLDER: str(workdir / "a-folder"),
             MISSING: str(workdir / "no-such.pt")}
    extra = [paths.get(token, token).replace(FILE, paths[FILE]) for token in extra]  # also "{file}/runs"
    return ["--epochs", "2", "--subset", "256", "--batch-size", "64", "--data-dir", str(data_dir),
            "--no-progress", *extra], paths


def expected_words(words, paths) -> list[str]:
    return [paths.get(word, word) for word in words]


@pytest.mark.parametrize("extra, words", [
    pytest.param(extra, words, id=name, marks=[pytest.mark.skipif(
        name in NEEDS_NO_CUDA and torch.cuda.is_available(), reason="needs a machine without CUDA")])
    for name, extra, words in BAD_COMMAND_LINES])
def test_a_bad_command_line_is_one_line_exit_2_and_writes_nothing(cifar10_dir, workdir, monkeypatch,
                                                                   capsys, extra, words):
    monkeypatch.chdir(workdir)
    argv, paths = command_line(cifar10_dir, workdir, extra)
    before = tree(workdir, cifar10_dir)
    assert train.main("cifar10", argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert_one_line_error(err, *expected_words(words, paths))
    assert tree(workdir, cifar10_dir) == before


@pytest.mark.parametrize("extra, words", [
    (["--subset", "256", "--val-size", "256"], ["--val-size"]),
    (["--model", "resnet18"], ["--model", "resnet18"]),
    (["--eval-only", "--tta", "--checkpoint", MISSING], ["--checkpoint", MISSING]),
])
def test_cifar100_refuses_the_same_way(workdir, monkeypatch, capsys, extra, words):
    monkeypatch.chdir(workdir)  # default --data-dir and --results-dir: data/ and results/ in here
    paths = {MISSING: str(workdir / "no-such.pt")}
    before = tree(workdir)
    assert train.main("cifar100", [paths.get(token, token) for token in extra]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert_one_line_error(err, *expected_words(words, paths))
    assert tree(workdir) == before


@pytest.mark.parametrize("script, data_fixture, extra, words", [
    # defaults for --data-dir and --results-dir: relative to the working directory, which must stay empty
    ("main_cifar10.py", None, ["--tag", "../escape", "--lr", "0.1"], ["--tag", "../escape"]),
    ("main_cifar10.py", "cifar10_dir", ["--results-dir", FILE], ["--results-dir", FILE]),
    ("main_cifar100.py", None, ["--subset", "50001"], ["--subset", "50001"]),
])
def test_the_real_process_refuses_the_same_way(request, workdir, script, data_fixture, extra, words):
    data_flags = [] if data_fixture is None else ["--data-dir", str(request.getfixturevalue(data_fixture))]
    paths = {FILE: str(workdir / "not-a-folder.txt")}
    args = [*data_flags, "--no-progress", *[paths.get(token, token) for token in extra]]
    roots = [workdir] + ([Path(data_flags[1])] if data_flags else [])
    before = tree(*roots)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    completed = subprocess.run([sys.executable, str(REPO_ROOT / script), *args], cwd=workdir,
                               capture_output=True, text=True, env=env, timeout=300)
    assert completed.returncode == 2, completed.stderr
    assert completed.stdout == ""
    assert_one_line_error(completed.stderr, *expected_words(words, paths))
    assert tree(*roots) == before


@pytest.mark.parametrize("flag, value", [("--weight-decay", "-1e-4"), ("--warmup-epochs", "-inf")])
def test_a_negative_value_in_any_notation_is_quoted_as_the_bad_value(capsys, flag, value):
    assert train.main("cifar10", [flag, value]) == 2
    assert_one_line_error(capsys.readouterr().err, flag, repr(value))
