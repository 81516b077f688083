"""The shapes world's scorer as a preference model for the SPO trainers: ``--preference_model shapes``.

The trainers call ``score(images, prompts, timesteps)`` with PIL images of the candidates' predicted clean images (not
step-aware: the timestep is ignored). The score counts atoms: +1 for each of the prompt's objects drawn, +1 for the
relation, -1 for each object more than the prompt names. Not the evaluation's share of atoms that hold: that gives an
empty image the "no extra object" atom, and the blurry clean images predicted at high noise hold spurious blobs, so
SPO's pools there preferred the emptiest candidate, and 150 steps trained the base into drawing nothing (held-out
accuracy 43% -> 0% at two learning rates). SPO keeps a pool's pair when softmax([s_w, s_l]) differs by more than its
threshold (0.3), so each atom is a logit of ``SCALE``: one atom apart is a softmax difference of 0.85.
"""

from typing import List, Sequence

from shapes import scorer


SCALE = 2.5


def atoms(result: "scorer.ScoreResult") -> int:
    extra = max(len(result.detections) - len(result.prompt.objects), 0)
    return sum(result.object_present) + bool(result.relation) - extra


def score(images: Sequence, prompts: Sequence[str], timesteps: Sequence[int]) -> List[float]:
    return [SCALE * atoms(scorer.score(image, prompt)) for image, prompt in zip(images, prompts)]
