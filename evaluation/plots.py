"""Pictures for comparing a base model with aligned ones: labelled image grids and line plots (drawn with PIL: a
plotting library is not worth a dependency for a few lines)."""

from typing import Dict, List, Sequence, Tuple

from PIL import Image, ImageDraw, ImageFont


def _font():
    """PIL's bitmap font: fixed 6-pixel cells with real spaces (the default FreeType font at this size draws spaces
    2 pixels wide, so labels read "left ofa blue square"); line wrapping below counts on the 6 pixels."""
    return ImageFont.load_default_imagefont()


def line_plot(
    series: Dict[str, List[Tuple[float, float]]],
    path: str,
    title: str = "",
    x_label: str = "",
    y_label: str = "",
    size=(640, 400),
) -> str:
    """Draws named (x, y) series as lines with a legend, axes and min/max tick labels; saves a PNG."""
    colors = [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
    ]
    w, h = size
    left, right, top, bottom = 60, 170, 30, 40
    points = [p for s in series.values() for p in s]
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-6)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.font = _font()

    def xy(x, y):
        return (
            left + (x - x0) / (x1 - x0) * (w - left - right),
            h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom),
        )

    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    draw.text((left, 8), title, fill="black")
    draw.text(((w - right + left) // 2 - 20, h - 18), x_label, fill="black")
    draw.text((4, top - 14), y_label, fill="black")
    for value, anchor in ((y0, h - bottom), (y1, top)):
        draw.text((4, anchor - 6), f"{value:.3g}", fill="black")
    for value, anchor in ((x0, left), (x1, w - right)):
        draw.text((anchor - 10, h - bottom + 4), f"{value:.4g}", fill="black")
    for i, (name, s) in enumerate(series.items()):
        color = colors[i % len(colors)]
        s = sorted(s)
        if len(s) > 1:
            draw.line([xy(*p) for p in s], fill=color, width=2)
        for p in s:
            cx, cy = xy(*p)
            draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=color)
        draw.line([(w - right + 10, top + 10 + 16 * i), (w - right + 30, top + 10 + 16 * i)], fill=color, width=3)
        draw.text((w - right + 35, top + 4 + 16 * i), name, fill="black")
    image.save(path)
    return path


def labelled_grid(rows: Dict[str, List[Image.Image]], column_labels: Sequence[str], scale: int = 3) -> Image.Image:
    """A grid of images, one labelled row per model, one column per prompt (labels wrapped under the images)."""
    first = next(iter(rows.values()))[0]
    cell_w, cell_h = first.width * scale, first.height * scale
    label_w, caption_h = 80, 40
    grid = Image.new("RGB", (label_w + cell_w * len(column_labels), caption_h + cell_h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    draw.font = _font()
    for c, text in enumerate(column_labels):
        words, lines, line = text.split(), [], ""
        for word in words:
            if len(line) + len(word) + 1 > (cell_w - 2) // 6:  # the font's 6-pixel cells, after the 2-pixel margin
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        lines.append(line)
        draw.multiline_text((label_w + c * cell_w + 2, 2), "\n".join(lines[:3]), fill="black", spacing=1)
    for r, (name, images) in enumerate(rows.items()):
        draw.text((4, caption_h + r * cell_h + cell_h // 2 - 6), name, fill="black")
        for c, image in enumerate(images):
            grid.paste(image.resize((cell_w, cell_h), Image.NEAREST), (label_w + c * cell_w, caption_h + r * cell_h))
    return grid
