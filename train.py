"""The one training loop behind main_cifar10.py and main_cifar100.py.

Reads top to bottom: main() parses the command line (training/flags.py) and command() dispatches it, typed, to a
command or to a run; then the stages of a run in order (processes and device, the run resolved from the command
line and its folder, data, model and optimization, what was saved), the epoch loop (train with
training/optimization.py's step, validate, record) and the end-of-run tests. Every file goes through
runfolder/store.py into results/<dataset>/<model>[-<tag>]/ as runfolder/declarations.py declares it;
last.pt holds everything needed to continue exactly where the run stopped.

Under torchrun (RANK in the environment) the same loop runs with DistributedDataParallel: each rank trains
on its share of every global batch, and only rank 0 prints and writes.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import load_data_cifar10
import load_data_cifar100
from core.errors import RunFailed, UsageError, quiet_closed_pipes, run_command
from model import build_model, count_flops, count_parameters, describe_model, format_flops, models_in
from reports import figures
from runfolder import declarations, lock, store, tensorboard_events
from runfolder.declarations import EpochMetrics, LastCheckpoint, RunFacts, Summary
from serving.commands import evaluate_checkpoint, predict_images
from training import flags, stopping
from training.dataset import RunData, load_data
from training.devices import resolve_amp, synchronize, torchvision_version
from training.evaluation import EvalResult, TestSet, Weights, evaluate, test_report, write_test_report
from training.optimization import EpochSums, Optimization, make_optimization
from training.processes import (
    Processes,
    all_reduce_sum,
    broadcast_buffers,
    end_processes,
    is_master,
    rank0_then_share,
    share_from_rank0,
    start_processes,
    stop_together,
)
from training.recording import Output, RunProgress, completed_log, make_print_and_log, timings
from training.rng_state import set_rng_state

# What differs between the datasets is data: how to load one and how many classes it has.
DATASETS = {"cifar10": (load_data_cifar10.load_cifar10, load_data_cifar10.CIFAR10),
            "cifar100": (load_data_cifar100.load_cifar100, load_data_cifar100.CIFAR100)}
DIVERGENCE_CHECK_STEPS = 50  # how often the loop reads the loss back from the device


def main(dataset: str, argv: list[str] | None = None) -> int:
    quiet_closed_pipes()  # before --help prints
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = flags.build_parser(dataset).parse_args(argv)
    except SystemExit as done:  # --help, or a bad flag already reported in one line
        return done.code
    try:
        with stopping.signals_handled():  # SIGTERM stops like Ctrl-C, SIGUSR1 after the epoch
            return run_command(lambda: command(args, dataset, argv), report=is_master(),
                               interrupted="Interrupted before training started; nothing new was saved")
    finally:
        end_processes()


def command(args: argparse.Namespace, dataset: str, argv: list[str]) -> int:
    """What the command line asks for: a listing, a description, an evaluation, predictions or a run. The
    namespace goes no further: the commands take the command line typed, a run what resolve() makes of it."""
    load_dataset, spec = DATASETS[dataset]
    if args.list_models is not None:
        try:
            print("\n".join(models_in(args.list_models)))
        except ValueError as err:
            raise UsageError(f"--list-models: {err}") from None
        return 0
    if args.summary:
        print(describe_model(args.model, spec.num_classes))
        return 0
    flags.check_flags(args, spec.train_size)
    line = flags.command_line(args, dataset, argv)
    if line.commands.eval_only:
        return evaluate_checkpoint(line, load_dataset, spec.num_classes)
    if line.commands.predict:
        return predict_images(line, load_dataset, spec.num_classes)
    settings = line.settings
    procs = start_processes(settings.device, settings.deterministic, settings.dist_timeout)
    return train(resolve(line, procs), procs)


# ---------------------------------------------------------------------------------------------------
# Stages 1 and 2: processes and device (above), then the run the command line resolves to: its configuration
# and its folder. Every rank agrees on refusing before anything is written.


@dataclass(frozen=True)
class ResolvedRun:
    """A training command resolved, before anything is written: the run's configuration, its folder, the last.pt
    it continues (None for a fresh start) and the folder's files as checked (compared again once it is locked)."""

    config: flags.RunConfig
    folder: Path
    checkpoint: LastCheckpoint | None
    checked: store.FolderState


