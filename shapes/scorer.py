"""The shapes world's scorer (``detect``, ``score``): it uses the pixels only, and the prompt grammar, palette and
image size of ``shapes/world.py``.

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

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from shapes.world import BACKGROUND, COLORS, PALETTE, RELATIONS, SIZE, Prompt, parse_prompt


# thresholds in 32-px units (see the module docstring)
FG_ALPHA = 0.5
MAX_RESIDUAL = 80.0
MIN_AREA = 12
TRIANGLE_SKEW = 0.22
SQUARE_K4 = 0.7
UNKNOWN_FILL = 0.3
MIN_SEPARATION = 2.0


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
