"""Seed statistics of the summary: a 95% confidence interval of a row's mean test accuracy (Student's t), and the
difference in test accuracy between two rows with its 95% interval, paired by seed where both rows ran the same
seeds (the same seed gives the same split and batch order) and Welch's otherwise.

The test accuracy is the final weights' (summary.json's final_test_acc). The t quantiles, and Welch's degrees of
freedom through them, come from scipy.stats rather than a hand-written table.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np
from scipy import stats

LEVEL = 0.95
# The field the statistics are about: the final weights' test accuracy of each run of a row.
FIELD = "final_test_acc"
# A difference, its interval's low and high ends, and its degrees of freedom.
Interval = tuple[float, float, float, float]


def mean_interval(values: list[float], level: float = LEVEL) -> tuple[float, float] | None:
    """The confidence interval of the mean of values, mean -/+ t_{(1+level)/2, n-1} * s / sqrt(n); None under two
    values."""
    if len(values) < 2:
        return None
    mean, standard_error = _mean_and_standard_error(values)
    return _interval(mean, standard_error, len(values) - 1, level)


def _mean_and_standard_error(values) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) / np.sqrt(len(values))


@dataclass(frozen=True)
class Difference:
    """first's mean minus second's, in accuracy points (percent), with its confidence interval and how it was
    computed ("paired by seed" or "Welch") with its degrees of freedom."""

    first: str
    second: str
    difference: float
    low: float
    high: float
    method: str
    df: float

    def within_noise(self) -> bool:
        return self.low <= 0 <= self.high

    def sentence(self) -> str:
        verdict = "within seed noise" if self.within_noise() else "larger than seed noise"
        return (f"{self.first} - {self.second}: {self.difference:+.2f} points, {LEVEL:.0%} CI {self.low:+.2f} to "
                f"{self.high:+.2f}: {verdict}")

    def test_text(self) -> str:
        return f"{self.method}, df {self.df:.3g}"


def _interval(difference: float, standard_error: float, df: float, level: float) -> tuple[float, float]:
    if standard_error == 0:  # every run gave the same figure: no spread to widen the interval by
        return difference, difference
    half = float(stats.t.ppf((1 + level) / 2, df)) * standard_error
    return difference - half, difference + half


def paired_difference(first: list[float], second: list[float], level: float = LEVEL) -> Interval:
    """(mean difference, low, high, df) of first[i] - second[i], runs of the same seed side by side."""
    differences = np.asarray(first, dtype=float) - np.asarray(second, dtype=float)
    mean, standard_error = _mean_and_standard_error(differences)
    df = len(differences) - 1
    return (mean, *_interval(mean, standard_error, df, level), float(df))


def welch_difference(first: list[float], second: list[float], level: float = LEVEL) -> Interval:
    """(difference of means, low, high, df): Welch's interval, the Welch-Satterthwaite degrees of freedom."""
    var1, var2 = np.var(first, ddof=1) / len(first), np.var(second, ddof=1) / len(second)
    mean = float(np.mean(first) - np.mean(second))
    if var1 + var2 == 0:
        return mean, mean, mean, float(len(first) + len(second) - 2)
    df = float((var1 + var2) ** 2 / (var1 ** 2 / (len(first) - 1) + var2 ** 2 / (len(second) - 1)))
    return (mean, *_interval(mean, float(np.sqrt(var1 + var2)), df, level), df)


def _by_seed(row: dict) -> dict[int, float] | None:
    """The row's test accuracies by seed, or None when a seed is unknown or repeated (then they cannot pair)."""
    runs = [run for run in row["members"] if run[FIELD] is not None]
    seeds = [run.get("seed") for run in runs]
    if None in seeds or len(set(seeds)) != len(seeds):
        return None
    return {seed: run[FIELD] for seed, run in zip(seeds, runs)}


def compare(first: dict, second: dict, first_label: str, second_label: str) -> Difference:
    """Two summary rows' difference in test accuracy, in points: paired when they ran the same seeds."""
    first_seeds, second_seeds = _by_seed(first), _by_seed(second)
    if first_seeds is not None and first_seeds.keys() == (second_seeds or {}).keys():
        seeds = sorted(first_seeds)
        values = ([100 * first_seeds[seed] for seed in seeds], [100 * second_seeds[seed] for seed in seeds])
        method, result = "paired by seed", paired_difference(*values)
    else:
        values = tuple([100 * run[FIELD] for run in row["members"] if run[FIELD] is not None]
                       for row in (first, second))
        method, result = "Welch", welch_difference(*values)
    difference, low, high, df = result
    return Difference(first_label, second_label, difference, low, high, method, df)


def has_seeds(row: dict) -> bool:
    """Whether a row has the two finished runs or more that an interval needs."""
    return row["finished"] and sum(run[FIELD] is not None for run in row["members"]) >= 2


def comparisons(rows: list[dict], label, baseline: str | None = None) -> list[Difference]:
    """Every pair of rows of two models with two seeds or more each, of the same recipe and epoch count (the later
    row minus the earlier, in the table's order); with baseline, each such row against the baseline model's.
    label: a row's name in the sentence (summary.run_label)."""
    rows = [row for row in rows if has_seeds(row)]
    pairs = []
    for earlier, later in combinations(rows, 2):
        if earlier["model"] == later["model"] or (earlier["recipe"], earlier["epochs"]) != (later["recipe"],
                                                                                             later["epochs"]):
            continue
        if baseline is not None and baseline not in (earlier["model"], later["model"]):
            continue
        first, second = (earlier, later) if later["model"] == baseline else (later, earlier)
        pairs.append(compare(first, second, label(first), label(second)))
    return pairs
