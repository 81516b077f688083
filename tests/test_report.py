import math

import pytest
from PIL import Image

from evaluation.plots import labelled_grid, line_plot
from evaluation.stats import mean_interval, wilson_interval, win_rate


def test_wilson_interval_by_hand_and_at_the_edges():
    low, high = wilson_interval(5, 10)
    assert (low + high) / 2 == pytest.approx(0.5) and high - low == pytest.approx(2 * 0.2634, abs=1e-3)
    assert wilson_interval(0, 20)[0] == 0.0 and 0 < wilson_interval(0, 20)[1] < 0.2
    assert wilson_interval(20, 20)[1] == 1.0


def test_win_rate_counts_ties_as_half_and_pairs_by_position():
    r = win_rate([1.0, 0.5, 0.2, 0.9], [0.5, 0.5, 0.3, 0.1])
    assert r["win_rate"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert (r["wins"], r["ties"], r["n"]) == (2, 1, 4)
    mean, low, high = mean_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and high - mean == pytest.approx(1.96 / math.sqrt(3))


def test_pictures_are_written(tmp_path):
    path = line_plot({"a": [(0, 0.1), (5, 0.3)], "b": [(0, 0.2)]}, str(tmp_path / "p.png"), "t", "x", "y")
    assert Image.open(path).size == (640, 400)
    grid = labelled_grid(
        {"base": [Image.new("RGB", (32, 32))] * 2, "aligned": [Image.new("RGB", (32, 32))] * 2},
        ["a red circle", "a blue square left of a yellow triangle"],
    )
    assert grid.size == (80 + 2 * 96, 40 + 2 * 96)


def _ink_span(label):
    grid = labelled_grid({"base": [Image.new("RGB", (32, 32))]}, [label]).convert("L")
    inked = [x for x in range(80, grid.width) if any(grid.getpixel((x, y)) < 128 for y in range(40))]
    return inked[-1] - inked[0]


def test_grid_labels_keep_the_spaces_between_words():
    # the default FreeType font draws a space 2 pixels wide: "left of a" read "left ofa"
    assert _ink_span("ll ll") - _ink_span("llll") >= 5
