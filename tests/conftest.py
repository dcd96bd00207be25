"""Shared test setup: the repository root on sys.path, and full-size CIFAR folders made of synthetic
images in the official python format (nothing is downloaded)."""
import contextlib
import fcntl
import functools
import hashlib
import inspect
import os
import pickle
import re
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# One thread for torch, here and in every process a test starts: the tests' tiny batches gain nothing from a
# second thread (the two mostly wait for each other, far longer on a busy machine), runs that a test compares
# across processes must sum in the same order, and each of pytest-xdist's workers keeps to a core of its own.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

# A suite started in the background by a script (`cmd &`, nohup) inherits SIGINT ignored, and so would every
# run it starts: the Ctrl-C tests would press a key nobody hears. Handle it as Python does, so runs do too.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# A line Python's warnings module prints ("file.py:12: DeprecationWarning: ..."), then the source line it quotes.
WARNING_LINE = re.compile(r"^\S.*:\d+: \w*Warning: ")


# README's test command runs the files on two pytest-xdist workers (--dist loadfile), each handed the next file as
# it nears the end of its last one, in the order below (--no-loadscope-reorder): the slowest first, so that no
# long file is left to run alone at the end. The others follow in their usual order.
SLOWEST_FILES_FIRST = ["test_train.py", "test_sweep.py", "test_faults.py", "test_models.py", "test_gpu_session.py",
                       "test_deterministic_ops.py", "test_slurm.py", "test_host_work.py", "test_channels_last.py",
                       "test_stopping.py"]


def pytest_collection_modifyitems(items) -> None:
    def rank(item) -> int:
        name = item.path.name
        return SLOWEST_FILES_FIRST.index(name) if name in SLOWEST_FILES_FIRST else len(SLOWEST_FILES_FIRST)
    items.sort(key=rank)  # a stable sort: each file's tests keep their order


def message_lines(stderr: str) -> list[str]:
    """What a command said on stderr, without the warnings a library may print as it is imported (a new
    version of one must not break the tests that expect a one-line error)."""
    lines, skip_source = [], False
    for line in stderr.splitlines():
        if WARNING_LINE.match(line):
            skip_source = True
        elif skip_source and line.startswith("  "):
            skip_source = False
        elif line.strip():
            skip_source = False
            lines.append(line)
    return lines


def synthetic_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """N x 3072 uint8 images a small network can learn: a class-coloured square on noise."""
    count = len(labels)
    images = rng.integers(0, 96, size=(count, 3, 32, 32), dtype=np.uint8)
    palette = np.linspace(60, 255, 100).astype(np.uint8)
    for channel, shift in enumerate((0, 37, 71)):
        colour = palette[(labels * 7 + shift) % 100]
        images[:, channel, 8:24, 8:24] = colour[:, None, None]
    return images.reshape(count, 3072)

def write_pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as handle:
        pickle.dump(obj, handle, protocol=2)

