"""The one training loop behind main_cifar10.py and main_cifar100.py.

Reads top to bottom: the command line, then the stages of a run in the order they happen (processes and
device, run folder, data, model and optimization), the epoch loop, the end-of-run tests, and --eval-only.
Each epoch: set the learning rate, forward, backward, step, validate, save. Every file of a run goes through
runs.py, which writes atomically into results/<dataset>/<model>[-<tag>]/, and last.pt holds everything needed
to continue exactly where the run stopped.

Under torchrun (RANK in the environment) the same loop runs with DistributedDataParallel: each rank trains
on its share of every global batch, and only rank 0 prints and writes.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import load_data_cifar10
import load_data_cifar100
import plot
import runs
import tensorboard_log
import trained_net
from batches import AUGMENTATIONS, EvalBatches, TrainBatches, channel_stats, split_validation
from cifar import DataError
from devices import AMP_CHOICES, DEVICE_CHOICES, accumulator_dtype, autocast, pick_device, resolve_amp
from errors import FAILED_EXIT, INTERRUPTED_EXIT, USAGE_EXIT, RunFailed, UsageError
from model import DEFAULT_LR, FAMILIES, MODELS, build_model, count_flops, count_parameters, format_flops, models_in

# What differs between the datasets is data: how to load one and how many classes it has.
DATASETS = {"cifar10": (load_data_cifar10.load_cifar10, load_data_cifar10.CIFAR10),
            "cifar100": (load_data_cifar100.load_cifar100, load_data_cifar100.CIFAR100)}
DIVERGENCE_CHECK_STEPS = 50  # how often the loop reads the loss back from the device
# Flags of a command line that are not part of what a run computes, left out of config.json.
NOT_CONFIG = ("list_models", "summary", "eval_only", "checkpoint", "tta", "predict")


# ---------------------------------------------------------------------------------------------------
# Command line

MAX_EPOCHS = 100_000
MAX_IMAGES = 50_000  # the training set of either dataset: the most a batch, subset or split can hold
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit
TAG_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (exit 2), not the whole usage block."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # argparse takes "-1e-4" and "-inf" for flags (only "-5" and "-0.5" for negative numbers), so
        # the error would be "expected one argument" instead of quoting the bad value.
        self._negative_number_matcher = re.compile(
            r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)

    def error(self, message: str):
        self.exit(USAGE_EXIT, f"error: {message} (see --help)\n")


def number(kind: type, allowed: str, within: Callable[[float], bool]) -> Callable[[str], float]:
    """An argparse type: a finite int or float for which within(value) holds, else an error quoting the
    value and saying what is allowed."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or (kind is float and not math.isfinite(value)) or not within(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {allowed}")
        return value
    return parse


def path_text(text: str) -> str:
    if not text or "\0" in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not a path")
    return text


def tag_text(text: str) -> str:
    if not TAG_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a plain name: 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'")
    return text


