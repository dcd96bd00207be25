"""load_data_cifar10.py / load_data_cifar100.py: reading the official formats safely, fetching the archive,
the validation split, and the on-device training and evaluation batches. Everything runs on tiny files the
tests write themselves, pickled the way the official ones were; nothing comes from the network."""
import dataclasses
import hashlib
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from load_data_cifar10 import (CIFAR10, DataError, EvalBatches, TrainBatches, channel_stats, load_cifar,
                               load_cifar10, split_validation)
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


def test_archive_with_right_md5_is_extracted_and_read(tmp_path):
    written = write_cifar10(tmp_path / "source")
    data_dir = tmp_path / "data"
    archive = data_dir / "cifar-10-python.tar.gz"
    md5 = archive_of(tmp_path / "source" / "cifar-10-batches-py", archive)
    data = load_cifar(dataclasses.replace(TINY_CIFAR10, md5=md5), data_dir, download=False)
    assert torch.equal(data.train_images, as_images(written["train_rows"]))
    assert sorted(path.name for path in data_dir.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


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
    assert list((tmp_path / "data").iterdir()) == []  # no partial download left behind


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


def truncate(folder: Path) -> str:
    path = folder / "data_batch_2"
    path.write_bytes(path.read_bytes()[:5000])
    return "data_batch_2"


def wrong_shape(folder: Path) -> str:
    (folder / "data_batch_4").write_bytes(python2_pickle({"data": np.zeros((4, 3000), np.uint8), "labels": [0] * 4}))
    return "data_batch_4"


def label_out_of_range(folder: Path) -> str:
    (folder / "test_batch").write_bytes(python2_pickle({"data": random_rows(TEST_SIZE, 5),
                                                        "labels": [10] + [0] * (TEST_SIZE - 1)}))
    return "test_batch"


def missing_file(folder: Path) -> str:
    (folder / "data_batch_5").unlink()
    return "data_batch_5"


def too_few_images(folder: Path) -> str:
    (folder / "data_batch_1").write_bytes(python2_pickle({"data": random_rows(3, 6), "labels": [1, 2, 3]}))
    return ""  # the folder as a whole is wrong


def too_few_class_names(folder: Path) -> str:
    (folder / "batches.meta").write_bytes(python2_pickle({"label_names": CIFAR10_NAMES[:9]}))
    return "batches.meta"


def not_a_dict(folder: Path) -> str:
    (folder / "data_batch_1").write_bytes(pickle.dumps([1, 2, 3]))
    return "data_batch_1"


@pytest.mark.parametrize("damage", [truncate, wrong_shape, label_out_of_range, missing_file, too_few_images,
                                    too_few_class_names, not_a_dict])
def test_damaged_files_give_one_line_data_error_naming_the_file(tmp_path, damage):
    write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    bad_name = damage(folder)
    with pytest.raises(DataError) as error:
        load_cifar(TINY_CIFAR10, tmp_path, download=False)
    assert str(folder / bad_name) in str(error.value) and "\n" not in str(error.value)
    assert (folder / "batches.meta").exists()  # the user's files stay


def test_the_real_split_sizes_are_required(tmp_path):
    write_cifar10(tmp_path)  # 20 training images where CIFAR-10 has 50,000
    with pytest.raises(DataError, match="50000"):
        load_cifar10(tmp_path, download=False)


# -- statistics and the validation split --------------------------------------------------------------------

def test_channel_stats_are_the_per_channel_mean_and_std_as_fractions():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (50, 3, 8, 8), generator=generator, dtype=torch.uint8)
    images[:, 1] //= 2  # channels with different statistics
    mean, std = channel_stats(images)
    pixels = images.double().div(255).transpose(0, 1).reshape(3, -1)
    assert mean == pytest.approx(pixels.mean(1).tolist(), abs=1e-12)
    assert std == pytest.approx(pixels.std(1, unbiased=False).tolist(), abs=1e-12)


def test_validation_split_is_balanced_disjoint_sorted_and_fixed_by_the_seed():
    labels = torch.arange(300) % 10
    labels = labels[torch.randperm(300, generator=torch.Generator().manual_seed(1))]
    train_indices, val_indices = split_validation(labels, 25, seed=0)
    per_class = torch.bincount(labels[val_indices], minlength=10)
    assert len(val_indices) == 25 and per_class.max() - per_class.min() <= 1
    assert torch.equal(torch.sort(torch.cat([train_indices, val_indices])).values, torch.arange(300))
    assert torch.equal(val_indices, torch.sort(val_indices).values)
    assert torch.equal(train_indices, torch.sort(train_indices).values)
    assert torch.equal(split_validation(labels, 25, seed=0)[1], val_indices)
    assert not torch.equal(split_validation(labels, 25, seed=1)[1], val_indices)


