"""Preference pairs for the shapes world, in the Pick-a-Pic v2 schema, from a model's own samples.

For each chosen TRAIN prompt (held-out prompts are never used), ``images_per_prompt`` images are sampled with
fixed seeds and scored with ``shapes.scorer.score``; every two images with different scores make a pair (the higher
score wins), ties are dropped. Each row is ``jpg_0``, ``jpg_1`` (JPEG bytes), ``label_0`` (1.0 when ``jpg_0``
is the winner, else 0.0; the winner's position is random) and ``caption``, plus ``score_0``/``score_1``.
"""

import io
import itertools
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

from shapes import sampling, scorer, world


def choose_prompts(num_prompts: int, seed: int = 0, single_fraction: float = 0.0) -> List[str]:
    """``num_prompts`` distinct train prompts (two-object ones, plus a share of single-object ones)."""
    rng = np.random.default_rng(seed)
    singles = [str(p) for p in world.train_prompts(1)]
    doubles = [str(p) for p in world.train_prompts(2)]
    n_single = min(len(singles), int(round(num_prompts * single_fraction)))
    n_double = min(len(doubles), num_prompts - n_single)
    chosen = [singles[i] for i in rng.choice(len(singles), n_single, replace=False)]
    chosen += [doubles[i] for i in rng.choice(len(doubles), n_double, replace=False)]
    rng.shuffle(chosen)
    return chosen


def jpeg_bytes(image: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def pairs_from_samples(
    prompts: Sequence[str],
    images: Sequence[Sequence[Image.Image]],
    seed: int = 0,
    max_pairs_per_prompt: Optional[int] = None,
    min_winner_score: Optional[float] = None,
    loser_outcome: Optional[str] = None,
) -> Dict[str, list]:
    """Rows (column -> list) of winner/loser pairs; equal scores are dropped, held-out prompts refused. With
    ``min_winner_score`` (1.0: the winner passes the whole prompt) pairs whose winner scores lower are dropped too;
    with ``loser_outcome`` (one of ``sampling.OUTCOMES``: ``relation`` keeps the pairs whose loser has every object
    right and only the relation wrong) pairs whose loser fails another way."""
    rng = np.random.default_rng(seed)
    rows = {"jpg_0": [], "jpg_1": [], "label_0": [], "caption": [], "score_0": [], "score_1": []}
    for prompt, ims in zip(prompts, images):
        if world.is_heldout(prompt):
            raise ValueError(f"held-out prompt {prompt!r} must not be used for training pairs")
        results = [scorer.score(im, prompt) for im in ims]
        scores = [r.score for r in results]
        candidates = [(a, b) for a, b in itertools.combinations(range(len(ims)), 2) if scores[a] != scores[b]]
        if min_winner_score is not None:
            candidates = [(a, b) for a, b in candidates if max(scores[a], scores[b]) >= min_winner_score]
        if loser_outcome is not None:
            loser = lambda a, b: results[b] if scores[a] > scores[b] else results[a]  # noqa: E731
            candidates = [(a, b) for a, b in candidates if sampling.outcome(loser(a, b)) == loser_outcome]
        if max_pairs_per_prompt is not None and len(candidates) > max_pairs_per_prompt:
            keep = rng.choice(len(candidates), max_pairs_per_prompt, replace=False)
            candidates = [candidates[k] for k in sorted(keep)]
        for a, b in candidates:
            win, lose = (a, b) if scores[a] > scores[b] else (b, a)
            first, second = (win, lose) if rng.random() < 0.5 else (lose, win)
            rows["jpg_0"].append(jpeg_bytes(ims[first]))
            rows["jpg_1"].append(jpeg_bytes(ims[second]))
            rows["label_0"].append(1.0 if first == win else 0.0)
            rows["caption"].append(str(prompt))
            rows["score_0"].append(float(scores[first]))
            rows["score_1"].append(float(scores[second]))
    return rows


def write_parquet(rows: Dict[str, list], path: str) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    schema = pa.schema(
        [
            ("jpg_0", pa.binary()),
            ("jpg_1", pa.binary()),
            ("label_0", pa.float64()),
            ("caption", pa.string()),
            ("score_0", pa.float64()),
            ("score_1", pa.float64()),
        ]
    )
    pq.write_table(pa.table(rows, schema=schema), path)
    return path


def make_pairs(
    pipe,
    num_prompts: int,
    images_per_prompt: int,
    out_path: str,
    seed: int = 0,
    steps: int = sampling.DEFAULT_STEPS,
    guidance: float = sampling.DEFAULT_GUIDANCE,
    single_fraction: float = 0.0,
    max_pairs_per_prompt: Optional[int] = None,
    prompts: Optional[Sequence[str]] = None,
    min_winner_score: Optional[float] = None,
    loser_outcome: Optional[str] = None,
) -> Dict[str, float]:
    """Samples, scores and writes pairs; returns counts. Sampling seeds are ``seed * 1000 + j``."""
    if prompts is None:
        prompts = choose_prompts(num_prompts, seed, single_fraction)
    images = sampling.sample(pipe, prompts, images_per_prompt, seed * 1000, steps, guidance)
    rows = pairs_from_samples(prompts, images, seed, max_pairs_per_prompt, min_winner_score, loser_outcome)
    write_parquet(rows, out_path)
    n_samples = len(prompts) * images_per_prompt
    passed = sum(scorer.score(im, p).passed for p, ims in zip(prompts, images) for im in ims)
    return {
        "prompts": len(prompts),
        "samples": n_samples,
        "sample_pass_rate": passed / max(n_samples, 1),
        "pairs": len(rows["caption"]),
    }
