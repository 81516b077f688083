"""Pictures for comparing a base model with aligned ones, drawn with matplotlib: image grids with row and column labels
(and a pass/fail mark per image), and curves of per-step values with their running mean.

Figures are made with ``matplotlib.figure.Figure`` on the Agg canvas, not through ``pyplot``: no global figure
registry to leak from and no dependence on the user's default backend (matplotlib's "Embedding in a web application
server" example does the same)."""

import textwrap
from typing import Dict, List, Optional, Sequence, Tuple

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image


PASS_COLOR, FAIL_COLOR = "#1a9850", "#d73027"  # green and red, told apart by shape too: a check and a cross


def new_figure(nrows: int, ncols: int, panel_size: Tuple[float, float] = (5.0, 3.2), **kwargs):
    """A figure of ``nrows`` x ``ncols`` panels of ``panel_size`` inches on the Agg canvas; returns (figure, axes) with
    axes a 2-D array."""
    fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False, **kwargs)


def save(fig: Figure, path: str, dpi: int = 100) -> str:
    fig.savefig(path, dpi=dpi)
    return path


def running_mean(points: Sequence[Tuple[float, float]], window: int) -> List[Tuple[float, float]]:
    """(step, value) points -> (step, mean of the values of the last ``window`` points up to it)."""
    return [
        (x, sum(v for _, v in points[max(0, i + 1 - window) : i + 1]) / min(window, i + 1))
        for i, (x, _) in enumerate(points)
    ]


def smoothed_panel(ax, points, window: int, title: str, y_label: str, x_label="optimizer step", color="C0"):
    """One panel: the per-step values as faint dots and their running mean over ``window`` steps as a line (one
    step's batch is noisy), with its title, axis labels, ticks and a legend."""
    xs, ys = [x for x, _ in points], [y for _, y in points]
    ax.plot(xs, ys, ".", color=color, alpha=0.3, markersize=4, label="per step")
    smooth = [y for _, y in running_mean(points, window)]
    ax.plot(xs, smooth, "-", color=color, linewidth=2, label=f"running mean of {window} step{'s' * (window > 1)}")
    ax.xaxis.set_major_locator(MaxNLocator("auto", steps=[1, 2, 2.5, 5, 10], integer=True))  # no step 1.5
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")


def image_grid(
    rows: Dict[str, List[Image.Image]],
    column_labels: Sequence[str],
    marks: Optional[Dict[str, List[Optional[bool]]]] = None,
    title: str = "",
    caption: str = "",
    cell_inches: float = 1.4,
) -> Figure:
    """A grid of images, one labelled row per model, one column per prompt (wrapped above the top row). ``marks``
    (per row, per image: True, False or None) frames each image green with a check under it where it passes and red
    with a cross where it fails."""
    ncols = len(column_labels)
    wrap = max(10, int(cell_inches * 11))  # characters a line at 8 pt in a cell of this width
    label_lines = max(len(textwrap.wrap(str(label), wrap)) for label in column_labels)
    width = 0.5 + cell_inches * ncols
    title, caption = (textwrap.fill(text, max(20, int(width * 9))) for text in (title, caption))  # 11 and 8 pt
    lines = [len(text.splitlines()) for text in (title, caption)]
    height = (
        0.2 * lines[0] + 0.15 * label_lines + (cell_inches + (0.25 if marks else 0.05)) * len(rows) + 0.17 * lines[1]
    )
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for r, (name, images) in enumerate(rows.items()):
        for c in range(ncols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(images):
                # nearest: a 32 x 32 sample's pixels are what the scorer reads, not a smoothed version of them
                ax.imshow(images[c], interpolation="nearest")
            mark = marks[name][c] if marks and c < len(marks[name]) else None
            if mark is not None:
                color = PASS_COLOR if mark else FAIL_COLOR
                for spine in ax.spines.values():
                    spine.set_edgecolor(color)
                    spine.set_linewidth(4)
                label = "\u2713 pass" if mark else "\u2717 fail"
                ax.set_xlabel(label, color=color, fontsize=9, fontweight="bold", labelpad=2)
            if r == 0:
                ax.set_title("\n".join(textwrap.wrap(str(column_labels[c]), wrap)), fontsize=8)
            if c == 0:
                ax.set_ylabel(name, fontsize=11, fontweight="bold")
    if title:
        fig.suptitle(title, fontsize=11)
    if caption:
        fig.supxlabel(caption, fontsize=8)
    return fig


def accuracy_band(ax, x, mean, low, high, label: str, color: str):
    """A line of means with its interval as a shaded band."""
    ax.fill_between(x, low, high, color=color, alpha=0.15, linewidth=0)
    ax.plot(x, mean, "-o", color=color, markersize=4, label=label)


def axes_texts(fig: Figure) -> List[Dict[str, str]]:
    """Every panel's title and axis labels (for tests and checks of what a figure shows)."""
    return [{"title": ax.get_title(), "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel()} for ax in fig.axes]
