"""train_inversion_dpo.py end to end through `accelerate launch`, on a tiny SD and a Pick-a-Pic-schema parquet."""

import math
import os

import pytest
import torch
from script_runner import QUICK, lora, metrics, run


SCRIPT = "train_inversion_dpo.py"

OBJECTIVES = [
    # the user's flags ride along: 8-bit Adam (bitsandbytes runs on the CPU), gradient checkpointing, bf16 autocast
    ["--objective", "diffusion_dpo", "--use_8bit_adam", "--gradient_checkpointing"],
    ["--objective", "inversion_dpo", "--inversion_target", "reference"],
    ["--objective", "inversion_dpo", "--inversion_target", "step", "--inversion_guidance_scale", "2"],
    [
        "--objective",
        "inversion_dpo",
        "--inversion_target",
        "x0",
        "--timestep_weighting",
        "uniform",
        "--inversion_margin",
        "step",
    ],
    ["--objective", "inpo", "--inpo_eta", "0.1", "--loss_type", "hinge"],
    [
        "--objective",
        "sft",
        "--mixed_precision",
        "bf16",
        "--validation_prompts",
        "a red circle",
        "--validation_num_inference_steps",
        "2",
    ],
]


@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda o: "-".join(o[1::2]))
def test_every_objective_trains_a_lora(objective, tiny_sd_dir, tiny_pairs_parquet, tmp_path):
    out = str(tmp_path / "out")
    run(
        SCRIPT,
        [
            "--pretrained_model_name_or_path",
            tiny_sd_dir,
            "--dataset_name",
            tiny_pairs_parquet,
            "--output_dir",
            out,
            "--max_train_steps",
            2,
            *QUICK,
            *objective,
        ],
    )
    rows = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("loss", "lr", "seconds"):
        assert all(math.isfinite(r[key]) for r in rows)
    name = objective[1]
    if name != "sft":
        assert {"margin", "accuracy"} <= set(rows[0])
        # policy == reference at the first step: margin 0, loss log 2 (hinge: 1)
        assert rows[0]["margin"] == 0.0
        assert rows[0]["loss"] == pytest.approx(1.0 if "hinge" in objective else math.log(2), abs=1e-4)
    lora_b = [v for k, v in lora(out).items() if "lora_B" in k or "lora.up" in k]
    assert lora_b, "no LoRA up-projection saved"
    moved = max(v.abs().max().item() for v in lora_b)
    if "reference" in objective:
        # method.md: the reference target has zero gradient at initialisation, so a LoRA (B = 0) never moves
        assert moved == 0.0
    else:
        assert moved > 0.0
    card = open(os.path.join(out, "README.md")).read()
    for tag in ("diffusers", "lora", "text-to-image", "inversion-dpo", f"`{name}`"):
        assert tag in card


@pytest.fixture(scope="module")
def four_steps(tiny_sd_dir, tiny_pairs_parquet, tmp_path_factory):
    """One uninterrupted 4-step run with a checkpoint every step, at most 2 kept, and validation."""
    out = str(tmp_path_factory.mktemp("run") / "out")
    args = [
        "--pretrained_model_name_or_path",
        tiny_sd_dir,
        "--dataset_name",
        tiny_pairs_parquet,
        "--checkpointing_steps",
        1,
        "--checkpoints_total_limit",
        2,
        *QUICK,
        "--train_batch_size",
        1,
        "--objective",
        "inpo",
        "--inpo_eta",
        0.1,
    ]
    run(
        SCRIPT,
        args
        + [
            "--output_dir",
            out,
            "--max_train_steps",
            4,
            "--validation_prompts",
            "a red circle",
            "a blue square",
            "--validation_steps",
            2,
            "--validation_num_inference_steps",
            2,
        ],
    )
    return out, args


def test_checkpoint_rotation_and_validation(four_steps):
    out, _ = four_steps
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint")) == ["checkpoint-3", "checkpoint-4"]
    assert not [d for d in os.listdir(out) if d.startswith(".partial")]
    assert sorted(os.listdir(os.path.join(out, "validation"))) == ["final-000004.png", "validation-000002.png"]
    assert os.path.exists(os.path.join(out, "validation.png"))
    assert "validation.png" in open(os.path.join(out, "README.md")).read()


def test_resume_continues_the_same_adapter_and_data_order(four_steps, tmp_path):
    out, args = four_steps
    resumed = str(tmp_path / "resumed")
    run(SCRIPT, args + ["--output_dir", resumed, "--max_train_steps", 2])
    run(SCRIPT, args + ["--output_dir", resumed, "--max_train_steps", 4, "--resume_from_checkpoint", "latest"])
    assert [r["step"] for r in metrics(resumed) if "loss" in r] == [1, 2, 3, 4]
    straight, continued = lora(out), lora(resumed)
    assert straight.keys() == continued.keys()
    for k in straight:
        assert torch.allclose(straight[k], continued[k], atol=1e-6), k
    # the same losses step by step: same data order and the same noise draws
    assert [round(r["loss"], 5) for r in metrics(out) if "loss" in r] == [
        round(r["loss"], 5) for r in metrics(resumed) if "loss" in r
    ]


def test_lora_loads_into_stock_pipeline_and_changes_output(four_steps, tiny_sd_dir):
    from diffusers import StableDiffusionPipeline

    out, _ = four_steps
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, feature_extractor=None)
    pipe.set_progress_bar_config(disable=True)

    def sample():
        g = torch.Generator().manual_seed(0)
        return pipe("a red circle", num_inference_steps=3, height=32, width=32, generator=g, output_type="pt").images

    before = sample()
    pipe.load_lora_weights(out)
    after = sample()
    assert (after - before).abs().max() > 1e-4


def test_missing_column_is_one_clear_line(tiny_sd_dir, tiny_pairs_parquet, tmp_path):
    proc = run(
        SCRIPT,
        [
            "--pretrained_model_name_or_path",
            tiny_sd_dir,
            "--dataset_name",
            tiny_pairs_parquet,
            "--output_dir",
            tmp_path,
            "--caption_column",
            "prompt",
        ],
        launcher="python",
        check=False,
    )
    assert proc.returncode == 2
    assert (
        "error: dataset" in proc.stderr and "no column 'prompt'" in proc.stderr and "--caption_column" in proc.stderr
    )
    assert "Traceback" not in proc.stderr


def test_hub_ids_offline_are_one_clear_line(tiny_sd_dir, tiny_pairs_parquet, tmp_path):
    proc = run(
        SCRIPT,
        [
            "--pretrained_model_name_or_path",
            tiny_sd_dir,
            "--dataset_name",
            "someone/pick-a-pic",
            "--output_dir",
            tmp_path,
        ],
        launcher="python",
        check=False,
    )
    assert proc.returncode == 2 and "could not load dataset 'someone/pick-a-pic'" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run(
        SCRIPT,
        [
            "--pretrained_model_name_or_path",
            "someone/sd",
            "--dataset_name",
            tiny_pairs_parquet,
            "--output_dir",
            tmp_path,
        ],
        launcher="python",
        check=False,
    )
    assert proc.returncode == 2 and "of model 'someone/sd'" in proc.stderr
    assert "Traceback" not in proc.stderr
