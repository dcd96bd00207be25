"""bench/gpu_session.sh, the checks a session runs in two device calls when it is lent a GPU for a few minutes,
rehearsed here on the CPU: each part's dry run (DRY_RUN=1, tiny sizes, a synthetic CIFAR-10, no GPU and, on CI
machines, no nvidia-smi) ends well and brings back its results in one archive within the 8 files the device tool
returns, leaving nothing in the repository; the plan's worst case fits the calls; what a step measured survives
its kill; the test step runs without pytest-timeout; a missing C compiler skips compiling instead of failing."""
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "bench" / "gpu_session.sh"
CALL_BUDGET_S = 540  # one device call: the tool allows 600 s a command
SESSION_BUDGET_S = 720  # both calls: 15 minutes of device time less a machine start
MAX_FILES_BACK = 8  # what the device tool brings back from $OUT, no deeper than $OUT/a/b/file

needs_bash = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def untracked_paths() -> set[str]:
    """Untracked and ignored paths of the repository, bytecode caches aside (other tests make those)."""
    listing = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"],
                             cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    paths = {line[3:] for line in listing.splitlines() if line[:2] in ("??", "!!")}
    return {path for path in paths if "__pycache__" not in path and ".pytest_cache" not in path}


def run_session(tmp_path: Path, data_dir: Path | None, **settings: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(tmp_path / "out"), "CUDA_VISIBLE_DEVICES": "", "TMPDIR": str(tmp_path),
           "SPEED_FIGURES": str(tmp_path / "speed-figures.csv"),
           # the script calls python3: this interpreter's, with the project's packages, also without a venv
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", **settings}
    return subprocess.run(["bash", str(SCRIPT), *([str(data_dir)] if data_dir else [])], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def archive(out: Path) -> dict[str, bytes]:
    with tarfile.open(out / "gpu-session.tar.gz") as packed:
        return {name.removeprefix("gpu-session/"): packed.extractfile(name).read()
                for name in packed.getnames() if packed.getmember(name).isfile()}


def steps_of(members: dict[str, bytes]) -> dict[str, str]:
    """steps.csv: each step's exit status ("skipped" for a skipped one)."""
    return {row["step"]: row["exit"] for row in csv.DictReader(io.StringIO(members["steps.csv"].decode()))}


def assert_few_files_back(out: Path) -> None:
    files_back = [path for path in out.rglob("*") if path.is_file()]
    assert len(files_back) <= MAX_FILES_BACK, files_back
    assert all(len(path.relative_to(out).parts) <= 3 for path in files_back)


# -- the two parts, rehearsed -------------------------------------------------------------------------------------

@needs_bash
def test_dry_run_of_the_speed_part_brings_back_every_step(cifar10_dir, tmp_path):
    before = untracked_paths() if shutil.which("git") and (REPO_ROOT / ".git").exists() else None
    result = run_session(tmp_path, cifar10_dir, DRY_RUN="1", PART="speed")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]

    out = tmp_path / "out"
    members = archive(out)
    steps = steps_of(members)
    assert list(steps) == ["data", "device", "checks", "pipeline", "train-compile", "models"]
    assert steps.pop("train-compile") == "skipped"  # a dry run does not compile unless COMPILE=1
    assert set(steps.values()) == {"0"}, steps
    assert all(f"{name}.log" in members for name in steps)
    assert "=== done" in members["session.log"].decode()  # the last archive holds the whole session log

    checks = members["checks.log"].decode()
    assert "[det-cnn_base] --- cnn_base: the two runs' metrics are identical" in checks
    assert "[tests] exit 0" in checks and "[det-cnn_base] exit 0" in checks
    assert members["det-cnn_base/det-a/metrics.csv"] and members["det-cnn_base/det-b/metrics.csv"]
    for name in ("pipeline.json", "models.json"):
        assert json.loads(members[name])["complete"] is True and (out / name).read_bytes() == members[name]
    speed = list(csv.DictReader(io.StringIO(members["speed.csv"].decode())))
    assert [row["mode"] for row in speed] == ["eager"]  # no compiled figure without compiling
    assert (tmp_path / "speed-figures.csv").read_bytes() == members["speed.csv"]  # for the accuracy part
    assert "PART=accuracy COMPILE=0" in result.stdout

    assert_few_files_back(out)
    if before is not None:
        assert untracked_paths() <= before, "the dry run left files in the repository"


@needs_bash
def test_dry_run_of_the_accuracy_part_trains_both_models_eager_when_no_c_compiler(cifar10_dir, tmp_path):
    """COMPILE=1 asked, but no compiler: the device step says so and the runs train eager, saying why."""
    result = run_session(tmp_path, cifar10_dir, DRY_RUN="1", PART="accuracy", COMPILE="1", CC="/nonexistent/cc")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]

    out = tmp_path / "out"
    members = archive(out)
    assert steps_of(members) == {"data": "0", "device": "0", "accuracy": "0"}
    assert "compile: no C compiler: CC=/nonexistent/cc is not a command" in members["device.log"].decode()
    assert "compile is unavailable (no C compiler: CC=/nonexistent/cc is not a command): eager" in result.stdout
    table = list(csv.DictReader(io.StringIO(members["accuracy.csv"].decode())))
    assert [row["model"] for row in table] == ["cnn_resnet18", "cnn_se_resnet18"]
    assert all(row["compile"] == "0" and row["epochs_done"] == "1" and 0 <= float(row["test_acc"]) <= 1
               for row in table), table
    assert [row["course_report_valid_acc"] for row in table] == ["0.8529", "0.7719"]
    for model in ("cnn_resnet18", "cnn_se_resnet18"):
        config = json.loads(members[f"accuracy/{model}/config.json"])
        assert config["compile"] is False and config["epochs"] == 1, config
        assert f"[{model}] exit 0" in members["accuracy.log"].decode()
    assert (out / "accuracy.csv").read_bytes() == members["accuracy.csv"]
    assert_few_files_back(out)


