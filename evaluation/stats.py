"""Small statistics for comparing a base model with aligned ones: confidence intervals and paired win rates."""

import math
from typing import Dict, Sequence, Tuple


def wilson_interval(successes: float, n: int, z: float = 1.96) -> Tuple[float, float]:
    """95% Wilson score interval of a proportion (sound at 0% and 100%, unlike the normal approximation)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(values: Sequence[float], z: float = 1.96) -> Tuple[float, float, float]:
    """Mean and its 95% normal-approximation interval."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, mean, mean
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = z * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def win_rate(new: Sequence[float], base: Sequence[float]) -> Dict[str, float]:
    """Paired comparison on the same prompts and noise: a win counts 1, a tie 1/2. Returns the rate and its 95% CI."""
    outcomes = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(new, base)]
    rate, low, high = mean_interval(outcomes)
    return {
        "win_rate": rate,
        "low": max(0.0, low),
        "high": min(1.0, high),
        "wins": sum(o == 1.0 for o in outcomes),
        "ties": sum(o == 0.5 for o in outcomes),
        "n": len(outcomes),
    }
