"""What CIFAR-10 and CIFAR-100 share (Krizhevsky 2009, https://www.cs.toronto.edu/~kriz/cifar.html): the
description of a dataset's files, the safe reader of the python-format pickles, and finding, downloading and
extracting the official archive. load_data_cifar10.py and load_data_cifar100.py each hold one CifarSpec.
"""
from __future__ import annotations

import http.client
import importlib
import os
import pickle
import socket
import tarfile
import tempfile
import urllib.error
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.errors import UsageError

DOWNLOAD_TIMEOUT_SECONDS = 60  # a stalled connection gives an error instead of hanging forever


class DataError(UsageError):
    """Any problem with the dataset files or their download; str(err) is one line naming the file or URL
    and saying what to do (exit 2)."""


@dataclass(frozen=True)
class CifarSpec:
    """What differs between CIFAR-10 and CIFAR-100: file names, label keys, sizes and where to get them."""

    folder: str  # what the official archive extracts to
    archive: str
    url: str
    md5: str  # of the archive; the extracted files are not checked against official sums
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    class_names_key: str
    num_classes: int
    coarse_label_key: str | None = None
    coarse_names_key: str | None = None
    num_coarse_classes: int = 0
    train_size: int = 50_000
    test_size: int = 10_000


@dataclass
class CifarData:
    """A whole dataset: images are uint8 N x 3 x 32 x 32, labels int64. Coarse fields are CIFAR-100 only."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    train_coarse_labels: torch.Tensor | None = None
    test_coarse_labels: torch.Tensor | None = None
    coarse_classes: list[str] | None = None

    def superclasses(self) -> dict[str, str] | None:
        """Each class's superclass (CIFAR-100's coarse class), as the training images label them, in the dataset's
        order of superclasses (then of classes); None without coarse labels."""
        if self.train_coarse_labels is None or self.coarse_classes is None:
            return None
        pairs = torch.stack([self.train_coarse_labels, self.train_labels]).unique(dim=1).T.tolist()
        return {self.classes[fine]: self.coarse_classes[coarse] for coarse, fine in sorted(pairs)}


def load_cifar(spec: CifarSpec, data_dir: str | Path, download: bool) -> CifarData:
    """Reads the dataset described by spec: the extracted folder if present, else the archive, else a download."""
    folder = _find_or_fetch(spec, Path(data_dir), download)
    meta = _read_pickle(folder / spec.meta_file, spec)
    classes = _class_names(meta, spec.class_names_key, spec.num_classes, folder / spec.meta_file, spec)
    coarse_classes = None
    if spec.coarse_names_key is not None:
        coarse_classes = _class_names(meta, spec.coarse_names_key, spec.num_coarse_classes,
                                      folder / spec.meta_file, spec)
    train = _read_split(spec, folder, spec.train_files, spec.train_size)
    test = _read_split(spec, folder, spec.test_files, spec.test_size)
    return CifarData(train_images=train[0], train_labels=train[1], test_images=test[0], test_labels=test[1],
                     classes=classes, train_coarse_labels=train[2], test_coarse_labels=test[2],
                     coarse_classes=coarse_classes)


# -- finding, downloading and extracting ---------------------------------------------------------------------

def _archive_utils():
    """torchvision's download, md5 and extraction utilities, imported only when an archive is handled:
    torchvision.datasets pulls in torchvision.models and torch._dynamo, 1.4 s of every start otherwise."""
    from torchvision.datasets import utils
    return utils


def _find_or_fetch(spec: CifarSpec, data_dir: Path, download: bool) -> Path:
    folder, archive = data_dir / spec.folder, data_dir / spec.archive
    if folder.is_dir():
        return folder
    if not archive.is_file() and not download:
        raise DataError(f"found neither {folder}/ nor {archive}; put the extracted folder or the archive from "
                        f"{spec.url} in {data_dir}/ (the training scripts download it there when online)")
    if archive.is_file() and not _archive_utils().check_integrity(str(archive), spec.md5):
        # The user's file stays where it is: it may be all they have.
        raise DataError(f"{archive} does not have the official md5 {spec.md5}; it is damaged or another file: "
                        f"replace it with a fresh download of {spec.url} (or delete it to download again)")
    try:
        if not archive.is_file():
            _download(spec, data_dir)
        _extract(spec, archive, data_dir)
    except OSError as err:  # what is left after download and extraction errors: the folder itself
        raise DataError(f"could not write the dataset into {data_dir}/ ({_one_line(err)}); pass a writable "
                        f"folder with about 400 MB free") from None
    return folder


def _download(spec: CifarSpec, data_dir: Path) -> None:
    """Downloads into a temporary folder and moves the archive into data_dir only once its md5 is right, so a
    failed or partial download never leaves a file behind that looks like the real one."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=data_dir) as temp_dir:
        temp_archive = Path(temp_dir) / spec.archive
        previous_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_SECONDS)  # urllib, used by torchvision, waits forever otherwise
        try:
            _archive_utils().download_url(spec.url, temp_dir, filename=spec.archive)
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
            # an HTTP error says its status ("HTTP Error 404: Not Found"); a URLError its reason, not "<urlopen ...>"
            reason = err if isinstance(err, urllib.error.HTTPError) else getattr(err, "reason", err)
            raise DataError(f"could not download {spec.url} ({_one_line(reason)}); check the network, or "
                            f"download it by hand and put it in {data_dir}/") from None
        finally:
            socket.setdefaulttimeout(previous_timeout)
        if not _archive_utils().check_integrity(str(temp_archive), spec.md5):
            raise DataError(f"the file downloaded from {spec.url} does not have the md5 {spec.md5}; try again, "
                            f"or download it by hand and put it in {data_dir}/")
        os.replace(temp_archive, data_dir / spec.archive)


