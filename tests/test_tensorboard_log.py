"""runfolder/tensorboard_events.py: a resumed run continues the same TensorBoard curves, each epoch once."""
import sys

import pytest

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from runfolder import tensorboard_events  # noqa: E402
from runfolder.tensorboard_events import SCALAR_TAGS, EpochLog  # noqa: E402


def metrics_row(epoch: int) -> dict:
    """A row as train.py puts it in metrics.csv: values as strings."""
    return {"epoch": epoch, "lr": f"{0.1 / epoch:.6g}", "train_loss": f"{2.0 / epoch:.6f}",
            "train_acc": f"{0.1 * epoch:.6f}", "val_loss": f"{2.5 / epoch:.6f}",
            "val_acc": f"{0.09 * epoch:.6f}", "val_top5": f"{0.3 + 0.1 * epoch:.6f}",
            "epoch_seconds": f"{10 + epoch:.3f}", "train_seconds": f"{9 + epoch:.3f}",
            "val_seconds": "1.000", "between_seconds": f"{0.01 * epoch:.3f}"}


def read_events(run_dir) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def assert_epochs(run_dir, epochs: int) -> None:
    """Every tag has steps 1..epochs exactly once, each with the value of its metrics row."""
    events = read_events(run_dir)
    assert set(events) == set(SCALAR_TAGS.values())
    for column, tag in SCALAR_TAGS.items():
        steps = sorted(events[tag])
        assert [step for step, _ in steps] == list(range(1, epochs + 1)), tag
        for step, value in steps:
            assert value == pytest.approx(float(metrics_row(step)[column]), rel=1e-6), tag


def train(run_dir, history: list[dict], epochs: int, write_events_of_last: bool = True) -> None:
    """What train.py does: open with the saved history, append each new epoch's row."""
    log = EpochLog(run_dir, history)
    for epoch in range(len(history) + 1, epochs + 1):
        history.append(metrics_row(epoch))
        if epoch < epochs or write_events_of_last:
            log.write(history[-1])
    log.close()


@pytest.mark.parametrize("events_of_epoch_3", [True, False])
def test_resume_continues_the_curves_without_repeats_or_gaps(tmp_path, events_of_epoch_3):
    # A run killed after epoch 3: last.pt may hold 2 epochs while the events hold 3 (killed after
    # the events, before last.pt), or hold 3 while the events hold 2 (killed before the events).
    history: list[dict] = []
    train(tmp_path, history, 3, write_events_of_last=events_of_epoch_3)
    saved = history[:2] if events_of_epoch_3 else history
    train(tmp_path, list(saved), 5)
    assert_epochs(tmp_path, 5)
    train(tmp_path, [metrics_row(epoch) for epoch in range(1, 6)], 6)  # --epochs raised later
    assert_epochs(tmp_path, 6)
    assert not any(path.name.startswith(".tensorboard") for path in tmp_path.iterdir())


def test_starting_over_clears_the_old_events(tmp_path):
    train(tmp_path, [], 3)
    train(tmp_path, [], 2)  # --overwrite: an empty history
    assert_epochs(tmp_path, 2)


def test_missing_tensorboard_is_one_line_saying_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # makes `import tensorboard` fail
    with pytest.raises(tensorboard_events.TensorBoardMissing) as error:
        tensorboard_events.require_tensorboard()
    assert "pip install tensorboard" in str(error.value) and "\n" not in str(error.value)


def test_training_with_tensorboard_then_resuming_gives_each_epoch_once(cifar10_dir, tmp_path):
    import csv

    import train as training_loop
    args = ["--epochs", "2", "--subset", "256", "--batch-size", "64", "--tensorboard", "--no-progress",
            "--data-dir", str(cifar10_dir), "--results-dir", str(tmp_path)]
    assert training_loop.main("cifar10", args) == 0
    assert training_loop.main("cifar10", args[2:] + ["--epochs", "3", "--resume"]) == 0
    run_dir = tmp_path / "cifar10" / "cnn_base"
    with open(run_dir / "metrics.csv", newline="") as metrics_file:
        rows = list(csv.DictReader(metrics_file))
    events = read_events(run_dir)
    for column, tag in SCALAR_TAGS.items():
        # every epoch once; a value not measured ("nan": the wait before a process's first epoch) is left out
        measured = [(int(row["epoch"]), float(row[column])) for row in rows if row[column] != "nan"]
        assert [step for step, _ in events[tag]] == [step for step, _ in measured], tag
        assert [value for _, value in events[tag]] == pytest.approx([value for _, value in measured], rel=1e-6), tag
    assert [step for step, _ in events[SCALAR_TAGS["val_acc"]]] == [1, 2, 3]


def test_tensorboard_flag_without_the_package_is_one_line_exit_2(cifar10_dir, tmp_path, capsys,
                                                                 monkeypatch):
    import train as training_loop
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what an absent package looks like
    assert training_loop.main("cifar10", ["--tensorboard", "--data-dir", str(cifar10_dir),
                                          "--results-dir", str(tmp_path / "results")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "pip install tensorboard" in error
    assert not (tmp_path / "results").exists()
