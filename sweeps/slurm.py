"""A sweep as a SLURM job array: sweep.sbatch, one array task per line of the sweep's runs.txt, submitted with
sbatch; and which of its tasks squeue still lists, for `sweep.py --status`.

SLURM schedules, requeues and caps the array (--array=0-N%K); the script only runs its line (a run with
--auto-resume) and passes on the signals: `--signal=B:USR1@MARGIN` reaches the batch shell MARGIN seconds
before the time limit, the trap forwards it to the run, which saves its epoch and exits 75, and the task then
requeues itself alone (`scontrol requeue ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}`: `$SLURM_JOB_ID` of
task 0 would requeue the whole array). A preemption (SIGTERM, then a requeue by SLURM) stops the run at once
and its next start resumes from last.pt.
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
from pathlib import Path

from core.errors import STOPPED_EXIT, UsageError
from runfolder import store
from sweeps.plan import LOGS_FOLDER, PLAN_FILE
from training import flags

SBATCH_FILE = "sweep.sbatch"
JOBS_FILE = "slurm_jobs.txt"  # the job ids of the submitted arrays, one a line


def add_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("SLURM (instead of running here)")
    add = group.add_argument
    add("--slurm", action="store_true", help="write <sweep folder>/sweep.sbatch, a job array over the plan, "
                                             "and submit it with sbatch")
    add("--max-parallel", type=flags.count(1, 100_000), help="at most K tasks of the array at once [no cap]")
    add("--gpus-per-run", type=flags.count(0, 64), default=1, help="GPUs of each run; 0 for CPU runs, more than "
                                                                 "1 runs it under torchrun [1]")
    add("--time", help="each task's time limit, as sbatch --time takes it [the partition's]")
    add("--partition", help="the partition [the cluster's default]")
    add("--sbatch-arg", action="append", default=[], metavar="ARG",
        help="one more sbatch option for every task, e.g. --sbatch-arg=--mem=16G (repeatable)")
    add("--stop-margin", type=flags.count(10, 86_400), default=300,
        help="seconds before the time limit at which a run is asked to stop after its epoch (SIGUSR1) [300]")
    add("--no-submit", action="store_true", help="write sweep.sbatch and say how to submit it, submit nothing")


def header(args, folder: Path, count: int) -> list[str]:
    """The #SBATCH lines."""
    cap = f"%{args.max_parallel}" if args.max_parallel else ""
    options = [f"--job-name={args.name}", f"--array=0-{count - 1}{cap}", "--requeue", "--open-mode=append",
               f"--output={folder.resolve() / LOGS_FOLDER / '%a.log'}", f"--signal=B:USR1@{args.stop_margin}",
               "--ntasks=1"]
    if args.gpus_per_run:
        options.append(f"--gres=gpu:{args.gpus_per_run}")
    options += [f"--time={args.time}"] * bool(args.time) + [f"--partition={args.partition}"] * bool(args.partition)
    return [f"#SBATCH {option}" for option in [*options, *args.sbatch_arg]]


def sbatch_script(args, folder: Path, count: int) -> str:
    plan = shlex.quote(str(folder.resolve() / PLAN_FILE))
    torchrun = (f'command=("${{command[0]}}" -m torch.distributed.run --standalone '
                f'--nproc_per_node={args.gpus_per_run} "${{command[@]:1}}")\n' if args.gpus_per_run > 1 else "")
    # Under torchrun the signal goes to its ranks (torchrun itself would die of SIGUSR1), and a rank's 75
    # comes back as torchrun's failure: a run asked to stop that did not finish is requeued all the same.
    forward = 'pkill -USR1 -P "$run"' if args.gpus_per_run > 1 else 'kill -USR1 "$run"'
    stopped = (f'[ "$status" -eq {STOPPED_EXIT} ] || {{ [ "$asked" = 1 ] && [ "$status" -ne 0 ]; }}'
               if args.gpus_per_run > 1 else f'[ "$status" -eq {STOPPED_EXIT} ]')
    return "\n".join([
        "#!/bin/bash",
        f"# Sweep {args.name}: one task per line of {plan}, written by sweep.py; its state: "
        f"python sweep.py --status {args.name}",
        *header(args, folder, count),
        "set -u",
        f"cd {shlex.quote(str(Path.cwd()))}",
        f'line=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {plan})',
        'task="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"',
        'now() { date -u +%Y-%m-%dT%H:%M:%SZ; }',
        'echo "=== $(now) task $task on $(hostname), start $((${SLURM_RESTART_COUNT:-0} + 1)): $line"',
        'eval "command=($line)"',
        torchrun + f'asked=0\nstop_for_now() {{ asked=1; echo "=== $(now) task $task: SIGUSR1, the run stops '
                   f'after its epoch"; {forward} 2>/dev/null; }}',
        'stop_now() { echo "=== $(now) task $task: SIGTERM, the run stops now"; kill -TERM "$run" 2>/dev/null; }',
        "trap stop_for_now USR1",
        "trap stop_now TERM",
        '"${command[@]}" &',
        "run=$!",
        'wait "$run"; status=$?',
        'while kill -0 "$run" 2>/dev/null; do wait "$run"; status=$?; done  # wait returns early for a trap',
        'echo "=== $(now) task $task: the run exited $status"',
        f"if {stopped}; then",
        '    echo "=== $(now) task $task: stopped for now, requeued to resume"',
        '    scontrol requeue "$task"',
        "fi",
        'exit "$status"', ""])


def submit(args, folder: Path, count: int) -> int:
    """Write sweep.sbatch; submit it with sbatch when there is one (and --no-submit is not given)."""
    path = folder / SBATCH_FILE
    store.write_text(path, sbatch_script(args, folder, count))
    if args.no_submit or shutil.which("sbatch") is None:
        why = "--no-submit" if args.no_submit else "no sbatch here"
        print(f"{path} written ({why}); submit it on the cluster with: sbatch {path}")
        return 0
    completed = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if completed.returncode != 0:
        raise UsageError(f"sbatch refused {path}: {completed.stderr.strip().splitlines()[-1:] or ['?']}"[:400])
    job = completed.stdout.strip().split(";")[0]
    with open(folder / JOBS_FILE, "a") as jobs:
        jobs.write(job + "\n")
    print(f"Submitted job array {job} ({count} tasks) from {path}; see python sweep.py --status {args.name}")
    return 0


def queued_tasks(folder: Path) -> dict[int, str]:
    """Array task index: its squeue state (PENDING, RUNNING, ...), for the sweep's submitted arrays that squeue
    still lists; empty without squeue."""
    jobs_path = folder / JOBS_FILE
    if shutil.which("squeue") is None or not jobs_path.is_file():
        return {}
    jobs = ",".join(jobs_path.read_text().split())
    try:
        listed = subprocess.run(["squeue", "-h", "-r", "-j", jobs, "-o", "%K %T"], capture_output=True,
                                text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    states = {}
    for line in listed.stdout.splitlines():
        index, _, state = line.partition(" ")
        if index.isdigit():
            states[int(index)] = state
    return states
