"""sweep.py as users drive it, with real processes on the CPU: a sweep killed with SIGKILL and started again by
two processes at once (which share the plan) finishes every run once with the metrics of runs made alone; a
failing run is retried once and reported while the rest finish; Ctrl-C stops the runs after their epoch; bad
input is one line, exit 2, nothing written; --slurm writes the job array."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train import assert_one_line_error, read_metrics

import sweep
import train
from conftest import REPO_ROOT, STARTED, without_time
from core.errors import INTERRUPTED_EXIT, STOPPED_EXIT

SEEDS = ["0", "1", "2"]


def run_flags(data_dir: Path, results: Path, epochs: int = 3, subset: int = 600) -> list[str]:
    return ["--epochs", str(epochs), "--subset", str(subset), "--batch-size", "64", "--deterministic",
            "--data-dir", str(data_dir), "--results-dir", str(results)]


def sweep_command(name: str, flags: list[str], *options: str) -> list[str]:
    return [sys.executable, "sweep.py", "--name", name, "--models", "cnn_base", "--seeds", *SEEDS, *options,
            "--", *flags]


def start(command: list[str]) -> subprocess.Popen:
    STARTED.append(subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}))
    return STARTED[-1]


def finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=900)
    assert process.returncode == 0, output
    return output


def epoch_lines(log: Path) -> list[str]:
    return re.findall(r"^Epoch \d+/\d+", log.read_text(), re.M)


def log_starts(folder: Path, index: int) -> int:
    """How many times the sweep started run index (the header line a worker writes to its log)."""
    log = folder / "logs" / f"{index}.log"
    return log.read_text().count("=== ") if log.is_file() else 0


@pytest.fixture(scope="module")
def runs_made_alone(cifar10_dir, tmp_path_factory, keep_global_torch_settings) -> Path:
    """The three runs of the sweep, each made alone, in this process (on one thread, as the sweep's: conftest)."""
    results = tmp_path_factory.mktemp("alone")
    for seed in SEEDS:
        assert train.main("cifar10", ["--model", "cnn_base", "--seed", seed, "--tag", f"s{seed}", "--no-progress",
                                      *run_flags(cifar10_dir, results)]) == 0
    return results / "cifar10"


def test_a_killed_sweep_started_again_twice_at_once_finishes_every_run_once(cifar10_dir, tmp_path, runs_made_alone,
                                                                           capsys):
    """Killed with SIGKILL mid-way, then started again by two processes at once (as two terminals, or two nodes
    on one shared folder, would): they share the plan, so every run is started once, finished once."""
    results = tmp_path / "results"
    first = start(sweep_command("lab", run_flags(cifar10_dir, results), "--workers", "2"))
    run_dirs = [results / "cifar10" / f"cnn_base-s{seed}" for seed in SEEDS]
    deadline = time.time() + 180
    while time.time() < deadline and not any((folder / "metrics.csv").is_file() for folder in run_dirs):
        time.sleep(0.05)
    # SIGKILL for the sweep and for the runs it started (its worker threads' children)
    children = [int(pid) for task in Path(f"/proc/{first.pid}/task").iterdir()
                for pid in (task / "children").read_text().split()]
    for pid in [first.pid, *children]:
        os.kill(pid, signal.SIGKILL)
    first.communicate()
    finished_before = [(folder / "summary.json").is_file() for folder in run_dirs]
    assert not all(finished_before), "killed too late"
    folder = results / "sweeps" / "lab"
    starts_before = [log_starts(folder, index) for index in range(len(SEEDS))]

    both = [start(sweep_command("lab", run_flags(cifar10_dir, results), "--workers", "1")) for _ in range(2)]
    for process in both:
        assert "3 done, 0 running, 0 failed, 0 waiting" in finish(process)
    for index, run_dir in enumerate(run_dirs):
        # a finished run is not started again, an unfinished one by one process only, and no epoch is trained
        # to its end twice (a SIGKILL may come between an epoch's files and its log line, so a line of the
        # sweep's log may be missing, never doubled; the run's own log.txt has every line once)
        assert log_starts(folder, index) == starts_before[index] + (not finished_before[index])
        lines = epoch_lines(folder / "logs" / f"{index}.log")
        assert len(lines) == len(set(lines)), lines
        assert epoch_lines(run_dir / "log.txt") == ["Epoch 1/3", "Epoch 2/3", "Epoch 3/3"]
        assert without_time(read_metrics(run_dir)) == without_time(read_metrics(runs_made_alone / run_dir.name))
    assert (results / "cifar10" / "summary.md").is_file()  # plot.py on the dataset at the end

    capsys.readouterr()
    assert sweep.main(["--status", "lab", "--", "--results-dir", str(results)]) == 0
    status = capsys.readouterr().out
    for seed in SEEDS:
        accuracy = json.loads((results / "cifar10" / f"cnn_base-s{seed}" / "summary.json").read_text())
        assert f"| cifar10/cnn_base-s{seed} | done | 3/3 | {accuracy['final_test_acc']:.4f} |" in status


def test_a_failing_run_is_retried_once_and_reported_and_the_rest_finish(cifar10_dir, tmp_path, capsys):
    results = tmp_path / "results"
    flags = [*run_flags(cifar10_dir, results, epochs=1, subset=500), "--warmup-epochs", "0"]
    # The sweep in this process (its runs in processes of their own, as always): its exit code and what it says
    code = sweep.main(["--name", "nan", "--seeds", "0", "--set", "lr=1e9,0.05", "--workers", "2", "--", *flags])
    output = "".join(capsys.readouterr())
    assert code == 1, output
    assert "1 done, 0 running, 1 failed, 0 waiting" in output
    assert re.search(r"\| cifar10/cnn_base-lr1e9-s0 \| failed \| 0/1 \|  \| exit 1: error: the loss became NaN",
                     output), output
    assert (results / "cifar10" / "cnn_base-lr0.05-s0" / "summary.json").is_file()
    assert (results / "sweeps" / "nan" / "logs" / "0.log").read_text().count("=== ") == 2  # tried twice


def test_ctrl_c_asks_the_runs_to_stop_after_their_epoch(cifar10_dir, tmp_path):
    results = tmp_path / "results"
    command = [sys.executable, "sweep.py", "--name", "long", "--workers", "1", "--",
               *run_flags(cifar10_dir, results, epochs=50, subset=1000)]
    process = start(command)
    metrics = results / "cifar10" / "cnn_base-s0" / "metrics.csv"
    deadline = time.time() + 120
    while time.time() < deadline and not metrics.is_file():
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == INTERRUPTED_EXIT, output
    record = json.loads((results / "sweeps" / "long" / "records" / "0.json").read_text())
    assert record["exit"] == STOPPED_EXIT
    assert "Stopped for now" in (results / "sweeps" / "long" / "logs" / "0.log").read_text()
    assert "| cifar10/cnn_base-s0 | waiting |" in output and "stopped, resumes" in output


@pytest.mark.parametrize("argv, words", [
    (["--models", "cnn_nope"], ["--models", "cnn_nope"]),
    (["--models", "resnet", "nofamily"], ["nofamily"]),
    (["--datasets", "cifar1000"], ["--datasets", "cifar1000"]),
    (["--set", "learning_rate=0.1"], ["--set", "learning_rate"]),
    (["--set", "lr=0.1,-1"], ["--set lr=-1", "--lr"]),
    (["--set", "aug=none,sideways"], ["aug=sideways"]),
    (["--gpus", "0,99"], ["--gpus", "99"]),
    (["--", "--epochs", "0"], ["--epochs"]),
    (["--", "--tag", "x"], ["--tag"]),
    (["--set", "epochs=2,3", "--", "--epochs", "4"], ["--epochs", "--set"]),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, argv, words):
    split = argv.index("--") if "--" in argv else len(argv)
    code = sweep.main(["--name", "bad", *argv[:split], "--", *argv[split + 1:], "--results-dir", str(tmp_path / "r")])
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, *words)
    assert not (tmp_path / "r").exists()


def test_on_off_values_of_set_give_each_run_its_flag(tmp_path, capsys):
    argv = ["--name", "onoff", "--set", "nesterov=on,off", "--set", "sync_bn=off,on", "--dry-run", "--",
            "--results-dir", str(tmp_path)]
    assert sweep.main(argv) == 0
    plan = [line for line in capsys.readouterr().out.splitlines() if "main_cifar10.py" in line]
    expected = [("--nesterov", ""), ("--nesterov", "--sync-bn"), ("--no-nesterov", ""), ("--no-nesterov", "--sync-bn")]
    assert len(plan) == 4
    for line, (nesterov, sync_bn) in zip(plan, expected):
        assert f" {nesterov} " in line and (sync_bn in line if sync_bn else "--sync-bn" not in line), line


def test_slurm_writes_an_array_over_the_plan_and_a_changed_plan_is_refused(tmp_path, capsys):
    argv = ["--name", "cluster", "--models", "cnn_base", "cnn_resnet18", "--seeds", "0", "1", "--slurm",
            "--max-parallel", "2", "--gpus-per-run", "0", "--time", "1:00:00", "--no-submit", "--",
            "--results-dir", str(tmp_path)]
    assert sweep.main(argv) == 0
    folder = tmp_path / "sweeps" / "cluster"
    plan = (folder / "runs.txt").read_text().splitlines()
    assert len(plan) == 4 and capsys.readouterr().out.startswith("\n".join(plan))
    assert [re.search(r"--tag (\S+)", line).group(1) for line in plan] == ["s0", "s1", "s0", "s1"]
    script = (folder / "sweep.sbatch").read_text()
    for line in ("#SBATCH --array=0-3%2", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 "#SBATCH --signal=B:USR1@300", "#SBATCH --time=1:00:00",
                 'scontrol requeue "$task"', 'task="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"'):
        assert line in script
    assert "--gres" not in script
    before = (folder / "runs.txt").read_text()
    assert sweep.main([*argv[:8], "2", *argv[8:]]) == 2  # seeds 0 1 2: another plan
    assert_one_line_error(capsys.readouterr().err, "another plan", "--overwrite")
    assert (folder / "runs.txt").read_text() == before
    assert sweep.main([*argv[:8], "2", "--overwrite", *argv[8:]]) == 0
    assert len((folder / "runs.txt").read_text().splitlines()) == 6
