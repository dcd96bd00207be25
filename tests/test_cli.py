"""The entry scripts' quick commands: --list-models, --summary, bad model names, the device report."""
import re
import runpy
import subprocess
import sys

import train
from conftest import REPO_ROOT, message_lines
from model import FAMILIES, MODELS, models_in
from training import flags


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)


COURSE_15 = ["cnn_base", "cnn_resnet18", "cnn_resnet34", "cnn_resnet50", "cnn_resnet101", "cnn_resnet152",
             "cnn_densenet121", "cnn_densenet169", "cnn_densenet201", "cnn_densenet264", "cnn_se_resnet18",
             "cnn_se_resnet34", "cnn_se_resnet50", "cnn_se_resnet101", "cnn_se_resnet152"]


def in_process(dataset: str, *argv: str, capsys) -> tuple[int, str, str]:
    """The entry script's main in this process (the real process is tested below): exit code, stdout, stderr."""
    code = train.main(dataset, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_models_prints_every_flag_the_course_15_first(capsys):
    completed = run("main_cifar10.py", "--list-models")  # a real process: nothing on stderr, not even a warning
    assert completed.returncode == 0 and completed.stderr == ""
    assert completed.stdout.splitlines() == list(MODELS)
    assert completed.stdout.splitlines()[:15] == COURSE_15
    assert in_process("cifar100", "--list-models", capsys=capsys) == (0, completed.stdout, "")


def test_list_models_course_prints_the_course_15_for_sweeps_that_keep_to_them(capsys):
    code, out, _ = in_process("cifar10", "--list-models", "course", capsys=capsys)
    assert code == 0
    assert out.splitlines() == COURSE_15


def test_list_models_of_a_family_prints_its_members_in_registry_order(capsys):
    code, out, _ = in_process("cifar10", "--list-models", "densenet", capsys=capsys)
    assert code == 0
    assert out.splitlines() == ["cnn_densenet121", "cnn_densenet169", "cnn_densenet201", "cnn_densenet264"]
    every_family = [name for family in FAMILIES for name in models_in(family)]
    assert sorted(every_family) == sorted(MODELS)  # each model in exactly one listed family


def test_list_models_of_an_unknown_family_is_one_line_exit_2(capsys):
    code, out, err = in_process("cifar10", "--list-models", "transformers", capsys=capsys)
    assert code == 2 and out == ""
    assert len(message_lines(err)) == 1 and "course" in err


def test_summary_prints_the_network_its_size_and_cost_for_the_dataset(capsys):
    code, out, err = in_process("cifar100", "--model", "cnn_resnet34", "--summary", capsys=capsys)
    assert code == 0, err
    assert out.startswith("ResNet(")
    assert "(fc): Linear(in_features=512, out_features=100, bias=True)" in out
    assert "Parameters: 21,328,292" in out
    assert re.search(r"FLOPs: 2\.319 GFLOPs", out)


def test_summary_of_base_cnn_on_cifar10(capsys):
    code, out, _ = in_process("cifar10", "--model", "cnn_base", "--summary", capsys=capsys)
    assert code == 0
    assert "(fc3): Linear(in_features=84, out_features=10, bias=True)" in out
    assert "Parameters: 62,006" in out


def test_an_unknown_model_is_a_usage_error_listing_the_choices(capsys):
    code, _, err = in_process("cifar10", "--model", "cnn_resnet19", capsys=capsys)
    assert code == 2
    assert "Traceback" not in err
    assert "invalid choice: 'cnn_resnet19'" in err
    assert "cnn_se_resnet152" in err and "--help" in err
    assert len(message_lines(err)) == 1


def test_every_flag_has_help():
    parser = flags.build_parser("cifar10")
    for action in parser._actions:
        assert action.help, action.dest


def test_device_report_names_torch_and_the_device(capsys):
    runpy.run_path(str(REPO_ROOT / "__init__.py"), run_name="__main__")  # python __init__.py, in this process
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"GPU available: (True|False)", lines[0])
    assert lines[1].startswith("PyTorch version: ")
    assert re.fullmatch(r"Device: (cuda|mps|cpu)", lines[2])
    if lines[0].endswith("True"):
        assert lines[3].startswith("GPU 0: ")