def build_parser(dataset: str) -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=f"main_{dataset}.py",
        description=f"Train, evaluate or describe one of {len(MODELS)} CNNs on {dataset.upper()}.")
    add = parser.add_argument
    count = lambda low, high: number(int, f"a whole number from {low:,} to {high:,}", lambda v: low <= v <= high)
    add("--model", default="cnn_base", choices=list(MODELS), metavar="MODEL",
        help="network to train (see --list-models) [cnn_base]")
    add("--epochs", type=count(1, MAX_EPOCHS), default=50, help="number of training epochs [50]")
    add("--batch-size", type=count(1, MAX_IMAGES), default=128,
        help="global batch size, split over the processes under torchrun [128]")
    add("--lr", type=number(float, "a learning rate above 0", lambda v: v > 0), default=None,
        help=f"peak learning rate after warmup [{DEFAULT_LR}; "
             + ", ".join(f"{name}: {spec.lr}" for name, spec in MODELS.items() if spec.lr != DEFAULT_LR)
             + "]")
    add("--momentum", type=number(float, "a momentum in [0, 1)", lambda v: 0 <= v < 1), default=0.9,
        help="SGD Nesterov momentum [0.9]")
    add("--weight-decay", type=number(float, "a weight decay of 0 or more", lambda v: v >= 0),
        default=5e-4, help="SGD weight decay [5e-4]")
    add("--label-smoothing", type=number(float, "a label smoothing in [0, 1)", lambda v: 0 <= v < 1),
        default=0.0, help="cross-entropy label smoothing [0]")
    add("--warmup-epochs", type=number(float, f"a number of epochs from 0 to {MAX_EPOCHS:,}",
                                       lambda v: 0 <= v <= MAX_EPOCHS), default=1.0,
        help="epochs of linear learning-rate warmup before the cosine decay [1]")
    add("--val-size", type=count(0, MAX_IMAGES - 1), default=0,
        help="training images held out (class balanced) for validation; 0 validates on the test "
             "set as the course code did [0]")
    add("--aug", default="flip-crop", choices=list(AUGMENTATIONS),
        help="training augmentation [flip-crop]")
    add("--subset", type=count(1, MAX_IMAGES), default=None,
        help="use only the first N training and N test images, for smoke runs [all]")
    add("--data-dir", type=path_text, default="data",
        help="where the dataset is, or is downloaded to [data]")
    add("--results-dir", type=path_text, default="results", help="root folder of all runs [results]")
    add("--tag", type=tag_text, default=None,
        help="suffix of the run folder, results/<dataset>/<model>-<tag>, e.g. a seed; letters, digits, "
             "'.', '_', '-' [none]")
    add("--device", default="auto", choices=list(DEVICE_CHOICES),
        help="training device [auto: cuda, then mps, then cpu]")
    add("--amp", default="auto", choices=list(AMP_CHOICES),
        help="mixed precision autocast [auto: bf16 on CUDA, off elsewhere]")
    add("--channels-last", action=argparse.BooleanOptionalAction, default=None,
        help="channels_last memory format [on for CUDA, off elsewhere]")
    add("--compile", action="store_true", help="torch.compile the model [off]")
    add("--sync-bn", action="store_true", help="synchronized BatchNorm across torchrun processes [off]")
    add("--seed", type=count(0, MAX_SEED), default=0,
        help="seed of initialization, split and batches [0]")
    add("--deterministic", action="store_true",
        help="deterministic algorithms: bit-identical reruns and resumes, somewhat slower [off]")
    add("--resume", action="store_true", help="continue the run from its last.pt")
    add("--overwrite", action="store_true", help="start the run over, replacing the one in its folder")
    add("--no-progress", action="store_true", help="no progress bar (also off when not on a terminal)")
    add("--list-models", nargs="?", const="all", default=None, metavar="WHICH",
        help="print model names, one per line, and exit: all of them, 'course' (the course's 15) "
             "or one family (" + ", ".join(FAMILIES) + ") [all]")
    add("--summary", action="store_true",
        help="print the network, its parameter count and FLOPs, and exit")
    add("--eval-only", action="store_true",
        help="evaluate the run's best.pt (or --checkpoint) on the test set and exit")
    add("--checkpoint", type=path_text, default=None,
        help="checkpoint for --eval-only and --predict [<run folder>/best.pt]")
    add("--tta", action="store_true",
        help="with --eval-only: average the predictions of each image and its mirror")
    add("--predict", nargs="+", type=path_text, default=None, metavar="IMAGE",
        help="print the top-5 classes of each PNG or JPEG image (any size) by the run's best.pt "
             "(or --checkpoint) and exit")
    add("--tensorboard", action="store_true",
        help="also write each epoch's metrics to <run folder>/tensorboard/ (needs the tensorboard "
             "package) [off]")
    return parser


