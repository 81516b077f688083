"""Evaluating a base model against aligned ones: ``scorers`` (image-text reward models for ``evaluate.py``),
``stats`` (confidence intervals, win rates and paired differences) and ``plots`` (image grids and curves, drawn with
matplotlib)."""
