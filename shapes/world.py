"""A procedural "shapes world": prompts, their held-out split and renders (its pixel-only scorer is
``shapes/scorer.py``).

Images are 32 x 32 RGB on a white background with one or two flat-coloured objects::

    a red circle
    a blue square left of a yellow triangle

Shapes are ``circle``, ``square`` and ``triangle`` (pointing up); colours are four saturated, far apart
``PALETTE`` entries. A two-object prompt states where the FIRST object is relative to the SECOND (``left of``,
``right of``, ``above``, ``below``); its two objects never share both colour and shape.

Held-out split (compositional evaluation, see ``is_heldout``): a two-object prompt is held out when its two
colours are one of the pairs {red, blue} or {green, yellow} AND its two shapes differ. The rule is about the
unordered pair of objects, so "A left of B" and "B right of A" are always on the same side, and all four
relations of a held-out pair are held out. That is 12 of the 66 object pairs, 96 of the 528 two-object
prompts (18.2 %); single-object prompts are never held out. Every colour, shape, (colour, shape) object and
relation still occurs in training, only these combinations of two objects do not.

Rendering (``sample_layout`` + ``draw``, or ``render``): object extent (circle diameter, square side,
triangle base = height) uniform in [8, 14] px, 1 px margin to the border, 4 x 4 supersampled coverage
(anti-aliasing). Two objects are separated along the relation's axis by at least max(8, (s1 + s2) / 2 + 3) px
between centres (so at least 3 px of white between their boxes: they never overlap or touch), and their
offset across that axis is at most half of the offset along it. ``render_wrong`` makes controlled mistakes.
"""

import io
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image


SIZE = 32
BACKGROUND = (255, 255, 255)
PALETTE: Dict[str, Tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (25, 180, 25),
    "blue": (25, 25, 230),
    "yellow": (240, 220, 20),
}
COLORS: Tuple[str, ...] = tuple(PALETTE)
SHAPES: Tuple[str, ...] = ("circle", "square", "triangle")
# relation -> (axis, sign): the first object's centroid minus the second's, along axis (0 = x, 1 = y; y grows
# downwards), has this sign
RELATIONS: Dict[str, Tuple[int, int]] = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
HELDOUT_COLOR_PAIRS = (frozenset({"red", "blue"}), frozenset({"green", "yellow"}))
WRONG_KINDS = ("color", "shape", "missing", "relation", "extra")

# rendering
MIN_EXTENT, MAX_EXTENT = 8.0, 14.0
MARGIN = 1.0
GAP = 3.0
MIN_CENTER_DISTANCE = 8.0
SUPERSAMPLE = 4


# ---------------------------------------------------------------------------------------------------- prompts


@dataclass(frozen=True, order=True)
class SceneObject:
    """One object of a scene: a colour from ``COLORS`` and a shape from ``SHAPES``."""

    color: str
    shape: str

    def __post_init__(self):
        if self.color not in PALETTE:
            raise ValueError(f"unknown color {self.color!r}, expected one of {COLORS}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}, expected one of {SHAPES}")

    def __str__(self) -> str:
        return f"a {self.color} {self.shape}"


@dataclass(frozen=True)
class Prompt:
    """A scene spec: one object, or two objects and where the first is relative to the second."""

    objects: Tuple[SceneObject, ...]
    relation: Optional[str] = None

    def __post_init__(self):
        object.__setattr__(self, "objects", tuple(self.objects))
        if len(self.objects) not in (1, 2):
            raise ValueError(f"a prompt has one or two objects, got {len(self.objects)}")
        if len(self.objects) == 1 and self.relation is not None:
            raise ValueError("a single-object prompt has no relation")
        if len(self.objects) == 2:
            if self.relation not in RELATIONS:
                raise ValueError(f"unknown relation {self.relation!r}, expected one of {tuple(RELATIONS)}")
            if self.objects[0] == self.objects[1]:
                raise ValueError(f"the two objects must differ in color or shape, got {self.objects[0]} twice")

    def __str__(self) -> str:
        if len(self.objects) == 1:
            return str(self.objects[0])
        return f"{self.objects[0]} {self.relation} {self.objects[1]}"


_OBJ = r"a (" + "|".join(COLORS) + r") (" + "|".join(SHAPES) + r")"
_PROMPT_RE = re.compile(rf"^{_OBJ}(?: ({'|'.join(RELATIONS)}) {_OBJ})?$")


