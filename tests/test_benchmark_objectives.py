"""benchmarks/shapes_objectives.py, shrunk: every run trained by the real trainer with a checkpoint per evaluation,
each checkpoint sampled on the held-out prompts, tabulated and plotted; a run may carry flags of its own."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO


pytestmark = pytest.mark.slow  # benchmark runs


def run(out, pairs, *runs):
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "shapes_objectives.py"), "--output_dir", str(out), "--pairs",
         str(pairs), "--seeds", "0", "--max_train_steps", "2", "--eval_every", "1", "--eval_prompts", "2",
         "--train_args", "--train_batch_size 2 --learning_rate 1e-3 --inversion_steps 2 --rank 4", "--runs", *runs],
        capture_output=True, text=True, timeout=900, env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )  # fmt: skip


def test_objectives_benchmark_evaluates_every_checkpoint_of_every_run(tmp_path, shapes_pairs):
    out = tmp_path / "bench"
    proc = run(out, shapes_pairs, "diffusion_dpo --beta_dpo 500", "sft")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the run's own beta reached the trainer (its model card states what it trained with)
    card = (out / "runs" / "diffusion_dpo-beta_dpo-500-seed0" / "README.md").read_text()
    assert "`diffusion_dpo` (beta_dpo 500," in card
    for folder in ("diffusion_dpo-beta_dpo-500-seed0", "sft-seed0"):
        for step in (1, 2):
            assert os.path.isdir(out / "runs" / folder / f"checkpoint-{step}")
    with open(out / "results.jsonl") as f:
        records = [json.loads(line) for line in f]
    keys = {(r["run"], r["seed"], r["step"]) for r in records}
    assert keys == {("base", 0, 0)} | {(name, 0, step) for name in ("diffusion_dpo --beta_dpo 500", "sft")
                                       for step in (1, 2)}  # fmt: skip
    assert all(len(r["passed"]) == 2 and len(r["scores"]) == 2 for r in records)
    table = (out / "table.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert {"diffusion_dpo --beta_dpo 500", "sft", "base"} <= set(rows)
    final = sum(next(r for r in records if r["run"] == "sft" and r["step"] == 2)["passed"]) / 2
    assert rows["sft"].split(" | ")[1].startswith(f"{final:.1%} (")
    assert os.path.getsize(out / "curves.png") > 0

    again = run(out, shapes_pairs, "diffusion_dpo --beta_dpo 500", "sft")  # everything done is reused
    assert again.returncode == 0, again.stderr[-3000:]
    assert "train " not in again.stdout
    with open(out / "results.jsonl") as f:
        assert len(f.readlines()) == len(records)
    assert (out / "table.md").read_text() == table


def test_an_unknown_run_label_is_a_one_line_error(tmp_path, shapes_pairs):
    proc = run(tmp_path / "bench", shapes_pairs, "inversion_dpo:x1")
    assert proc.returncode != 0
    assert "unknown run label 'inversion_dpo:x1'; expected one of" in proc.stderr.strip().splitlines()[-1]
