"""What the host does for each step and each epoch, kept small so that a GPU is not left waiting for it: the loop's
per-step sums in five kernels with the same numbers as before, fused SGD on CUDA, validation in large batches on
CUDA, curves.png drawn in a process of its own, the state copied on the training thread's stream, and log.txt
appended a line at a time. Everything here runs on the CPU; what needs CUDA is faked or, with a GPU, checked too.
"""
import errno
import os
import signal
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_faults import NO_SPACE, fault_args, temp_files
from test_train import assert_one_line_error, read_metrics
from torch.utils._python_dispatch import TorchDispatchMode

import train
from cifar.batches import BatchOptions, EvalBatches
from conftest import without_time
from core.errors import RunFailed
from model import build_model
from reports import figures
from runfolder import declarations, store
from training import optimization, recording
from training.dataset import eval_batch_size
from training.evaluation import evaluate
from training.flags import Recipe, Settings
from training.processes import Processes

pytestmark = pytest.mark.usefixtures("keep_global_torch_settings")
CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------------
# The loop's sums


def per_step_values(steps: int, batch: int, seed: int = 0):
    """Losses whose float32 product with the batch size rounds (so that a product taken in float64 differs), logits
    and labels."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = torch.rand((), generator=generator) * 3
        logits = torch.randn(batch, 10, generator=generator)
        yield loss, logits, torch.randint(0, 10, (batch,), generator=generator)


def test_the_epoch_sums_are_the_numbers_the_loop_always_summed():
    """The loop used to add loss * batch (rounded to float32) and the hits to float64 sums, one step at a time; the
    fewer kernels give the same float64 numbers to the last bit, so CPU runs keep their metrics."""
    sums = optimization.EpochSums(CPU, 4)
    expected = torch.zeros(3, dtype=torch.float64)
    for step, (loss, logits, labels) in enumerate(per_step_values(22, 7), start=1):
        sums.add(loss, logits, labels)
        expected[0] += loss * labels.numel()
        expected[1] += (logits.argmax(1) == labels).sum()
        expected[2] += labels.numel()
        if step % 4 == 0:
            assert sums.first_bad_step().item() == -1
    assert sums.result().tolist() == expected.tolist()
    assert sums.result().dtype == torch.float64


def test_the_divergence_check_names_the_first_step_whose_loss_was_not_finite():
    sums = optimization.EpochSums(CPU, 5)
    values = list(per_step_values(12, 3))
    bad = {8: float("nan"), 9: float("inf"), 11: float("nan")}
    checked = {}
    for step, (loss, logits, labels) in enumerate(values, start=1):
        sums.add(torch.tensor(bad.get(step, loss.item())), logits, labels)
        if step % 5 == 0 or step == len(values):
            checked[step] = sums.first_bad_step().item()
    assert checked == {5: -1, 10: 8, 12: 11}


def test_a_loop_that_skips_its_checks_is_stopped_rather_than_miscounted():
    sums = optimization.EpochSums(CPU, 2)
    steps = per_step_values(3, 2)
    for loss, logits, labels in [next(steps), next(steps)]:
        sums.add(loss, logits, labels)
    with pytest.raises(RuntimeError, match="at least every 2 steps"):
        sums.add(*next(steps))


class OpsAfterSteps(TorchDispatchMode):
    """The ATen ops that launch work (no views) the loop runs after each step, per step."""

    def __init__(self) -> None:
        super().__init__()
        self.step, self.ops = 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops.setdefault(self.step, []).append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


class Batches(list):
    def set_epoch(self, epoch: int) -> None:
        pass


def fake_epoch(steps: int, losses: dict | None = None) -> tuple[OpsAfterSteps, tuple]:
    """A counter and train.train_epoch's arguments for an epoch of `steps` steps of 4 images, whose
    Optimization.step computes nothing: it returns the given losses (1.5 for the others) and fixed logits."""
    counter = OpsAfterSteps()
    generator = torch.Generator().manual_seed(0)
    batches = Batches((torch.zeros(4, 3, 32, 32), torch.randint(0, 10, (4,), generator=generator))
                      for _ in range(steps))
    logits = torch.randn(4, 10, generator=generator)
    step_losses = [torch.tensor((losses or {}).get(step, 1.5)) for step in range(1, steps + 1)]

    def step(net, inputs, labels):
        counter.step += 1
        return step_losses[counter.step - 1], logits

    run = SimpleNamespace(procs=Processes(False, 0, 1, 0, CPU), folder=Path("run"), recipe=Recipe(lr=0.1),
                          config=SimpleNamespace(settings=Settings(no_progress=True)))
    net = torch.nn.Identity()
    training = SimpleNamespace(net=net, optimization=SimpleNamespace(step=step), net_for=lambda inputs: net)
    return counter, (run, SimpleNamespace(train_batches=batches), training, SimpleNamespace(history=[]), 1)


def test_the_loop_adds_each_step_to_its_sums_in_five_kernels():
    """Every op is a kernel launch on a GPU; the sums and the divergence mark took 19 a step before. (Step 4, the
    epoch's last, also checks for divergence.)"""
    counter, arguments = fake_epoch(4)
    with counter:
        totals = train.train_epoch(*arguments)
    assert totals.tolist()[0::2] == [4 * 4 * 1.5, 16.0]
    assert counter.ops[1] == counter.ops[2] == counter.ops[3] == ["aten.mul", "aten.argmax", "aten.eq", "aten.sum",
                                                                  "aten.add_"]


def test_a_diverged_epoch_fails_at_its_check_naming_the_first_bad_step(monkeypatch):
    monkeypatch.setattr(train, "DIVERGENCE_CHECK_STEPS", 5)
    _, arguments = fake_epoch(12, losses={7: float("nan"), 8: float("inf")})
    with pytest.raises(RunFailed, match="at epoch 1, step 7;"):
        train.train_epoch(*arguments)


# ---------------------------------------------------------------------------------------------------
# Fused SGD and the validation batch


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16, torch.float16])
def test_cuda_takes_the_fused_sgd_in_every_precision_the_cpu_only_for_fp16(amp_dtype):
    assert optimization.uses_fused_sgd(torch.device("cuda", 0), amp_dtype)
    assert optimization.uses_fused_sgd(CPU, amp_dtype) is (amp_dtype is torch.float16)
    assert not optimization.uses_fused_sgd(torch.device("mps"), amp_dtype)


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16])
def test_an_optimization_made_for_cuda_is_fused(amp_dtype):
    """make_optimization follows uses_fused_sgd (the CPU's parameters stand in for a GPU's: SGD takes either)."""
    net = build_model("cnn_base", 10)
    made = optimization.make_optimization(net, Recipe(lr=0.05), 10, torch.device("cuda"), amp_dtype)
    assert made.optimizer.defaults["fused"] is True


