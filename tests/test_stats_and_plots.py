"""evaluation/stats.py's intervals, checked by hand, against a published example and at their edges; the plots of
evaluation/plots.py and of the objectives benchmark, checked through matplotlib's objects before they are saved."""

import math

import pytest
from PIL import Image

from evaluation.plots import PASS_COLOR, axes_texts, image_grid, new_figure, running_mean, save, smoothed_panel
from evaluation.stats import mean_interval, paired_difference, wilson_interval, win_rate


def test_wilson_interval_by_hand_and_at_the_edges():
    low, high = wilson_interval(5, 10)
    assert (low + high) / 2 == pytest.approx(0.5) and high - low == pytest.approx(2 * 0.2634, abs=1e-3)
    assert wilson_interval(0, 20)[0] == 0.0 and 0 < wilson_interval(0, 20)[1] < 0.2
    assert wilson_interval(20, 20)[1] == 1.0


def test_mean_interval_is_clipped_to_the_scores_range():
    values = [1.0] * 9 + [0.5]  # a mean of 0.95 whose normal interval reaches above 1
    mean, low, high = mean_interval(values)
    assert high > 1.0
    assert mean_interval(values, bounds=(0.0, 1.0)) == (pytest.approx(mean), pytest.approx(low), 1.0)
    mean, low, high = mean_interval([1.0, 2.0, 3.0])  # unbounded: the normal interval as it is
    assert mean == 2.0 and high - mean == pytest.approx(1.96 / math.sqrt(3)) and mean - low == high - mean
    # one value says nothing of the spread: the whole range, not a point
    assert mean_interval([0.7], bounds=(0.0, 1.0)) == (0.7, 0.0, 1.0)
    assert mean_interval([0.7]) == (0.7, -math.inf, math.inf)