def test_validation_split_gives_small_classes_all_they_have_and_the_rest_to_the_others():
    labels = torch.tensor([0] + [1] * 50 + [2] * 50)
    _, val_indices = split_validation(labels, 30, seed=0)
    assert sorted(torch.bincount(labels[val_indices]).tolist()) == [1, 14, 15]


def test_validation_size_out_of_range_is_a_value_error():
    labels = torch.arange(10) % 2
    train_indices, val_indices = split_validation(labels, 0, seed=0)
    assert torch.equal(train_indices, torch.arange(10)) and len(val_indices) == 0
    for val_size in (-1, 10):
        with pytest.raises(ValueError):
            split_validation(labels, val_size, seed=0)


# -- batches ------------------------------------------------------------------------------------------------

RAW = ((0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255))  # mean and std that leave pixel values as they are


def numbered_images(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and labels that are their own index, so every output names its source."""
    images = torch.randint(0, 256, (count, 3, 32, 32), generator=torch.Generator().manual_seed(count),
                           dtype=torch.uint8)
    return images, torch.arange(count)


@pytest.mark.parametrize("count, batch_size, world_size", [(103, 10, 1), (103, 10, 2), (101, 10, 2), (7, 4, 3)])
def test_a_training_epoch_covers_every_image_once_over_all_ranks(count, batch_size, world_size):
    images, labels = numbered_images(count)
    seen, steps = [], set()
    for rank in range(world_size):
        batches = TrainBatches(images, labels, batch_size, *RAW, aug="none", seed=3, rank=rank,
                               world_size=world_size)
        batches.set_epoch(2)
        rank_batches = list(batches)
        assert len(rank_batches) == len(batches)
        steps.add(len(batches))
        for inputs, ids in rank_batches:
            assert 0 < len(ids) <= batch_size // world_size + 1
            assert torch.allclose(inputs, images[ids].float(), atol=1e-3)  # each label stays with its image
            seen.append(ids)
    assert len(steps) == 1  # the same number of steps on every rank, or DDP would hang
    assert torch.equal(torch.sort(torch.cat(seen)).values, torch.arange(count))


def candidates(image: torch.Tensor) -> torch.Tensor:
    """All 9 x 9 crops of the 4-pixel zero-padded image, each also mirrored: 162 x 3 x 32 x 32."""
    padded = F.pad(image, (4, 4, 4, 4))
    crops = [padded[:, y:y + 32, x:x + 32] for y in range(9) for x in range(9)]
    return torch.stack(crops + [crop.flip(-1) for crop in crops]).float()


def test_crops_move_content_at_most_4_pixels_and_flips_mirror_it():
    images, labels = numbered_images(24)
    batches = TrainBatches(images, labels, 8, *RAW, aug="flip-crop", seed=0)
    cases = set()
    for epoch in range(3):
        batches.set_epoch(epoch)
        for inputs, ids in batches:
            for output, image_id in zip(inputs, ids):
                distances = (candidates(images[image_id]) - output).abs().amax(dim=(1, 2, 3))
                assert distances.min() < 1e-3, "output is no 4-pixel crop of its image, mirrored or not"
                cases.add(int(distances.argmin()))
    assert len(cases) > 20  # offsets vary
    assert min(cases) < 81 <= max(cases)  # both mirrored and not


def test_cutout_zeroes_one_square_of_up_to_16_pixels_to_the_mean():
    images, labels = numbered_images(40)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)  # no pixel and no padding normalizes to exactly 0
    batches = TrainBatches(images, labels, 10, mean, std, aug="flip-crop-cutout", seed=0)
    sides = set()
    for inputs, _ in batches:
        for output in inputs:
            zero = output == 0
            assert torch.equal(zero[0], zero[1]) and torch.equal(zero[0], zero[2])
            rows, cols = torch.nonzero(zero[0].any(1)).flatten(), torch.nonzero(zero[0].any(0)).flatten()
            height, width = len(rows), len(cols)
            assert 8 <= height <= 16 and 8 <= width <= 16
            assert int(zero[0].sum()) == height * width  # one filled rectangle...
            assert rows[-1] - rows[0] + 1 == height and cols[-1] - cols[0] + 1 == width
            assert height == 16 or rows[0] == 0 or rows[-1] == 31  # ...smaller only where a border clips it
            assert width == 16 or cols[0] == 0 or cols[-1] == 31
            sides.add((height, width))
    assert len(sides) > 1


def test_normalized_batches_have_zero_mean_and_unit_std_per_channel():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (60, 3, 32, 32), generator=generator, dtype=torch.uint8)
    images[:, 0] //= 3
    mean, std = channel_stats(images)
    for batches in (TrainBatches(images, torch.zeros(60, dtype=torch.int64), 16, mean, std, aug="none"),
                    EvalBatches(images, torch.zeros(60, dtype=torch.int64), 16, mean, std)):
        inputs = torch.cat([inputs for inputs, _ in batches]).transpose(0, 1).reshape(3, -1).double()
        assert inputs.mean(1).tolist() == pytest.approx([0, 0, 0], abs=1e-5)
        assert inputs.std(1, unbiased=False).tolist() == pytest.approx([1, 1, 1], abs=1e-5)


@pytest.mark.parametrize("aug", ["none", "flip-crop", "flip-crop-cutout"])
def test_same_seed_and_epoch_give_the_same_batches_even_after_a_resume(aug):
    images, labels = numbered_images(30)

    def epoch_batches(seed: int, epoch: int, epochs_before: int = 0) -> list:
        batches = TrainBatches(images, labels, 8, *RAW, aug=aug, seed=seed)
        for earlier in range(epochs_before):
            batches.set_epoch(earlier)
            list(batches)
        batches.set_epoch(epoch)
        return list(batches)

    def same(first: list, second: list) -> bool:
        return all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))

    reference = epoch_batches(seed=5, epoch=3)
    assert same(reference, epoch_batches(seed=5, epoch=3, epochs_before=3))
    assert not same(reference, epoch_batches(seed=5, epoch=4))
    assert not same(reference, epoch_batches(seed=6, epoch=3))


def test_eval_batches_come_in_order_and_ranks_share_them():
    images, labels = numbered_images(53)
    batches = EvalBatches(images, labels, 10, *RAW)
    outputs = list(batches)
    assert len(batches) == len(outputs) == 6
    assert torch.equal(torch.cat([ids for _, ids in outputs]), labels)
    assert torch.allclose(torch.cat([inputs for inputs, _ in outputs]), images.float(), atol=1e-3)
    shared = [ids for rank in range(2) for _, ids in EvalBatches(images, labels, 10, *RAW, rank=rank, world_size=2)]
    assert torch.equal(torch.sort(torch.cat(shared)).values, labels)


def test_channels_last_changes_the_layout_not_the_values():
    images, labels = numbered_images(12)
    plain = next(iter(TrainBatches(images, labels, 12, *RAW, seed=1)))[0]
    reordered = next(iter(TrainBatches(images, labels, 12, *RAW, seed=1, channels_last=True)))[0]
    assert reordered.is_contiguous(memory_format=torch.channels_last) and torch.equal(plain, reordered)
    evaluated = next(iter(EvalBatches(images, labels, 12, *RAW, channels_last=True)))[0]
    assert evaluated.is_contiguous(memory_format=torch.channels_last)


def test_starting_a_second_iteration_stops_the_first_loudly():
    images, labels = numbered_images(20)
    batches = TrainBatches(images, labels, 5, *RAW)
    first = iter(batches)
    next(first)
    next(iter(batches))
    with pytest.raises(RuntimeError, match="iterate one at a time"):
        next(first)


def test_bad_batch_arguments_are_value_errors():
    images, labels = numbered_images(10)
    with pytest.raises(ValueError, match="flip-crop"):
        TrainBatches(images, labels, 4, *RAW, aug="mixup")
    with pytest.raises(ValueError):
        TrainBatches(images, labels, 2, *RAW, rank=0, world_size=4)
    with pytest.raises(ValueError):
        EvalBatches(images.float(), labels, 4, *RAW)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batches_are_the_same_on_cpu_and_cuda():
    images, labels = numbered_images(40)
    for aug in ("flip-crop", "flip-crop-cutout"):
        on_cpu = list(TrainBatches(images, labels, 16, *RAW, aug=aug, seed=2))
        on_cuda = list(TrainBatches(images, labels, 16, *RAW, aug=aug, seed=2, device="cuda"))
        for (cpu_inputs, cpu_ids), (cuda_inputs, cuda_ids) in zip(on_cpu, on_cuda):
            assert cuda_inputs.is_cuda and torch.equal(cpu_ids, cuda_ids.cpu())
            assert torch.allclose(cpu_inputs, cuda_inputs.cpu(), atol=1e-5)