def _extract(spec: CifarSpec, archive: Path, data_dir: Path) -> None:
    """Extracts into a temporary folder and moves the dataset folder into place whole, so an interrupted
    extraction never leaves a half-filled folder that would be read next time."""
    with tempfile.TemporaryDirectory(prefix=".extract-", dir=data_dir) as temp_dir:
        try:
            _archive_utils().extract_archive(str(archive), temp_dir)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
            raise DataError(f"could not extract {archive} ({_one_line(err)}); replace it with a fresh download "
                            f"of {spec.url}") from None
        extracted = Path(temp_dir) / spec.folder
        if not extracted.is_dir():
            raise DataError(f"{archive} holds no {spec.folder}/ folder; replace it with a fresh download of "
                            f"{spec.url}")
        os.replace(extracted, data_dir / spec.folder)


def _one_line(reason: object) -> str:
    return " ".join(str(reason).split())


# -- reading safely ----------------------------------------------------------------------------------------------

class _Refused(pickle.UnpicklingError):
    """The file asks for something a CIFAR file never needs (and that might run code)."""


def _numpy_function(module_name: str, name: str) -> object:
    """numpy 2 moved numpy.core to numpy._core; files pickled under either name must load with either numpy."""
    try:
        module = importlib.import_module(f"numpy._core.{module_name}")
    except ImportError:
        module = importlib.import_module(f"numpy.core.{module_name}")
    return getattr(module, name)


def _reconstruct_ndarray(subtype: type, shape: tuple, dtype_code: bytes) -> np.ndarray:
    if subtype is not np.ndarray:
        raise _Refused(f"it asks to rebuild a {subtype!r}")
    return _numpy_function("multiarray", "_reconstruct")(subtype, shape, dtype_code)


def _integer_dtype(code: object, align: bool = False, copy: bool = True) -> np.dtype:
    """Only plain integer dtypes, always a fresh copy: the pickle then sets the copy's state, which must never
    reach numpy's shared dtype objects."""
    dtype = np.dtype(code, bool(align), True)
    if dtype.kind not in "biu" or dtype.fields is not None or dtype.subdtype is not None:
        raise _Refused(f"it asks for dtype {code!r}")
    return dtype


def _frombuffer(buffer: bytes, dtype: np.dtype, shape: tuple, order: str) -> np.ndarray:
    return _numpy_function("numeric", "_frombuffer")(buffer, dtype, shape, order)


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """How Python 3 pickles bytes at protocol 2; only latin-1 makes sense there."""
    if encoding not in ("latin1", "latin-1"):
        raise _Refused(f"it asks for the {encoding!r} codec")
    return text.encode("latin1")


