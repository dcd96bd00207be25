"""From uint8 images on the device to the batches a network trains and is tested on: channel statistics, the
class-balanced validation split, and the shuffled, augmented, normalized training batches and plain evaluation
batches. The whole dataset fits in memory, so there is no DataLoader: each split is one uint8 tensor on the
training device and every batch is cut from it with tensor ops (as in KellerJordan/airbench).
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

# The --aug choices: what TrainBatches can do to a training image; the command line reads this list.
AUGMENTATIONS = ("none", "flip-crop", "flip-crop-cutout")
CROP_PADDING = 4  # pixels of zero padding around the image before the random 32x32 crop
CUTOUT_SIZE = 16  # side of the square that cutout zeroes (DeVries & Taylor 2017, their CIFAR-10 setting)


@dataclass(frozen=True)
class BatchOptions:
    """What every batch of a run shares: the normalization (per-channel mean and std as fractions of 255),
    the device and memory format they are made in, and which share of each global batch this process takes
    under torchrun (rank of world_size)."""

    mean: Sequence[float]
    std: Sequence[float]
    device: str | torch.device = "cpu"
    channels_last: bool = False
    rank: int = 0
    world_size: int = 1


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

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, options: BatchOptions, *,
                 aug: str = "flip-crop", seed: int = 0) -> None:
        _check_batch_arguments(images, labels, batch_size, options.rank, options.world_size)
        if aug not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {aug!r}; choose one of {', '.join(AUGMENTATIONS)}")
        self.device = torch.device(options.device)
        self.images = images.to(self.device).contiguous()
        # Flipped copies cost one more dataset of memory and save flipping half of it every epoch.
        self.flipped_images = self.images.flip(3) if aug != "none" else None
        self.labels = labels.to(self.device, torch.int64)
        self.scale, self.shift = _normalization(options.mean, options.std, self.device)
        self.aug, self.seed, self.channels_last, self.epoch = aug, seed, options.channels_last, 0
        self.shares = _batch_shares(len(images), batch_size, options.rank, options.world_size)
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

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, options: BatchOptions) -> None:
        _check_batch_arguments(images, labels, batch_size, options.rank, options.world_size)
        self.device = torch.device(options.device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.scale, self.shift = _normalization(options.mean, options.std, self.device)
        self.channels_last = options.channels_last
        self.shares = _batch_shares(len(images), batch_size, options.rank, options.world_size)

    def __len__(self) -> int:
        return len(self.shares)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start, end in self.shares:
            yield (_normalize(self.images[start:end], self.scale, self.shift, self.channels_last),
                   self.labels[start:end])
