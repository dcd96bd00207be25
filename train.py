"""The one training loop behind main_cifar10.py and main_cifar100.py.

Reads top to bottom: parse flags, check them, load the data onto the device, build the model, then
for each epoch: set the learning rate, forward, backward, step, validate, save. Every file of a run is
written atomically into results/<dataset>/<model>[-<tag>]/ so that a crash at any moment leaves the
previous version whole, and last.pt holds everything needed to continue exactly where it stopped.

Under torchrun (RANK in the environment) the same loop runs with DistributedDataParallel: each rank
trains on its share of every global batch, and only rank 0 prints and writes.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import platform
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import load_data_cifar10
import load_data_cifar100
import plot
from load_data_cifar10 import DataError, EvalBatches, TrainBatches, channel_stats, split_validation
from model import MODELS, build_model, count_flops, count_parameters, format_flops

# What differs between the datasets is data: how to load one and how many classes it has.
DATASETS = {"cifar10": (load_data_cifar10.load_cifar10, load_data_cifar10.NUM_CLASSES),
            "cifar100": (load_data_cifar100.load_cifar100, load_data_cifar100.NUM_CLASSES)}
# BaseCNN has no BatchNorm and diverges or trains poorly at 0.1; every other model uses 0.1.
DEFAULT_LR = {"cnn_base": 0.05}
FALLBACK_LR = 0.1
# Flags that define what a run computes: on --resume they come from the saved run, and a different
# value typed on the command line is refused (only --epochs may grow).
RECIPE_FLAGS = ["batch_size", "seed", "lr", "momentum", "weight_decay", "label_smoothing",
                "warmup_epochs", "val_size", "aug", "subset", "sync_bn"]
DIVERGENCE_CHECK_STEPS = 50  # how often the loop reads the loss back from the device


class UsageError(Exception):
    """A problem the user can fix by changing the command line or files; printed as one line, exit 2."""


class Diverged(Exception):
    """The loss became NaN or infinite; printed as one line, exit 1."""


# ---------------------------------------------------------------------------------------------------
# Command line


def build_parser(dataset: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"main_{dataset}.py",
        description=f"Train, evaluate or describe one of {len(MODELS)} CNNs on {dataset.upper()}.")
    add = parser.add_argument
    add("--model", default="cnn_base", choices=list(MODELS), metavar="MODEL",
        help="network to train (see --list-models) [cnn_base]")
    add("--epochs", type=int, default=50, help="number of training epochs [50]")
    add("--batch-size", type=int, default=128,
        help="global batch size, split over the processes under torchrun [128]")
    add("--lr", type=float, default=None,
        help=f"peak learning rate after warmup [{FALLBACK_LR}; "
             + ", ".join(f"{m}: {lr}" for m, lr in DEFAULT_LR.items()) + "]")
    add("--momentum", type=float, default=0.9, help="SGD Nesterov momentum [0.9]")
    add("--weight-decay", type=float, default=5e-4, help="SGD weight decay [5e-4]")
    add("--label-smoothing", type=float, default=0.0, help="cross-entropy label smoothing [0]")
    add("--warmup-epochs", type=float, default=1.0,
        help="epochs of linear learning-rate warmup before the cosine decay [1]")
    add("--val-size", type=int, default=0,
        help="training images held out (class balanced) for validation; 0 validates on the test "
             "set as the course code did [0]")
    add("--aug", default="flip-crop", choices=["none", "flip-crop", "flip-crop-cutout"],
        help="training augmentation [flip-crop]")
    add("--subset", type=int, default=None,
        help="use only the first N training and N test images, for smoke runs [all]")
    add("--data-dir", default="data", help="where the dataset is, or is downloaded to [data]")
    add("--results-dir", default="results", help="root folder of all runs [results]")
    add("--tag", default=None,
        help="suffix of the run folder, results/<dataset>/<model>-<tag>, e.g. a seed [none]")
    add("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"],
        help="training device [auto: cuda, then mps, then cpu]")
    add("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
        help="mixed precision autocast [auto: bf16 on CUDA, off elsewhere]")
    add("--channels-last", action=argparse.BooleanOptionalAction, default=None,
        help="channels_last memory format [on for CUDA, off elsewhere]")
    add("--compile", action="store_true", help="torch.compile the model [off]")
    add("--sync-bn", action="store_true", help="synchronized BatchNorm across torchrun processes [off]")
    add("--seed", type=int, default=0, help="seed of initialization, split and batches [0]")
    add("--deterministic", action="store_true",
        help="deterministic algorithms: bit-identical reruns and resumes, somewhat slower [off]")
    add("--resume", action="store_true", help="continue the run from its last.pt")
    add("--overwrite", action="store_true", help="start the run over, replacing the one in its folder")
    add("--no-progress", action="store_true", help="no progress bar (also off when not on a terminal)")
    add("--list-models", action="store_true", help="print the model names, one per line, and exit")
    add("--summary", action="store_true",
        help="print the network, its parameter count and FLOPs, and exit")
    add("--eval-only", action="store_true",
        help="evaluate the run's best.pt (or --checkpoint) on the test set and exit")
    add("--checkpoint", default=None, help="checkpoint for --eval-only [<run folder>/best.pt]")
    add("--tta", action="store_true",
        help="with --eval-only: average the predictions of each image and its mirror")
    return parser


def flags_given(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Names (dests) of the flags typed on the command line, to tell them from defaults."""
    typed = {token.split("=", 1)[0] for token in argv if token.startswith("--")}
    return {action.dest for action in parser._actions if typed & set(action.option_strings)}


