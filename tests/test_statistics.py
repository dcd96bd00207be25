"""reports/statistics.py: the seed statistics of the summary (a 95% interval of a row's mean test accuracy, the
difference between two models with its interval), checked against textbook values and the formulas written out."""
import math

import numpy as np
import pytest
from scipy import stats
from test_plot import read_summary_csv
from test_report import make_run

import plot
from reports import statistics


def test_the_mean_interval_is_students_t_with_n_minus_1_degrees_of_freedom():
    values = [70.0, 72.0, 71.0, 73.0, 74.0]  # mean 72, s = sqrt(2.5)
    low, high = statistics.mean_interval(values)
    half = 2.776 * math.sqrt(2.5) / math.sqrt(5)  # t_{0.975, 4} = 2.776 (every t table)
    assert low == pytest.approx(72 - half, abs=1e-3) and high == pytest.approx(72 + half, abs=1e-3)
    assert statistics.mean_interval([70.0, 72.0]) == pytest.approx((72 - 71) * np.array([-12.706, 12.706]) + 71,
                                                                   abs=1e-3)  # t_{0.975, 1} = 12.706
    assert statistics.mean_interval([70.0]) is None and statistics.mean_interval([]) is None


def test_a_paired_difference_is_the_mean_interval_of_the_differences_by_seed():
    first, second = [72.0, 73.5, 71.0], [71.0, 72.0, 71.5]
    differences = [1.0, 1.5, -0.5]
    mean = sum(differences) / 3
    s = math.sqrt(sum((d - mean) ** 2 for d in differences) / 2)
    half = 4.303 * s / math.sqrt(3)  # t_{0.975, 2} = 4.303
    difference, low, high, df = statistics.paired_difference(first, second)
    assert (difference, df) == (pytest.approx(mean), 2)
    assert (low, high) == (pytest.approx(mean - half, abs=1e-3), pytest.approx(mean + half, abs=1e-3))
    scipy_interval = stats.ttest_rel(first, second).confidence_interval(0.95)
    assert (low, high) == pytest.approx((scipy_interval.low, scipy_interval.high))


def test_a_welch_difference_uses_the_welch_satterthwaite_degrees_of_freedom():
    first, second = [1.0, 2.0, 3.0], [2.0, 4.0, 6.0]  # variances 1 and 4: df = (5/3)^2 / ((1/3)^2/2 + (4/3)^2/2)
    difference, low, high, df = statistics.welch_difference(first, second)
    assert df == pytest.approx(50 / 17) and difference == pytest.approx(-2.0)
    half = stats.t.ppf(0.975, 50 / 17) * math.sqrt(1 / 3 + 4 / 3)
    assert (low, high) == pytest.approx((-2 - half, -2 + half))
    scipy_interval = stats.ttest_ind(first, second, equal_var=False).confidence_interval(0.95)
    assert (low, high) == pytest.approx((scipy_interval.low, scipy_interval.high))
    # Equal variances and sizes: Welch's degrees of freedom are the pooled test's, 2(n - 1), here with t = 2.776.
    difference, low, high, df = statistics.welch_difference([1.0, 2.0, 3.0], [3.0, 4.0, 5.0])
    assert df == pytest.approx(4) and high == pytest.approx(-2 + 2.776 * math.sqrt(2 / 3), abs=1e-3)


def test_the_sentence_says_whether_the_interval_contains_zero():
    within = statistics.Difference("cnn_se_resnet18", "cnn_resnet18", 0.42, -0.31, 1.15, "paired by seed", 2)
    assert within.sentence() == ("cnn_se_resnet18 - cnn_resnet18: +0.42 points, 95% CI -0.31 to +1.15: "
                                 "within seed noise")
    larger = statistics.Difference("a", "b", -1.5, -2.25, -0.75, "Welch", 3.2)
    assert larger.sentence() == "a - b: -1.50 points, 95% CI -2.25 to -0.75: larger than seed noise"
    assert larger.test_text() == "Welch, df 3.2"


def three_seeds(dataset_dir, model, seeds=(0, 1, 2)):
    for seed in seeds:
        make_run(dataset_dir, model, f"s{seed}", seed=seed)


