"""cifar/batches.py: channel statistics, the validation split, and the training and evaluation batches made on the
device (every image once per epoch over all ranks, crops, flips, cutout, normalization, and the same batches
after a resume and on any device)."""
import hashlib

import pytest
import torch
import torch.nn.functional as F

from cifar.batches import BatchOptions, EvalBatches, TrainBatches, channel_stats, split_validation

# -- statistics and the validation split --------------------------------------------------------------------

def test_channel_stats_are_the_per_channel_mean_and_std_as_fractions():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (50, 3, 8, 8), generator=generator, dtype=torch.uint8)
    images[:, 1] //= 2  # channels with different statistics
    mean, std = channel_stats(images)
    pixels = images.double().div(255).transpose(0, 1).reshape(3, -1)
    assert mean == pytest.approx(pixels.mean(1).tolist(), abs=1e-12)
    assert std == pytest.approx(pixels.std(1, unbiased=False).tolist(), abs=1e-12)


@pytest.mark.parametrize("images", [torch.zeros(2, 3, 4, 4), torch.zeros(3, 4, 4, dtype=torch.uint8),
                                    torch.zeros(2, 1, 4, 4, dtype=torch.uint8),
                                    torch.zeros(0, 3, 4, 4, dtype=torch.uint8)], ids=["float", "3-d", "1-channel",
                                                                                      "empty"])
def test_channel_stats_refuses_anything_but_uint8_rgb_images(images):
    with pytest.raises(ValueError, match=r"^channel_stats needs a non-empty uint8 N x 3 x H x W tensor, got "):
        channel_stats(images)


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
        with pytest.raises(ValueError, match=f"validation size {val_size} must be at least 0 and less than the 10"):
            split_validation(labels, val_size, seed=0)
    with pytest.raises(ValueError):  # one image cannot be both the training set and the held-out one
        split_validation(labels[:1], 1, seed=0)


def test_a_seed_holds_out_the_same_images_in_every_version():
    """--resume recomputes the held-out split from the seed, so it must come out as it did when the run started:
    pinned here, on uneven classes where an unstable sort (of the classes or inside them) picks others."""
    labels = torch.arange(1000) % 100
    labels[:37] = 5
    _, val_indices = split_validation(labels, 150, seed=3)
    assert len(val_indices) == 150 and val_indices[:10].tolist() == [18, 29, 40, 44, 55, 58, 62, 68, 85, 90]
    assert hashlib.sha256(str(val_indices.tolist()).encode()).hexdigest()[:16] == "3a3743c45967110b"


# -- batches ------------------------------------------------------------------------------------------------

RAW = ((0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255))  # mean and std that leave pixel values as they are


