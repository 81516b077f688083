"""A procedural "shapes world": prompts, renders and a pixel-only scorer.

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

Scorer (``detect``, ``score``): uses the pixels only.

1. Images that are not 32 x 32 are resized to 32 x 32 (box filter) first, so every threshold is in 32-px units.
2. Colour: each pixel ``p`` is explained as a mix of white and a palette colour ``c``,
   ``p ~ white + a (c - white)``; per colour the best ``a`` (clipped to [0, 1.5]) and the residual distance are
   computed and the colour with the smallest residual wins. A pixel is foreground when ``a >= FG_ALPHA`` (0.5,
   at least half covered: near-white is background, anti-aliased fringes fall on the side they mostly are)
   and the residual is ``<= MAX_RESIDUAL`` (80 of 441 RGB units: slightly off, darker or washed-out colours
   still count, but grey, black or a colour half-way between two palette entries do not). Projecting on the
   white-to-colour line instead of taking the plain nearest colour keeps the light fringe of a red shape from
   being read as yellow.
3. Objects: 8-connected components of same-colour foreground; components of fewer than ``MIN_AREA`` (12) px
   are noise and dropped (the smallest rendered object, a triangle of extent 8, has about 32 px).
4. Shape: from moments of the component's soft coverage (this colour's mix ``a``, clipped to [0, 1], over the
   component and a 2 px ring of background around it), which anti-aliasing, blur and JPEG barely move. A
   triangle is skewed (|skewness| of the y profile ~0.55 for an apex-up triangle, 0 for circles and squares):
   triangle when the larger |skewness| of the x and y profiles is ``>= TRIANGLE_SKEW`` (0.22). A square's
   fourth cumulant along the diagonals is half of that along its sides, a disc's is the same in every
   direction (a Gaussian blur leaves fourth cumulants unchanged): square when that ratio is
   ``<= SQUARE_K4`` (0.7) or ``>= 1 / SQUARE_K4`` (a square standing on a corner), else circle. Measured on
   renders (clean, JPEG 90, Gaussian blur radius 0.6 and 1.0): skewness >= 0.32 for triangles and <= 0.13
   otherwise; ratio 0.41-0.55 for squares and 0.75-1.23 for circles. The bounding-box fill ratio (square
   ~1.0, circle ~0.785, triangle ~0.5) was the first idea but overlaps on small rasterised shapes (circles
   of 8-11 px reach 0.88, squares with a dropped corner pixel fall to 0.88), so it is only reported, and a
   fill below 0.3 (a scribble, not a solid shape) is ``unknown``.
5. Atoms: per prompt object "present with this colour and shape"; for two objects the relation, decided on the
   centroids of the (largest) matching components by the dominant-axis rule: ``d`` = centroid(first) -
   centroid(second) must point the right way along the relation's axis by at least ``MIN_SEPARATION`` (2 px)
   AND be at least as long along that axis as across it (within the 45 degree cone); it is False when either
   object is missing. Finally "no extra objects": at most as many components as prompt objects. ``score`` is
   the fraction of atoms that hold, ``passed`` that all hold.
"""

import io
import re
from dataclasses import dataclass, field
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

# scoring (see the module docstring)
FG_ALPHA = 0.5
MAX_RESIDUAL = 80.0
MIN_AREA = 12
TRIANGLE_SKEW = 0.22
SQUARE_K4 = 0.7
UNKNOWN_FILL = 0.3
MIN_SEPARATION = 2.0


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


# ---------------------------------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class Detection:
    """One connected component of same-colour foreground."""

    color: str
    shape: str
    area: int
    cx: float  # centroid, pixels (x right, y down)
    cy: float
    box: Tuple[int, int, int, int]  # x0, y0, x1, y1 inclusive
    fill: float  # pixels / bounding box
    skew: float  # larger |skewness| of the x and y coverage profiles
    k4_ratio: float  # fourth cumulant along the diagonals / along the axes


