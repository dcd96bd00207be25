"""bench/gpu_session.sh, the checks a session runs when it is lent a GPU for a few minutes, rehearsed here
on the CPU: its dry run (DRY_RUN=1, tiny sizes, a synthetic CIFAR-10, no GPU and, on CI machines, no
nvidia-smi) ends well, stays within the device call's time, and brings back every step's log and the run's
metrics in one archive within the 8 files the device tool returns, leaving nothing in the repository."""
import csv
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "bench" / "gpu_session.sh"
DEVICE_CALL_BUDGET_S = 540  # the 9 minutes, inside the device tool's 10-minute limit per command
MAX_FILES_BACK = 8  # what the device tool brings back from $OUT, no deeper than $OUT/a/b/file


def untracked_paths() -> set[str]:
    """Untracked and ignored paths of the repository, bytecode caches aside (other tests make those)."""
    listing = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"],
                             cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    paths = {line[3:] for line in listing.splitlines() if line[:2] in ("??", "!!")}
    return {path for path in paths if "__pycache__" not in path and ".pytest_cache" not in path}


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils' timeout")
def test_dry_run_brings_back_every_step(cifar10_dir, tmp_path):
    out = tmp_path / "out"
    before = untracked_paths() if shutil.which("git") and (REPO_ROOT / ".git").exists() else None
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(out), "CUDA_VISIBLE_DEVICES": "", "TMPDIR": str(tmp_path),
           # the script calls python3: this interpreter's, with the project's packages, also without an activated venv
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(["bash", str(SCRIPT), str(cifar10_dir)], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]

    total = re.search(r"step limits add up to (\d+) s", result.stdout)
    assert total and int(total.group(1)) <= DEVICE_CALL_BUDGET_S, result.stdout[:1000]

    with tarfile.open(out / "gpu-session.tar.gz") as archive:
        members = {name.removeprefix("gpu-session/"): archive.extractfile(name).read()
                   for name in archive.getnames() if archive.getmember(name).isfile()}
    steps = list(csv.DictReader(io.StringIO(members["steps.csv"].decode())))
    names = [row["step"] for row in steps]
    assert names == ["data", "device", "tests", "pipeline", "train", "det-cnn_base", "models"]
    assert all(row["exit"] == "0" for row in steps), steps
    assert all(f"{name}.log" in members for name in names)
    assert "=== done" in members["session.log"].decode()  # the last archive holds the whole session log

    run_metrics = list(csv.DictReader(io.StringIO(members["train/metrics.csv"].decode())))
    assert len(run_metrics) == 1 and 0 <= float(run_metrics[0]["val_acc"]) <= 1
    assert (out / "train-metrics.csv").read_bytes() == members["train/metrics.csv"]
    assert (out / "pipeline.json").is_file()
    assert "metrics are identical" in members["det-cnn_base.log"].decode()

    files_back = [path for path in out.rglob("*") if path.is_file()]
    assert len(files_back) <= MAX_FILES_BACK, files_back
    assert all(len(path.relative_to(out).parts) <= 3 for path in files_back)
    if before is not None:
        assert untracked_paths() <= before, "the dry run left files in the repository"
