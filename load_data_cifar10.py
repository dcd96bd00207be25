"""CIFAR-10 (Krizhevsky 2009, https://www.cs.toronto.edu/~kriz/cifar.html) as tensors, and what CIFAR-100 shares
with it: the safe reader of the python-format files, the validation split and the on-device batches.

The whole dataset fits in memory, so there is no DataLoader: each split is one uint8 tensor on the training
device and every batch is cut from it with tensor ops (as in KellerJordan/airbench).
"""
from __future__ import annotations

import hashlib
import importlib
import http.client
import os
import pickle
import socket
import tarfile
import tempfile
import urllib.error
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets.utils import check_integrity, download_url, extract_archive

DATASET_NAME = "cifar10"
NUM_CLASSES = 10
AUGMENTATIONS = ("none", "flip-crop", "flip-crop-cutout")
CROP_PADDING = 4  # pixels of zero padding around the image before the random 32x32 crop
CUTOUT_SIZE = 16  # side of the square that cutout zeroes (DeVries & Taylor 2017, their CIFAR-10 setting)
DOWNLOAD_TIMEOUT_SECONDS = 60  # a stalled connection gives an error instead of hanging forever


class DataError(Exception):
    """Any problem with the dataset files or their download; str(err) is one line naming the file or URL
    and saying what to do."""


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


CIFAR10 = CifarSpec(
    folder="cifar-10-batches-py", archive="cifar-10-python.tar.gz",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", md5="c58f30108f718f92721af3b95e74349a",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)), test_files=("test_batch",),
    meta_file="batches.meta", label_key="labels", class_names_key="label_names", num_classes=NUM_CLASSES)


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


def load_cifar10(data_dir: str | Path = "data", download: bool = True) -> CifarData:
    """CIFAR-10 from data_dir, downloaded there first if it holds neither the folder nor the archive."""
    return load_cifar(CIFAR10, data_dir, download)


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

def _find_or_fetch(spec: CifarSpec, data_dir: Path, download: bool) -> Path:
    folder, archive = data_dir / spec.folder, data_dir / spec.archive
    if folder.is_dir():
        return folder
    if not archive.is_file() and not download:
        raise DataError(f"found neither {folder}/ nor {archive}; put the extracted folder or the archive from "
                        f"{spec.url} in {data_dir}/ (the training scripts download it there when online)")
    if archive.is_file() and not check_integrity(str(archive), spec.md5):
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
            download_url(spec.url, temp_dir, filename=spec.archive)
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise DataError(f"could not download {spec.url} ({_one_line(reason)}); check the network, or "
                            f"download it by hand and put it in {data_dir}/") from None
        finally:
            socket.setdefaulttimeout(previous_timeout)
        if not check_integrity(str(temp_archive), spec.md5):
            raise DataError(f"the file downloaded from {spec.url} does not have the md5 {spec.md5}; try again, "
                            f"or download it by hand and put it in {data_dir}/")
        os.replace(temp_archive, data_dir / spec.archive)


def _extract(spec: CifarSpec, archive: Path, data_dir: Path) -> None:
    """Extracts into a temporary folder and moves the dataset folder into place whole, so an interrupted
    extraction never leaves a half-filled folder that would be read next time."""
    with tempfile.TemporaryDirectory(prefix=".extract-", dir=data_dir) as temp_dir:
        try:
            extract_archive(str(archive), temp_dir)
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


# -- statistics and the validation split -----------------------------------------------------------------------