def flags_given(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Names (dests) of the flags typed on the command line, to tell them from defaults."""
    typed = {token.split("=", 1)[0] for token in argv if token.startswith("--")}
    return {action.dest for action in parser._actions if typed & set(action.option_strings)}


def check_flags(args: argparse.Namespace, train_size: int) -> None:
    """What no single flag's type can see: flags that contradict each other, sizes beyond the dataset's,
    paths that cannot serve. Reads nothing but the file system's metadata and writes nothing."""
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other: pass one of them")
    if args.eval_only and (args.resume or args.overwrite):
        raise UsageError("--eval-only trains nothing, so --resume and --overwrite mean nothing with it; "
                         "drop them")
    if args.eval_only and args.predict:
        raise UsageError("--eval-only and --predict are two commands; pass one of them")
    if args.predict and (args.resume or args.overwrite):
        raise UsageError("--predict trains nothing, so --resume and --overwrite mean nothing with it; "
                         "drop them")
    if args.checkpoint and not (args.eval_only or args.predict):
        raise UsageError("--checkpoint is for --eval-only and --predict; to continue a run use --resume")
    if args.tensorboard:
        tensorboard_log.require_tensorboard()
    if args.tta and not args.eval_only:
        raise UsageError("--tta is for --eval-only; add --eval-only or drop --tta")
    if args.subset is not None and args.subset > train_size:
        raise UsageError(f"--subset {args.subset} is more than the {train_size:,} training images; pass "
                         "a smaller number or leave it out")
    images = train_size if args.subset is None else args.subset
    if args.val_size >= images:
        raise UsageError(f"--val-size {args.val_size} leaves no training images out of {images:,}; pass "
                         "a smaller number")
    for flag, path in (("--data-dir", args.data_dir), ("--results-dir", args.results_dir)):
        if Path(path).exists() and not Path(path).is_dir():
            raise UsageError(f"{flag} {path} is a file; pass a folder")
    if args.checkpoint and not Path(args.checkpoint).is_file():
        raise UsageError(f"--checkpoint {args.checkpoint}: no such file; pass the path of a best.pt")


def main(dataset: str, argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(dataset)
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, or a bad flag already reported in one line
        return done.code
    load_dataset, spec = DATASETS[dataset]
    num_classes = spec.num_classes
    if args.list_models is not None:
        try:
            print("\n".join(models_in(args.list_models)))
        except ValueError as err:
            print(f"error: --list-models: {err}", file=sys.stderr)
            return USAGE_EXIT
        return 0
    if args.summary:
        net = build_model(args.model, num_classes)
        print(net)
        print(f"Parameters: {count_parameters(net):,}")
        print(f"FLOPs: {format_flops(count_flops(net))}FLOPs (forward pass of one 3x32x32 image)")
        return 0
    ddp = int(os.environ.get("RANK", -1)) != -1
    master = int(os.environ.get("RANK", 0)) == 0
    args.command = " ".join([f"main_{dataset}.py"] + argv)
    try:
        check_flags(args, spec.train_size)
        if args.eval_only:
            return evaluate_checkpoint(args, dataset, load_dataset, num_classes)
        if args.predict:
            return predict_images(args, dataset, load_dataset, num_classes)
        return train(args, dataset, load_dataset, num_classes, flags_given(parser, argv), ddp)
    except (UsageError, DataError) as err:
        if master:
            print(f"error: {err}", file=sys.stderr)
        return USAGE_EXIT
    except RunFailed as err:
        if master:
            print(f"error: {err}", file=sys.stderr)
        return FAILED_EXIT
    except KeyboardInterrupt:
        if master:
            print("\nInterrupted before training started; nothing new was saved", file=sys.stderr)
        return INTERRUPTED_EXIT
    finally:
        if ddp and dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------
# Stage 1: processes and device


@dataclass
class Processes:
    """This process's place under torchrun (rank 0 of 1 without it) and its device."""

    ddp: bool
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def master(self) -> bool:
        return self.rank == 0


def start_processes(args: argparse.Namespace, ddp: bool) -> Processes:
    rank, world_size, local_rank = 0, 1, 0
    if ddp:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.batch_size % world_size:
        raise UsageError(f"--batch-size {args.batch_size} is not divisible by the {world_size} "
                         "processes; pick a multiple of the process count")
    device = pick_device(args.device, local_rank)
    if ddp:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if args.deterministic:
        # cuBLAS needs this set before its first call to give repeatable results.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Processes(ddp, rank, world_size, local_rank, device)


# ---------------------------------------------------------------------------------------------------
# Stage 2: the run folder; every rank agrees on refusing before anything is written


def open_run_folder(args, dataset: str, given: set[str],
                    procs: Processes) -> tuple[Path, dict | None, tuple]:
    """The run folder, with --resume its last.pt (the recipe flags in args then come from it), and the
    state of its files as checked (compared again once the folder is locked)."""
    run_dir = runs.run_folder(args.results_dir, dataset, args.model, args.tag)
    checkpoint, refusal = None, None
    if procs.master:
        try:
            runs.refuse_if_in_use(run_dir)
            checkpoint = runs.check_run_folder(run_dir, args)
            if checkpoint is not None:
                runs.reconcile_resume(args, checkpoint["config"], given, dataset)
        except UsageError as err:
            refusal = str(err)
    if procs.ddp:
        shared = [refusal, vars(args)]
        dist.broadcast_object_list(shared, src=0)
        refusal = shared[0]
        vars(args).update(shared[1])
        if args.resume and not procs.master and refusal is None:
            checkpoint = runs.load_checkpoint(run_dir / runs.LAST_CHECKPOINT)  # folder on every node
    if refusal:
        raise UsageError(refusal)
    return run_dir, checkpoint, runs.folder_state(run_dir)


# ---------------------------------------------------------------------------------------------------
# Stage 3: data


@dataclass
class Data:
    train_batches: TrainBatches
    val_batches: EvalBatches
    test_images: torch.Tensor
    test_labels: torch.Tensor
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    validation: str  # "held-out" or "test": what the epochs are validated on
    channels_last: bool
    classes: list[str]
    train_count: int
    val_count: int


def load_data(args, load_dataset, procs: Processes, channels_last: bool) -> Data:
    """The dataset on the device: subset, validation split and the batches the loop iterates."""
    data, data_error = None, [None]
    if procs.master:  # rank 0 alone downloads, if needed, then the others read what it left
        try:
            data = load_dataset(args.data_dir)
        except DataError as err:
            data_error[0] = str(err)
    if procs.ddp:
        dist.broadcast_object_list(data_error, src=0)
    if data_error[0]:
        raise UsageError(data_error[0])
    if data is None:
        data = load_dataset(args.data_dir)
    mean, std = channel_stats(data.train_images)  # the whole training set, before subset and split
    train_images, train_labels = data.train_images, data.train_labels
    test_images, test_labels = data.test_images, data.test_labels
    # check_flags has held --subset and --val-size against the dataset's size, which cifar.py enforces.
    if args.subset is not None:
        train_images, train_labels = train_images[:args.subset], train_labels[:args.subset]
        test_images, test_labels = test_images[:args.subset], test_labels[:args.subset]
    if args.val_size:
        train_index, val_index = split_validation(train_labels, args.val_size, args.seed)
        val_images, val_labels = train_images[val_index], train_labels[val_index]
        train_images, train_labels = train_images[train_index], train_labels[train_index]
        validation = "held-out"
    else:
        val_images, val_labels = test_images, test_labels
        validation = "test"
    batch_options = dict(mean=mean, std=std, device=procs.device, channels_last=channels_last,
                         rank=procs.rank, world_size=procs.world_size)
    try:
        train_batches = TrainBatches(train_images, train_labels, args.batch_size, aug=args.aug,
                                     seed=args.seed, **batch_options)
        val_batches = EvalBatches(val_images, val_labels, max(256, args.batch_size), **batch_options)
    except ValueError as err:  # e.g. fewer images than processes
        raise UsageError(str(err)) from None
    return Data(train_batches, val_batches, test_images, test_labels, mean, std, validation,
                channels_last, data.classes, len(train_labels), len(val_labels))


# ---------------------------------------------------------------------------------------------------
# Stage 4: model, optimizer, schedule


@dataclass
class Training:
    raw_net: nn.Module  # the model itself, whose state_dict is saved
    net: nn.Module  # what the loop calls: raw_net, wrapped by DDP and torch.compile as asked
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    parameters: int
    flops: int


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup per step, then cosine decay to zero at the last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_training(args, num_classes: int, procs: Processes, channels_last: bool,
                   amp_dtype: torch.dtype | None, steps_per_epoch: int) -> Training:
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    raw_net = build_model(args.model, num_classes)
    parameters, flops = count_parameters(raw_net), count_flops(raw_net)
    raw_net = raw_net.to(procs.device)
    if channels_last:
        raw_net = raw_net.to(memory_format=torch.channels_last)
    net = raw_net
    if procs.ddp:
        if args.sync_bn:
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[procs.local_rank] if procs.device.type == "cuda" else None)
    if args.compile:
        net = torch.compile(net)
    optimizer = torch.optim.SGD(raw_net.parameters(), lr=args.lr, momentum=args.momentum,
                                nesterov=args.momentum > 0, weight_decay=args.weight_decay)
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = min(total_steps, round(args.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps))
    scaler = torch.amp.GradScaler(procs.device.type, enabled=amp_dtype is torch.float16)
    return Training(raw_net, net, optimizer, scheduler, scaler, parameters, flops)


def run_config(args, dataset: str, num_classes: int, procs: Processes, data: Data,
               training: Training, amp_name: str, channels_last: bool) -> dict:
    """config.json: every flag and what the run was made of, on which machine."""
    device = procs.device
    config = {name: value for name, value in vars(args).items() if name not in NOT_CONFIG}
    config.update(dataset=dataset, num_classes=num_classes, parameters=training.parameters,
                  flops=training.flops, validation=data.validation, mean=list(data.mean),
                  std=list(data.std), train_images=data.train_count, val_images=data.val_count,
                  device=str(device), gpu_name=torch.cuda.get_device_name(device)
                  if device.type == "cuda" else None, amp=amp_name, channels_last=channels_last,
                  world_size=procs.world_size, torch_version=str(torch.__version__),
                  torchvision_version=_torchvision_version(),
                  python_version=platform.python_version(), classes=data.classes)
    return config


@dataclass
class Progress:
    """What the loop carries from epoch to epoch, and what last.pt saves of it."""

    history: list[dict]
    best: dict
    start_epoch: int
    log_lines: list[str]
    saved_epochs: int  # what last.pt holds: what a --resume would continue from


def restore(checkpoint: dict | None, training: Training, run_dir: Path) -> Progress:
    """A fresh start, or everything last.pt saved put back."""
    if checkpoint is None:
        return Progress([], {"epoch": 0, "val_acc": -1.0}, 0, [], 0)
    training.raw_net.load_state_dict(checkpoint["model"])
    training.optimizer.load_state_dict(checkpoint["optimizer"])
    training.scheduler.load_state_dict(checkpoint["scheduler"])
    training.scaler.load_state_dict(checkpoint["scaler"])
    runs.set_rng_state(checkpoint["rng"])
    log_path = run_dir / runs.LOG_FILE
    log_lines = log_path.read_text().splitlines() if log_path.exists() else []
    return Progress(checkpoint["history"], checkpoint["best"], checkpoint["epoch"], log_lines,
                    checkpoint["epoch"])


def announce(args, dataset: str, procs: Processes, run_dir: Path, config: dict, progress: Progress,
             say, resumed: bool) -> None:
    """Rank 0, in the locked run folder: say what runs, write config.json (and, on a resume, metrics.csv
    from last.pt, in case a kill came between the two)."""
    if resumed and progress.start_epoch >= args.epochs:
        say(f"Finishing {run_dir}: its {progress.start_epoch} epochs are saved, its end-of-run tests not")
    elif resumed:
        say(f"Resuming {run_dir} at epoch {progress.start_epoch + 1}/{args.epochs}")
    elif args.overwrite and (run_dir / runs.METRICS_FILE).exists():
        say(f"--overwrite: starting {run_dir} over; the previous run there is replaced")
    if config["validation"] == "test":
        say("Validation uses the test set (--val-size 0, as the course code did): the best epoch "
            "is picked on it, so report the final epoch or hold out a split with --val-size")
    world = f" x{procs.world_size}" if procs.ddp else ""
    say(f"{args.model} on {dataset}: {config['parameters']:,} parameters, "
        f"{format_flops(config['flops'])}FLOPs, device {config['device']}{world}, amp {config['amp']}, "
        f"{config['train_images']} training and {config['val_images']} validation images")
    runs.write_json(run_dir / runs.CONFIG_FILE, config)
    if resumed:
        runs.write_metrics(run_dir / runs.METRICS_FILE, progress.history)


# ---------------------------------------------------------------------------------------------------
# The run: the stages above in order, then the epoch loop


def train(args, dataset: str, load_dataset, num_classes: int, given: set[str], ddp: bool) -> int:
    procs = start_processes(args, ddp)
    run_dir, checkpoint, folder_state = open_run_folder(args, dataset, given, procs)
    trained = checkpoint is not None and checkpoint["epoch"] >= args.epochs
    if trained and (run_dir / runs.SUMMARY_FILE).exists():
        if procs.master:
            print(f"{run_dir} already finished its {checkpoint['epoch']} epochs; pass a larger "
                  "--epochs with --resume to train further")
        return 0
    if args.lr is None:
        args.lr = MODELS[args.model].lr
    amp_name, amp_dtype = resolve_amp(args.amp, procs.device)
    channels_last = procs.device.type == "cuda" if args.channels_last is None else args.channels_last
    data = load_data(args, load_dataset, procs, channels_last)
    training = build_training(args, num_classes, procs, channels_last, amp_dtype,
                              len(data.train_batches))
    config = run_config(args, dataset, num_classes, procs, data, training, amp_name, channels_last)
    progress = restore(checkpoint, training, run_dir)
    say = runs.make_logger(procs.master, run_dir, progress.log_lines)
    lock = epoch_log = None
    try:
        if procs.master:
            # Held until this process ends; taken only now, so that every refusal above wrote nothing.
            lock = runs.lock_run_folder(run_dir)
            runs.check_unchanged(run_dir, folder_state)
            runs.remove_stale_temp_files(run_dir)
            announce(args, dataset, procs, run_dir, config, progress, say, checkpoint is not None)
            if args.tensorboard:
                epoch_log = tensorboard_log.EpochLog(run_dir, progress.history)
        run_epochs(args, procs, data, training, config, progress, run_dir, amp_dtype, say, epoch_log)
        if procs.master:
            finish(args, dataset, procs, data, training, progress, run_dir, amp_dtype, say)
    except KeyboardInterrupt:
        if procs.master:
            saved = progress.saved_epochs
            print(f"\nInterrupted: {saved} epoch{'s' if saved != 1 else ''} saved in {run_dir}; "
                  "continue with the same command and --resume", file=sys.stderr)
        return INTERRUPTED_EXIT
    except runs.WriteFailed as err:
        raise RunFailed(f"{err}; {what_is_kept(run_dir, progress.saved_epochs)}") from None
    finally:
        if epoch_log is not None:
            epoch_log.close()
        if lock is not None:
            lock.close()
    if procs.ddp:
        dist.barrier()
    return 0


def what_is_kept(run_dir: Path, saved_epochs: int) -> str:
    """The end of the one line a failed write prints: what the folder still holds and how to go on."""
    if saved_epochs == 0:
        return "no epoch was saved; free space, then run the same command again"
    return (f"{runs.LAST_CHECKPOINT} holds epoch {saved_epochs}; free space, then continue with the same "
            "command and --resume")


def run_epochs(args, procs: Processes, data: Data, training: Training, config: dict,
               progress: Progress, run_dir: Path, amp_dtype, say, epoch_log) -> None:
    device, master, ddp = procs.device, procs.master, procs.ddp
    net, raw_net, optimizer = training.net, training.raw_net, training.optimizer
    scheduler, scaler = training.scheduler, training.scaler
    train_batches, steps_per_epoch = data.train_batches, len(data.train_batches)
    show_progress = master and not args.no_progress and sys.stderr.isatty()
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    for epoch in range(progress.start_epoch + 1, args.epochs + 1):
        started = time.perf_counter()
        net.train()
        train_batches.set_epoch(epoch)
        totals = torch.zeros(3, device=device, dtype=accumulator_dtype(device))  # loss, hits, count
        first_bad_step = torch.full((), -1, device=device)
        bar = _progress_bar(show_progress, steps_per_epoch, epoch, args.epochs)
        for step, (inputs, labels) in enumerate(train_batches, start=1):
            with autocast(device, amp_dtype):
                logits = net(inputs)
                loss = criterion(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            # Accumulate on the device; reading values back every step would stall the GPU.
            loss = loss.detach()
            totals[0] += loss * labels.numel()
            totals[1] += (logits.detach().argmax(1) == labels).sum()
            totals[2] += labels.numel()
            first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss),
                                         torch.full_like(first_bad_step, step), first_bad_step)
            if step % DIVERGENCE_CHECK_STEPS == 0 or step == steps_per_epoch:
                check_divergence(first_bad_step, ddp, epoch, args, run_dir, progress.history)
                if bar is not None:
                    bar.set_postfix(loss=f"{totals[0].item() / totals[2].item():.4f}")
            if bar is not None:
                bar.update()
        if bar is not None:
            bar.close()
        train_totals = all_reduce_sum(totals, ddp)
        val_totals, _ = evaluate(raw_net, data.val_batches, amp_dtype)
        val_totals = all_reduce_sum(val_totals, ddp)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        row = {"epoch": epoch, "lr": f"{optimizer.param_groups[0]['lr']:.6g}",
               "train_loss": f"{train_totals[0].item() / train_totals[2].item():.6f}",
               "train_acc": f"{train_totals[1].item() / train_totals[2].item():.6f}",
               "val_loss": f"{val_totals[0].item() / val_totals[3].item():.6f}",
               "val_acc": f"{val_totals[1].item() / val_totals[3].item():.6f}",
               "val_top5": f"{val_totals[2].item() / val_totals[3].item():.6f}",
               "epoch_seconds": f"{time.perf_counter() - started:.3f}"}
        progress.history.append(row)
        if float(row["val_acc"]) > progress.best["val_acc"]:
            progress.best = {"epoch": epoch, "val_acc": float(row["val_acc"])}
            if master:
                runs.save_checkpoint(run_dir / runs.BEST_CHECKPOINT, runs.best_weights(
                    raw_net.state_dict(), config, epoch, progress.best["val_acc"]))
        if master:
            # last.pt first: it is the truth a resume starts from, metrics.csv is rebuilt from it.
            runs.save_checkpoint(run_dir / runs.LAST_CHECKPOINT, {
                "config": config, "epoch": epoch, "model": raw_net.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "rng": runs.get_rng_state(),
                "history": progress.history, "best": progress.best})
            progress.saved_epochs = epoch
            if epoch == progress.start_epoch + 1:
                for stale in runs.END_OF_RUN_FILES:
                    runs.remove_file(run_dir / stale)  # they described an older state
            runs.write_metrics(run_dir / runs.METRICS_FILE, progress.history)
            plot.plot_curves(run_dir)
            say(f"Epoch {epoch}/{args.epochs}, Train Loss: {float(row['train_loss']):.4f}, "
                f"Train Accuracy: {float(row['train_acc']):.4f}, "
                f"Valid Loss: {float(row['val_loss']):.4f}, "
                f"Valid Accuracy: {float(row['val_acc']):.4f}, "
                f"Time: {float(row['epoch_seconds']):.2f}s")
            if epoch_log is not None:  # after last.pt, so a resume never writes an epoch twice
                epoch_log.write(row)