def parse_prompt(text: str) -> Prompt:
    """Parses ``"a red circle"`` or ``"a blue square left of a yellow triangle"`` (case and spacing tolerant)."""
    if isinstance(text, Prompt):
        return text
    m = _PROMPT_RE.match(" ".join(str(text).lower().split()))
    if m is None:
        raise ValueError(
            f"not a shapes-world prompt: {text!r} (expected 'a <color> <shape>' or "
            f"'a <color> <shape> <relation> a <color> <shape>' with colors {COLORS}, shapes {SHAPES}, "
            f"relations {tuple(RELATIONS)})"
        )
    c1, s1, rel, c2, s2 = m.groups()
    if rel is None:
        return Prompt((SceneObject(c1, s1),))
    try:
        return Prompt((SceneObject(c1, s1), SceneObject(c2, s2)), rel)
    except ValueError as e:
        raise ValueError(f"not a valid shapes-world prompt: {text!r}: {e}") from None


def all_objects() -> List[SceneObject]:
    """The 12 (color, shape) objects."""
    return [SceneObject(c, s) for c in COLORS for s in SHAPES]


def all_prompts(num_objects: int) -> List[Prompt]:
    """Every prompt with ``num_objects`` (1: 12 prompts, 2: 12 * 11 * 4 = 528), in a fixed order."""
    objs = all_objects()
    if num_objects == 1:
        return [Prompt((o,)) for o in objs]
    if num_objects == 2:
        return [Prompt((a, b), rel) for a in objs for b in objs if a != b for rel in RELATIONS]
    raise ValueError(f"num_objects must be 1 or 2, got {num_objects}")


def is_heldout(prompt: Union[Prompt, str]) -> bool:
    """Whether a prompt belongs to the evaluation-only split (rule in the module docstring)."""
    p = parse_prompt(prompt)
    if len(p.objects) != 2:
        return False
    a, b = p.objects
    return frozenset({a.color, b.color}) in HELDOUT_COLOR_PAIRS and a.shape != b.shape


def heldout_prompts() -> List[Prompt]:
    """The held-out two-object prompts (96), never to be used for training."""
    return [p for p in all_prompts(2) if is_heldout(p)]


def train_prompts(num_objects: Optional[int] = None) -> List[Prompt]:
    """All prompts that may be trained on (12 single + 432 two-object), or only those with ``num_objects``."""
    counts = (1, 2) if num_objects is None else (num_objects,)
    return [p for n in counts for p in all_prompts(n) if not is_heldout(p)]


# -------------------------------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Placement:
    """Where an object is drawn: centre of its bounding box (x right, y down, pixel units) and extent."""

    obj: SceneObject
    cx: float
    cy: float
    size: float

    def box(self) -> Tuple[float, float, float, float]:
        h = self.size / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


RngLike = Union[np.random.Generator, int, None]


def _rng(rng: RngLike) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _center_range(size: float) -> Tuple[float, float]:
    return MARGIN + size / 2, SIZE - MARGIN - size / 2


def _place_pair(
    a: SceneObject, b: SceneObject, relation: str, rng: np.random.Generator, max_extent: float
) -> Tuple[Placement, Placement]:
    axis, sign = RELATIONS[relation]
    while True:
        s1, s2 = rng.uniform(MIN_EXTENT, max_extent, size=2)
        sep = max(MIN_CENTER_DISTANCE, (s1 + s2) / 2 + GAP)
        # along the axis: the object with the smaller coordinate ("lo") comes first
        s_lo, s_hi = (s1, s2) if sign < 0 else (s2, s1)
        lo_min, _ = _center_range(s_lo)
        _, hi_max = _center_range(s_hi)
        if hi_max - lo_min >= sep:
            break
    lo = rng.uniform(lo_min, hi_max - sep)
    hi = rng.uniform(lo + sep, hi_max)
    along1, along2 = (lo, hi) if sign < 0 else (hi, lo)
    # across the axis: independent, but the offset is at most half the offset along the axis
    limit = abs(along1 - along2) / 2
    lo1, hi1 = _center_range(s1)
    lo2, hi2 = _center_range(s2)
    across1 = rng.uniform(lo1, hi1)
    across2 = rng.uniform(max(lo2, across1 - limit), min(hi2, across1 + limit))
    if axis == 0:
        return Placement(a, along1, across1, s1), Placement(b, along2, across2, s2)
    return Placement(a, across1, along1, s1), Placement(b, across2, along2, s2)


def sample_layout(prompt: Union[Prompt, str], rng: RngLike = None, max_extent: float = MAX_EXTENT) -> List[Placement]:
    """Random sizes and positions for the prompt's objects, consistent with its relation."""
    p, g = parse_prompt(prompt), _rng(rng)
    if len(p.objects) == 1:
        s = g.uniform(MIN_EXTENT, max_extent)
        lo, hi = _center_range(s)
        return [Placement(p.objects[0], g.uniform(lo, hi), g.uniform(lo, hi), s)]
    return list(_place_pair(p.objects[0], p.objects[1], p.relation, g, max_extent))