def check_flags(args: argparse.Namespace) -> None:
    if args.epochs < 1:
        raise UsageError(f"--epochs must be at least 1 (got {args.epochs})")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {args.batch_size})")
    if args.lr is not None and not args.lr > 0:
        raise UsageError(f"--lr must be above 0 (got {args.lr})")
    if args.subset is not None and args.subset < 1:
        raise UsageError(f"--subset must be at least 1 (got {args.subset})")
    if args.val_size < 0:
        raise UsageError(f"--val-size must be 0 or more (got {args.val_size})")
    if args.warmup_epochs < 0:
        raise UsageError(f"--warmup-epochs must be 0 or more (got {args.warmup_epochs})")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other: pass one of them")
    if Path(args.data_dir).is_file():
        raise UsageError(f"--data-dir {args.data_dir} is a file; pass a folder")
    if args.checkpoint and not args.eval_only:
        raise UsageError("--checkpoint is for --eval-only; to continue a run use --resume")


def pick_device(requested: str, local_rank: int) -> torch.device:
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if requested == "cuda" and not cuda:
        raise UsageError("--device cuda: no CUDA GPU is available here; use --device cpu or auto")
    if requested == "mps" and not mps:
        raise UsageError("--device mps: no Apple GPU is available here; use --device cpu or auto")
    if requested == "cuda" or (requested == "auto" and cuda):
        return torch.device("cuda", local_rank)
    if requested == "mps" or (requested == "auto" and mps):
        return torch.device("mps")
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------------
# Files: each written to a temporary file in the same folder, then renamed over the old one
# (plot.write_atomically), so a crash at any moment leaves the previous version whole.


def write_json(path: Path, data: dict) -> None:
    plot.write_text(path, json.dumps(data, indent=2) + "\n")