def resolve(line: flags.CommandLine, procs: Processes) -> ResolvedRun:
    """The run a training command asks for. --auto-resume is --resume when the folder holds a last.pt (a fresh
    start when it does not); the typed recipe takes --recipe's defaults for the flags not typed, and on a resume
    the saved recipe, which a typed flag may not change (--epochs may grow). Rank 0 checks the folder, writing
    nothing; every rank gets its answer or its refusal."""
    settings, given, dataset = line.settings, line.given, line.dataset
    typed = flags.with_recipe_defaults(line.recipe, given)
    folder = store.run_folder(settings.results_dir, dataset, typed.model, settings.tag)
    if settings.auto_resume:
        settings = dataclasses.replace(settings, resume=(folder / declarations.LAST_CHECKPOINT).exists())

    def check() -> tuple[LastCheckpoint | None, flags.Recipe]:
        lock.refuse_if_in_use(folder, settings.exit_code_if_in_use)
        saved = store.check_run_folder(folder, settings.resume, settings.overwrite)
        return saved, typed if saved is None else flags.resume_recipe(typed, given, saved.config, dataset)

    checkpoint, recipe = rank0_then_share(procs, check) or (None, None)
    recipe = flags.Recipe(**share_from_rank0(procs, dataclasses.asdict(recipe) if recipe else None))
    if settings.resume and not procs.master:  # the folder is on every node
        checkpoint = store.check_run_folder(folder, True, False)
    config = flags.RunConfig(flags.with_default_lr(recipe), settings, dataset, line.text)
    return ResolvedRun(config, folder, checkpoint, store.folder_state(folder))


@dataclass(frozen=True)
class RunSetup:
    """A run's configuration and where and how it computes, fixed once the first stages have run."""

    config: flags.RunConfig
    procs: Processes
    folder: Path
    amp_name: str
    amp_dtype: torch.dtype | None
    channels_last: bool

    @property
    def recipe(self) -> flags.Recipe:
        return self.config.recipe


# ---------------------------------------------------------------------------------------------------
# Stage 4: model, optimizer, schedule


COMPILE_BACKEND = "inductor"  # torch.compile's backend; tests put a recording one here


@dataclass
class NetworkAndOptimization:
    """The network being trained, as saved and as called, and how it learns."""

    raw_net: nn.Module  # the model itself, whose state_dict is saved
    net: nn.Module  # what the loop calls for a full batch: raw_net, wrapped by DDP and torch.compile as asked
    optimization: Optimization
    parameters: int
    flops: int
    eager_net: nn.Module | None = None  # with --compile: raw_net wrapped by DDP alone, for the other batch sizes
    compiled_batch: int = 0  # the one batch size (per process) the compiled network sees

    def net_for(self, inputs: torch.Tensor) -> nn.Module:
        """The compiled network for the full batch, the uncompiled one for any other size (the epoch's last,
        smaller batch): compiling that size too would cost a second compilation in every run, for one step
        an epoch, and both run the same parameters."""
        if self.eager_net is None or inputs.shape[0] == self.compiled_batch:
            return self.net
        return self.eager_net


