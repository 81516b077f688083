"""The cost, memory and shapes-world benchmarks, each run as ``python benchmarks/<name>.py``; a package so that the
tests import their helpers (``benchmarks.memory``) with the repository root on ``sys.path``."""