def write_full_cifar10(folder: Path) -> None:
    """A full-size (50,000 + 10,000) CIFAR-10 in the official python format, in folder/cifar-10-batches-py."""
    folder = folder / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(1, 6):
        labels = rng.integers(0, 10, size=10_000)
        write_pickle(folder / f"data_batch_{index}", {
            "batch_label": f"training batch {index} of 5", "labels": labels.tolist(),
            "data": synthetic_images(labels, rng), "filenames": [f"{i}.png" for i in range(10_000)]})
    labels = rng.integers(0, 10, size=10_000)
    write_pickle(folder / "test_batch", {
        "batch_label": "testing batch 1 of 1", "labels": labels.tolist(),
        "data": synthetic_images(labels, rng), "filenames": [f"{i}.png" for i in range(10_000)]})
    write_pickle(folder / "batches.meta", {
        "label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                        "ship", "truck"], "num_cases_per_batch": 10_000, "num_vis": 3072})


def write_full_cifar100(folder: Path) -> None:
    """A full-size CIFAR-100 in the official python format, in folder/cifar-100-python."""
    folder = folder / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, count in (("train", 50_000), ("test", 10_000)):
        fine = rng.integers(0, 100, size=count)
        write_pickle(folder / name, {
            "batch_label": f"{name} batch", "fine_labels": fine.tolist(),
            "coarse_labels": (fine // 5).tolist(), "data": synthetic_images(fine, rng),
            "filenames": [f"{i}.png" for i in range(count)]})
    write_pickle(folder / "meta", {"fine_label_names": [f"fine{i}" for i in range(100)],
                                   "coarse_label_names": [f"coarse{i}" for i in range(20)]})


def data_folder(tmp_path_factory, write) -> Path:
    """A data folder made by write, which the tests read and never change: made once for the two pytest-xdist
    workers of a session (in the session's folder, the first to come makes it while the other waits), or kept
    across sessions in $CIFAR_TEST_DATA_CACHE when that is set (mutmut starts a session per mutant); its name
    holds a digest of the code that writes it, so an edited writer makes a new one."""
    cache = os.environ.get("CIFAR_TEST_DATA_CACHE")
    if not cache and "PYTEST_XDIST_WORKER" not in os.environ:
        folder = tmp_path_factory.mktemp(write.__name__)
        write(folder)
        return folder
    source = "".join(inspect.getsource(code) for code in (synthetic_images, write_pickle, write))
    parent = Path(cache) if cache else tmp_path_factory.getbasetemp().parent
    parent.mkdir(parents=True, exist_ok=True)
    folder = parent / f"{write.__name__}-{hashlib.sha256(source.encode()).hexdigest()[:12]}"
    with open(f"{folder}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if not folder.is_dir():
            partial = Path(f"{folder}.partial")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
            write(partial)
            partial.rename(folder)
    return folder


@pytest.fixture(scope="session")
def cifar10_dir(tmp_path_factory) -> Path:
    """A data folder holding a full-size (50,000 + 10,000) CIFAR-10 in the official python format."""
    return data_folder(tmp_path_factory, write_full_cifar10)


@pytest.fixture(scope="session")
def cifar100_dir(tmp_path_factory) -> Path:
    """A data folder holding a full-size CIFAR-100 in the official python format."""
    return data_folder(tmp_path_factory, write_full_cifar100)


@pytest.fixture(scope="session", autouse=True)
def read_each_dataset_once():
    """The runs made in the pytest process read their data folder once, not once a run: reading and checking
    the 60,000 images of a folder takes about half a second, and the suite makes a hundred such runs. (The
    reading itself is tested in test_cifar.py and by every run in a process of its own.)"""
    import train
    with pytest.MonkeyPatch.context() as patch:
        for dataset, (load, spec) in list(train.DATASETS.items()):
            patch.setitem(train.DATASETS, dataset, (functools.lru_cache(maxsize=1)(load), spec))
        yield


@pytest.fixture(scope="module")
def keep_global_torch_settings():
    """--deterministic in-process switches torch to deterministic algorithms and sets cuBLAS's workspace;
    put both back for the other modules."""
    enabled = torch.are_deterministic_algorithms_enabled()
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
        yield
    torch.use_deterministic_algorithms(enabled)


@contextlib.contextmanager
def one_torch_thread():
    """torch on one thread inside, its thread count put back after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def model_table() -> str:
    """README's model table as the code computes it (every model's size and cost: seconds), once a session."""
    from model import model_table_markdown
    return model_table_markdown()


def descendants(pid: int) -> list[int]:
    """The processes pid started, and theirs, as /proc lists them now."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *descendants(child)]
    return found


def without_time(rows: list[dict]) -> list[dict]:
    """metrics.csv's rows without the wall-time columns, which no two runs share."""
    return [{key: value for key, value in row.items() if not key.endswith("_seconds")} for row in rows]


# Processes a test starts and may leave running when it fails or hits its time limit: tests that start runs
# append their Popen here, and kill_what_a_test_left_running ends them, and what they started, after each test.
STARTED: list = []


def kill_with_descendants(processes: list) -> None:
    """Kill each process still running and everything it started, so that no run outlives its test (a failed
    check, a time limit); then forget them."""
    for process in processes:
        for pid in [*descendants(process.pid), process.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait(timeout=60)
    processes.clear()


@pytest.fixture(autouse=True)
def kill_what_a_test_left_running():
    yield
    kill_with_descendants(STARTED)