@dataclass(frozen=True)
class ScoreResult:
    """The atoms of one (image, prompt) pair."""

    prompt: Prompt
    object_present: Tuple[bool, ...]
    relation: Optional[bool]  # None for single-object prompts
    no_extra: bool
    detections: Tuple[Detection, ...] = field(default=(), repr=False)

    @property
    def atoms(self) -> Dict[str, bool]:
        out = {str(o): ok for o, ok in zip(self.prompt.objects, self.object_present)}
        if self.relation is not None:
            out[f"relation: {self.prompt.relation}"] = self.relation
        out["no extra objects"] = self.no_extra
        return out

    @property
    def score(self) -> float:
        atoms = list(self.atoms.values())
        return sum(atoms) / len(atoms)

    @property
    def passed(self) -> bool:
        return all(self.atoms.values())


ImageLike = Union[Image.Image, np.ndarray]

_WHITE = np.asarray(BACKGROUND, dtype=np.float64)
_DIRS = _WHITE[None, :] - np.asarray([PALETTE[c] for c in COLORS], dtype=np.float64)  # [4, 3] white -> colour
_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def _to_array(image: ImageLike) -> np.ndarray:
    """float RGB in [0, 255], SIZE x SIZE."""
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):  # CHW
            arr = arr.transpose(1, 2, 0)
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        if arr.dtype != np.uint8:
            arr = np.clip(np.asarray(arr, dtype=np.float64) * 255.0, 0, 255).round().astype(np.uint8)
        image = Image.fromarray(np.ascontiguousarray(arr[..., :3]), "RGB")
    image = image.convert("RGB")
    if image.size != (SIZE, SIZE):
        image = image.resize((SIZE, SIZE), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.float64)


def _mix(image: ImageLike) -> Tuple[np.ndarray, np.ndarray]:
    """Per pixel and palette colour: the best white-to-colour mix ``a`` and its residual ([H, W, 4] each)."""
    v = _WHITE - _to_array(image)  # [H, W, 3], how far from white
    a = np.clip(v @ _DIRS.T / (_DIRS * _DIRS).sum(1), 0.0, 1.5)
    resid = np.linalg.norm(v[..., None, :] - a[..., None] * _DIRS, axis=-1)
    return a, resid


def _segment(a: np.ndarray, resid: np.ndarray) -> np.ndarray:
    best = resid.argmin(-1)
    a_best = np.take_along_axis(a, best[..., None], -1)[..., 0]
    r_best = np.take_along_axis(resid, best[..., None], -1)[..., 0]
    return np.where((a_best >= FG_ALPHA) & (r_best <= MAX_RESIDUAL), best, -1)


def segment(image: ImageLike) -> np.ndarray:
    """Per-pixel colour index into ``COLORS``, or -1 for background / unexplained colours (SIZE x SIZE)."""
    return _segment(*_mix(image))


def _components(labels: np.ndarray) -> List[np.ndarray]:
    """8-connected components of equal non-negative labels, as boolean masks (a small stack flood fill)."""
    h, w = labels.shape
    # flattened with a border of -1, so that neighbours never need bounds checks
    lab = np.pad(labels, 1, constant_values=-1).ravel().tolist()
    stride = w + 2
    offsets = [dy * stride + dx for dy, dx in _NEIGHBOURS]
    seen = [v < 0 for v in lab]
    out = []
    for start in range(len(lab)):
        if seen[start]:
            continue
        cls, stack, pix = lab[start], [start], []
        seen[start] = True
        while stack:
            i = stack.pop()
            pix.append(i)
            for o in offsets:
                j = i + o
                if not seen[j] and lab[j] == cls:
                    seen[j] = True
                    stack.append(j)
        mask = np.zeros((h + 2) * stride, dtype=bool)
        mask[pix] = True
        out.append(mask.reshape(h + 2, stride)[1:-1, 1:-1].copy())
    return out


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        p = np.pad(mask, 1)
        mask = mask.copy()
        for dy, dx in _NEIGHBOURS:
            mask |= p[1 + dy : p.shape[0] - 1 + dy, 1 + dx : p.shape[1] - 1 + dx]
    return mask