def test_win_rate_counts_ties_as_half_and_pairs_by_position():
    r = win_rate([1.0, 0.5, 0.2, 0.9], [0.5, 0.5, 0.3, 0.1])
    assert r["win_rate"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert (r["wins"], r["ties"], r["n"]) == (2, 1, 4)
    assert (r["low"], r["high"]) == wilson_interval(2.5, 4)  # Wilson's interval of the tie-corrected count
    with pytest.raises(ValueError, match="by position"):
        win_rate([1.0, 2.0], [1.0])


def test_win_rate_interval_stays_honest_at_the_edges():
    four_ties = win_rate([0.5] * 4, [0.5] * 4)
    # the outcomes' own spread is 0 here; the interval must still say that 4 pairs decide little
    assert four_ties["win_rate"] == 0.5 and four_ties["low"] < 0.2 and four_ties["high"] > 0.8
    assert four_ties["low"] + four_ties["high"] == pytest.approx(1.0)
    many_ties = win_rate([0.5] * 400, [0.5] * 400)
    assert many_ties["low"] < 0.5 < many_ties["high"] and many_ties["high"] - many_ties["low"] < 0.1  # narrows with n
    all_wins = win_rate([1.0] * 4, [0.0] * 4)
    assert all_wins["win_rate"] == 1.0 and all_wins["high"] == 1.0 and 0.4 < all_wins["low"] < 0.6
    all_losses = win_rate([0.0] * 4, [1.0] * 4)
    assert all_losses["win_rate"] == 0.0 and all_losses["low"] == 0.0 and 0.4 < all_losses["high"] < 0.6
    one_win, one_tie = win_rate([1.0], [0.0]), win_rate([0.5], [0.5])
    assert one_win["high"] == 1.0 and one_win["low"] < 0.25  # n = 1: nearly anything
    assert one_tie["low"] < 0.1 and one_tie["high"] > 0.9
    none = win_rate([], [])
    assert math.isnan(none["win_rate"]) and (none["low"], none["high"]) == (0.0, 1.0)


def test_paired_difference_matches_the_published_example():
    # Fagerland, Lydersen & Laake, "Statistical Analysis of Contingency Tables" (2017), ch. 8, the Cavo et al. 2012
    # table (59 both, 6 first only, 16 second only, 80 neither): Newcombe square-and-add -0.0621 [-0.1186, -0.0046],
    # as the book's R package (contingencytables) prints it
    new = [1] * 59 + [1] * 6 + [0] * 16 + [0] * 80
    base = [1] * 59 + [0] * 6 + [1] * 16 + [0] * 80
    d = paired_difference(new, base)
    assert (d["both"], d["new_only"], d["base_only"], d["neither"], d["n"]) == (59, 6, 16, 80, 161)
    assert d["difference"] == pytest.approx(-0.0621, abs=5e-5)
    assert (d["low"], d["high"]) == (pytest.approx(-0.1186, abs=5e-5), pytest.approx(-0.0046, abs=5e-5))
    # swapping the models mirrors the interval
    e = paired_difference(base, new)
    assert (e["low"], e["high"]) == (pytest.approx(-d["high"]), pytest.approx(-d["low"]))


def test_paired_difference_at_the_edges():
    same = paired_difference([True] * 4, [True] * 4)  # no discordant pair: not a point at 0
    assert same["difference"] == 0.0 and same["low"] < -0.3 and same["high"] > 0.3
    one = paired_difference([True], [False])
    assert one["difference"] == 1.0 and one["low"] < 0 and one["high"] == 1.0
    every = paired_difference([True] * 96, [False] * 96)
    assert every["low"] > 0.9 and every["high"] == 1.0
    # pairing: the same 10-point gain is clear when the rest of the samples agree, not when they are shuffled
    agree = paired_difference([True] * 60 + [False] * 40, [True] * 50 + [False] * 50)
    assert agree["difference"] == pytest.approx(0.1) and agree["low"] > 0
    with pytest.raises(ValueError, match="by position"):
        paired_difference([True], [True, False])


def test_image_grid_labels_rows_and_columns_and_marks_each_sample(tmp_path):
    red, blue = Image.new("RGB", (32, 32), "red"), Image.new("RGB", (32, 32), "blue")
    prompts = ["a red circle", "a blue square left of a yellow triangle"]
    fig = image_grid(
        {"base": [red, blue], "aligned": [blue, red]},
        prompts,
        marks={"base": [True, False], "aligned": [None, True]},
        title="held-out",
    )
    texts = axes_texts(fig)
    assert len(texts) == 4
    assert [t["title"].replace("\n", " ") for t in texts[:2]] == prompts and texts[2]["title"] == ""
    assert [t["ylabel"] for t in texts] == ["base", "", "aligned", ""]
    assert [t["xlabel"] for t in texts] == ["\u2713 pass", "\u2717 fail", "", "\u2713 pass"]
    assert fig.axes[0].spines["top"].get_edgecolor() == pytest.approx((0.102, 0.596, 0.314, 1.0), abs=2e-3)
    assert PASS_COLOR == "#1a9850"
    assert fig.axes[0].get_images()[0].get_array().shape[:2] == (32, 32)  # the pixels as sampled
    path = save(fig, str(tmp_path / "grid.png"))
    width, height = fig.get_size_inches() * 100
    assert Image.open(path).size == (round(width), round(height))


def test_the_smoothed_line_is_the_running_mean_of_the_per_step_values(tmp_path):
    steps = [(s, float(s % 2)) for s in range(1, 7)]  # a loss that jumps between 0 and 1 every step
    assert running_mean(steps, 1) == steps
    assert running_mean(steps, 2) == [(1, 1.0), (2, 0.5), (3, 0.5), (4, 0.5), (5, 0.5), (6, 0.5)]
    fig, axes = new_figure(1, 1)
    smoothed_panel(axes[0][0], steps, 3, "loss", "value")
    raw, smooth = axes[0][0].get_lines()
    assert list(zip(raw.get_xdata(), raw.get_ydata())) == steps
    assert list(zip(smooth.get_xdata(), smooth.get_ydata())) == running_mean(steps, 3)
    assert [t.get_text() for t in axes[0][0].get_legend().get_texts()] == ["per step", "running mean of 3 steps"]
    assert axes[0][0].get_xlabel() == "optimizer step" and axes[0][0].get_yticklabels()


def test_objectives_benchmark_plots_accuracy_with_bands_against_each_cost(tmp_path):
    from benchmarks.shapes_objectives import AXES, curve_point, plot_curves

    def record(passed, step):
        return {"passed": passed, "seconds": 2.0 * step, "unet_evals": 9.0 * step}

    base = curve_point([{"passed": [True, False, False, False]}], 0)
    curves = {
        run: [curve_point([record(p, step), record(q, step)], step) for step in (1, 2)]
        for run, p, q in (
            ("sft", [True] * 2 + [False] * 2, [True] * 3 + [False]),
            ("diffusion_dpo", [True] * 4, [True] * 4),
        )
    }
    assert curves["sft"][0]["accuracy"] == pytest.approx(0.625) and curves["sft"][0]["seeds"] == [0.5, 0.75]
    assert (curves["sft"][0]["passed"], curves["sft"][0]["n"]) == (5, 8)
    fig = plot_curves(curves, base, str(tmp_path))
    assert [ax.get_xlabel() for ax in fig.axes] == [x_label for *_, x_label in AXES]
    assert all(ax.get_ylabel() == "held-out full-prompt accuracy" for ax in fig.axes)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["base (25.0%)", "sft", "diffusion_dpo"]
    ax = fig.axes[1]  # against UNet evaluations: every run starts at the base, at cost 0
    sft_line = next(line for line in ax.get_lines() if line.get_label() == "sft")
    assert list(sft_line.get_xdata()) == [0.0, 9.0, 18.0]
    assert list(sft_line.get_ydata()) == pytest.approx([0.25, 0.625, 0.625])
    assert len(ax.collections) == 2 and len(ax.patches) == 1  # a band per run, one for the base
    for name, *_ in AXES:
        assert Image.open(tmp_path / f"{name}.png").size[0] > 300
    assert Image.open(tmp_path / "curves.png").size[0] > 1000
