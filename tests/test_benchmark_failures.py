"""benchmarks/failure_kinds.py, shrunk: base and an adapter sampled on the same noise, every sample counted once
under one kind of failure."""

import os
import subprocess
import sys

import pytest
from conftest import REPO, random_lora


pytestmark = pytest.mark.slow  # benchmark runs


def test_failure_kinds_counts_every_sample_of_base_and_adapter(tmp_path):
    model = os.path.join(REPO, "models", "shapes-sd-tiny")
    adapter = random_lora(model, tmp_path / "noisy", scale=0.05)
    out = tmp_path / "kinds.md"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "failure_kinds.py"), "--adapters", adapter,
         "--max_prompts", "3", "--train_every", "4", "--steps", "4", "--threads", "1", "--output", str(out)],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = out.read_text()
    assert table.strip() == proc.stdout.strip()
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    header, body = rows[0], rows[1:]
    assert header[1:] == ["held-out (2 a prompt): base", "held-out (2 a prompt): noisy",
                          "train, every 4 (1 a prompt): base", "train, every 4 (1 a prompt): noisy |"]  # fmt: skip
    from shapes.sampling import FAILURE_KINDS

    assert [r[0].strip("| ") for r in body] == list(FAILURE_KINDS)
    totals = [sum(int(r[c].split()[0]) for r in body) for c in range(1, 5)]
    assert totals == [6, 6, 3, 3]  # 3 prompts x 2 samples held-out, 3 x 1 train: each sample once


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--held_images", "0"], "must be at least 1"),
        (["--adapters", "runs/seed1/checkpoint-300", "runs/seed2/checkpoint-300"], "named 'checkpoint-300'"),
        (["--adapters", "runs/base"], "named 'base'"),
    ],
)
def test_failure_kinds_rejects_bad_flags_in_one_line(flags, message):
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "failure_kinds.py"), *flags],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1]
