"""The shapes world's scorer as a preference model for the SPO trainers: ``--preference_model shapes``.

The trainers call ``score(images, prompts, timesteps)`` with PIL images of the candidates' predicted clean images.
The shapes score is the share of a prompt's atoms (each object present, the relation, no extra object) that hold,
in [0, 1]; it is not step-aware (the timestep is ignored). SPO keeps a pool's pair when softmax([s_w, s_l]) differs
by more than its threshold (0.3), so the score is returned as a logit: ``SCALE`` times it, where one atom of a
two-object prompt (a quarter) is a logit gap of 2.5, a softmax difference of 0.85.
"""

from typing import List, Sequence

from shapes import scorer


SCALE = 10.0


def score(images: Sequence, prompts: Sequence[str], timesteps: Sequence[int]) -> List[float]:
    return [SCALE * scorer.score(image, prompt).score for image, prompt in zip(images, prompts)]