def channel_stats(images: torch.Tensor) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and std of uint8 N x 3 x H x W images, as fractions of 255. Counting how often each of
    the 256 values occurs gives exact sums without a float copy of the whole dataset."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3 or images.numel() == 0:
        raise ValueError(f"channel_stats needs a non-empty uint8 N x 3 x H x W tensor, got {images.dtype} "
                         f"{tuple(images.shape)}")
    values = torch.arange(256, dtype=torch.float64, device=images.device)
    means, stds = [], []
    for channel in range(3):
        counts = torch.bincount(images[:, channel].reshape(-1), minlength=256).double()
        mean = (counts * values).sum() / counts.sum()
        variance = (counts * (values - mean) ** 2).sum() / counts.sum()
        means.append(mean.item() / 255)
        stds.append(variance.sqrt().item() / 255)
    return (means[0], means[1], means[2]), (stds[0], stds[1], stds[2])


def split_validation(labels: torch.Tensor, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train_indices, val_indices), both sorted and disjoint, with val_size images held out, balanced over the
    classes (per-class counts differ by at most one unless a class has fewer images than its share) and
    fixed by seed."""
    labels = labels.cpu().long()
    if not 0 <= val_size < max(len(labels), 1):
        raise ValueError(f"validation size {val_size} must be at least 0 and less than the {len(labels)} "
                         f"training images")
    generator = torch.Generator().manual_seed(seed)
    classes, class_sizes = torch.unique(labels, return_counts=True)
    # Which classes get the one extra image when val_size does not divide evenly depends on the seed, not on
    # class ids; smallest classes are served first so whatever they cannot give goes to the others.
    class_order = torch.randperm(len(classes), generator=generator)
    class_order = class_order[torch.argsort(class_sizes[class_order], stable=True)]
    quotas, remaining = [0] * len(classes), val_size
    for served, class_position in enumerate(class_order.tolist()):
        quotas[class_position] = min(int(class_sizes[class_position]), remaining // (len(classes) - served))
        remaining -= quotas[class_position]
    shuffled = torch.randperm(len(labels), generator=generator)
    by_class = shuffled[torch.argsort(labels[shuffled], stable=True)]  # grouped by class, shuffled inside
    class_starts = torch.cumsum(class_sizes, 0) - class_sizes
    val_indices = torch.cat([by_class[start:start + quota]
                             for start, quota in zip(class_starts.tolist(), quotas)] + [by_class[:0]])
    is_val = torch.zeros(len(labels), dtype=torch.bool)
    is_val[val_indices] = True
    return torch.nonzero(~is_val).flatten(), torch.nonzero(is_val).flatten()


# -- batches -----------------------------------------------------------------------------------------------------

def _check_batch_arguments(images: torch.Tensor, labels: torch.Tensor, batch_size: int, rank: int,
                           world_size: int) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a uint8 N x 3 x H x W tensor, got {images.dtype} {tuple(images.shape)}")
    if labels.shape != (len(images),):
        raise ValueError(f"labels must be one per image, got {tuple(labels.shape)} for {len(images)} images")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    if batch_size < world_size or 0 < len(images) < world_size:
        raise ValueError(f"batch size {batch_size} and {len(images)} images cannot be shared by {world_size} "
                         f"processes without some getting none; use at least {world_size} of each")


def _batch_shares(num_images: int, batch_size: int, rank: int, world_size: int) -> list[tuple[int, int]]:
    """(start, end) of this rank's part of every global batch of the epoch order. Ranks split each global batch
    into near-equal contiguous parts, so together they see every image once; a last global batch smaller than
    world_size is folded into the one before, so that no rank ever gets an empty batch."""
    bounds = list(range(0, num_images, batch_size)) + [num_images]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < world_size:
        del bounds[-2]
    shares = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        share, extra = divmod(end - start, world_size)
        share_start = start + rank * share + min(rank, extra)
        shares.append((share_start, share_start + share + (rank < extra)))
    return shares


def _normalization(mean: Sequence[float], std: Sequence[float],
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """scale and shift such that uint8 * scale + shift == (value / 255 - mean) / std, per channel."""
    mean_tensor = torch.tensor(list(mean), dtype=torch.float64).view(1, 3, 1, 1)
    std_tensor = torch.tensor(list(std), dtype=torch.float64).view(1, 3, 1, 1)
    scale, shift = 1 / (255 * std_tensor), -mean_tensor / std_tensor
    return scale.float().to(device), shift.float().to(device)


def _normalize(images: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
               channels_last: bool) -> torch.Tensor:
    if channels_last:  # reorder the uint8 pixels, 4x cheaper than reordering floats
        images = images.contiguous(memory_format=torch.channels_last)
    return images.float().mul_(scale).add_(shift)


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator for one epoch: the same numbers on every device, and for an epoch resumed without
    replaying the ones before. Hashing keeps (seed, epoch) pairs apart, unlike seed + epoch."""
    digest = hashlib.sha256(f"{seed},{epoch}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _shift_into(source: torch.Tensor, target: torch.Tensor, dy: int, dx: int) -> None:
    """target[..., i, j] = source[..., i + dy, j + dx], zero where that falls outside: a crop of the zero-padded
    image, as one slice copy."""
    height, width = source.shape[-2:]
    top, bottom, left, right = max(0, -dy), height - max(0, dy), max(0, -dx), width - max(0, dx)
    target[:, :, top:bottom, left:right] = source[:, :, top + dy:bottom + dy, left + dx:right + dx]
    target[:, :, :top].zero_()
    target[:, :, bottom:].zero_()
    target[:, :, top:bottom, :left].zero_()
    target[:, :, top:bottom, right:].zero_()


def _cutout_lines(centres: torch.Tensor, length: int) -> torch.Tensor:
    """1.0 on the rows (or columns) that a CUTOUT_SIZE square around each centre covers, clipped at the borders;
    the square of an image is the outer product of its two lines."""
    pixels = torch.arange(length, device=centres.device)
    first = centres[:, None] - CUTOUT_SIZE // 2
    return ((pixels >= first) & (pixels < first + CUTOUT_SIZE)).float()


class TrainBatches:
    """Shuffled, augmented and normalized training batches, made on the device.

    Every epoch is a fresh permutation with per-image random crops (CROP_PADDING pixels of zero padding) and
    horizontal flips, plus cutout with aug="flip-crop-cutout". All random numbers of an epoch are drawn at the
    start of iteration from a CPU generator seeded with (seed, epoch), so the same seed and epoch give the same
    batches on any device and after a resume. batch_size is the global batch: under torchrun every rank takes
    its share of each global batch of the same permutation. One iteration at a time: an epoch's augmented
    images live in buffers reused every epoch (fresh memory would cost more than the augmentation itself).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, mean: Sequence[float],
                 std: Sequence[float], *, aug: str = "flip-crop", seed: int = 0, device: str | torch.device = "cpu",
                 channels_last: bool = False, rank: int = 0, world_size: int = 1) -> None:
        _check_batch_arguments(images, labels, batch_size, rank, world_size)
        if aug not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {aug!r}; choose one of {', '.join(AUGMENTATIONS)}")
        self.device = torch.device(device)
        self.images = images.to(self.device).contiguous()
        # Flipped copies cost one more dataset of memory and save flipping half of it every epoch.
        self.flipped_images = self.images.flip(3) if aug != "none" else None
        self.labels = labels.to(self.device, torch.int64)
        self.scale, self.shift = _normalization(mean, std, self.device)
        self.aug, self.seed, self.channels_last, self.epoch = aug, seed, channels_last, 0
        self.shares = _batch_shares(len(images), batch_size, rank, world_size)
        # This rank's positions in the epoch order, batch after batch.
        self.positions = torch.cat([torch.arange(start, end) for start, end in self.shares] + [torch.arange(0)])
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self._iterations = 0

    def set_epoch(self, epoch: int) -> None:
        """Chooses the epoch whose batches the next iteration makes; without it every iteration repeats one."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.shares)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._iterations += 1
        iteration = self._iterations
        num_images, (height, width) = len(self.images), self.images.shape[-2:]
        span = 2 * CROP_PADDING + 1
        generator = _epoch_generator(self.seed, self.epoch)
        # Drawn whatever aug is, so that aug changes the pictures but not the order.
        permutation = torch.randperm(num_images, generator=generator)
        crop_y, crop_x, flips, cutout_y, cutout_x = (
            torch.randint(0, high, (num_images,), generator=generator)[self.positions]
            for high in (span, span, 2, height, width))
        sources = permutation[self.positions]
        labels = self.labels[sources.to(self.device)]
        if self.aug == "none":
            pool, rows = self.images, sources.to(self.device)
        else:
            pool, rows = self._crop_and_flip(sources, crop_y, crop_x, flips)
        if self.aug == "flip-crop-cutout":
            cutout_rows = _cutout_lines(cutout_y.to(self.device), height)
            cutout_cols = _cutout_lines(cutout_x.to(self.device), width)
        offset = 0
        for start, end in self.shares:
            if self._iterations != iteration:
                raise RuntimeError("TrainBatches was iterated again before an earlier iteration finished; "
                                   "they share buffers, so iterate one at a time")
            batch_rows = slice(offset, offset + end - start)
            inputs = _normalize(pool.index_select(0, rows[batch_rows]), self.scale, self.shift, self.channels_last)
            if self.aug == "flip-crop-cutout":
                # After normalization, as DeVries & Taylor 2017 do, so the square takes the mean colour.
                # A float multiply is several times faster here than masked_fill_ with a broadcast mask.
                inputs.mul_(1 - cutout_rows[batch_rows, None, :, None] * cutout_cols[batch_rows, None, None, :])
            yield inputs, labels[batch_rows]
            offset += end - start

    def _crop_and_flip(self, sources: torch.Tensor, crop_y: torch.Tensor, crop_x: torch.Tensor,
                       flips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The epoch's flipped and cropped images in a buffer grouped by (flip, crop offset), and for each epoch
        position its row there. Only 2 x 9 x 9 cases exist, so grouping makes every crop one slice copy
        instead of a per-pixel gather. Flip first, then crop: the same distribution as the other way round."""
        span = 2 * CROP_PADDING + 1
        cases = (flips * span + crop_y) * span + crop_x
        order = torch.argsort(cases, stable=True)
        rows = torch.empty_like(order)
        rows[order] = torch.arange(len(order))
        ordered_sources = sources[order].to(self.device)
        if self._buffers is None:
            self._buffers = (torch.empty_like(self.images[:len(order)]), torch.empty_like(self.images[:len(order)]))
        gathered, cropped = self._buffers
        start = 0
        for case, count in enumerate(torch.bincount(cases, minlength=2 * span * span).tolist()):
            if count == 0:
                continue
            end = start + count
            flip, (crop_row, crop_col) = case // (span * span), divmod(case % (span * span), span)
            source = self.flipped_images if flip else self.images
            torch.index_select(source, 0, ordered_sources[start:end], out=gathered[start:end])
            _shift_into(gathered[start:end], cropped[start:end], crop_row - CROP_PADDING, crop_col - CROP_PADDING)
            start = end
        return cropped, rows.to(self.device)


class EvalBatches:
    """Normalized batches in dataset order, without augmentation. Under torchrun every rank takes its share of
    each global batch, so all ranks together see every image once."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, mean: Sequence[float],
                 std: Sequence[float], *, device: str | torch.device = "cpu", channels_last: bool = False,
                 rank: int = 0, world_size: int = 1) -> None:
        _check_batch_arguments(images, labels, batch_size, rank, world_size)
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.scale, self.shift = _normalization(mean, std, self.device)
        self.channels_last = channels_last
        self.shares = _batch_shares(len(images), batch_size, rank, world_size)

    def __len__(self) -> int:
        return len(self.shares)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start, end in self.shares:
            yield (_normalize(self.images[start:end], self.scale, self.shift, self.channels_last),
                   self.labels[start:end])