def test_plot_py_gives_two_models_of_three_seeds_intervals_and_a_comparison(tmp_path, capsys):
    """Two models x three seeds: CI columns in summary.csv, the CI beside mean +- std, and one comparison paired by
    seed in summary.md and on the page; a model of one seed gets neither, and says so in a footnote."""
    dataset_dir = tmp_path / "cifar10"
    three_seeds(dataset_dir, "cnn_base")
    three_seeds(dataset_dir, "cnn_resnet18")
    make_run(dataset_dir, "cnn_vgg11", None)
    summary_file = dataset_dir / "cnn_resnet18-s1" / "summary.json"
    summary_file.write_text(summary_file.read_text().replace('"final_test_acc": 0.5', '"final_test_acc": 0.52'))
    assert plot.main([str(dataset_dir)]) == 0
    rows = {row["model"]: row for row in read_summary_csv(dataset_dir)}
    # make_run's final test accuracies by seed: 0.49, 0.50, 0.51 (mean 0.50, s = 0.01); t_{0.975, 2} = 4.303.
    half = 4.303 * 0.01 / math.sqrt(3)
    assert float(rows["cnn_base"]["final_test_acc_ci95_low"]) == pytest.approx(0.5 - half, abs=1e-5)
    assert float(rows["cnn_base"]["final_test_acc_ci95_high"]) == pytest.approx(0.5 + half, abs=1e-5)
    # cnn_resnet18: 0.49, 0.52, 0.51 (mean 0.50667, s = 0.01528).
    resnet_half = 4.303 * float(np.std([0.49, 0.52, 0.51], ddof=1)) / math.sqrt(3)
    assert float(rows["cnn_resnet18"]["final_test_acc_ci95_high"]) == pytest.approx(0.50667 + resnet_half, abs=1e-4)
    assert rows["cnn_vgg11"]["final_test_acc_ci95_low"] == rows["cnn_vgg11"]["final_test_acc_ci95_high"] == ""
    markdown = (dataset_dir / "summary.md").read_text()
    assert "50.00 \u00b1 1.00% (CI 47.52\u201352.48)" in markdown
    # Paired by seed: differences 0, 2, 0 points (mean 2/3, s = sqrt(4/3)), so 2/3 -/+ 4.303 * sqrt(4/3) / sqrt(3).
    paired_half = 4.303 * math.sqrt(4 / 3) / math.sqrt(3)
    sentence = (f"cnn_resnet18 - cnn_base: +0.67 points, 95% CI {2 / 3 - paired_half:+.2f} to "
                f"{2 / 3 + paired_half:+.2f}: within seed noise")
    assert sentence == "cnn_resnet18 - cnn_base: +0.67 points, 95% CI -2.20 to +3.54: within seed noise"
    assert f"| {sentence} | paired by seed, df 2 |" in markdown
    assert "a row of one run has none and takes part in no comparison" in markdown
    assert "cnn_vgg11 -" not in markdown and "- cnn_vgg11" not in markdown
    page = (dataset_dir / "index.html").read_text()
    assert f"<tr><td>{sentence}</td><td>paired by seed, df 2</td></tr>" in page
    assert '<h2>Comparisons</h2>\n<div class="scroll"><table id="comparisons">' in page


def test_other_seeds_are_compared_by_welch_and_baseline_limits_the_pairs(tmp_path, capsys):
    dataset_dir = tmp_path / "cifar10"
    three_seeds(dataset_dir, "cnn_base")
    three_seeds(dataset_dir, "cnn_resnet18", seeds=(3, 4, 5))
    three_seeds(dataset_dir, "cnn_vgg11", seeds=(0, 1, 2))
    assert plot.main([str(dataset_dir)]) == 0
    markdown = (dataset_dir / "summary.md").read_text()
    # cnn_resnet18's final accuracies 0.52, 0.53, 0.54 against 0.49, 0.50, 0.51: +3 points, equal variances, df 4.
    half = 2.776 * math.sqrt(2 * 1 / 3)
    assert (f"cnn_resnet18 - cnn_base: +3.00 points, 95% CI +{3 - half:.2f} to +{3 + half:.2f}: larger than seed "
            "noise | Welch, df 4 |") in markdown
    assert markdown.count(" points, 95% CI ") == 3  # every pair of the three models
    assert plot.main([str(dataset_dir), "--baseline", "cnn_vgg11"]) == 0
    markdown = (dataset_dir / "summary.md").read_text()
    assert "| cnn_base - cnn_vgg11:" in markdown and "| cnn_resnet18 - cnn_vgg11:" in markdown
    assert "cnn_resnet18 - cnn_base" not in markdown and "against `--baseline cnn_vgg11`" in markdown


def test_an_unknown_baseline_is_one_line_and_exit_2(tmp_path, capsys):
    dataset_dir = tmp_path / "cifar10"
    three_seeds(dataset_dir, "cnn_base")
    capsys.readouterr()
    assert plot.main([str(dataset_dir), "--baseline", "cnn_nope"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().count("\n") == 0 and "cnn_nope" in captured.err and captured.out == ""
    # A known model without two runs here: the section says no pair qualifies.
    assert plot.main([str(dataset_dir), "--baseline", "cnn_vgg11"]) == 0
    assert ("No two models have two finished runs or more each of one recipe and epoch count, with "
            "`--baseline cnn_vgg11` one of them.") in (dataset_dir / "summary.md").read_text()


def test_rows_of_one_seed_show_what_they_showed(tmp_path, capsys):
    dataset_dir = tmp_path / "cifar10"
    make_run(dataset_dir, "cnn_base", None)
    make_run(dataset_dir, "cnn_resnet18", None)
    assert plot.main([str(dataset_dir)]) == 0
    markdown = (dataset_dir / "summary.md").read_text()
    assert "(CI " not in markdown and "CI:" not in markdown and "Comparisons" not in markdown
    assert "Comparisons" not in (dataset_dir / "index.html").read_text()


def test_a_crafted_model_name_in_a_comparison_shows_as_text(tmp_path, capsys):
    dataset_dir = tmp_path / "cifar10"
    three_seeds(dataset_dir, "cnn_base")
    three_seeds(dataset_dir, "<i class=x>")  # config.json names the model; the registry does not know it
    assert plot.main([str(dataset_dir)]) == 0
    page = (dataset_dir / "index.html").read_text()
    assert "<i " not in page and "&lt;i class=x&gt; - cnn_base: +0.00 points" in page