def all_reduce_sum(tensor: torch.Tensor, ddp: bool) -> torch.Tensor:
    if ddp:
        dist.all_reduce(tensor)
    return tensor


def check_divergence(first_bad_step, ddp, epoch, args, run_dir, history) -> None:
    flag = first_bad_step.clone().float()
    if ddp:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    bad = int(flag.item())
    if bad >= 0:
        raise RunFailed(f"the loss became NaN or infinite at epoch {epoch}, step {bad}; "
                        f"{run_dir / runs.LAST_CHECKPOINT} keeps the last good epoch ({len(history)}); "
                        f"try a lower --lr than {args.lr} with --overwrite")


def _progress_bar(show: bool, total: int, epoch: int, epochs: int):
    if not show:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=f"Epoch {epoch}/{epochs}", leave=False, dynamic_ncols=True)


def _torchvision_version() -> str | None:
    try:
        import torchvision
        return torchvision.__version__
    except ImportError:
        return None


# ---------------------------------------------------------------------------------------------------
# Stage 5: the end of a run, testing the best and the final weights


def finish(args, dataset: str, procs: Processes, data: Data, training: Training, progress: Progress,
           run_dir: Path, amp_dtype, say) -> None:
    say("Training Finished")
    raw_net = training.raw_net
    test_batches = EvalBatches(data.test_images, data.test_labels, max(256, args.batch_size),
                               mean=data.mean, std=data.std, device=procs.device,
                               channels_last=data.channels_last)
    final_totals, _ = evaluate(raw_net, test_batches, amp_dtype)
    raw_net.load_state_dict(runs.load_checkpoint(run_dir / runs.BEST_CHECKPOINT)["model"])
    best_totals, _ = evaluate(raw_net, test_batches, amp_dtype)
    history, best = progress.history, progress.best
    seconds = [float(row["epoch_seconds"]) for row in history]
    last_row = history[-1]
    summary = {
        "model": args.model, "dataset": dataset, "epochs": len(history),
        "best_epoch": best["epoch"], "best_val_acc": best["val_acc"],
        "final_train_loss": float(last_row["train_loss"]),
        "final_train_acc": float(last_row["train_acc"]),
        "final_val_loss": float(last_row["val_loss"]),
        "final_val_acc": float(last_row["val_acc"]),
        **rates("test", best_totals), **rates("final_test", final_totals),
        "validation": data.validation, "total_seconds": round(sum(seconds), 3),
        "seconds_per_epoch": round(sum(seconds) / len(seconds), 3)}
    runs.write_json(run_dir / runs.SUMMARY_FILE, summary)
    try:
        plot.plot_curves(run_dir)  # once more, now that the title can carry the test accuracy
        say(f"Test accuracy: {summary['final_test_acc']:.4f} (final weights), "
            f"{summary['test_acc']:.4f} (best.pt, epoch {best['epoch']})")
        say("Model Saved")
    except runs.WriteFailed:
        # summary.json marks a finished run; without it, the --resume the error asks for finishes it again
        runs.remove_file(run_dir / runs.SUMMARY_FILE)
        raise


