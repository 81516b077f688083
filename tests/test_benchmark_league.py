"""benchmarks/league.py, shrunk: the sweep on the first seed, the best setting on the other seeds, every checkpoint
evaluated, the data's cost (pair sampling, the cache build) counted in the offline methods' compute."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO


pytestmark = pytest.mark.slow  # benchmark runs


def run(out, *methods):
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "league.py"), "--output_dir", str(out), "--seeds", "0", "1",
         "--offline_steps", "2", "--spo_steps", "1", "--checkpoints", "1", "--eval_prompts", "2", "--eval_images", "1",
         "--pair_prompts", "12", "--images_per_prompt", "3", "--methods", *methods],
        capture_output=True, text=True, timeout=900, env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )  # fmt: skip


def test_league_sweeps_then_trains_the_best_setting_and_counts_the_data(tmp_path):
    sys.path.insert(0, REPO)
    from benchmarks.league import SWEEP, run_folder

    out = tmp_path / "league"
    proc = run(out, "inversion_dpo:per_step", "spo")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "results.jsonl") as f:
        records = [json.loads(line) for line in f]
    keys = {(r["run"], r["seed"]) for r in records}
    for method in ("inversion_dpo:per_step", "spo"):
        swept = {s: r for s in SWEEP[method] for r in records if r["run"] == f"{method} {s}" and r["seed"] == 0}
        assert set(swept) == set(SWEEP[method])  # every candidate trained and evaluated on the first seed
        # the second seed trained only the best one (the earlier candidate on a tie)
        best = max(SWEEP[method], key=lambda s: (sum(swept[s]["passed"]), -SWEEP[method].index(s)))
        assert {s for s in SWEEP[method] if (f"{method} {s}", 1) in keys} == {best}
    table = (out / "table.md").read_text()
    rows = {
        line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines() if line.startswith("| ")
    }
    assert {"inversion_dpo:per_step", "spo"} <= set(rows)

    # compute: the offline run's UNet evaluations start from the pairs' sampling and the cache build; SPO's are its
    # steps' own rows (its metrics count the sampling), a row with grad counting 3
    data = json.loads((out / "data.json").read_text())
    cache = json.loads((out / "inversion_cache.json").read_text())
    assert data["unet_rows"] == data["samples"] * 25 * 2 and cache["unet_rows"] > 0
    for method, start in (("inversion_dpo:per_step", data["unet_rows"] + cache["unet_rows"]), ("spo", 0)):
        best = next(s for s in SWEEP[method] if (f"{method} {s}", 1) in keys)
        own = []
        for seed in (0, 1):
            with open(out / "runs" / run_folder(method, best, seed) / "logs" / "metrics.jsonl") as f:
                steps = [json.loads(line) for line in f if "step_seconds" in line]
            if method == "spo":
                own.append(sum(3 * s["unet_grad_evals"] + s["unet_evals"] for s in steps))
            else:
                own.append(sum(8 * (3 * s["unet_grad_evals_per_pair"] + s["unet_evals_per_pair"]) for s in steps))
        assert min(own) > 0
        assert float(rows[method][6].replace(",", "")) == pytest.approx(start + sum(own) / 2, abs=1)
    assert os.path.getsize(out / "curves.png") > 0

    again = run(out, "inversion_dpo:per_step", "spo")  # everything done is reused
    assert again.returncode == 0, again.stderr[-3000:]
    assert "train " not in again.stdout
    assert (out / "table.md").read_text() == table
