"""cifar/dataset_files.py, load_data_cifar10.py and load_data_cifar100.py: reading the official formats safely,
fetching the archive, and refusing damaged or crafted files with one line naming the file. Everything runs on tiny
files the tests write themselves, pickled the way the official ones were; nothing comes from the network."""
import dataclasses
import hashlib
import importlib
import io
import os
import pickle
import re
import socket
import struct
import tarfile
import tempfile
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from cifar import dataset_files
from cifar.dataset_files import DataError, load_cifar
from load_data_cifar10 import CIFAR10, load_cifar10
from load_data_cifar100 import CIFAR100

TRAIN_SIZE, TEST_SIZE = 20, 10  # 5 CIFAR-10 training files of 4 images each
TINY_CIFAR10 = dataclasses.replace(CIFAR10, train_size=TRAIN_SIZE, test_size=TEST_SIZE)
TINY_CIFAR100 = dataclasses.replace(CIFAR100, train_size=TRAIN_SIZE, test_size=TEST_SIZE)
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# -- writing files like the official ones ---------------------------------------------------------------------

class Python2Pickler(pickle._Pickler):
    """Pickles as Python 2's cPickle did for the official files: str as byte strings (BINSTRING), uint8
    arrays under numpy 1's module names with their pixels as one byte string."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_byte_string(self, text: str) -> None:
        raw = text.encode("latin1")
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)

    def save_array(self, array: np.ndarray) -> None:
        assert array.dtype == np.uint8
        self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n" + pickle.GLOBAL + b"numpy\nndarray\n")
        self.save((0,))
        self.save("b")
        self.write(pickle.TUPLE3 + pickle.REDUCE + pickle.MARK)
        self.save(1)
        self.save(array.shape)
        self.write(pickle.GLOBAL + b"numpy\ndtype\n")
        self.save(("u1", 0, 1))
        self.write(pickle.REDUCE)
        self.save((3, "|", None, None, None, -1, -1, 0))
        self.write(pickle.BUILD)
        self.save(False)
        self.save(array.tobytes().decode("latin1"))
        self.write(pickle.TUPLE + pickle.BUILD)

    dispatch[str] = save_byte_string
    dispatch[np.ndarray] = save_array


def python2_pickle(content: dict) -> bytes:
    written = io.BytesIO()
    Python2Pickler(written, protocol=2).dump(content)
    return written.getvalue()


def python3_bytes_keys_pickle(content: dict) -> bytes:
    """Protocol 2 from Python 3 with bytes keys and names, as some converters write."""
    def to_bytes(value):
        if isinstance(value, str):
            return value.encode()
        return [to_bytes(item) for item in value] if isinstance(value, list) else value
    return pickle.dumps({key.encode(): to_bytes(value) for key, value in content.items()}, protocol=2)


def python3_pickle(content: dict) -> bytes:
    return pickle.dumps(content, protocol=pickle.HIGHEST_PROTOCOL)


WRITERS = [python2_pickle, python3_bytes_keys_pickle, python3_pickle]


def random_rows(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (rows, 3072), dtype=np.uint8)


def write_cifar10(root: Path, write=python2_pickle) -> dict[str, np.ndarray]:
    """A CIFAR-10 folder of TRAIN_SIZE + TEST_SIZE images; returns what it holds."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_rows, test_rows = random_rows(TRAIN_SIZE, 1), random_rows(TEST_SIZE, 2)
    train_labels, test_labels = np.arange(TRAIN_SIZE) * 3 % 10, np.arange(TEST_SIZE) * 7 % 10
    per_file = TRAIN_SIZE // 5
    for number in range(5):
        rows = slice(number * per_file, (number + 1) * per_file)
        (folder / f"data_batch_{number + 1}").write_bytes(write({
            "batch_label": f"training batch {number + 1} of 5", "labels": train_labels[rows].tolist(),
            "data": train_rows[rows], "filenames": [f"image_{i}.png" for i in range(per_file)]}))
    (folder / "test_batch").write_bytes(write({
        "batch_label": "testing batch 1 of 1", "labels": test_labels.tolist(), "data": test_rows,
        "filenames": [f"test_{i}.png" for i in range(TEST_SIZE)]}))
    (folder / "batches.meta").write_bytes(write({"num_cases_per_batch": per_file, "label_names": CIFAR10_NAMES,
                                                 "num_vis": 3072}))
    return {"train_rows": train_rows, "train_labels": train_labels, "test_rows": test_rows,
            "test_labels": test_labels}


