"""A sweep as a SLURM job array on a real SLURM (Debian's slurm-wlm) started on this machine: a 3-task array
capped at 2 on the CPU, one task asked to stop for now (SIGUSR1, as --signal sends it before the time limit),
one requeued as a preemption would; every run ends done, the interrupted ones resumed, with the metrics of
unbroken runs. Skipped, with the reason, where slurmctld is not installed or cannot start."""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_sweep import epoch_lines, run_flags
from test_train import read_metrics

import sweep
import train
from conftest import REPO_ROOT, without_time

DAEMONS = ("munged", "slurmctld", "slurmd")
pytestmark = pytest.mark.usefixtures("keep_global_torch_settings")  # --deterministic runs in this process


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def slurm_conf(folder: Path) -> str:
    host = socket.gethostname().split(".")[0]
    return "\n".join([
        "ClusterName=sweeptest", f"SlurmctldHost={host}(127.0.0.1)", "SlurmUser=root",
        f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}", "AuthType=auth/munge",
        f"AuthInfo=socket={folder / 'munge.socket'}", f"StateSaveLocation={folder / 'state'}",
        f"SlurmdSpoolDir={folder / 'spool'}", f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
        f"SlurmdPidFile={folder / 'slurmd.pid'}",
        f"SlurmctldLogFile={folder / 'slurmctld.log'}", f"SlurmdLogFile={folder / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", "MpiDefault=none", "ReturnToService=2", "KillWait=10",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN",
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""])


def stop_daemons(folder: Path, env: dict) -> None:
    """Cancel the cluster's jobs, then end the daemons this test started (by the pids they wrote)."""
    subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True, timeout=30)
    deadline = time.time() + 30
    while time.time() < deadline and subprocess.run(["squeue", "-h"], env=env, capture_output=True,
                                                     text=True, timeout=30).stdout.strip():
        time.sleep(0.5)
    for name in reversed(DAEMONS):
        pid_file = folder / f"{name}.pid"
        if pid_file.is_file():
            try:
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory):
    """The environment (SLURM_CONF) of a one-node SLURM on 127.0.0.1, started for this module."""
    missing = [name for name in (*DAEMONS, "sbatch", "scontrol", "squeue") if shutil.which(name) is None]
    if missing or os.geteuid() != 0:
        pytest.skip(f"needs slurm-wlm installed and root (missing: {', '.join(missing) or 'root'}); "
                    "apt-get install slurm-wlm")
    folder = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (folder / sub).mkdir()
    (folder / "slurm.conf").write_text(slurm_conf(folder))
    env = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf"), "OMP_NUM_THREADS": "1"}
    commands = [["munged", f"--socket={folder / 'munge.socket'}", f"--pid-file={folder / 'munged.pid'}",
                 f"--log-file={folder / 'munged.log'}", f"--seed-file={folder / 'munged.seed'}", "--force"],
                ["slurmctld"], ["slurmd"]]
    try:
        for command in commands:
            subprocess.run(command, env=env, check=True, capture_output=True, timeout=30)
        deadline = time.time() + 30
        while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True,
                                           text=True, timeout=30).stdout:
            if time.time() > deadline:
                raise RuntimeError("the node never became idle")
            time.sleep(0.5)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, RuntimeError, OSError) as err:
        stop_daemons(folder, env)
        pytest.skip(f"SLURM did not start here ({err}); see {folder}")
    yield env
    stop_daemons(folder, env)


def squeue(env: dict, job: str) -> dict[str, str]:
    listed = subprocess.run(["squeue", "-h", "-r", "-j", job, "-o", "%i %T %r"], env=env, capture_output=True,
                            text=True, timeout=30).stdout
    return {line.split()[0]: " ".join(line.split()[1:]) for line in listed.splitlines()}


