"""Figures and tables made from run folders: the files train.py writes are the only input.

    python plot.py results/cifar10/cnn_resnet18   # redraw one run's curves.png
    python plot.py results/cifar10                # summary.md, summary.csv, the figures, index.html
    python plot.py results                        # the same for every dataset folder
    python plot.py results --baseline cnn_resnet18  # comparisons of models: each against cnn_resnet18 only

Also writes the HTML pages of a dataset folder and of the results root (reports/pages.py). This is the command
alone: the figures are reports/figures.py's (accuracy against cost reports/cost.py's, the classes'
reports/classes.py's), the files of a dataset folder and of the results root reports/folders.py's, and run folders
are read through runfolder/, the package that writes them.
It runs without torch: nothing here draws from a checkpoint (confusion_matrix.png and mistakes.png are the test
report's, of the end of a run or --eval-only, which run the network; plot.py leaves them as they are), and the model
registry it hands the reports (the names and families that order and colour the runs) is a table that imports no
torch.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.errors import RunFailed, quiet_closed_pipes, run_command
from model import MODEL_FAMILIES
from reports.figures import plot_curves
from reports.folders import PlotError, has_runs, summarize_dataset, summarize_results
from runfolder import store
from runfolder.declarations import METRICS_FILE, SUMMARY_MD_FILE


def main(argv: list[str] | None = None) -> int:
    quiet_closed_pipes()  # before --help prints
    parser = argparse.ArgumentParser(description="Redraw a run's curves, or summarize and compare "
                                                 "the runs of a dataset folder or a results root.")
    parser.add_argument("path", type=Path,
                        help="a run folder (results/cifar10/cnn_resnet18), a dataset folder "
                             "(results/cifar10) or the results root (results)")
    parser.add_argument("--baseline", metavar="MODEL",
                        help="compare each model's test accuracy with this model's only (default: every pair of "
                             "models with two seeds or more each)")
    args = parser.parse_args(argv)
    return run_command(lambda: plot_path(args.path, args.baseline))


def plot_path(path: Path, baseline: str | None = None) -> int:
    """What `python plot.py PATH [--baseline MODEL]` does for a run folder, a dataset folder or the results root."""
    if not path.is_dir():
        raise PlotError(f"{path}: no such folder; give a run folder, a dataset folder or the results root")
    if baseline is not None and baseline not in MODEL_FAMILIES:
        raise PlotError(f"--baseline {baseline}: no such model; python main_cifar10.py --list-models names them")
    try:
        if (path / METRICS_FILE).is_file():
            print(plot_curves(path))
        elif has_runs(path):
            summarize_dataset(path, MODEL_FAMILIES, baseline=baseline)
            print(path / SUMMARY_MD_FILE)
        else:
            print(summarize_results(path, MODEL_FAMILIES, baseline))
    except store.WriteFailed as err:
        raise RunFailed(f"{err}; the files written before are complete; free space and run it again") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
