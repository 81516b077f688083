"""The shapes world, a miniature of compositional generation that a program can check: ``world`` (prompts, the
held-out split, renders), ``scorer`` (the pixel-only scorer), ``sampling`` (sampling and scoring a pipeline with fixed
seeds) and ``pairs`` (preference pairs from a model's own samples)."""