# Everything a pickled numpy integer array needs, under the names numpy 1 and 2 write; nothing else loads.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_ndarray,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct_ndarray,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _integer_dtype,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _latin1_encode,
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """A pickle can call any importable function while it loads; this one can only rebuild integer arrays."""

    def find_class(self, module: str, name: str) -> object:
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise _Refused(f"it asks to load {module}.{name}, which a CIFAR file never needs")
        return allowed


def _read_pickle(path: Path, spec: CifarSpec) -> dict[str, object]:
    """One dataset file as a dict with str keys. The official files were pickled by Python 2: latin-1 turns
    their byte strings into str; bytes keys written by other tools are decoded the same way."""
    try:
        with open(path, "rb") as file:
            content = _ArrayOnlyUnpickler(file, encoding="latin1").load()
    except FileNotFoundError:
        raise _file_error(path, "is missing", spec) from None
    except _Refused as err:
        raise _file_error(path, f"was not loaded: {_one_line(err)}", spec) from None
    except Exception as err:  # a damaged pickle can raise almost anything: EOFError, ValueError, KeyError...
        raise _file_error(path, f"is truncated or not a CIFAR file ({type(err).__name__}: {_one_line(err)})",
                          spec) from None
    if not isinstance(content, dict):
        raise _file_error(path, f"holds a {type(content).__name__}, not a dict", spec)
    return {(key.decode("latin1") if isinstance(key, bytes) else key): value for key, value in content.items()}


def _file_error(path: Path, problem: str, spec: CifarSpec) -> DataError:
    return DataError(f"{path} {problem}; replace {path.parent}/ with the folder extracted from {spec.archive} "
                     f"(or delete it to download {spec.url} again)")


def _class_names(meta: dict, key: str, count: int, path: Path, spec: CifarSpec) -> list[str]:
    names = meta.get(key)
    if not isinstance(names, list) or len(names) != count or not all(isinstance(n, (str, bytes)) for n in names):
        raise _file_error(path, f"has no list of {count} names under '{key}'", spec)
    return [name.decode("latin1") if isinstance(name, bytes) else name for name in names]


def _labels(content: dict, key: str, count: int, rows: int, path: Path, spec: CifarSpec) -> np.ndarray:
    labels = content.get(key)
    if not isinstance(labels, (list, np.ndarray)):
        raise _file_error(path, f"has no '{key}' list", spec)
    labels = np.asarray(labels)
    if labels.shape != (rows,) or (rows and (labels.dtype.kind not in "iu" or labels.dtype.hasobject)):
        raise _file_error(path, f"has {labels.shape} '{key}' of type {labels.dtype} for {rows} images", spec)
    if rows and (labels.min() < 0 or labels.max() >= count):
        raise _file_error(path, f"has '{key}' outside 0..{count - 1}", spec)
    return labels.astype(np.int64)


def _read_split(spec: CifarSpec, folder: Path, files: tuple[str, ...],
                size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Images (uint8 N x 3 x 32 x 32), labels and coarse labels (or None) of one split, checked."""
    images, labels, coarse_labels = [], [], []
    for name in files:
        path = folder / name
        content = _read_pickle(path, spec)
        data = content.get("data")
        if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.dtype.hasobject or data.ndim != 2
                or data.shape[1] != 3072):
            shape = data.shape if isinstance(data, np.ndarray) else type(data).__name__
            raise _file_error(path, f"has 'data' of {shape}, not N x 3072 uint8", spec)
        images.append(data)
        labels.append(_labels(content, spec.label_key, spec.num_classes, len(data), path, spec))
        if spec.coarse_label_key is not None:
            coarse_labels.append(_labels(content, spec.coarse_label_key, spec.num_coarse_classes, len(data),
                                         path, spec))
    total = sum(len(data) for data in images)
    if total != size:
        raise DataError(f"{folder}/ holds {total} images in {', '.join(files)} where {spec.folder} has {size}; "
                        f"replace it with the folder extracted from {spec.archive} (or delete it to download "
                        f"{spec.url} again)")
    # Each row is the 1024 red, then green, then blue values of one image, row by row.
    image_tensor = torch.from_numpy(np.concatenate(images)).reshape(-1, 3, 32, 32)
    coarse = torch.from_numpy(np.concatenate(coarse_labels)) if coarse_labels else None
    return image_tensor, torch.from_numpy(np.concatenate(labels)), coarse
