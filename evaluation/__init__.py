"""Evaluating a base model against aligned ones: ``scorers`` (image-text reward models for ``evaluate.py``),
``stats`` (confidence intervals and win rates) and ``plots`` (image grids and line plots)."""