def write_cifar100(root: Path, write=python2_pickle) -> dict[str, np.ndarray]:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    written = {}
    for split, rows, seed in (("train", TRAIN_SIZE, 3), ("test", TEST_SIZE, 4)):
        fine = np.arange(rows) * 37 % 100
        written[split] = (random_rows(rows, seed), fine, fine // 5)
        (folder / split).write_bytes(write({
            "filenames": [f"{split}_{i}.png" for i in range(rows)], "batch_label": f"{split}ing batch 1 of 1",
            "fine_labels": fine.tolist(), "coarse_labels": (fine // 5).tolist(), "data": written[split][0]}))
    (folder / "meta").write_bytes(write({"fine_label_names": [f"fine{i}" for i in range(100)],
                                         "coarse_label_names": [f"coarse{i}" for i in range(20)]}))
    return written


def as_images(rows: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rows).reshape(-1, 3, 32, 32)


def archive_of(folder: Path, archive: Path) -> str:
    """tar.gz of folder as the official archive holds it; returns its md5."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return hashlib.md5(archive.read_bytes()).hexdigest()


# -- reading ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("write", WRITERS)
def test_cifar10_folder_loads_as_uint8_images_and_int64_labels(tmp_path, write):
    written = write_cifar10(tmp_path, write)
    data = load_cifar(TINY_CIFAR10, tmp_path, download=False)
    assert data.train_images.dtype == torch.uint8 and data.train_images.shape == (TRAIN_SIZE, 3, 32, 32)
    # each row is 1024 red, 1024 green, 1024 blue values: channel-first images
    assert torch.equal(data.train_images, as_images(written["train_rows"]))
    assert torch.equal(data.test_images, as_images(written["test_rows"]))
    assert data.train_labels.dtype == torch.int64
    assert data.train_labels.tolist() == written["train_labels"].tolist()
    assert data.test_labels.tolist() == written["test_labels"].tolist()
    assert data.classes == CIFAR10_NAMES
    assert data.coarse_classes is None and data.train_coarse_labels is None


@pytest.mark.parametrize("write", WRITERS)
def test_cifar100_folder_loads_fine_and_coarse_labels(tmp_path, write):
    written = write_cifar100(tmp_path, write)
    data = load_cifar(TINY_CIFAR100, tmp_path, download=False)
    assert torch.equal(data.train_images, as_images(written["train"][0]))
    assert data.train_labels.tolist() == written["train"][1].tolist()
    assert data.test_labels.tolist() == written["test"][1].tolist()
    assert data.train_coarse_labels.tolist() == written["train"][2].tolist()
    assert data.test_coarse_labels.tolist() == written["test"][2].tolist()
    assert data.classes[99] == "fine99" and len(data.classes) == 100
    assert data.coarse_classes[19] == "coarse19" and len(data.coarse_classes) == 20


def test_archive_with_right_md5_is_extracted_and_read(tmp_path, monkeypatch):
    written = write_cifar10(tmp_path / "source")
    data_dir = tmp_path / "data"
    archive = data_dir / "cifar-10-python.tar.gz"
    md5 = archive_of(tmp_path / "source" / "cifar-10-batches-py", archive)
    # extracted into a hidden folder of its own inside data_dir (a kill mid-way leaves no visible tmp folder)
    utils, folders = dataset_files._archive_utils(), []
    extract_archive = utils.extract_archive
    monkeypatch.setattr(utils, "extract_archive", lambda source, to, *args, **kwargs: (
        folders.append(Path(to)), extract_archive(source, to, *args, **kwargs))[1])
    data = load_cifar(dataclasses.replace(TINY_CIFAR10, md5=md5), data_dir, download=False)
    assert len(folders) == 1 and folders[0].parent == data_dir and folders[0].name.startswith(".extract-")
    assert torch.equal(data.train_images, as_images(written["train_rows"]))
    assert sorted(path.name for path in data_dir.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


@pytest.mark.parametrize("damage, words", [("cut", ["could not extract"]),
                                            ("no folder", ["holds no cifar-10-batches-py/ folder"])])
def test_an_archive_with_the_right_md5_that_cannot_give_the_folder_is_refused(tmp_path, damage, words):
    """The md5 matches (as the spec says it should), but the archive is cut short or holds another folder: one
    line naming the archive and the download, nothing extracted into the data folder."""
    write_cifar10(tmp_path / "source")
    data_dir = tmp_path / "data"
    archive = data_dir / "cifar-10-python.tar.gz"
    if damage == "cut":
        archive_of(tmp_path / "source" / "cifar-10-batches-py", tmp_path / "whole.tar.gz")
        data_dir.mkdir()
        archive.write_bytes((tmp_path / "whole.tar.gz").read_bytes()[:2000])
    else:
        (tmp_path / "source" / "cifar-10-batches-py").rename(tmp_path / "source" / "other")
        archive_of(tmp_path / "source" / "other", archive)
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    with pytest.raises(DataError) as error:
        load_cifar(dataclasses.replace(TINY_CIFAR10, md5=md5), data_dir, download=False)
    message = str(error.value)
    assert str(archive) in message and TINY_CIFAR10.url in message and "\n" not in message
    for word in words:
        assert word in message, message
    assert list(data_dir.iterdir()) == [archive]  # no folder, no temporary folder
    if damage == "cut":  # with the reason the archive itself gives when extracted directly
        with pytest.raises(Exception) as raw:
            dataset_files._archive_utils().extract_archive(str(archive), str(tmp_path / "scratch"))
        assert f"could not extract {archive} ({' '.join(str(raw.value).split())}); " in message, message


def test_archive_with_wrong_md5_is_refused_and_kept(tmp_path):
    write_cifar10(tmp_path / "source")
    archive = tmp_path / "data" / "cifar-10-python.tar.gz"
    archive_of(tmp_path / "source" / "cifar-10-batches-py", archive)
    before = archive.read_bytes()
    with pytest.raises(DataError, match="md5") as error:
        load_cifar(TINY_CIFAR10, tmp_path / "data", download=True)  # the real md5 cannot match
    assert str(archive) in str(error.value) and "\n" not in str(error.value)
    assert archive.read_bytes() == before
    assert list((tmp_path / "data").iterdir()) == [archive]  # nothing extracted, nothing else left


def test_download_from_a_refusing_address_gives_data_error_naming_the_url(tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "*")  # talk to the address itself even where a proxy is configured
    url = "http://127.0.0.1:9/cifar-10-python.tar.gz"  # the discard port: nothing listens there
    with pytest.raises(DataError) as error:
        load_cifar(dataclasses.replace(TINY_CIFAR10, url=url), tmp_path / "data", download=True)
    assert url in str(error.value) and "\n" not in str(error.value)
    assert "<urlopen error" not in str(error.value)  # the reason itself, not urllib's wrapping of it
    assert list((tmp_path / "data").iterdir()) == []  # no partial download left behind


def test_a_data_dir_that_cannot_be_made_says_why(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(DataError) as error:
        load_cifar(TINY_CIFAR10, tmp_path / "a-file" / "data", download=True)
    assert str(error.value).startswith(f"could not write the dataset into {tmp_path / 'a-file' / 'data'}/ ("
                                       "[Errno 20] Not a directory: ")


class ArchiveServer(ThreadingHTTPServer):
    """An HTTP server on 127.0.0.1 that answers every GET with `body` (status 200), with `status` alone, or, when
    `stall` is set, with nothing until the client gives up."""

    daemon_threads = True  # a stalled answer must not keep the test waiting for its thread

    def __init__(self) -> None:
        self.body, self.status, self.stall = b"", 200, threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(handler) -> None:
                if self.stall.is_set():
                    time.sleep(5)
                    return
                handler.send_response(self.status)
                handler.send_header("Content-Length", str(len(self.body) if self.status == 200 else 0))
                handler.end_headers()
                if self.status == 200:
                    handler.wfile.write(self.body)

            def log_message(handler, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/cifar-10-python.tar.gz"


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("no_proxy", "*")  # talk to 127.0.0.1 itself even where a proxy is configured
    with ArchiveServer() as serving:
        thread = threading.Thread(target=serving.serve_forever, daemon=True)
        thread.start()
        yield serving
        serving.shutdown()


def test_a_download_with_the_official_md5_is_put_in_place_extracted_and_read(tmp_path, server, monkeypatch):
    written = write_cifar10(tmp_path / "source")
    md5 = archive_of(tmp_path / "source" / "cifar-10-batches-py", tmp_path / "served.tar.gz")
    server.body = (tmp_path / "served.tar.gz").read_bytes()
    data_dir = tmp_path / "data" / "new"  # made by the download
    # It downloads into a hidden folder of its own inside data_dir, never the system's temporary folder (on another
    # file system, the archive could not be moved into place in one step).
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-folder"))
    utils, folders = dataset_files._archive_utils(), []
    download_url = utils.download_url
    monkeypatch.setattr(utils, "download_url", lambda url, root, **kwargs: (folders.append(Path(root)),
                                                                             download_url(url, root, **kwargs)))
    data = load_cifar(dataclasses.replace(TINY_CIFAR10, url=server.url, md5=md5), data_dir, download=True)
    assert len(folders) == 1 and folders[0].parent == data_dir and folders[0].name.startswith(".download-")
    assert torch.equal(data.train_images, as_images(written["train_rows"]))
    assert data.test_labels.tolist() == written["test_labels"].tolist()
    assert sorted(path.name for path in data_dir.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    assert (data_dir / "cifar-10-python.tar.gz").read_bytes() == server.body
    assert socket.getdefaulttimeout() is None  # the download's timeout is not left behind for the process


@pytest.mark.parametrize("answer, words", [("other bytes", ["does not have the md5"]), (404, ["404"])])
def test_a_failed_download_says_why_in_one_line_and_leaves_nothing(tmp_path, server, answer, words):
    if answer == 404:
        server.status = 404
    else:
        server.body = b"<html>not the archive</html>"
    (tmp_path / "data").mkdir()  # an empty data folder, as a first run often finds
    with pytest.raises(DataError) as error:
        load_cifar(dataclasses.replace(TINY_CIFAR10, url=server.url), tmp_path / "data", download=True)
    message = str(error.value)
    assert server.url in message and "\n" not in message
    for word in words:
        assert word in message, message
    assert list((tmp_path / "data").iterdir()) == []  # no partial download, no temporary folder
    assert socket.getdefaulttimeout() is None


def test_a_download_puts_back_the_processs_own_socket_timeout(tmp_path, server):
    server.status = 404
    socket.setdefaulttimeout(30.0)
    try:
        with pytest.raises(DataError):
            load_cifar(dataclasses.replace(TINY_CIFAR10, url=server.url), tmp_path / "data", download=True)
        assert socket.getdefaulttimeout() == 30.0
    finally:
        socket.setdefaulttimeout(None)


def test_a_stalled_download_ends_in_an_error_after_the_timeout_instead_of_hanging(tmp_path, server, monkeypatch):
    monkeypatch.setattr(dataset_files, "DOWNLOAD_TIMEOUT_SECONDS", 0.5)
    server.stall.set()
    started = time.monotonic()
    with pytest.raises(DataError, match="timed out") as error:
        load_cifar(dataclasses.replace(TINY_CIFAR10, url=server.url), tmp_path / "data", download=True)
    assert time.monotonic() - started < 4
    assert server.url in str(error.value)
    assert list((tmp_path / "data").iterdir()) == []
    assert socket.getdefaulttimeout() is None


def test_without_files_and_without_download_the_error_says_where_to_put_them(tmp_path):
    with pytest.raises(DataError) as error:
        load_cifar10(tmp_path, download=False)
    message = str(error.value)
    assert "cifar-10-batches-py" in message and "cifar-10-python.tar.gz" in message and str(tmp_path) in message
    assert "download" in message and "\n" not in message


class OpenFile:
    """A pickle payload: loading it creates a file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


class RunShell:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch '{self.path}'",)


@pytest.mark.parametrize("payload", [OpenFile, RunShell])
def test_crafted_pickle_is_refused_and_its_payload_never_runs(tmp_path, payload):
    write_cifar10(tmp_path)
    marker = tmp_path / "payload-ran"
    crafted = pickle.dumps({"data": payload(marker), "labels": [0]}, protocol=2)
    if payload is OpenFile:  # the payload is live: a plain pickle.loads runs it
        pickle.loads(crafted)
        assert marker.exists()
        marker.unlink()
    bad_file = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad_file.write_bytes(crafted)
    with pytest.raises(DataError) as error:
        load_cifar(TINY_CIFAR10, tmp_path, download=False)
    assert str(bad_file) in str(error.value) and "\n" not in str(error.value)
    assert not marker.exists()


def pickled(value) -> bytes:
    """The opcodes that push `value` (a tuple or str) on the unpickler's stack."""
    return pickle.dumps(value, protocol=2)[2:-1]


GLOBAL = pickle.GLOBAL
# Each pickle below reaches one check of the safe unpickler through names it allows.
CRAFTED = {
    "not-an-ndarray": (b"\x80\x02" + GLOBAL + b"numpy._core.multiarray\n_reconstruct\n" + GLOBAL + b"numpy\ndtype\n"
                       + pickled((0,)) + pickled("b") + pickle.TUPLE3 + pickle.REDUCE + pickle.STOP,
                       "asks to rebuild"),
    "float-dtype": (b"\x80\x02" + GLOBAL + b"numpy\ndtype\n" + pickled(("f8", False, True)) + pickle.REDUCE
                    + pickle.STOP, "asks for dtype 'f8'"),
    "object-dtype": (b"\x80\x02" + GLOBAL + b"numpy\ndtype\n" + pickled(("O", False, True)) + pickle.REDUCE
                     + pickle.STOP, "asks for dtype 'O'"),
    "integer-dtype-with-fields": (b"\x80\x02" + GLOBAL + b"numpy\ndtype\n"
                                  + pickled((("i4", [("a", "i2"), ("b", "i2")]),)) + pickle.REDUCE + pickle.STOP,
                                  "asks for dtype"),
    "utf-16-codec": (b"\x80\x02" + GLOBAL + b"_codecs\nencode\n" + pickled(("abc", "utf-16")) + pickle.REDUCE
                     + pickle.STOP, "'utf-16' codec"),
    "numpy-function": (b"\x80\x02" + GLOBAL + b"numpy\nload\n" + pickled(("x.npy",)) + pickle.REDUCE + pickle.STOP,
                       "numpy.load"),
}


def test_files_pickled_under_numpy_2s_module_names_load_with_numpy_1_too(tmp_path, monkeypatch):
    """numpy 1 has no numpy._core: the unpickler then finds the same functions under numpy.core."""
    import_module = importlib.import_module

    def numpy_1(name: str, *args):
        if name.startswith("numpy._core."):
            raise ImportError(f"No module named {name!r}")
        return import_module(name, *args)

    written = write_cifar10(tmp_path)
    monkeypatch.setattr(dataset_files.importlib, "import_module", numpy_1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # numpy 2 still answers to numpy.core, with a warning
        data = load_cifar(TINY_CIFAR10, tmp_path, download=False)
    assert torch.equal(data.train_images, as_images(written["train_rows"]))


def test_a_fortran_ordered_array_pickled_at_protocol_5_loads_as_saved(tmp_path):
    """numpy pickles such an array (at protocol 5) with its order, 'F': read in C order, its pixels would be
    scrambled without an error."""
    write_cifar10(tmp_path)
    rows = random_rows(4, 9)
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(
        python3_pickle({"data": np.asfortranarray(rows), "labels": [0, 1, 2, 3]}))
    data = load_cifar(TINY_CIFAR10, tmp_path, download=False)
    assert torch.equal(data.train_images[4:8], as_images(rows))


@pytest.mark.parametrize("name", list(CRAFTED))
def test_every_check_of_the_safe_unpickler_refuses_in_one_line(tmp_path, name):
    crafted, reason = CRAFTED[name]
    write_cifar10(tmp_path)
    bad_file = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad_file.write_bytes(crafted)
    with pytest.raises(DataError) as error:
        load_cifar(TINY_CIFAR10, tmp_path, download=False)
    message = str(error.value)
    assert str(bad_file) in message and "was not loaded" in message and reason in message, message
    assert "\n" not in message


# Each damage: what it does to a CIFAR-10 folder, then the file the error must name and what it must say.
def truncate(folder: Path) -> tuple[str, str]:
    path = folder / "data_batch_2"
    path.write_bytes(path.read_bytes()[:5000])
    return "data_batch_2", r"is truncated or not a CIFAR file \(\w+Error: (?!None\))\w"  # its class, then its words


def wrong_shape(folder: Path) -> tuple[str, str]:
    (folder / "data_batch_4").write_bytes(python2_pickle({"data": np.zeros((4, 3000), np.uint8), "labels": [0] * 4}))
    return "data_batch_4", r"has 'data' of \(4, 3000\), not N x 3072 uint8"


def flat_data(folder: Path) -> tuple[str, str]:
    (folder / "data_batch_4").write_bytes(python2_pickle({"data": np.zeros(3072, np.uint8), "labels": [0]}))
    return "data_batch_4", r"has 'data' of \(3072,\), not N x 3072 uint8"


def labels_missing(folder: Path) -> tuple[str, str]:
    (folder / "data_batch_3").write_bytes(python2_pickle({"data": random_rows(4, 7)}))
    return "data_batch_3", "has no 'labels' list"


def labels_one_short(folder: Path) -> tuple[str, str]:
    (folder / "data_batch_3").write_bytes(python2_pickle({"data": random_rows(4, 7), "labels": [1, 2, 3]}))
    return "data_batch_3", r"has \(3,\) 'labels' of type int64 for 4 images"


def label_out_of_range(folder: Path) -> tuple[str, str]:
    (folder / "test_batch").write_bytes(python2_pickle({"data": random_rows(TEST_SIZE, 5),
                                                        "labels": [10] + [0] * (TEST_SIZE - 1)}))
    return "test_batch", r"has 'labels' outside 0\.\.9"


def missing_file(folder: Path) -> tuple[str, str]:
    (folder / "data_batch_5").unlink()
    return "data_batch_5", "data_batch_5 is missing; replace"


def too_few_images(folder: Path) -> tuple[str, str]:
    (folder / "data_batch_1").write_bytes(python2_pickle({"data": random_rows(3, 6), "labels": [1, 2, 3]}))
    return "", "images in data_batch_1"  # the folder as a whole is wrong


def too_few_class_names(folder: Path) -> tuple[str, str]:
    (folder / "batches.meta").write_bytes(python2_pickle({"label_names": CIFAR10_NAMES[:9]}))
    return "batches.meta", "has no list of 10 names under 'label_names'"


def not_a_dict(folder: Path) -> tuple[str, str]:
    (folder / "data_batch_1").write_bytes(pickle.dumps([1, 2, 3]))
    return "data_batch_1", "holds a list, not a dict"


def meta_not_a_dict(folder: Path) -> tuple[str, str]:
    (folder / "batches.meta").write_bytes(pickle.dumps(CIFAR10_NAMES))
    return "batches.meta", "holds a list, not a dict"


def float_labels(folder: Path) -> tuple[str, str]:
    (folder / "data_batch_3").write_bytes(python2_pickle({"data": random_rows(4, 7), "labels": [1.0, 2.0, 3.0, 4.0]}))
    return "data_batch_3", r"has \(4,\) 'labels' of type float64 for 4 images"


def data_of_another_type(folder: Path) -> tuple[str, str]:
    (folder / "data_batch_4").write_bytes(python3_pickle({"data": random_rows(4, 7).astype(np.int64),
                                                          "labels": [0] * 4}))
    return "data_batch_4", r"has 'data' of \(4, 3072\), not N x 3072 uint8"


def data_not_an_array(folder: Path) -> tuple[str, str]:
    (folder / "data_batch_4").write_bytes(python2_pickle({"data": [[0] * 3072] * 4, "labels": [0] * 4}))
    return "data_batch_4", "has 'data' of list, not N x 3072 uint8"


@pytest.mark.parametrize("damage", [truncate, wrong_shape, flat_data, labels_missing, labels_one_short,
                                    label_out_of_range, missing_file, too_few_images, too_few_class_names, not_a_dict,
                                    meta_not_a_dict, float_labels, data_of_another_type, data_not_an_array])
def test_damaged_files_give_one_line_data_error_naming_the_file(tmp_path, damage):
    write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    bad_name, says = damage(folder)
    with pytest.raises(DataError) as error:
        load_cifar(TINY_CIFAR10, tmp_path, download=False)
    message = str(error.value)
    assert str(folder / bad_name) in message and "\n" not in message
    assert re.search(says, message), message
    assert (folder / "batches.meta").exists()  # the user's files stay


@pytest.mark.parametrize("damage", ["one coarse name", "coarse label 20"])
def test_damaged_cifar100_coarse_names_or_labels_give_one_line_naming_the_file(tmp_path, damage):
    written = write_cifar100(tmp_path)
    folder = tmp_path / "cifar-100-python"
    if damage == "one coarse name":
        bad, says = folder / "meta", "has no list of 20 names under 'coarse_label_names'"
        bad.write_bytes(python2_pickle({"fine_label_names": [f"fine{i}" for i in range(100)],
                                        "coarse_label_names": ["coarse0"]}))
    else:
        bad, says = folder / "train", "has 'coarse_labels' outside 0..19"
        rows, fine, coarse = written["train"]
        bad.write_bytes(python2_pickle({"data": rows, "fine_labels": fine.tolist(),
                                        "coarse_labels": [20] + coarse.tolist()[1:]}))
    with pytest.raises(DataError) as error:
        load_cifar(TINY_CIFAR100, tmp_path, download=False)
    assert str(error.value).startswith(f"{bad} {says}"), str(error.value)


def test_labels_pickled_big_endian_load_as_their_values_without_a_warning(tmp_path):
    """A label array of another byte order (as a converter on another machine may write) is read by its value."""
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(
        python3_pickle({"data": random_rows(4, 9), "labels": np.arange(4, dtype=">i8")}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = load_cifar(TINY_CIFAR10, tmp_path, download=False)
    assert data.train_labels[4:8].tolist() == [0, 1, 2, 3]


def test_the_real_split_sizes_are_required(tmp_path):
    write_cifar10(tmp_path)  # 20 training images where CIFAR-10 has 50,000
    with pytest.raises(DataError, match="50000"):
        load_cifar10(tmp_path, download=False)
