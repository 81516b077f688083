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
    # the headline: the last line printed and the first of results.md, decided by the paired interval
    diff = held_out["aligned"]["accuracy_difference"]
    assert (diff["n"], diff["base"]) == (3, held_out["base"]["accuracy"])
    verdict = "beat the base" if diff["low"] > 0 else "did not beat the base"
    assert proc.stdout.strip().splitlines()[-1] == results["headline"]
    assert results["headline"].startswith("Held-out prompts, full-prompt accuracy: base ")
    assert results["headline"].endswith(
        f"(paired: 3 samples of 3 prompts on the same noise): the aligned model {verdict}."
    )
    report = (out / "results.md").read_text().splitlines()
    assert report[0] == results["headline"] and "not reproducible to the digit" in report[2]
    assert report[4].startswith("| prompts | model |")
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


def test_demo_on_the_sd3_twin_trains_with_the_sd3_script(tmp_path):
    model = os.path.join(REPO, "models", "shapes-sd3-tiny")
    out, proc = run_demo(tmp_path, "--model", model)
    assert "accelerate launch train_inversion_dpo_sd3.py" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    flags = results["train_args"]
    assert flags[flags.index("--max_sequence_length") + 1] == "16"  # as the twin was trained and is sampled
    assert flags.count("--lora_target_modules") == 1
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(model)
    pipe.load_lora_weights(str(out))  # the stock SD3 loader takes the demo's adapter
    lora = {name for name, _ in pipe.transformer.named_parameters() if "lora" in name}
    assert any(".ff_context." in name for name in lora) and any(".add_q_proj." in name for name in lora)
    assert results["table"]["held-out two-object"]["aligned"]["n"] == 3


def test_the_demo_picks_the_trainer_of_the_model_architecture(tmp_path):
    """From the folder's model_index.json: SD, SDXL and SD3 (with its LoRA modules and T5's caption length; without
    T5, --no_t5)."""
    from tests.tiny import save_tiny_sd3

    demo = import_demo()
    assert demo.trainer_for(os.path.join(REPO, "models", "shapes-sd-tiny")) == ("train_inversion_dpo.py", [])
    assert demo.trainer_for(os.path.join(REPO, "models", "shapes-sdxl-tiny")) == ("train_inversion_dpo_sdxl.py", [])
    script, flags = demo.trainer_for(save_tiny_sd3(str(tmp_path / "sd3")))
    assert script == "train_inversion_dpo_sd3.py"
    assert flags == ["--lora_target_modules", demo.SD3_LORA_TARGET_MODULES, "--max_sequence_length", "32"]
    script, flags = demo.trainer_for(save_tiny_sd3(str(tmp_path / "no_t5"), t5=False))
    assert script == "train_inversion_dpo_sd3.py" and flags[-1] == "--no_t5"
    # the recipe names the LoRA modules once, the architecture's
    script, recipe = demo.recipe_for(str(tmp_path / "sd3"))
    assert recipe.count("--lora_target_modules") == 1
    assert recipe[recipe.index("--lora_target_modules") + 1] == demo.SD3_LORA_TARGET_MODULES
    assert (
        recipe[: recipe.index("--lora_target_modules")]
        == demo.TRAIN_ARGS[: demo.TRAIN_ARGS.index("--lora_target_modules")]
    )
    assert demo.recipe_for(os.path.join(REPO, "models", "shapes-sd-tiny")) == (
        "train_inversion_dpo.py",
        demo.TRAIN_ARGS,
    )


def import_demo():
    sys.path.insert(0, REPO)
    import demo

    return demo


def test_the_headline_says_beat_only_when_the_paired_interval_is_above_zero():
    from evaluation.stats import paired_difference

    demo = import_demo()
    gain = paired_difference([True] * 60 + [False] * 40, [True] * 50 + [False] * 50)
    assert demo.headline(gain, 50) == (
        "Held-out prompts, full-prompt accuracy: base 50.0% -> aligned 60.0%, +10.0 points [95% CI +3.8, +16.0] "
        "(paired: 100 samples of 50 prompts on the same noise): the aligned model beat the base."
    )
    small = paired_difference([True, True, False], [False, True, False])
    assert small["difference"] > 0 and small["low"] < 0
    assert demo.headline(small, 3).endswith(": the aligned model did not beat the base.")
    assert demo.headline(paired_difference([False] * 9, [True] * 9), 9).endswith("did not beat the base.")


def curve_rows(with_preference_loss):
    rows = []
    for step in range(1, 31):
        row = {"step": step, "loss": 0.5 + 300 * 0.2 + 30000 * 1e-5, "sft": 0.2, "anchor": 1e-5, "accuracy": step % 2}
        if with_preference_loss:
            row["preference_loss"] = 0.25 + 0.01 * step
        rows.append(row)
    return rows + [{"final": True, "step": 30, "pairs": 4}]


@pytest.mark.parametrize("with_preference_loss", [False, True])
def test_the_training_curve_has_a_labelled_panel_per_term(tmp_path, with_preference_loss):
    from evaluation.plots import axes_texts, running_mean

    demo = import_demo()
    rows = curve_rows(with_preference_loss)
    flags = [*demo.TRAIN_ARGS, "--sft_weight", "300"]  # the last one wins, as in the trainer
    fig = demo.training_curve(rows, flags, str(tmp_path / "training_curve.png"))
    assert (tmp_path / "training_curve.png").stat().st_size > 0
    assert [t["title"] for t in axes_texts(fig)] == [
        "preference loss",
        "sft loss on the winners (x 300 in the total)",
        "reference anchor (x 30000 in the total)",
        "preference accuracy (pairs ranked right)",
    ]
    assert all(t["xlabel"] == "optimizer step" and t["ylabel"] for t in axes_texts(fig))
    assert all(ax.get_yticklabels() and ax.get_xticklabels() for ax in fig.axes)
    assert (
        fig.get_suptitle()
        == "Training (inversion_dpo), 30 steps: total loss = preference + 300 x sft + 30000 x anchor"
    )
    # the preference loss: the logged key where there is one, else the total less the weighted terms
    raw, smooth, no_preference = fig.axes[0].get_lines()
    expected = [0.25 + 0.01 * s for s in range(1, 31)] if with_preference_loss else [0.5] * 30
    assert list(raw.get_ydata()) == pytest.approx(expected)
    window = 2  # 30 steps // 15
    assert list(smooth.get_ydata()) == pytest.approx(
        [y for _, y in running_mean(list(zip(range(1, 31), expected)), window)]
    )
    assert list(no_preference.get_ydata()) == pytest.approx([0.6931472] * 2)  # log 2: the sigmoid loss at margin 0
    # the extra terms unweighted; the accuracy in [0, 1] with chance marked
    assert list(fig.axes[1].get_lines()[0].get_ydata()) == pytest.approx([0.2] * 30)
    accuracy = fig.axes[3]
    assert accuracy.get_ylim()[0] < 0 and 1 < accuracy.get_ylim()[1] < 1.1
    chance = [line for line in accuracy.get_lines() if line.get_label() == "chance (0.5)"]
    assert chance and list(chance[0].get_ydata()) == [0.5, 0.5]


def test_the_trainer_flag_read_is_the_last_one_given():
    demo = import_demo()
    assert demo.train_flag(["--sft_weight", "300", "--sft_weight=5"], "--sft_weight") == "5"
    assert demo.train_flag(["--anchor_weight", "1"], "--sft_weight") == "0"
    assert demo.train_flag([], "--loss_type", "sigmoid") == "sigmoid"