def _moments(weights: np.ndarray) -> Tuple[float, float, float, float]:
    """(centroid x, centroid y, skewness, diagonal / axis fourth-cumulant ratio) of a weight map."""
    ys, xs = np.mgrid[0 : weights.shape[0], 0 : weights.shape[1]]
    total = weights.sum()
    mx, my = (weights * xs).sum() / total, (weights * ys).sum() / total
    x, y = xs - mx, ys - my

    def skew_k4(c):
        m2, m3, m4 = ((weights * c**k).sum() / total for k in (2, 3, 4))
        return m3 / max(m2, 1e-9) ** 1.5, m4 - 3 * m2 * m2

    (sx, kx), (sy, ky) = skew_k4(x), skew_k4(y)
    (_, ku), (_, kv) = skew_k4((x + y) / np.sqrt(2)), skew_k4((x - y) / np.sqrt(2))
    axis_k4 = kx + ky
    ratio = (ku + kv) / axis_k4 if abs(axis_k4) > 1e-9 else 1.0
    return float(mx + 0.5), float(my + 0.5), float(max(abs(sx), abs(sy))), float(ratio)


def classify_shape(skew: float, k4_ratio: float, fill: float) -> str:
    """Shape from the features of one component (rules in the module docstring)."""
    if fill < UNKNOWN_FILL:
        return "unknown"
    if skew >= TRIANGLE_SKEW:
        return "triangle"
    if k4_ratio <= SQUARE_K4 or k4_ratio >= 1 / SQUARE_K4:
        return "square"
    return "circle"


def detect(image: ImageLike) -> List[Detection]:
    """The objects in an image, largest first, from its pixels alone."""
    a, resid = _mix(image)
    labels = _segment(a, resid)
    dets = []
    for mask in _components(labels):
        ys, xs = np.nonzero(mask)
        if len(xs) < MIN_AREA:
            continue
        ci = int(labels[ys[0], xs[0]])
        # soft weights: this colour's coverage on the component and the background ring around it, so that
        # anti-aliasing, blur and compression shift the moments only a little
        region = _dilate(mask, 2) & ((labels == -1) | mask)
        weights = np.where(region, np.clip(a[..., ci], 0.0, 1.0), 0.0)
        ry, rx = np.nonzero(region)
        y0, x0 = ry.min(), rx.min()
        cx, cy, skew, k4_ratio = _moments(weights[y0 : ry.max() + 1, x0 : rx.max() + 1])
        cx, cy = cx + x0, cy + y0
        fill = len(xs) / float((np.ptp(xs) + 1) * (np.ptp(ys) + 1))
        dets.append(
            Detection(
                color=COLORS[ci],
                shape=classify_shape(skew, k4_ratio, fill),
                area=int(len(xs)),
                cx=cx,
                cy=cy,
                box=(int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())),
                fill=float(fill),
                skew=skew,
                k4_ratio=k4_ratio,
            )
        )
    return sorted(dets, key=lambda d: -d.area)


def relation_holds(first: Detection, second: Detection, relation: str) -> bool:
    """Dominant-axis rule on centroids (module docstring)."""
    axis, sign = RELATIONS[relation]
    d = (first.cx - second.cx, first.cy - second.cy)
    along, across = d[axis] * sign, d[1 - axis]
    return bool(along >= MIN_SEPARATION and along >= abs(across))


def score(image: ImageLike, prompt: Union[Prompt, str]) -> ScoreResult:
    """Scores an image against a prompt from pixels only: per-object presence, relation, no extra objects.

    ``image``: a PIL image, or an array HWC / CHW, uint8 in [0, 255] or float in [0, 1]; any size (resized to 32).
    """
    p = parse_prompt(prompt)
    dets = detect(image)
    matches = [next((d for d in dets if d.color == o.color and d.shape == o.shape), None) for o in p.objects]
    relation = None
    if len(p.objects) == 2:
        relation = all(m is not None for m in matches) and relation_holds(matches[0], matches[1], p.relation)
    return ScoreResult(
        prompt=p,
        object_present=tuple(m is not None for m in matches),
        relation=relation,
        no_extra=len(dets) <= len(p.objects),
        detections=tuple(dets),
    )


def score_many(images: Sequence[ImageLike], prompts: Sequence[Union[Prompt, str]]) -> List[ScoreResult]:
    """``score`` over paired lists."""
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts")
    return [score(im, pr) for im, pr in zip(images, prompts)]


def pass_rate(results: Sequence[ScoreResult]) -> float:
    """Fraction of results that passed."""
    return sum(r.passed for r in results) / max(len(results), 1)


def jpeg(image: Image.Image, quality: int = 90) -> Image.Image:
    """A JPEG round trip of an image (for robustness checks)."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")