@torch.no_grad()
def evaluate(net: nn.Module, batches, amp_dtype, tta: bool = False, num_classes: int = 0):
    """Summed loss, top-1 and top-5 hits and count, kept on the device; optionally a confusion matrix."""
    net.eval()
    device = batches.device
    totals = torch.zeros(4, device=device, dtype=accumulator_dtype(device))
    confusion = torch.zeros(num_classes, num_classes, device=device, dtype=torch.int64)
    for inputs, labels in batches:
        with autocast(device, amp_dtype):
            logits = net(inputs).float()
            if tta:
                probs = (logits.softmax(1) + net(inputs.flip(3)).float().softmax(1)) / 2
                logits = probs.clamp_min(1e-12).log()  # so the loss below is that of the averaged prediction
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        totals[0] += F.cross_entropy(logits, labels, reduction="sum")
        totals[1] += (top5[:, 0] == labels).sum()
        totals[2] += (top5 == labels[:, None]).any(1).sum()
        totals[3] += labels.numel()
        if num_classes:
            confusion += torch.bincount(labels * num_classes + top5[:, 0],
                                        minlength=num_classes ** 2).view(num_classes, num_classes)
    return totals, confusion


def rates(prefix: str, totals: torch.Tensor) -> dict:
    loss, top1, top5, count = totals.tolist()
    return {f"{prefix}_acc": top1 / count, f"{prefix}_top5": top5 / count,
            f"{prefix}_loss": loss / count}


