"""`sweep.py --status`: a table of every run of a sweep, read from its run folders (done: summary.json, running:
a process holds the folder), the workers' records (failed, stopped) and SLURM's queue (waiting as a task)."""
from __future__ import annotations

from pathlib import Path

from core.errors import IN_USE_EXIT, UsageError
from runfolder import store
from runfolder.declarations import METRICS_FILE, SUMMARY_FILE
from sweeps import slurm
from sweeps.plan import PLAN_FILE, PlannedRun, is_done, is_running, read_plan, sweep_folder
from sweeps.workers import STOPPED_CODES, read_record


def run_state(run: PlannedRun, record: dict, queued: dict[int, str]) -> tuple[str, str]:
    """(state, note) of a run: done, running, failed (with its last error line) or waiting."""
    if is_done(run):
        return "done", ""
    if is_running(run) or queued.get(run.index) == "RUNNING":
        return "running", ""
    code, stopped = record.get("exit"), record.get("stopped") or record.get("exit") in STOPPED_CODES
    if code is not None and code not in (0, IN_USE_EXIT) and not stopped:
        return "failed", f"exit {code}: {record.get('error', '')}"
    if run.index in queued:
        return "waiting", f"SLURM {queued[run.index].lower()}"
    return "waiting", "stopped, resumes" if stopped else ""


def status_table(plan: list[PlannedRun], folder: Path) -> str:
    queued = slurm.queued_tasks(folder)
    lines = ["| # | run | state | epochs | test acc | note |", "|---:|---|---|---:|---:|---|"]
    for run in plan:
        state, note = run_state(run, read_record(folder, run), queued)
        summary = store.read_json(run.folder / SUMMARY_FILE) if state == "done" else None
        metrics = run.folder / METRICS_FILE
        epochs = max(0, len(metrics.read_text().splitlines()) - 1) if metrics.is_file() else 0
        accuracy = f"{summary['final_test_acc']:.4f}" if summary and "final_test_acc" in summary else ""
        lines.append(f"| {run.index} | {run.name} | {state} | {epochs}/{run.flags.epochs} | {accuracy} | "
                     f"{note.replace('|', '/')} |")
    counts = {state: sum(f"| {state} |" in line for line in lines[2:]) for state in ("done", "running",
                                                                                      "failed", "waiting")}
    return "\n".join(lines) + "\n" + ", ".join(f"{count} {state}" for state, count in counts.items())


def show_status(results_dir: str, name: str) -> int:
    """Print the table of sweep `name` in results_dir; UsageError where it has no such sweep."""
    folder = sweep_folder(results_dir, name)
    if not (folder / PLAN_FILE).is_file():
        raise UsageError(f"no sweep {name!r} in {Path(results_dir) / 'sweeps'}; pass its --results-dir after --")
    print(status_table(read_plan(folder), folder))
    return 0
