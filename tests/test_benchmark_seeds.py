"""benchmarks/shapes_seeds.py, shrunk: the demo's recipe over training seeds, base and adapters on the same noise,
and an interrupted or repeated benchmark reuses what it has."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO


pytestmark = pytest.mark.slow  # benchmark runs


@pytest.fixture
def pairs(shapes_pairs):
    return shapes_pairs


def run(out, pairs, *flags):
    """The benchmark on ``pairs`` with 2 training steps of 2 pairs, one thread, and ``flags``."""
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "shapes_seeds.py"), "--output_dir", str(out), "--pairs",
         str(pairs), "--max_train_steps", "2", "--train_args", "--train_batch_size 2", "--threads", "1", *flags],
        capture_output=True, text=True, timeout=900, env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )  # fmt: skip


SEEDS_RUN = ["--seeds", "0", "1", "--eval_seeds", "10000", "20000", "--eval_images", "1", "--max_eval_prompts", "2"]


def test_seeds_benchmark_trains_each_seed_and_tabulates_every_evaluation_set(tmp_path, pairs):
    out = tmp_path / "bench"
    proc = run(out, pairs, *SEEDS_RUN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for seed in (0, 1):
        assert os.path.exists(out / "runs" / f"seed{seed}" / "pytorch_lora_weights.safetensors")
    table = (out / "table.md").read_text()
    header = table.splitlines()[2]
    assert "held-out 2 x 1, seeds 10000-" in header and "held-out 2 x 1, seeds 20000-" in header
    assert "train 2 x 1, seeds 20000-" in header
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert {"base", "seed 0", "seed 1", "mean gain over training seeds"} <= set(rows)
    # the seeds' samples pooled against the base's, paired: the same mean gain, with its interval
    gain = rows["mean gain over training seeds"].split(" | ")[1].removesuffix(" points")
    assert rows["paired gain over base, seeds pooled [95% CI]"].split(" | ")[1].startswith(f"{gain} [")
    with open(out / "results.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 3 * 3  # base and two seeds, three sets each
    assert all(len(r["passed"]) == 2 for r in records)

    again = run(out, pairs, *SEEDS_RUN)  # everything done is reused: no training, no sampling
    assert again.returncode == 0, again.stderr[-3000:]
    assert ": accuracy" not in again.stdout and "train inversion_dpo seed" not in again.stdout
    with open(out / "results.jsonl") as f:
        assert len(f.readlines()) == 9
    assert (out / "table.md").read_text() == table


def test_recipe_variants_swap_only_the_preference_term(tmp_path, pairs):
    # --variants: the demo's recipe with Diffusion-DPO at a beta of its own in place of Inversion-DPO, and with no
    # preference term (the sft objective and the anchor at the recipe's ratio); each run tabulated under its name
    # (with its flags), sampled as asked
    import demo

    out = tmp_path / "bench"
    proc = run(
        out, pairs, "--seeds", "0", "--variants", "inversion_dpo", "diffusion_dpo  --beta_dpo 500", "no_preference",
        "--eval_seeds", "10000", "--eval_images", "2", "--max_eval_prompts", "2", "--no_train_prompts", "--eval_steps",
        "5", "--eval_guidance", "3",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]

    def metrics(folder):
        with open(out / "runs" / folder / "logs" / "metrics.jsonl") as f:
            return [r for r in map(json.loads, f) if "step_seconds" in r]

    assert all("margin" in r for r in metrics("diffusion_dpo-beta_dpo-500-seed0"))
    # the variant's own beta wins over the recipe's (the model card states what the run trained with)
    card = (out / "runs" / "diffusion_dpo-beta_dpo-500-seed0" / "README.md").read_text()
    recipe_beta = demo.TRAIN_ARGS[demo.TRAIN_ARGS.index("--beta_dpo") + 1]
    assert "`diffusion_dpo` (beta_dpo 500," in card and recipe_beta != "500"
    sft_weight = float(demo.TRAIN_ARGS[demo.TRAIN_ARGS.index("--sft_weight") + 1])
    anchor = float(demo.TRAIN_ARGS[demo.TRAIN_ARGS.index("--anchor_weight") + 1])
    alone = metrics("no_preference-seed0")
    assert len(alone) == 2 and all("margin" not in r for r in alone)
    for r in alone:  # the loss is the two terms at the recipe's ratio, nothing else
        assert r["loss"] == pytest.approx(r["sft"] + anchor / sft_weight * r["anchor"], rel=1e-5)
    assert alone[0]["grad_norm"] > 0
    table = (out / "table.md").read_text()
    name = "held-out 2 x 2, seeds 10000-, 5 steps, guidance 3"
    assert name in table.splitlines()[2]
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert {"base", "seed 0", "diffusion_dpo --beta_dpo 500 seed 0", "no_preference seed 0"} <= set(rows)
    assert {
        "mean gain over training seeds (diffusion_dpo --beta_dpo 500)",
        "mean gain over training seeds (no_preference)",
        "diffusion_dpo --beta_dpo 500 - inversion_dpo, paired [95% CI]",
    } <= set(rows)
    # each variant against the recipe, paired on the same samples
    with open(out / "results.jsonl") as f:
        passed = {(r["run"], r["set"]): r["passed"] for r in map(json.loads, f)}
    assert len(passed[("seed 0", name)]) == 4
    diff = sum(passed[("no_preference seed 0", name)]) - sum(passed[("seed 0", name)])
    assert (
        rows["no_preference - inversion_dpo, paired [95% CI]"].split(" | ")[1].startswith(f"{100 * diff / 4:+.1f} [")
    )


def test_no_preference_needs_the_recipes_sft_term():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from shapes_seeds import variant_flags

    import demo

    flags = variant_flags("no_preference", demo.TRAIN_ARGS + ["--max_grad_norm", "2"])
    assert flags[flags.index("--objective") + 1] == "sft" and flags[flags.index("--sft_weight") + 1] == "0"
    assert float(flags[flags.index("--max_grad_norm") + 1]) == pytest.approx(2 / 300)
    with pytest.raises(SystemExit, match="its --sft_weight is 0"):
        variant_flags("no_preference", demo.TRAIN_ARGS + ["--sft_weight", "0"])


@pytest.mark.parametrize(
    "variants, message",
    [
        (["dpo"], "unknown variant 'dpo'; expected one of"),
        (["diffusion_dpo --beta_dpo 500 --bogus_flag 1"], "'--bogus_flag' is not a flag of train_inversion_dpo.py"),
        (
            ["inpo --learning_rate 1e-3", "inpo --learning_rate=1e-3"],
            "would share the folder 'inpo-learning_rate-1e-3'",
        ),
    ],
)
def test_a_bad_variant_stops_the_benchmark_before_it_samples(tmp_path, pairs, variants, message):
    proc = run(tmp_path / "bench", pairs, "--variants", *variants)
    assert proc.returncode != 0
    assert message in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "bench" / "results.jsonl").exists()