def build_training(run: RunSetup, num_classes: int, steps_per_epoch: int) -> NetworkAndOptimization:
    recipe, procs = run.recipe, run.procs
    torch.manual_seed(recipe.seed)
    np.random.seed(recipe.seed)
    random.seed(recipe.seed)
    raw_net = build_model(recipe.model, num_classes)
    parameters, flops = count_parameters(raw_net), count_flops(raw_net)
    raw_net = raw_net.to(procs.device)
    if run.channels_last:
        raw_net = raw_net.to(memory_format=torch.channels_last)
    net = raw_net
    if procs.ddp:
        if recipe.sync_bn:
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        # SyncBatchNorm keeps every rank's running statistics the same, so broadcasting rank 0's before
        # every forward would only cost time; without it rank 0's are used (and broadcast before validating).
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[procs.local_rank] if procs.device.type == "cuda" else None,
            broadcast_buffers=not recipe.sync_bn,
            # The gradients live in DDP's communication buckets: no copy into and out of them every step.
            gradient_as_bucket_view=True)
    optimization = make_optimization(raw_net, recipe, steps_per_epoch, procs.device, run.amp_dtype)
    if not run.config.settings.compile:
        return NetworkAndOptimization(raw_net, net, optimization, parameters, flops)
    if run.config.settings.deterministic:
        # Inductor's own switch: no autotuning by timing, no atomics in its generated reductions.
        torch._inductor.config.deterministic = True
    # Static shapes, for the full batch alone: NetworkAndOptimization.net_for sends any other size to the uncompiled
    # network, so one graph is compiled in the first step and nothing after it.
    compiled = torch.compile(net, dynamic=False, backend=COMPILE_BACKEND)
    return NetworkAndOptimization(raw_net, compiled, optimization, parameters, flops, eager_net=net,
                                  compiled_batch=recipe.batch_size // procs.world_size)


def run_facts(run: RunSetup, num_classes: int, data: RunData, training: NetworkAndOptimization) -> RunFacts:
    """What config.json says besides the flags: what the run was made of, on which machine."""
    device = run.procs.device
    return RunFacts(
        dataset=run.config.dataset, num_classes=num_classes, parameters=training.parameters,
        flops=training.flops, validation=data.validation, mean=list(data.options.mean),
        std=list(data.options.std),
        train_images=data.train_count, val_images=data.val_count, device=str(device),
        gpu_name=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        amp=run.amp_name, channels_last=run.channels_last, world_size=run.procs.world_size,
        torch_version=str(torch.__version__), torchvision_version=torchvision_version(),
        python_version=platform.python_version(), classes=data.classes, command=run.config.command)


# ---------------------------------------------------------------------------------------------------
# Stage 5: what was saved, put back; what rank 0 writes as the run goes


def restore(checkpoint: LastCheckpoint | None, training: NetworkAndOptimization, run: RunSetup) -> RunProgress:
    """A fresh start, or everything last.pt saved put back."""
    if checkpoint is None:
        return RunProgress([], {"epoch": 0, "val_acc": -1.0}, 0, [])
    training.raw_net.load_state_dict(checkpoint.model)
    training.optimization.optimizer.load_state_dict(checkpoint.optimizer)
    training.optimization.scheduler.load_state_dict(checkpoint.scheduler)
    scaler = training.optimization.scaler
    # --amp is a setting: a run may go on in another precision (fp16 on an older GPU, say). A scaler of a
    # run without fp16 saved nothing, and one the new precision does not use is not restored.
    if scaler.is_enabled() and checkpoint.scaler:
        scaler.load_state_dict(checkpoint.scaler)
    set_rng_state(checkpoint.rng, run.procs.device)
    log_path = run.folder / declarations.LOG_FILE
    log_lines = log_path.read_text().splitlines() if log_path.exists() else []
    history = [declarations.complete_row(row) for row in checkpoint.history]
    log_lines = completed_log(log_lines, history, checkpoint.config.get("epochs", checkpoint.epoch))
    return RunProgress(history, checkpoint.best, checkpoint.epoch, log_lines)


def log_start_and_write_config(run: RunSetup, progress: RunProgress, output: Output) -> None:
    """Rank 0, in the locked run folder: print and log what runs, write config.json (and, on a resume,
    metrics.csv from last.pt, in case a kill came between the two)."""
    print_and_log, config, recipe = output.print_and_log, output.config, run.recipe
    resumed = run.config.settings.resume  # set by resolve() under --auto-resume when the folder held a last.pt
    for note in output.notes:
        print_and_log(note)
    if resumed and progress.start_epoch >= recipe.epochs:
        print_and_log(f"Finishing {run.folder}: its {progress.start_epoch} epochs are saved, its end-of-run tests not")
    elif resumed:
        print_and_log(f"Resuming {run.folder} at epoch {progress.start_epoch + 1}/{recipe.epochs}")
    elif run.config.settings.overwrite and (run.folder / declarations.METRICS_FILE).exists():
        print_and_log(f"--overwrite: starting {run.folder} over; the previous run there is replaced")
    if config["validation"] == "test":
        print_and_log("Validation uses the test set (--val-size 0, as the course code did): the best epoch "
                      "is picked on it, so report the final epoch or hold out a split with --val-size")
    world = f" x{run.procs.world_size}" if run.procs.ddp else ""
    print_and_log(f"{recipe.model} on {run.config.dataset}: {config['parameters']:,} parameters, "
                  f"{format_flops(config['flops'])}FLOPs, device {config['device']}{world}, amp {config['amp']}, "
                  f"{config['train_images']} training and {config['val_images']} validation images")
    store.write_json(run.folder / declarations.CONFIG_FILE, config)
    if resumed:
        store.write_metrics(run.folder / declarations.METRICS_FILE, progress.history)


# ---------------------------------------------------------------------------------------------------
# The run: the stages above in order, then the epoch loop


def train(resolved: ResolvedRun, procs: Processes) -> int:
    config, checkpoint, run_dir = resolved.config, resolved.checkpoint, resolved.folder
    recipe, settings = config.recipe, config.settings
    if checkpoint is not None and checkpoint.epoch >= recipe.epochs and (run_dir / declarations.SUMMARY_FILE).exists():
        if procs.master:
            print(f"{run_dir} already finished its {checkpoint.epoch} epochs; pass a larger "
                  "--epochs with --resume to train further")
        return 0
    if recipe.batch_size % procs.world_size:
        raise UsageError(f"--batch-size {recipe.batch_size} is not divisible by the {procs.world_size} "
                         "processes; pick a multiple of the process count")
    if recipe.sync_bn and settings.compile:
        raise UsageError("--sync-bn and --compile do not work together (torch.compile breaks its graph at every "
                         "SyncBatchNorm); drop one of them")
    amp_name, amp_dtype = resolve_amp(settings.amp, procs.device)
    channels_last = settings.channels_last
    run = RunSetup(config, procs, run_dir, amp_name, amp_dtype,
                   procs.device.type == "cuda" if channels_last is None else channels_last)
    load_dataset, spec = DATASETS[config.dataset]
    data = load_data(recipe, load_dataset, settings.data_dir, procs, run.channels_last)
    training = build_training(run, spec.num_classes, len(data.train_batches))
    facts = run_facts(run, spec.num_classes, data, training)
    progress = restore(checkpoint, training, run)
    output = Output(run_dir, {**config.flags(), **facts.to_dict()},
                    make_print_and_log(procs.master, run_dir, progress.log_lines), progress.start_epoch)
    if checkpoint is not None and checkpoint.config.get("amp", amp_name) != amp_name:
        output.notes.append(f"--amp changed from {checkpoint.config.get('amp')} to {amp_name} on resume: "
                            "the loss scaler starts afresh")
    return train_in_folder(run, data, training, progress, output, resolved.checked)


def train_in_folder(run: RunSetup, data: RunData, training: NetworkAndOptimization, progress: RunProgress,
                    output: Output, checked: store.FolderState) -> int:
    """Rank 0 locks the folder (refusing if its files changed since they were checked); then the epochs, the
    end-of-run tests, and one line for what stops them."""
    held_lock = None
    try:
        if run.procs.master:
            # Held until this process ends; taken only now, so that every refusal above wrote nothing.
            held_lock = lock.lock_run_folder(run.folder, run.config.settings.exit_code_if_in_use)
            store.check_unchanged(run.folder, checked)
            store.remove_stale_temp_files(run.folder)
            log_start_and_write_config(run, progress, output)
            if run.config.settings.tensorboard:
                output.epoch_log = tensorboard_events.EpochLog(run.folder, progress.history)
        for epoch in range(progress.start_epoch + 1, run.recipe.epochs + 1):
            run_epoch(run, data, training, progress, output, epoch)
            stopping.stop_if_asked(run.procs, output, epoch, run.recipe.epochs)  # SIGUSR1
        if run.procs.master:
            finish(run, data, training, progress, output)
    except KeyboardInterrupt as stop:  # Ctrl-C, SIGTERM, or SIGUSR1 after an epoch (training/stopping.py)
        if run.procs.master:
            output.wait_returning_error()  # the epoch being saved is saved (or its failure kept nothing new)
            print(stopping.stopped_line(stop, run.folder, output.saved_epochs, run.config.settings.auto_resume),
                  file=sys.stderr)
        return stopping.exit_code_of(stop)
    except store.WriteFailed as err:
        raise RunFailed(f"{err}; {store.what_is_kept(run.folder, output.saved_epochs)}") from None
    finally:
        output.wait_returning_error()
        if output.epoch_log is not None:
            output.epoch_log.close()
        if held_lock is not None:
            held_lock.close()
    if run.procs.ddp:
        torch.distributed.barrier()
    return 0


def run_epoch(run: RunSetup, data: RunData, training: NetworkAndOptimization, progress: RunProgress,
              output: Output, epoch: int) -> None:
    """Train one epoch, validate, and record it. Timed apart: the steps, the validation, and the work
    between the previous epoch's validation and this epoch's first step (saving, mostly)."""
    started = time.perf_counter()
    between = started - progress.validated_at if progress.validated_at is not None else math.nan
    train_totals = train_epoch(run, data, training, progress, epoch)
    synchronize(run.procs.device)
    trained = time.perf_counter()
    if run.procs.ddp:  # every rank validates the network rank 0 saves, with rank 0's BatchNorm statistics
        broadcast_buffers(training.raw_net)
    val_totals, _ = evaluate(training.raw_net, data.val_batches, run.amp_dtype)
    val_totals = all_reduce_sum(val_totals, run.procs.ddp)
    synchronize(run.procs.device)
    progress.validated_at = time.perf_counter()
    validation = EvalResult.from_totals(val_totals)
    loss, hits, count = train_totals.tolist()
    metrics = EpochMetrics(
        epoch=epoch, lr=training.optimization.optimizer.param_groups[0]["lr"], train_loss=loss / count,
        train_acc=hits / count, val_loss=validation.loss, val_acc=validation.acc, val_top5=validation.top5,
        epoch_seconds=progress.validated_at - started, train_seconds=trained - started,
        val_seconds=progress.validated_at - trained, between_seconds=between)
    record_epoch(run, training, progress, output, metrics)


def train_epoch(run: RunSetup, data: RunData, training: NetworkAndOptimization, progress: RunProgress,
                epoch: int) -> torch.Tensor:
    """One pass over the training batches; the summed loss, hits and count over every rank."""
    device, net = run.procs.device, training.net
    batches, steps = data.train_batches, len(data.train_batches)
    net.train()
    batches.set_epoch(epoch)
    sums = EpochSums(device, DIVERGENCE_CHECK_STEPS)
    bar = _progress_bar(run, steps, epoch)
    for step, (inputs, labels) in enumerate(batches, start=1):
        loss, logits = training.optimization.step(training.net_for(inputs), inputs, labels)
        # Summed on the device, in few kernels: reading values back every step would stall the GPU, and
        # launching many small kernels would keep it waiting for the host.
        sums.add(loss, logits, labels)
        if step % DIVERGENCE_CHECK_STEPS == 0 or step == steps:
            check_divergence(run, sums.first_bad_step(), epoch, len(progress.history))
            if bar is not None:
                bar.set_postfix(loss=f"{sums.totals[0].item() / sums.images:.4f}")
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return all_reduce_sum(sums.result(), run.procs.ddp)


def record_epoch(run: RunSetup, training: NetworkAndOptimization, progress: RunProgress, output: Output,
                 metrics: EpochMetrics) -> None:
    """The epoch into the history and, on rank 0, its files written in the background from CPU copies;
    under torchrun every rank stops with rank 0 when its previous save failed."""
    row = metrics.row()
    recorded = EpochMetrics.from_row(row)  # the figures as metrics.csv holds them, which the best is picked on
    progress.history.append(row)
    new_best = recorded.val_acc > progress.best["val_acc"]
    if new_best:
        progress.best = {"epoch": metrics.epoch, "val_acc": recorded.val_acc}
    failure = None
    if run.procs.master:
        try:
            output.save_epoch(training.raw_net, training.optimization, progress, recorded, new_best)
        except store.WriteFailed as err:  # the previous epoch's
            failure = err
    stop_together(run.procs, failure)


def check_divergence(run: RunSetup, first_bad_step: torch.Tensor, epoch: int, saved_epochs: int) -> None:
    flag = first_bad_step.clone().float()
    if run.procs.ddp:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    bad = int(flag.item())
    if bad >= 0:
        raise RunFailed(f"the loss became NaN or infinite at epoch {epoch}, step {bad}; "
                        f"{run.folder / declarations.LAST_CHECKPOINT} keeps the last good epoch ({saved_epochs}); "
                        f"try a lower --lr than {run.recipe.lr} with --overwrite")


def _progress_bar(run: RunSetup, total: int, epoch: int):
    if not (run.procs.master and not run.config.settings.no_progress and sys.stderr.isatty()):
        return None
    from tqdm import tqdm  # only on a terminal: tqdm costs every other run its import
    return tqdm(total=total, desc=f"Epoch {epoch}/{run.recipe.epochs}", leave=False, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------------
# The end of a run: testing the best and the final weights


def finish(run: RunSetup, data: RunData, training: NetworkAndOptimization, progress: RunProgress,
           output: Output) -> None:
    output.wait()  # the last epoch's files, best.pt first among them, and the last drawing of curves.png
    output.print_and_log("Training Finished")
    raw_net = training.raw_net
    test_batches = data.test_batches()
    final = EvalResult.from_totals(evaluate(raw_net, test_batches, run.amp_dtype)[0])
    best_path = run.folder / declarations.BEST_CHECKPOINT
    raw_net.load_state_dict(store.load_checkpoint(best_path)["model"])
    history, best = [EpochMetrics.from_row(row) for row in progress.history], progress.best
    # best.pt's test report, as --eval-only writes it (eval.json, confusion_matrix.png, mistakes.png); before
    # summary.json, which marks the run finished.
    best_test = test_report(raw_net, Weights(run.recipe.model, best_path, best["epoch"]),
                            TestSet(run.config.dataset, test_batches, data.test_images, data.classes,
                                    data.superclasses), run.amp_dtype)
    write_test_report(run.folder, best_test, data.test_images)
    summary = Summary(
        model=run.recipe.model, dataset=run.config.dataset, epochs=len(history), best_epoch=best["epoch"],
        best_val_acc=best["val_acc"], final_train_loss=history[-1].train_loss,
        final_train_acc=history[-1].train_acc, final_val_loss=history[-1].val_loss,
        final_val_acc=history[-1].val_acc, test_acc=best_test.test_acc, test_top5=best_test.test_top5,
        test_loss=best_test.test_loss, final_test_acc=final.acc, final_test_top5=final.top5,
        final_test_loss=final.loss, validation=data.validation, **timings(history))
    store.write_text(run.folder / declarations.SUMMARY_FILE, declarations.json_text(summary))
    try:
        figures.plot_curves(run.folder)  # once more, now that the title can carry the test accuracy
        output.print_and_log(f"Test accuracy: {summary.final_test_acc:.4f} (final weights), "
                             f"{summary.test_acc:.4f} (best.pt, epoch {best['epoch']})")
        output.print_and_log("Model Saved")
    except store.WriteFailed:
        # summary.json marks a finished run; without it, the --resume the error asks for finishes it again
        store.remove_file(run.folder / declarations.SUMMARY_FILE)
        raise