def write_metrics(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=plot.METRIC_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    plot.write_text(path, buffer.getvalue())


def save_checkpoint(path: Path, state: dict) -> None:
    plot.write_atomically(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file: truncated, not a checkpoint, wrong format
        raise UsageError(f"{path} is not a readable checkpoint ({type(err).__name__}); "
                         "restore it or start over with --overwrite") from None


# ---------------------------------------------------------------------------------------------------
# Evaluation


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


def resolve_amp(requested: str, device: torch.device) -> tuple[str, torch.dtype | None]:
    """--amp's name and autocast dtype; auto is bf16 on CUDA and off elsewhere."""
    name = ("bf16" if device.type == "cuda" else "off") if requested == "auto" else requested
    return name, {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[name]


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """Sums over an epoch in float64, except on Apple GPUs, which have no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def autocast(device: torch.device, amp_dtype):
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def all_reduce_sum(tensor: torch.Tensor, ddp: bool) -> torch.Tensor:
    if ddp:
        dist.all_reduce(tensor)
    return tensor


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup per step, then cosine decay to zero at the last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------------------------------------
# The entry point


def main(dataset: str, argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(dataset)
    args = parser.parse_args(argv)
    load_dataset, num_classes = DATASETS[dataset]
    if args.list_models:
        print("\n".join(MODELS))
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
        check_flags(args)
        if args.eval_only:
            return evaluate_checkpoint(args, dataset, load_dataset, num_classes)
        return train(args, dataset, load_dataset, num_classes, flags_given(parser, argv), ddp)
    except (UsageError, DataError) as err:
        if master:
            print(f"error: {err}", file=sys.stderr)
        return 2
    except Diverged as err:
        if master:
            print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if master:
            print("\nInterrupted before training started; nothing new was saved", file=sys.stderr)
        return 130
    finally:
        if ddp and dist.is_initialized():
            dist.destroy_process_group()


def run_folder(args: argparse.Namespace, dataset: str) -> Path:
    name = args.model if args.tag is None else f"{args.model}-{args.tag}"
    return Path(args.results_dir) / dataset / name


def check_run_folder(run_dir: Path, args: argparse.Namespace) -> dict | None:
    """Decide, writing nothing, whether this run may start; returns last.pt when resuming."""
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"cannot write {run_dir}: {existing} is a file; move it or pick another "
                         "--results-dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {run_dir}: {existing} is not writable; pick another "
                         "--results-dir")
    has_run = (run_dir / "last.pt").exists() or (run_dir / "metrics.csv").exists()
    if has_run and not (args.resume or args.overwrite):
        raise UsageError(f"{run_dir} already holds a run: pass --resume to continue it or "
                         "--overwrite to start over (or another --tag)")
    if args.resume and not (run_dir / "last.pt").exists():
        raise UsageError(f"--resume: there is no {run_dir / 'last.pt'} to continue; drop --resume "
                         "to start this run")
    if not args.resume:
        return None
    checkpoint = load_checkpoint(run_dir / "last.pt")
    if not isinstance(checkpoint, dict) or "config" not in checkpoint:
        raise UsageError(f"{run_dir / 'last.pt'} is not a last.pt of this project; "
                         "start over with --overwrite")
    return checkpoint


def reconcile_resume(args: argparse.Namespace, saved: dict, given: set[str], dataset: str) -> None:
    """Take the run's recipe from its last.pt; refuse a typed flag that would change it."""
    if saved["model"] != args.model or saved["dataset"] != dataset:
        raise UsageError(f"last.pt in this folder is a {saved['dataset']} {saved['model']} run, not "
                         f"{dataset} {args.model}; pick the matching --model or --overwrite")
    for name in RECIPE_FLAGS:
        flag = "--" + name.replace("_", "-")
        if name in given and getattr(args, name) != saved[name]:
            raise UsageError(f"--resume cannot change {flag} (the run used {saved[name]}, got "
                             f"{getattr(args, name)}); drop the flag or start over with --overwrite")
        setattr(args, name, saved[name])
    if args.epochs < saved["epochs"] and "epochs" in given:
        raise UsageError(f"--resume can raise --epochs but not lower it (the run has "
                         f"{saved['epochs']}); drop the flag or start over with --overwrite")
    if "epochs" not in given:
        args.epochs = saved["epochs"]


def train(args, dataset: str, load_dataset, num_classes: int, given: set[str], ddp: bool) -> int:
    # -- processes and device ----------------------------------------------------------------------
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
    master = rank == 0
    if args.deterministic:
        # cuBLAS needs this set before its first call to give repeatable results.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # -- the run folder: every rank agrees on refusing before anything is written -------------------
    run_dir = run_folder(args, dataset)
    checkpoint, refusal = None, None
    if master:
        try:
            checkpoint = check_run_folder(run_dir, args)
            if checkpoint is not None:
                reconcile_resume(args, checkpoint["config"], given, dataset)
        except UsageError as err:
            refusal = str(err)
    if ddp:
        shared = [refusal, vars(args)]
        dist.broadcast_object_list(shared, src=0)
        refusal = shared[0]
        vars(args).update(shared[1])
        if args.resume and not master and refusal is None:
            checkpoint = load_checkpoint(run_dir / "last.pt")  # needs the folder on every node
    if refusal:
        raise UsageError(refusal)
    if checkpoint is not None and checkpoint["epoch"] >= args.epochs:
        if master:
            print(f"{run_dir} already finished its {checkpoint['epoch']} epochs; pass a larger "
                  "--epochs with --resume to train further")
        return 0
    if args.lr is None:
        args.lr = DEFAULT_LR.get(args.model, FALLBACK_LR)
    amp_name, amp_dtype = resolve_amp(args.amp, device)
    channels_last = device.type == "cuda" if args.channels_last is None else args.channels_last

    # -- data ---------------------------------------------------------------------------------------
    data, data_error = None, [None]
    if master:  # rank 0 alone downloads, if needed, then the others read what it left
        try:
            data = load_dataset(args.data_dir)
        except DataError as err:
            data_error[0] = str(err)
    if ddp:
        dist.broadcast_object_list(data_error, src=0)
    if data_error[0]:
        raise UsageError(data_error[0])
    if data is None:
        data = load_dataset(args.data_dir)
    mean, std = channel_stats(data.train_images)  # the whole training set, before subset and split
    train_images, train_labels = data.train_images, data.train_labels
    test_images, test_labels = data.test_images, data.test_labels
    if args.subset is not None:
        if args.subset > len(train_labels):
            raise UsageError(f"--subset {args.subset} is more than the {len(train_labels)} training "
                             "images; pass a smaller number or leave it out")
        train_images, train_labels = train_images[:args.subset], train_labels[:args.subset]
        test_images, test_labels = test_images[:args.subset], test_labels[:args.subset]
    if args.val_size >= len(train_labels):
        raise UsageError(f"--val-size {args.val_size} leaves no training images out of "
                         f"{len(train_labels)}; pass a smaller number")
    if args.val_size:
        train_index, val_index = split_validation(train_labels, args.val_size, args.seed)
        val_images, val_labels = train_images[val_index], train_labels[val_index]
        train_images, train_labels = train_images[train_index], train_labels[train_index]
        validation = "held-out"
    else:
        val_images, val_labels = test_images, test_labels
        validation = "test"
    batch_options = dict(mean=mean, std=std, device=device, channels_last=channels_last,
                         rank=rank, world_size=world_size)
    try:
        train_batches = TrainBatches(train_images, train_labels, args.batch_size, aug=args.aug,
                                     seed=args.seed, **batch_options)
        val_batches = EvalBatches(val_images, val_labels, max(256, args.batch_size), **batch_options)
    except ValueError as err:  # e.g. fewer images than processes
        raise UsageError(str(err)) from None

    # -- model, optimizer, schedule -----------------------------------------------------------------
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    raw_net = build_model(args.model, num_classes)
    parameters, flops = count_parameters(raw_net), count_flops(raw_net)
    raw_net = raw_net.to(device)
    if channels_last:
        raw_net = raw_net.to(memory_format=torch.channels_last)
    net = raw_net
    if ddp:
        if args.sync_bn:
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[local_rank] if device.type == "cuda" else None)
    if args.compile:
        net = torch.compile(net)
    optimizer = torch.optim.SGD(raw_net.parameters(), lr=args.lr, momentum=args.momentum,
                                nesterov=args.momentum > 0, weight_decay=args.weight_decay)
    steps_per_epoch = len(train_batches)
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = min(total_steps, round(args.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)

    config = {name: value for name, value in vars(args).items()
              if name not in ("list_models", "summary", "eval_only", "checkpoint", "tta")}
    config.update(dataset=dataset, num_classes=num_classes, parameters=parameters,
                  flops=flops, validation=validation, mean=list(mean), std=list(std),
                  train_images=len(train_labels), val_images=len(val_labels),
                  device=str(device), gpu_name=torch.cuda.get_device_name(device)
                  if device.type == "cuda" else None, amp=amp_name, channels_last=channels_last,
                  world_size=world_size, torch_version=str(torch.__version__),
                  torchvision_version=_torchvision_version(),
                  python_version=platform.python_version())

    # -- resume or start --------------------------------------------------------------------------
    history: list[dict] = []
    best = {"epoch": 0, "val_acc": -1.0}
    start_epoch = 0
    log_lines: list[str] = []
    if checkpoint is not None:
        raw_net.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        set_rng_state(checkpoint["rng"])
        history, best, start_epoch = checkpoint["history"], checkpoint["best"], checkpoint["epoch"]
        if (run_dir / "log.txt").exists():
            log_lines = (run_dir / "log.txt").read_text().splitlines()
    say = make_logger(master, run_dir, log_lines)
    if master:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"cannot create {run_dir} ({err.strerror}); pick another "
                             "--results-dir") from None
        if checkpoint is not None:
            say(f"Resuming {run_dir} at epoch {start_epoch + 1}/{args.epochs}")
        elif args.overwrite and (run_dir / "metrics.csv").exists():
            say(f"--overwrite: starting {run_dir} over; the previous run there is replaced")
        if validation == "test":
            say("Validation uses the test set (--val-size 0, as the course code did): the best epoch "
                "is picked on it, so report the final epoch or hold out a split with --val-size")
        say(f"{args.model} on {dataset}: {parameters:,} parameters, {format_flops(flops)}FLOPs, device "
            f"{device}{' x' + str(world_size) if ddp else ''}, amp {amp_name}, "
            f"{len(train_labels)} training and {len(val_labels)} validation images")
        write_json(run_dir / "config.json", config)

    # -- the loop ---------------------------------------------------------------------------------
    show_progress = master and not args.no_progress and sys.stderr.isatty()
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    saved_epochs = start_epoch  # what last.pt holds: what a --resume would continue from
    try:
        for epoch in range(start_epoch + 1, args.epochs + 1):
            started = time.perf_counter()
            net.train()
            train_batches.set_epoch(epoch)
            totals = torch.zeros(3, device=device, dtype=accumulator_dtype(device))  # loss, hits, count
            first_bad_step = torch.full((), -1, device=device)
            progress = _progress_bar(show_progress, steps_per_epoch, epoch, args.epochs)
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
                    check_divergence(first_bad_step, ddp, epoch, args, run_dir, start_epoch, history)
                    if progress is not None:
                        progress.set_postfix(loss=f"{totals[0].item() / totals[2].item():.4f}")
                if progress is not None:
                    progress.update()
            if progress is not None:
                progress.close()
            train_totals = all_reduce_sum(totals, ddp)
            val_totals, _ = evaluate(raw_net, val_batches, amp_dtype)
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
            history.append(row)
            if float(row["val_acc"]) > best["val_acc"]:
                best = {"epoch": epoch, "val_acc": float(row["val_acc"])}
                if master:
                    save_checkpoint(run_dir / "best.pt", weights_file(raw_net, config, epoch, best))
            if master:
                # last.pt first: it is the truth a resume starts from, metrics.csv is rebuilt from it.
                save_checkpoint(run_dir / "last.pt", {
                    "config": config, "epoch": epoch, "model": raw_net.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "rng": get_rng_state(), "history": history,
                    "best": best})
                saved_epochs = epoch
                if epoch == start_epoch + 1:
                    for stale in ("summary.json", "eval.json", "confusion_matrix.png"):
                        (run_dir / stale).unlink(missing_ok=True)  # they described an older state
                write_metrics(run_dir / "metrics.csv", history)
                plot.plot_curves(run_dir)
                say(f"Epoch {epoch}/{args.epochs}, Train Loss: {float(row['train_loss']):.4f}, "
                    f"Train Accuracy: {float(row['train_acc']):.4f}, "
                    f"Valid Loss: {float(row['val_loss']):.4f}, "
                    f"Valid Accuracy: {float(row['val_acc']):.4f}, "
                    f"Time: {float(row['epoch_seconds']):.2f}s")
    except KeyboardInterrupt:
        if master:
            plural = "s" if saved_epochs != 1 else ""
            print(f"\nInterrupted: {saved_epochs} epoch{plural} saved in {run_dir}; continue with "
                  "the same command and --resume", file=sys.stderr)
        return 130

    # -- the end: test the best and the final weights -----------------------------------------------
    if master:
        say("Training Finished")
        test_batches = EvalBatches(test_images, test_labels, max(256, args.batch_size), mean=mean,
                                   std=std, device=device, channels_last=channels_last)
        final_totals, _ = evaluate(raw_net, test_batches, amp_dtype)
        raw_net.load_state_dict(load_checkpoint(run_dir / "best.pt")["model"])
        best_totals, _ = evaluate(raw_net, test_batches, amp_dtype)
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
            "validation": validation, "total_seconds": round(sum(seconds), 3),
            "seconds_per_epoch": round(sum(seconds) / len(seconds), 3)}
        write_json(run_dir / "summary.json", summary)
        plot.plot_curves(run_dir)  # once more, now that the title can carry the test accuracy
        say(f"Test accuracy: {summary['final_test_acc']:.4f} (final weights), "
            f"{summary['test_acc']:.4f} (best.pt, epoch {best['epoch']})")
        say("Model Saved")
    if ddp:
        dist.barrier()
    return 0


def rates(prefix: str, totals: torch.Tensor) -> dict:
    loss, top1, top5, count = totals.tolist()
    return {f"{prefix}_acc": top1 / count, f"{prefix}_top5": top5 / count,
            f"{prefix}_loss": loss / count}


def check_divergence(first_bad_step, ddp, epoch, args, run_dir, start_epoch, history) -> None:
    flag = first_bad_step.clone().float()
    if ddp:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    bad = int(flag.item())
    if bad >= 0:
        saved = len(history)
        raise Diverged(f"the loss became NaN or infinite at epoch {epoch}, step {bad}; "
                       f"{run_dir / 'last.pt'} keeps the last good epoch ({saved}); "
                       f"try a lower --lr than {args.lr} with --overwrite")


def weights_file(raw_net: nn.Module, config: dict, epoch: int, best: dict) -> dict:
    """best.pt: the weights plus what evaluating them needs (model, classes, normalization)."""
    return {"model": raw_net.state_dict(), "model_name": config["model"],
            "dataset": config["dataset"], "num_classes": config["num_classes"],
            "mean": config["mean"], "std": config["std"], "epoch": epoch,
            "val_acc": best["val_acc"]}


def get_rng_state() -> dict:
    _, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    python_version, python_internal, python_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": [numpy_keys.tolist(), numpy_pos, numpy_has_gauss, numpy_gauss],
             "python": [python_version, list(python_internal), python_gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    # Batches draw from their own (seed, epoch) generator; these only matter to code that uses the
    # global generators (dropout, say), restored so that a resumed run behaves like an unbroken one.
    torch.set_rng_state(state["torch"])
    numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = state["numpy"]
    np.random.set_state(("MT19937", np.array(numpy_keys, dtype=np.uint32), numpy_pos,
                         numpy_has_gauss, numpy_gauss))
    python_version, python_internal, python_gauss = state["python"]
    random.setstate((python_version, tuple(python_internal), python_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def make_logger(master: bool, run_dir: Path, log_lines: list[str]):
    def say(line: str) -> None:
        if not master:
            return
        print(line, flush=True)
        log_lines.append(line)
        plot.write_text(run_dir / "log.txt", "\n".join(log_lines) + "\n")
    return say


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
# --eval-only


def evaluate_checkpoint(args, dataset: str, load_dataset, num_classes: int) -> int:
    checkpoint_path = Path(args.checkpoint) if args.checkpoint else run_folder(args, dataset) / "best.pt"
    if not checkpoint_path.is_file():
        raise UsageError(f"no checkpoint at {checkpoint_path}; train the run first or pass "
                         "--checkpoint PATH")
    checkpoint = load_checkpoint(checkpoint_path)
    if not isinstance(checkpoint, dict) or "model_name" not in checkpoint:
        raise UsageError(f"{checkpoint_path} is not a best.pt of this project; pass a best.pt")
    if checkpoint["model_name"] != args.model:
        raise UsageError(f"{checkpoint_path} holds a {checkpoint['model_name']}, not {args.model}; "
                         f"pass --model {checkpoint['model_name']}")
    if checkpoint["num_classes"] != num_classes:
        raise UsageError(f"{checkpoint_path} has {checkpoint['num_classes']} classes, "
                         f"{dataset} has {num_classes}; use the other main script")
    device = pick_device(args.device, 0)
    _, amp_dtype = resolve_amp(args.amp, device)
    net = build_model(args.model, num_classes)
    net.load_state_dict(checkpoint["model"])
    net.to(device)
    data = load_dataset(args.data_dir)
    batches = EvalBatches(data.test_images, data.test_labels, 500, mean=checkpoint["mean"],
                          std=checkpoint["std"], device=device)
    totals, confusion = evaluate(net, batches, amp_dtype, tta=args.tta,
                                 num_classes=num_classes)
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
    out_dir = checkpoint_path.parent
    write_json(out_dir / "eval.json", {
        "model": args.model, "dataset": dataset, "checkpoint": str(checkpoint_path),
        "checkpoint_epoch": checkpoint.get("epoch"), "tta": args.tta,
        "top1": result["test_acc"], "top5": result["test_top5"], "loss": result["test_loss"],
        "images": int(totals[3]), "per_class": dict(zip(data.classes, per_class)),
        "confusion_matrix": confusion.tolist()})
    plot.plot_confusion_matrix(confusion.numpy(), data.classes, out_dir / "confusion_matrix.png",
                               f"{args.model} on the {plot.pretty_dataset(dataset)} test set"
                               f"{' (mirror TTA)' if args.tta else ''}")
    print(f"Wrote {out_dir / 'eval.json'} and {out_dir / 'confusion_matrix.png'}")
    return 0
