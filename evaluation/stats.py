"""Small statistics for comparing a base model with aligned ones: 95% intervals of a proportion (Wilson), of a mean
(clipped to the score's range), of a paired win rate and of a paired difference of two pass rates (Newcombe)."""

import math
from typing import Dict, Optional, Sequence, Tuple


Bounds = Optional[Tuple[float, float]]  # a score's (lowest, highest) possible value; None where it has no bound


def wilson_interval(successes: float, n: int, z: float = 1.96) -> Tuple[float, float]:
    """95% Wilson score interval of a proportion (Wilson 1927, JASA 22:209-212): sound at 0% and 100% and at small n,
    unlike the normal approximation (Brown, Cai & DasGupta 2001, Statistical Science 16:101-133, recommend it)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(values: Sequence[float], z: float = 1.96, bounds: Bounds = None) -> Tuple[float, float, float]:
    """Mean and its 95% normal-approximation interval, clipped to ``bounds`` (the score's range: a mean of scores in
    [0, 1] near 1 would otherwise get an interval above 1). One value says nothing of the spread: its interval is the
    whole range (infinite without bounds)."""
    low_bound, high_bound = (float(b) for b in bounds) if bounds is not None else (-math.inf, math.inf)
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, low_bound, high_bound
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = z * sd / math.sqrt(n)
    return mean, max(low_bound, mean - half), min(high_bound, mean + half)


def win_rate(new: Sequence[float], base: Sequence[float], z: float = 1.96) -> Dict[str, float]:
    """Paired comparison on the same prompts and noise: a win counts 1, a tie 1/2, a loss 0; the rate and its 95%
    interval.

    The interval is Wilson's (``wilson_interval``) with ties as half-successes, ``wins + ties / 2`` out of n pairs.
    Each pair's outcome lies in [0, 1], so its variance is at most ``p (1 - p)`` for a mean p (the Bhatia-Davis
    inequality: Bhatia & Davis 2000, Amer. Math. Monthly 107:353-357), the variance the Wilson interval assumes: the
    interval is conservative with ties, and exact in form without them. It widens as n falls (4 ties: [0.15, 0.85],
    where the outcomes' own spread, 0, would give [0.5, 0.5]) and stays inside [0, 1]. Counting a tie as half a win
    is the usual convention of pairwise evaluations (as in Chatbot Arena's and AlpacaEval's win rates)."""
    if len(new) != len(base):
        raise ValueError(f"win_rate pairs samples by position: {len(new)} new scores against {len(base)} base scores")
    wins = sum(a > b for a, b in zip(new, base))
    ties = sum(a == b for a, b in zip(new, base))
    n = len(new)
    low, high = wilson_interval(wins + ties / 2, n, z)
    return {"win_rate": (wins + ties / 2) / n if n else math.nan, "low": low, "high": high, "wins": wins,
            "ties": ties, "n": n}  # fmt: skip


def paired_difference(new: Sequence[bool], base: Sequence[bool], z: float = 1.96) -> Dict[str, float]:
    """Difference of two pass rates measured on the same samples (``new[i]`` and ``base[i]`` share their prompt and
    noise), ``mean(new) - mean(base)``, with its 95% interval by Newcombe's square-and-add method for paired
    proportions (Newcombe 1998, Statistics in Medicine 17:2635-2650, method 10; as written out by
    Fagerland, Lydersen & Laake 2014, Statistics in Medicine 33:2850-2875). It combines the two rates' Wilson
    intervals with their correlation, so it is far narrower than treating the samples as independent when most of
    them pass or fail under both models, and it stays sound at small n and at 0 or n discordant pairs (where the
    normal approximation collapses to a point).

    Returns the rates, the difference with its interval, n, and the 2 x 2 counts: ``both`` pass, ``new_only``,
    ``base_only``, ``neither``."""
    if len(new) != len(base):
        raise ValueError(f"paired_difference pairs samples by position: {len(new)} against {len(base)}")
    n = len(new)
    both = sum(bool(a) and bool(b) for a, b in zip(new, base))
    new_only = sum(bool(a) and not b for a, b in zip(new, base))
    base_only = sum(not a and bool(b) for a, b in zip(new, base))
    neither = n - both - new_only - base_only
    counts = {"n": n, "both": both, "new_only": new_only, "base_only": base_only, "neither": neither}
    if n == 0:
        return {"new": math.nan, "base": math.nan, "difference": math.nan, "low": -1.0, "high": 1.0, **counts}
    p1, p2 = (both + new_only) / n, (both + base_only) / n
    l1, u1 = wilson_interval(both + new_only, n, z)
    l2, u2 = wilson_interval(both + base_only, n, z)
    # the correlation of the two rates, with Newcombe's continuity correction of its numerator, 0 where a margin is 0
    margins = (both + new_only) * (base_only + neither) * (both + base_only) * (new_only + neither)
    cross = both * neither - new_only * base_only
    phi = 0.0
    if margins > 0:
        phi = (cross - n / 2) / math.sqrt(margins) if cross > n / 2 else min(cross, 0) / math.sqrt(margins)
    d = p1 - p2
    low = d - math.sqrt(max(0.0, (p1 - l1) ** 2 + (u2 - p2) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2)))
    high = d + math.sqrt(max(0.0, (p2 - l2) ** 2 + (u1 - p1) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1)))
    return {"new": p1, "base": p2, "difference": d, "low": max(-1.0, low), "high": min(1.0, high), **counts}