@pytest.mark.timeout(900)  # SLURM's own start-up and requeue delays come on top of six short runs
def test_an_array_stopped_for_now_and_preempted_ends_done_and_resumed(slurm_env, cifar10_dir, tmp_path, monkeypatch,
                                                                      capsys):
    seeds = ["0", "1", "2"]
    flags = run_flags(cifar10_dir, tmp_path / "results", epochs=6, subset=1200)
    submitted = subprocess.run(
        [sys.executable, "sweep.py", "--name", "array", "--seeds", *seeds, "--slurm", "--max-parallel", "2",
         "--gpus-per-run", "0", "--", *flags], cwd=REPO_ROOT, env=slurm_env, capture_output=True, text=True,
        timeout=120)
    assert submitted.returncode == 0, submitted.stderr
    job = re.search(r"Submitted job array (\d+)", submitted.stdout).group(1)
    run_dirs = [tmp_path / "results" / "cifar10" / f"cnn_base-s{seed}" for seed in seeds]
    # Each task is signalled as soon as its own run has an epoch saved, whichever comes first, so in the epochs
    # still to come (the two tasks need not start together: waiting for one could let the other finish first,
    # as it once did, its 6 epochs in 2 s).
    signals = {0: ["scancel", "-b", "-s", "USR1", f"{job}_0"], 1: ["scontrol", "requeue", f"{job}_1"]}
    deadline = time.time() + 120
    while signals:
        for index in [index for index in signals if (run_dirs[index] / "metrics.csv").is_file()]:
            subprocess.run(signals.pop(index), env=slurm_env, check=True, timeout=30)
        assert time.time() < deadline, squeue(slurm_env, job)
        time.sleep(0.05)
    # Done when every run has its summary.json and the queue has been empty twice in a row: a task being
    # requeued can be missing from one listing (or squeue can time out on a busy machine), so one empty
    # listing alone does not mean the array ended.
    deadline, empty_listings, begin_set = time.time() + 400, 0, set()
    while empty_listings < 2 or not all((folder / "summary.json").is_file() for folder in run_dirs):
        queued = squeue(slurm_env, job)
        assert time.time() < deadline, queued
        empty_listings = 0 if queued else empty_listings + 1
        for task, state in queued.items():
            # A requeued task waits ~120 s for its begin time: not here. But not "now" either: a task started
            # again within the second its old instance was killed is refused by slurmd ("Job credential
            # revoked", compared to the second) and ends failed instead of running. Once a task: set again
            # while it waits, the begin time moved 3 s ahead at every listing, and the task started only when
            # a listing came more than 3 s after the last (half a minute late here, never on a faster machine).
            if state.startswith("PENDING") and "BeginTime" in state and task not in begin_set:
                if subprocess.run(["scontrol", "update", f"jobid={task}", "starttime=now+3"], env=slurm_env,
                                  capture_output=True, timeout=30).returncode == 0:
                    begin_set.add(task)
        time.sleep(1)
    for seed in seeds[:2]:  # the interrupted runs, made again unbroken, in this process (one thread, as the tasks)
        assert train.main("cifar10", ["--model", "cnn_base", "--seed", seed, "--tag", f"s{seed}", "--no-progress",
                                      *run_flags(cifar10_dir, tmp_path / "alone", epochs=6, subset=1200)]) == 0

    logs = tmp_path / "results" / "sweeps" / "array" / "logs"
    stopped, preempted = (logs / "0.log").read_text(), (logs / "1.log").read_text()
    assert "SIGUSR1" in stopped and "Stopped for now" in stopped and "requeued to resume" in stopped
    assert "Terminated:" in preempted
    for log in (stopped, preempted):
        assert ", start 2:" in log and "Resuming" in log, log
    for index, folder in enumerate(run_dirs):
        assert (folder / "summary.json").is_file()
        assert epoch_lines(folder / "log.txt") == [f"Epoch {epoch}/6" for epoch in range(1, 7)]
        if index < 2:
            assert without_time(read_metrics(folder)) == without_time(
                read_metrics(tmp_path / "alone" / "cifar10" / folder.name))
    monkeypatch.setenv("SLURM_CONF", slurm_env["SLURM_CONF"])  # --status asks this SLURM's queue
    capsys.readouterr()
    assert sweep.main(["--status", "array", "--", "--results-dir", str(tmp_path / "results")]) == 0
    status = capsys.readouterr().out
    assert "3 done, 0 running, 0 failed, 0 waiting" in status, status