def _coverage(pl: Placement) -> np.ndarray:
    """Fraction of each pixel covered by the shape (SIZE x SIZE), from SUPERSAMPLE^2 samples per pixel."""
    n = SIZE * SUPERSAMPLE
    t = (np.arange(n) + 0.5) / SUPERSAMPLE
    x, y = t[None, :], t[:, None]
    h = pl.size / 2
    if pl.obj.shape == "circle":
        inside = (x - pl.cx) ** 2 + (y - pl.cy) ** 2 <= h * h
    elif pl.obj.shape == "square":
        inside = (np.abs(x - pl.cx) <= h) & (np.abs(y - pl.cy) <= h)
    else:  # triangle, apex up: the half-width grows from 0 at the top to h at the base
        top = pl.cy - h
        inside = (y >= top) & (y <= pl.cy + h) & (np.abs(x - pl.cx) <= (y - top) / 2)
    return inside.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE).mean(axis=(1, 3))


def draw(placements: Sequence[Placement]) -> Image.Image:
    """Draws placed objects over a white background (anti-aliased)."""
    img = np.empty((SIZE, SIZE, 3), dtype=np.float64)
    img[:] = BACKGROUND
    for pl in placements:
        a = _coverage(pl)[..., None]
        img = img * (1 - a) + np.asarray(PALETTE[pl.obj.color], dtype=np.float64) * a
    return Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8), "RGB")


def render(prompt: Union[Prompt, str], rng: RngLike = None) -> Image.Image:
    """A correct 32 x 32 image for the prompt; deterministic for a given seed / generator state."""
    return draw(sample_layout(prompt, rng))


def _boxes_apart(p: Placement, q: Placement, gap: float = GAP) -> bool:
    a, b = p.box(), q.box()
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _other(choices: Sequence[str], current: str, rng: np.random.Generator) -> str:
    rest = [c for c in choices if c != current]
    return rest[rng.integers(len(rest))]


def render_wrong(
    prompt: Union[Prompt, str], rng: RngLike = None, kind: str = "color", target: Optional[int] = None
) -> Image.Image:
    """A controlled wrong render, failing exactly one kind of atom.

    kind: ``color`` / ``shape`` (object ``target`` gets another colour / shape, never a copy of the other
    object), ``missing`` (object ``target`` is not drawn), ``relation`` (two objects only: drawn with the
    opposite relation), ``extra`` (a third object, unlike the prompt's ones, is added where there is room).
    ``target`` is the index of the object to corrupt, random when None.
    """
    p, g = parse_prompt(prompt), _rng(rng)
    if kind not in WRONG_KINDS:
        raise ValueError(f"unknown wrong-render kind {kind!r}, expected one of {WRONG_KINDS}")
    n = len(p.objects)
    if target is None:
        target = int(g.integers(n))
    if not 0 <= target < n:
        raise ValueError(f"target {target} out of range for {n} object(s)")

    if kind == "relation":
        if n != 2:
            raise ValueError(f"kind 'relation' needs a two-object prompt, got {str(p)!r}")
        return render(Prompt(p.objects, OPPOSITE[p.relation]), g)

    if kind == "extra":
        used = set(p.objects)
        while True:  # smaller objects than usual so that a third one fits
            layout = sample_layout(p, g, max_extent=11.0)
            extra = [o for o in all_objects() if o not in used]
            obj = extra[g.integers(len(extra))]
            for _ in range(50):
                s = g.uniform(MIN_EXTENT, 10.0)
                lo, hi = _center_range(s)
                cand = Placement(obj, g.uniform(lo, hi), g.uniform(lo, hi), s)
                if all(_boxes_apart(cand, q) for q in layout):
                    return draw(layout + [cand])

    layout = sample_layout(p, g)
    if kind == "missing":
        return draw([q for i, q in enumerate(layout) if i != target])
    old = layout[target].obj
    others = {q.obj for i, q in enumerate(layout) if i != target}
    while True:
        if kind == "color":
            new = SceneObject(_other(COLORS, old.color, g), old.shape)
        else:
            new = SceneObject(old.color, _other(SHAPES, old.shape, g))
        if new not in others:
            break
    q = layout[target]
    layout[target] = Placement(new, q.cx, q.cy, q.size)
    return draw(layout)


def jpeg(image: Image.Image, quality: int = 90) -> Image.Image:
    """A JPEG round trip of an image (for robustness checks)."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")