def numbered_images(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and labels that are their own index, so every output names its source."""
    images = torch.randint(0, 256, (count, 3, 32, 32), generator=torch.Generator().manual_seed(count),
                           dtype=torch.uint8)
    return images, torch.arange(count)


@pytest.mark.parametrize("count, batch_size, world_size", [(103, 10, 1), (103, 10, 2), (101, 10, 2), (7, 4, 3),
                                                       (5, 4, 2)])
def test_a_training_epoch_covers_every_image_once_over_all_ranks(count, batch_size, world_size):
    images, labels = numbered_images(count)
    seen, steps = [], set()
    for rank in range(world_size):
        options = BatchOptions(*RAW, rank=rank, world_size=world_size)
        batches = TrainBatches(images, labels, batch_size, options, aug="none", seed=3)
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


@pytest.mark.parametrize("shape, labels, batch_size, rank, world_size, message", [
    ((4, 1, 8, 8), 4, 2, 0, 1, "images must be a uint8 N x 3 x H x W tensor, got torch.uint8 (4, 1, 8, 8)"),
    ((4, 3, 8, 8), 3, 2, 0, 1, "labels must be one per image, got (3,) for 4 images"),
    ((4, 3, 8, 8), 4, 2, 2, 2, "rank 2 is outside 0..1"),
    ((4, 3, 8, 8), 4, 1, 0, 2, "batch size 1 and 4 images cannot be shared by 2 processes without some getting none; "
                               "use at least 2 of each"),
    ((1, 3, 8, 8), 1, 2, 0, 2, "batch size 2 and 1 images cannot be shared by 2 processes without some getting none; "
                               "use at least 2 of each"),
])
def test_batch_arguments_that_cannot_work_are_refused_saying_why(shape, labels, batch_size, rank, world_size,
                                                                  message):
    options = BatchOptions(*RAW, rank=rank, world_size=world_size)
    for make in (TrainBatches, EvalBatches):
        with pytest.raises(ValueError) as refused:
            make(torch.zeros(shape, dtype=torch.uint8), torch.zeros(labels, dtype=torch.int64), batch_size, options)
        assert str(refused.value) == message


def test_the_smallest_batches_that_can_work_are_made():
    """One image each for two processes, one image on one, and no images at all (no batches)."""
    images, labels = numbered_images(2)
    for rank in (0, 1):
        batches = TrainBatches(images, labels, 2, BatchOptions(*RAW, rank=rank, world_size=2), aug="none")
        assert [ids.tolist() for _, ids in batches] in ([[0]], [[1]])
    assert [ids.tolist() for _, ids in EvalBatches(images[:1], labels[:1], 1, BatchOptions(*RAW))] == [[0]]
    assert list(EvalBatches(images[:0], labels[:0], 4, BatchOptions(*RAW))) == []


def test_crops_move_content_at_most_4_pixels_and_flips_mirror_it():
    images, labels = numbered_images(24)
    batches = TrainBatches(images, labels, 8, BatchOptions(*RAW), aug="flip-crop", seed=0)
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
    # every offset from -4 to +4, down and across (cases are 81 * mirrored + 9 * y + x)
    assert {case % 81 // 9 for case in cases} == set(range(9)) and {case % 9 for case in cases} == set(range(9))


def test_cutout_zeroes_one_square_of_up_to_16_pixels_to_the_mean():
    images, labels = numbered_images(40)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)  # no pixel and no padding normalizes to exactly 0
    batches = TrainBatches(images, labels, 10, BatchOptions(mean, std), aug="flip-crop-cutout", seed=0)
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
    for batches in (TrainBatches(images, torch.zeros(60, dtype=torch.int64), 16, BatchOptions(mean, std), aug="none"),
                    EvalBatches(images, torch.zeros(60, dtype=torch.int64), 16, BatchOptions(mean, std))):
        inputs = torch.cat([inputs for inputs, _ in batches]).transpose(0, 1).reshape(3, -1).double()
        assert inputs.mean(1).tolist() == pytest.approx([0, 0, 0], abs=1e-5)
        assert inputs.std(1, unbiased=False).tolist() == pytest.approx([1, 1, 1], abs=1e-5)


@pytest.mark.parametrize("mean, std", [(0.005, 0.1), (0.005, 0.3)])
def test_normalization_is_worked_out_in_float64_and_rounded_once(mean, std):
    """A 0 pixel normalizes to -mean / std exactly as float32 rounds it: worked out from a float32 mean or std,
    the shift can be a float32 step off (as for these two), moving every pixel of every batch."""
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    options = BatchOptions((mean,) * 3, (std,) * 3)
    for batches in (EvalBatches(images, torch.zeros(2, dtype=torch.int64), 2, options),
                    TrainBatches(images, torch.zeros(2, dtype=torch.int64), 2, options, aug="none")):
        inputs, _ = next(iter(batches))
        assert torch.equal(inputs, torch.full_like(inputs, -mean / std))


@pytest.mark.parametrize("aug, digest", [("flip-crop", "cc042dac23fb7b69"), ("flip-crop-cutout", "14b9455cb533b79b")])
def test_a_seed_and_epoch_give_the_batches_they_gave_when_pinned(aug, digest):
    """The order, crops, flips and cutouts that a seed and an epoch draw, pinned: a run made again with this
    version gets the numbers it got (a change to how they are drawn must change these values, and say why)."""
    images, labels = numbered_images(24)
    batches = TrainBatches(images, labels, 24, BatchOptions(*RAW), aug=aug, seed=5)
    batches.set_epoch(3)
    inputs, ids = next(iter(batches))
    assert ids[:8].tolist() == [16, 22, 0, 11, 14, 2, 5, 17]
    assert hashlib.sha256(inputs.numpy().tobytes()).hexdigest()[:16] == digest


@pytest.mark.parametrize("aug", ["none", "flip-crop", "flip-crop-cutout"])
def test_same_seed_and_epoch_give_the_same_batches_even_after_a_resume(aug):
    images, labels = numbered_images(30)

    def epoch_batches(seed: int, epoch: int, epochs_before: int = 0) -> list:
        batches = TrainBatches(images, labels, 8, BatchOptions(*RAW), aug=aug, seed=seed)
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
    batches = EvalBatches(images, labels, 10, BatchOptions(*RAW))
    outputs = list(batches)
    assert len(batches) == len(outputs) == 6
    assert torch.equal(torch.cat([ids for _, ids in outputs]), labels)
    assert torch.allclose(torch.cat([inputs for inputs, _ in outputs]), images.float(), atol=1e-3)
    shared = [ids for rank in range(2)
              for _, ids in EvalBatches(images, labels, 10, BatchOptions(*RAW, rank=rank, world_size=2))]
    assert torch.equal(torch.sort(torch.cat(shared)).values, labels)


def test_channels_last_changes_the_layout_not_the_values():
    images, labels = numbered_images(12)
    plain = next(iter(TrainBatches(images, labels, 12, BatchOptions(*RAW), seed=1)))[0]
    reordered = next(iter(TrainBatches(images, labels, 12, BatchOptions(*RAW, channels_last=True), seed=1)))[0]
    assert reordered.is_contiguous(memory_format=torch.channels_last) and torch.equal(plain, reordered)
    evaluated = next(iter(EvalBatches(images, labels, 12, BatchOptions(*RAW, channels_last=True))))[0]
    assert evaluated.is_contiguous(memory_format=torch.channels_last)


def test_starting_a_second_iteration_stops_the_first_loudly():
    images, labels = numbered_images(20)
    batches = TrainBatches(images, labels, 5, BatchOptions(*RAW))
    first = iter(batches)
    next(first)
    next(iter(batches))
    with pytest.raises(RuntimeError, match=r"^TrainBatches was iterated again before an earlier iteration "
                                           r"finished; they share buffers, so iterate one at a time$"):
        next(first)


def test_bad_batch_arguments_are_value_errors():
    images, labels = numbered_images(10)
    with pytest.raises(ValueError, match="flip-crop"):
        TrainBatches(images, labels, 4, BatchOptions(*RAW), aug='mixup')
    with pytest.raises(ValueError):
        TrainBatches(images, labels, 2, BatchOptions(*RAW, rank=0, world_size=4))
    with pytest.raises(ValueError):
        EvalBatches(images.float(), labels, 4, BatchOptions(*RAW))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batches_are_the_same_on_cpu_and_cuda():
    images, labels = numbered_images(40)
    for aug in ("flip-crop", "flip-crop-cutout"):
        on_cpu = list(TrainBatches(images, labels, 16, BatchOptions(*RAW), aug=aug, seed=2))
        on_cuda = list(TrainBatches(images, labels, 16, BatchOptions(*RAW, device='cuda'), aug=aug, seed=2))
        for (cpu_inputs, cpu_ids), (cuda_inputs, cuda_ids) in zip(on_cpu, on_cuda):
            assert cuda_inputs.is_cuda and torch.equal(cpu_ids, cuda_ids.cpu())
            assert torch.allclose(cpu_inputs, cuda_inputs.cpu(), atol=1e-5)