# ---------------------------------------------------------------------------------------------------
# --eval-only


def checkpoint_path_of(args, dataset: str) -> Path:
    """--checkpoint, or the run's best.pt."""
    if args.checkpoint:
        return Path(args.checkpoint)
    return runs.run_folder(args.results_dir, dataset, args.model, args.tag) / runs.BEST_CHECKPOINT


def evaluate_checkpoint(args, dataset: str, load_dataset, num_classes: int) -> int:
    checkpoint_path = checkpoint_path_of(args, dataset)
    out_dir = checkpoint_path.parent
    runs.refuse_if_in_use(out_dir)
    trained = trained_net.load_trained(checkpoint_path, args.model, num_classes)
    device = pick_device(args.device, 0)
    _, amp_dtype = resolve_amp(args.amp, device)
    net = trained.net.to(device)  # the batches below normalize, as in training
    data = load_dataset(args.data_dir)
    mean, std = trained.statistics
    batches = EvalBatches(data.test_images, data.test_labels, 500, mean=mean, std=std, device=device)
    totals, confusion = evaluate(net, batches, amp_dtype, tta=args.tta, num_classes=num_classes)
    result = rates("test", totals)
    confusion = confusion.cpu()
    per_class = (confusion.diag() / confusion.sum(1).clamp_min(1)).tolist()
    print(f"{args.model} {checkpoint_path} on the {dataset} test set ({int(totals[3])} images"
          f"{', with mirror TTA' if args.tta else ''}):")
    print(f"Top-1 accuracy: {result['test_acc']:.4f}, Top-5 accuracy: {result['test_top5']:.4f}, "
          f"Loss: {result['test_loss']:.4f}")
    width = max(len(name) for name in data.classes)
    for name, accuracy in zip(data.classes, per_class):
        print(f"  {name:<{width}}  {accuracy:.4f}")
    lock = runs.lock_run_folder(out_dir)
    try:
        runs.write_json(out_dir / runs.EVAL_FILE, {
            "model": args.model, "dataset": dataset, "checkpoint": str(checkpoint_path),
            "checkpoint_epoch": trained.epoch, "tta": args.tta,
            "top1": result["test_acc"], "top5": result["test_top5"], "loss": result["test_loss"],
            "images": int(totals[3]), "per_class": dict(zip(data.classes, per_class)),
            "confusion_matrix": confusion.tolist()})
        plot.plot_confusion_matrix(confusion.numpy(), data.classes, out_dir / runs.CONFUSION_FILE,
                                   f"{args.model} on the {plot.pretty_dataset(dataset)} test set"
                                   f"{' (mirror TTA)' if args.tta else ''}")
    except runs.WriteFailed as err:
        raise RunFailed(f"{err}; {checkpoint_path} is untouched; free space, then evaluate again") from None
    finally:
        lock.close()
    print(f"Wrote {out_dir / runs.EVAL_FILE} and {out_dir / runs.CONFUSION_FILE}")
    return 0


# ---------------------------------------------------------------------------------------------------
# --predict


def predict_images(args, dataset: str, load_dataset, num_classes: int) -> int:
    """The top-5 classes of each image file by a trained network; writes nothing."""
    import predict  # here, not at the top: torchvision's image code costs every other command 2 s to load
    trained = trained_net.load_trained(checkpoint_path_of(args, dataset), args.model, num_classes)
    class_names = trained.classes
    if class_names is None:  # a best.pt from before checkpoints carried the class names
        try:
            class_names = load_dataset(args.data_dir, download=False).classes
        except DataError:
            class_names = None  # predict names them "class 0", "class 1", ...
    device = pick_device(args.device, 0)
    for line in predict.format_predictions(
            predict.predict_files(trained, args.predict, device, class_names)):
        print(line)
    return 0