# -- the plan ---------------------------------------------------------------------------------------------------

def plan(**settings: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PLAN_ONLY": "1", **settings})


@needs_bash
def test_each_part_fits_its_call_and_both_fit_the_session_kill_grace_included():
    source = SCRIPT.read_text()
    # The one `timeout` of the script kills after the grace the plan counts.
    assert re.findall(r"timeout -k (\S+)", source) == ['"$KILL_GRACE"']
    worst = {}
    for part in ("speed", "accuracy"):
        result = plan(PART=part)
        assert result.returncode == 0, result.stdout + result.stderr
        limits = [int(seconds) for seconds in re.findall(r"^  \S+ +(\d+) s$", result.stdout, re.MULTILINE)]
        grace, overhead, total = map(int, re.search(r"x \((\d+) s kill grace \+ (\d+) s archive\) = (\d+) s",
                                                    result.stdout).groups())
        assert limits and total == sum(limits) + len(limits) * (grace + overhead), result.stdout
        assert grace >= 5  # the training's SIGTERM handler stops the run; 5 s is ample for it
        worst[part] = total
    assert worst["speed"] <= CALL_BUDGET_S and worst["accuracy"] <= CALL_BUDGET_S, worst
    assert worst["speed"] + worst["accuracy"] <= SESSION_BUDGET_S, worst


@needs_bash
def test_the_accuracy_part_compiles_only_when_the_speed_figures_say_50_compiled_epochs_are_faster(tmp_path):
    figures = tmp_path / "speed.csv"
    figures.write_text("mode,first_epoch_train_seconds,steady_epoch_train_seconds,source\n"
                       "eager,2.0,2.0,pipeline\ncompile,20.0,1.5,train-compile\n")  # 20 + 49 x 1.5 = 93.5 < 100
    decided = plan(PART="accuracy", SPEED_FIGURES=str(figures)).stdout
    assert "compile: compiled: 50 epochs of training take 94 s compiled, 100 s eager" in decided
    assert "compile: eager: 10 epochs" in plan(PART="accuracy", SPEED_FIGURES=str(figures), ACC_EPOCHS="10").stdout
    assert "compile: COMPILE=0 given" in plan(PART="accuracy", SPEED_FIGURES=str(figures), COMPILE="0").stdout
    figures.write_text("mode,first_epoch_train_seconds,steady_epoch_train_seconds,source\neager,2.0,2.0,pipeline\n")
    assert "has no compiled figure: eager" in plan(PART="accuracy", SPEED_FIGURES=str(figures)).stdout
    missing = plan(PART="accuracy", SPEED_FIGURES=str(tmp_path / "none.csv")).stdout
    assert "no speed figures at" in missing and "no COMPILE: eager" in missing


@needs_bash
@pytest.mark.parametrize("settings, message", [
    ({"PART": "both"}, "PART=both: choose speed (call 1) or accuracy (call 2)"),
    ({"PART": "speed", "ONLY": "accuracy"}, "ONLY: part speed has no step accuracy"),
    ({"PART": "accuracy", "COMPILE": "yes"}, "COMPILE=yes: use 1 (compile), 0 (eager) or leave it unset"),
])
def test_a_bad_setting_is_one_line_exit_2(settings, message):
    result = plan(**settings)
    assert result.returncode == 2 and result.stderr.strip().startswith(message), result.stderr


# -- nothing measured is lost -------------------------------------------------------------------------------------

@pytest.fixture
def bench(monkeypatch):
    """The bench scripts as modules (each imports common from its own folder), the RNG left as it was."""
    monkeypatch.syspath_prepend(str(REPO_ROOT / "bench"))
    import bench_models
    import bench_pipeline
    with torch.random.fork_rng():
        yield bench_models, bench_pipeline


def test_bench_models_stopped_mid_way_leaves_the_models_measured_before(bench, tmp_path, monkeypatch):
    bench_models = bench[0]
    measure = bench_models.measure

    def stopped_at_the_second_model(name, *args):
        if name != "cnn_base":
            raise KeyboardInterrupt  # what a time limit's signal does to a run: nothing after it happens
        return measure(name, *args)

    monkeypatch.setattr(bench_models, "measure", stopped_at_the_second_model)
    out = tmp_path / "models.json"
    code = bench_models.main(["--models", "cnn_base,cnn_resnet18", "--device", "cpu", "--batch-size", "2",
                              "--warmup", "0", "--steps", "1", "--out", str(out)])
    assert code != 0
    saved = json.loads(out.read_text())
    assert saved["complete"] is False and [row["model"] for row in saved["rows"]] == ["cnn_base"]
    assert saved["rows"][0]["train_images_per_second"] > 0 and saved["device"] == "cpu"


def test_bench_pipeline_stopped_mid_way_leaves_the_rounds_measured_before(bench, cifar10_dir, tmp_path,
                                                                           monkeypatch):
    bench_pipeline = bench[1]
    timed_epoch, epochs = bench_pipeline.timed_epoch, []

    def stopped_in_the_second_round(*args):
        epochs.append(args)
        if len(epochs) == 6:  # warm-up round, first timed round (project, dataloader), then project, dataloader
            raise KeyboardInterrupt
        return timed_epoch(*args)

    monkeypatch.setattr(bench_pipeline, "timed_epoch", stopped_in_the_second_round)
    out = tmp_path / "pipeline.json"
    code = bench_pipeline.main(["--data-dir", str(cifar10_dir), "--models", "cnn_base,cnn_resnet18", "--device",
                                "cpu", "--steps", "1", "--repeats", "2", "--batch-size", "8", "--workers", "0",
                                "--out", str(out)])
    assert code != 0
    saved = json.loads(out.read_text())
    assert saved["complete"] is False
    assert [(row["model"], row["pipeline"], len(row["seconds"])) for row in saved["rows"]] == [
        ("cnn_base", "project", 1), ("cnn_base", "dataloader", 1)]


@needs_bash
def test_a_step_killed_at_its_limit_leaves_its_measured_models_and_the_steps_before_in_the_archive(
        cifar10_dir, tmp_path):
    """The rehearsal: LIMIT_SCALE shortens the models step to 25 s, which measures cnn_base in seconds and then
    three large models that take over a minute together on two cores: it is killed mid-way."""
    asked = ["cnn_base", "cnn_resnext29_16x64d", "cnn_sknet29", "cnn_resnext29_8x64d"]
    result = run_session(tmp_path, cifar10_dir, DRY_RUN="1", PART="speed", ONLY="data,models", LIMIT_SCALE="0.5",
                         MODELS=",".join(asked), MODELS_ARGS="--batch-size 16 --warmup 1 --steps 1")
    assert result.returncode == 1, result.stdout[-4000:] + result.stderr[-2000:]
    out = tmp_path / "out"
    members = archive(out)
    steps = steps_of(members)
    assert steps["data"] == "0" and steps["models"] in ("124", "137"), steps
    assert "train: (50000, 3, 32, 32)" in members["data.log"].decode()
    assert "=== models: exit 124, stopped at its limit" in members["session.log"].decode()
    saved = json.loads(members["models.json"])
    measured = [row["model"] for row in saved["rows"]]
    assert saved["complete"] is False and 1 <= len(measured) < len(asked) and measured == asked[:len(measured)]
    assert (out / "models.json").read_bytes() == members["models.json"]
    assert_few_files_back(out)


# -- on the box: no pytest-timeout, no C compiler ------------------------------------------------------------------

@needs_bash
def test_the_test_step_runs_without_pytest_timeout(cifar10_dir, tmp_path):
    """setup.cfg loads the plugin by name (-p timeout), so a pytest without it refuses to start: the step finds
    it missing and runs without it. Simulated here by hiding the installed plugin from every python3."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import importlib.metadata\nimport sys\n\n"
        "sys.modules['pytest_timeout'] = None  # import pytest_timeout fails\n"
        "_distributions = importlib.metadata.distributions\n\n\n"
        "def distributions(**kwargs):  # and pytest finds no plugin of that name\n"
        "    return (dist for dist in _distributions(**kwargs) if dist.metadata['Name'] != 'pytest-timeout')\n\n\n"
        "importlib.metadata.distributions = distributions\n")
    result = run_session(tmp_path, cifar10_dir, DRY_RUN="1", PART="speed", ONLY="checks", DET_MODELS="",
                         TESTS="tests/test_batches.py", TESTS_K="cuda", PYTHONPATH=str(hide))
    checks = archive(tmp_path / "out")["checks.log"].decode()
    assert result.returncode == 0, checks[-3000:] + result.stdout[-2000:]
    assert "[tests] pytest-timeout is not installed here: running without it (-o addopts=" in checks
    assert re.search(r"\[tests\] =+ .*1 (passed|skipped)", checks) and "[tests] exit 0" in checks


@needs_bash
def test_a_missing_c_compiler_is_reported_and_later_steps_skip_compiling(cifar10_dir, tmp_path):
    result = run_session(tmp_path, cifar10_dir, DRY_RUN="1", PART="speed", ONLY="device,checks,train-compile",
                         COMPILE="1", CC="/nonexistent/cc", DET_MODELS="", TESTS="tests/test_batches.py",
                         TESTS_K="cuda")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    members = archive(tmp_path / "out")
    why = "no C compiler: CC=/nonexistent/cc is not a command"
    assert f"compile: {why}" in members["device.log"].decode()
    assert steps_of(members)["train-compile"] == "skipped"
    assert f"=== train-compile: skipped (compile unavailable: {why})" in result.stdout
    assert f"[tests] compile unavailable ({why}): leaving out the tests named for compile" in \
        members["checks.log"].decode()
    assert f"=== compile unavailable: {why}" in result.stdout and "PART=accuracy COMPILE=0" in result.stdout
