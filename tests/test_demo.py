"""The README's main command, shrunk: the whole shapes story runs and writes what it promises."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO


pytestmark = pytest.mark.slow  # the whole demo


def run_demo(tmp_path, *extra):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "demo.py"),
            *extra,
            "--output_dir",
            str(out),
            "--pair_prompts",
            "3",
            "--images_per_prompt",
            "3",
            "--eval_seeds",
            "1",
            "--max_eval_prompts",
            "3",
            "--train_args",
            "--max_train_steps 2 --train_batch_size 2",
        ],
        cwd=tmp_path,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_demo_story_end_to_end(tmp_path):
    out, proc = run_demo(tmp_path)
    for name in (
        "pytorch_lora_weights.safetensors",
        "README.md",
        "results.md",
        "before_after.png",
        "training_curve.png",
        "pairs.parquet",
    ):
        assert (out / name).exists(), name
    results = json.loads((out / "results.json").read_text())
    held_out = results["table"]["held-out two-object"]
    assert held_out["base"]["n"] == 3 and 0.0 <= held_out["aligned"]["win_rate"]["win_rate"] <= 1.0
    assert "| held-out two-object | aligned |" in proc.stdout
    # every held-out sample is counted once in what changed between base and aligned on the same noise
    changes = held_out["aligned"]["transitions"]
    assert sum(n for row in changes.values() for n in row.values()) == 3
    assert "held-out two-object, per sample (base -> aligned, the same noise): relation -> pass" in proc.stdout
    assert list((out / "inversion_cache").glob("*/*")), "the demo trains from the reference-side cache"
    # results.json records the training flags as run, so that the run can be repeated from it
    flags = results["train_args"]
    assert results["train_script"] == "train_inversion_dpo.py"
    assert os.path.samefile(flags[flags.index("--inversion_cache") + 1], out / "inversion_cache")
    assert flags[flags.index("--dataset_name") + 1].endswith("pairs.parquet")
    # the winners' sft and reference anchors are on, from the cache, and logged; the prompts the pairs came from are
    # evaluated too
    assert float(flags[flags.index("--sft_weight") + 1]) > 0 and float(flags[flags.index("--anchor_weight") + 1]) > 0
    steps = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert any("sft" in r and "anchor" in r for r in steps)
    assert results["table"]["train two-object (every 4th)"]["aligned"]["n"] == 3
    # every pair's winner passes its prompt (--min_winner_score 1.0)
    import pyarrow.parquet as pq

    pairs = pq.read_table(out / "pairs.parquet").to_pydict()
    assert pairs["caption"] and all(max(a, b) == 1.0 for a, b in zip(pairs["score_0"], pairs["score_1"]))


def test_demo_on_the_sdxl_twin_trains_with_the_sdxl_script(tmp_path):
    out, proc = run_demo(tmp_path, "--model", os.path.join(REPO, "models", "shapes-sdxl-tiny"))
    assert "accelerate launch train_inversion_dpo_sdxl.py" in proc.stdout
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(os.path.join(REPO, "models", "shapes-sdxl-tiny"))
    pipe.load_lora_weights(str(out))  # the stock SDXL loader takes the demo's adapter
    assert any("lora" in name for name, _ in pipe.unet.named_parameters())
    assert json.loads((out / "results.json").read_text())["table"]["held-out two-object"]["aligned"]["n"] == 3


def test_the_training_curve_plots_a_running_mean_of_the_per_step_values():
    sys.path.insert(0, REPO)
    import demo

    steps = [(s, float(s % 2)) for s in range(1, 7)]  # a loss that jumps between 0 and 1 every step
    assert demo.running_mean(steps, 1) == steps
    assert demo.running_mean(steps, 2) == [(1, 1.0), (2, 0.5), (3, 0.5), (4, 0.5), (5, 0.5), (6, 0.5)]