def test_validation_on_cuda_takes_batches_of_1024_and_the_cpu_keeps_its_own():
    assert eval_batch_size(128, torch.device("cuda", 0)) == 1024
    assert eval_batch_size(2048, torch.device("cuda", 0)) == 2048
    assert eval_batch_size(128, CPU) == 256
    assert eval_batch_size(512, CPU) == 512


def test_the_validation_figures_do_not_depend_on_the_batch_size():
    """Counts exactly; the loss, summed in float32 per batch, within float tolerance."""
    torch.manual_seed(0)
    net = build_model("cnn_base", 10).eval()
    images, labels = torch.randint(0, 256, (1100, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (1100,))
    options = BatchOptions((0.5,) * 3, (0.25,) * 3)
    small, _ = evaluate(net, EvalBatches(images, labels, 256, options), None)
    large, _ = evaluate(net, EvalBatches(images, labels, 1024, options), None)
    assert large[1:].tolist() == small[1:].tolist()
    assert large[0].item() == pytest.approx(small[0].item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------------
# curves.png, drawn in a process of its own


def has_ended(pid: int) -> bool:
    """Whether the process has ended and been waited for (a zombie still shows in /proc)."""
    return not Path(f"/proc/{pid}").exists()


def run_folder_with_metrics(folder: Path) -> Path:
    folder.mkdir(parents=True)
    row = declarations.EpochMetrics(epoch=1, lr=0.1, train_loss=2.0, train_acc=0.2, val_loss=1.9, val_acc=0.25,
                                 val_top5=0.7, epoch_seconds=1.0, train_seconds=0.8, val_seconds=0.2,
                                 between_seconds=float("nan")).row()
    store.write_metrics(folder / declarations.METRICS_FILE, [row])
    return folder


def test_the_drawer_draws_in_another_process_one_drawing_at_a_time(tmp_path, monkeypatch):
    def not_here(*args):
        raise AssertionError("curves.png drawn in the training process")
    monkeypatch.setattr(figures, "plot_curves", not_here)
    folder = run_folder_with_metrics(tmp_path / "run")
    drawer = recording.CurvesDrawer()
    assert drawer.draw(folder)
    pid = drawer._process.pid
    assert not drawer.draw(folder)  # the first is still under way: the process is starting
    assert drawer.close() is None
    assert (folder / declarations.CURVES_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert temp_files(folder) == []
    assert has_ended(pid)


def test_a_failed_drawing_is_handed_over_once_as_the_write_that_failed(tmp_path):
    folder = run_folder_with_metrics(tmp_path / "run")
    (folder / declarations.CURVES_FILE).mkdir()  # renaming the drawing over it fails
    drawer = recording.CurvesDrawer()
    drawer.draw(folder)
    failure = drawer.close()
    assert isinstance(failure, store.WriteFailed)
    assert str(failure) == f"cannot write {folder / declarations.CURVES_FILE} ({os.strerror(errno.EISDIR)})"
    assert drawer.failure() is None
    assert temp_files(folder) == []


def failed_drawing(tmp_path: Path) -> recording.Output:
    """An Output whose drawer has been asked to draw what it cannot write."""
    folder = run_folder_with_metrics(tmp_path / "run")
    (folder / declarations.CURVES_FILE).mkdir()
    output = recording.Output(folder, {}, print, 0)
    assert output.drawer.draw(folder)
    return output


def test_a_drawing_process_that_dies_before_answering_is_a_failed_drawing(tmp_path):
    folder = run_folder_with_metrics(tmp_path / "run")
    drawer = recording.CurvesDrawer()
    drawer.draw(folder)
    os.kill(drawer._process.pid, signal.SIGKILL)  # before it has imported matplotlib, let alone answered
    failure = drawer.close()
    assert isinstance(failure, store.WriteFailed)
    assert str(failure) == f"cannot write {folder / declarations.CURVES_FILE} (the drawing process ended with exit " \
                           f"code {-signal.SIGKILL})"


def test_the_next_save_hands_over_a_failed_drawing_before_it_writes_anything(tmp_path):
    output = failed_drawing(tmp_path)
    while output.drawer.busy():
        pass
    with pytest.raises(store.WriteFailed, match="curves.png"):
        output.save_epoch(None, None, None, None, False)  # raised before save_epoch looks at the epoch
    assert output.wait_returning_error() is None  # handed over once


def test_the_end_of_a_run_waits_for_the_drawing_under_way_and_reports_its_failure(tmp_path):
    output = failed_drawing(tmp_path)
    pid = output.drawer._process.pid
    with pytest.raises(store.WriteFailed, match="curves.png"):
        output.wait()
    assert has_ended(pid)
    output = failed_drawing(tmp_path / "again")
    assert isinstance(output.wait_returning_error(), store.WriteFailed)


def test_a_run_draws_its_curves_in_the_training_process_only_at_the_end(cifar10_dir, tmp_path, monkeypatch):
    """Drawn after every epoch here, always in the drawing process, which has ended when the run returns."""
    monkeypatch.setattr(recording, "CURVES_EVERY_SECONDS", 0.0)
    drawn_here, real_plot_curves = [], figures.plot_curves
    monkeypatch.setattr(figures, "plot_curves", lambda folder: drawn_here.append(folder) or real_plot_curves(folder))
    drawn_there, real_draw = [], recording.CurvesDrawer.draw

    def draw(self, folder):
        started = real_draw(self, folder)
        if started:
            drawn_there.append((folder, self._process.pid))
        return started
    monkeypatch.setattr(recording.CurvesDrawer, "draw", draw)
    assert train.main("cifar10", fault_args(cifar10_dir, tmp_path, "--epochs", "3")) == 0
    run_dir = tmp_path / "cifar10" / "cnn_base"
    assert drawn_here == [run_dir]  # finish(): the title with the test accuracy
    assert drawn_there and {folder for folder, _ in drawn_there} == {run_dir}
    assert all(has_ended(pid) for _, pid in drawn_there)
    assert (run_dir / declarations.CURVES_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_shorter_than_the_drawing_interval_starts_no_drawing_process(cifar10_dir, tmp_path, monkeypatch):
    """Its end draws curves.png; a process that imports reports/figures.py's libraries for nothing would cost a tiny run
    (and the test suite, made of them) seconds."""
    monkeypatch.setattr(recording, "CURVES_EVERY_SECONDS", 3600.0)
    drawn_there = []
    monkeypatch.setattr(recording.CurvesDrawer, "draw", lambda self, folder: drawn_there.append(folder))
    assert train.main("cifar10", fault_args(cifar10_dir, tmp_path)) == 0
    assert drawn_there == []
    assert (tmp_path / "cifar10" / "cnn_base" / declarations.CURVES_FILE).exists()


def test_a_drawing_that_fails_while_the_run_trains_stops_it_in_one_line_and_resume_finishes(
        cifar10_dir, tmp_path, monkeypatch, capsys):
    """A drawing fails in the drawing process (no room for curves.png: here a folder in its place); the run stops
    at its next save or at the end, saying what last.pt holds, and goes on once the way is clear."""
    monkeypatch.setattr(recording, "CURVES_EVERY_SECONDS", 0.0)
    run_dir = tmp_path / "cifar10" / "cnn_base"
    run_dir.mkdir(parents=True)
    (run_dir / declarations.CURVES_FILE).mkdir()
    capsys.readouterr()
    assert train.main("cifar10", fault_args(cifar10_dir, tmp_path)) == 1
    err = capsys.readouterr().err
    assert_one_line_error(err, f"error: cannot write {run_dir / declarations.CURVES_FILE} "
                               f"({os.strerror(errno.EISDIR)}); last.pt holds epoch ")
    assert not (run_dir / declarations.SUMMARY_FILE).exists() and temp_files(run_dir) == []
    (run_dir / declarations.CURVES_FILE).rmdir()
    assert train.main("cifar10", [*fault_args(cifar10_dir, tmp_path), "--resume"]) == 0
    assert (run_dir / declarations.SUMMARY_FILE).exists()
    assert len(without_time(read_metrics(run_dir))) == 2


# ---------------------------------------------------------------------------------------------------
# The writer thread copies on the training thread's stream


def test_the_writer_thread_copies_the_state_on_the_training_threads_stream(cifar10_dir, tmp_path, monkeypatch):
    """On CPU a stand-in stream: what save_epoch takes on the training thread is what the writer thread copies
    the parameters and momenta under."""
    entered = threading.local()
    copies = []

    def trainer_stream(device):
        return ("stream of", threading.current_thread().name)

    class OnStream:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            entered.stream = self.stream

        def __exit__(self, *exc):
            entered.stream = None

    real_cpu_copy = recording.cpu_copy

    def cpu_copy(state, reuse=None):
        if threading.current_thread().name == "run-writer":
            copies.append(getattr(entered, "stream", None))
        return real_cpu_copy(state, reuse)

    monkeypatch.setattr(recording, "trainer_stream", trainer_stream)
    monkeypatch.setattr(recording, "on_stream", OnStream)
    monkeypatch.setattr(recording, "cpu_copy", cpu_copy)
    assert train.main("cifar10", fault_args(cifar10_dir, tmp_path)) == 0
    assert copies and set(copies) == {("stream of", threading.main_thread().name)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_stream_puts_another_threads_work_on_the_given_stream():
    stream, seen = torch.cuda.Stream(), []

    def writer():
        with recording.on_stream(stream):
            seen.append(torch.cuda.current_stream())
        seen.append(torch.cuda.current_stream())

    thread = threading.Thread(target=writer)
    thread.start()
    thread.join()
    assert seen == [stream, torch.cuda.default_stream()]


# ---------------------------------------------------------------------------------------------------
# log.txt


def test_log_txt_is_written_whole_once_then_appended_a_line_at_a_time(tmp_path, monkeypatch):
    """A resume's lines (completed from last.pt) and the first new one in one atomic write; each line after it
    appended to the same file, not the whole log rewritten."""
    whole_writes, real_write_text = [], store.write_text

    def write_text(path, text):
        whole_writes.append(path)
        real_write_text(path, text)
    monkeypatch.setattr(store, "write_text", write_text)
    print_and_log = recording.make_print_and_log(True, tmp_path, ["old 1", "old 2"])
    log = tmp_path / declarations.LOG_FILE
    assert not log.exists()  # nothing before the first line: a refused run writes nothing
    print_and_log("a")
    inode = log.stat().st_ino
    print_and_log("b")
    print_and_log("c")
    assert log.read_text() == "old 1\nold 2\na\nb\nc\n"
    assert log.stat().st_ino == inode and whole_writes == [log]
    log.unlink()  # by hand, say: the next line puts every line back
    print_and_log("d")
    assert log.read_text() == "old 1\nold 2\na\nb\nc\nd\n"


def test_an_append_that_fails_leaves_log_txt_whole_and_the_next_line_writes_it_all(tmp_path, monkeypatch):
    print_and_log = recording.make_print_and_log(True, tmp_path, [])
    log = tmp_path / declarations.LOG_FILE
    print_and_log("first")
    real_write = os.write

    def write_then_fill(handle, data):  # a few bytes fit, then the disk is full
        if len(data) > 3:
            return real_write(handle, bytes(data[:3]))
        raise OSError(errno.ENOSPC, NO_SPACE)

    with monkeypatch.context() as patch:
        patch.setattr(store.os, "write", write_then_fill)
        with pytest.raises(store.WriteFailed) as failed:
            print_and_log("second line")
    assert str(failed.value) == f"cannot write {log} ({NO_SPACE})"
    assert log.read_text() == "first\n"
    print_and_log("third")
    assert log.read_text() == "first\nsecond line\nthird\n"
