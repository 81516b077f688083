"""train_inversion_dpo_sdxl.py: its conditioning against StableDiffusionXLPipeline's own, then end to end through
`accelerate launch` on a tiny SDXL and a Pick-a-Pic-schema parquet."""

import math
import os
import shutil

import pytest
import torch
from huggingface_hub import ModelCard
from script_runner import QUICK, lora, metrics, run


SCRIPT = "train_inversion_dpo_sdxl.py"


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_conditioning_is_the_pipelines_with_each_images_time_ids(sdxl):
    from train_inversion_dpo_sdxl import TextEncoders, pair_conditioning

    captions = ["a red circle", "a blue square"]
    batch = {
        "captions": captions,
        # [B, 2, 2] (h, w) and (top, left) of (winner, loser): the second pair's images differ in size and crop
        "original_sizes": torch.tensor([[[32, 32], [32, 32]], [[48, 64], [40, 32]]]),
        "crop_top_lefts": torch.tensor([[[0, 0], [0, 0]], [[0, 8], [4, 0]]]),
    }
    text = TextEncoders([sdxl.tokenizer, sdxl.tokenizer_2], [sdxl.text_encoder, sdxl.text_encoder_2])
    with torch.no_grad():
        cond, null = pair_conditioning(batch, text, 32)
        embeds, _, pooled, _ = sdxl.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False)

    # the same text conditioning as the stock pipeline's, for winners then losers
    torch.testing.assert_close(cond["encoder_hidden_states"], torch.cat([embeds, embeds]))
    torch.testing.assert_close(cond["added_cond_kwargs"]["text_embeds"], torch.cat([pooled, pooled]))
    ids = cond["added_cond_kwargs"]["time_ids"]
    assert ids.shape == (4, 6)
    # rows: winner 0, winner 1, loser 0, loser 1; each the pipeline's own time ids for that image
    for row, (b, k) in enumerate([(0, 0), (1, 0), (0, 1), (1, 1)]):
        size, crop = batch["original_sizes"][b, k].tolist(), batch["crop_top_lefts"][b, k].tolist()
        expected = sdxl._get_add_time_ids(tuple(size), tuple(crop), (32, 32), torch.float32, 32)
        torch.testing.assert_close(ids[row : row + 1], expected)
    assert not torch.equal(ids[1], ids[3])  # winner and loser of the second pair differ

    # force_zeros_for_empty_prompt: the null text and pooled embeddings are zeros, the time ids stay
    assert not null["encoder_hidden_states"].any() and not null["added_cond_kwargs"]["text_embeds"].any()
    assert null["encoder_hidden_states"].shape == cond["encoder_hidden_states"].shape
    assert null["added_cond_kwargs"]["time_ids"] is ids

    # and the time ids reach the UNet: the same latent, caption and step, other sizes, another prediction
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).expand(4, -1, -1, -1)
    with torch.no_grad():
        eps = sdxl.unet(x, torch.tensor(500), **cond).sample
    assert torch.equal(cond["encoder_hidden_states"][1], cond["encoder_hidden_states"][3])
    assert (eps[1] - eps[3]).abs().max() > 1e-4


def test_parser_defaults_and_vae_flag():
    from train_inversion_dpo_sdxl import parse_args

    args = parse_args(["--pretrained_model_name_or_path", "m", "--dataset_name", "d"])
    assert args.resolution == 1024 and args.pretrained_vae_model_name_or_path is None
    args = parse_args(
        ["--pretrained_model_name_or_path", "m", "--dataset_name", "d", "--pretrained_vae_model_name_or_path", "v"]
    )
    assert args.pretrained_vae_model_name_or_path == "v"


def check_run(out, objective, steps=2, samples=4):
    """The metrics, the first step's log 2, a moved adapter and the model card of a run of ``steps`` steps, with
    ``samples`` final validation samples (4: the data's first distinct captions, without --validation_prompts)."""
    rows = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(math.isfinite(r["loss"]) for r in rows)
    name = objective[1]
    if name != "sft":
        # policy == reference at the first step: margin 0, loss log 2
        assert rows[0]["margin"] == 0.0
        assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    lora_b = [v for k, v in lora(out).items() if "lora_B" in k or "lora.up" in k]
    assert lora_b and max(v.abs().max().item() for v in lora_b) > 0.0
    card = open(os.path.join(out, "README.md")).read()
    for tag in ("lora", "inversion-dpo", "stable-diffusion-xl", f"`{name}`"):
        assert tag in card
    assert len(ModelCard(card).data.widget) == samples
    assert f"| 6 | {steps} |" in card


OBJECTIVES = [
    ["--objective", "diffusion_dpo", "--gradient_checkpointing"],
    # guidance 2: the inversion runs through the zeros null conditioning
    ["--objective", "inversion_dpo", "--inversion_target", "step", "--inversion_guidance_scale", "2"],
    # bf16 autocast with the VAE kept in fp32 (the tiny VAE asks for force_upcast, as SDXL's does)
    ["--objective", "sft", "--mixed_precision", "bf16"],
]
# inpo runs in the resume fixture below
RESUMABLE = ["--objective", "inpo", "--inpo_eta", "0.1"]


def common(tiny_sdxl_dir, tiny_pairs_parquet):
    return ["--pretrained_model_name_or_path", tiny_sdxl_dir, "--dataset_name", tiny_pairs_parquet, *QUICK]


@pytest.mark.slow
@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda o: o[1])
def test_every_objective_trains_a_lora(objective, tiny_sdxl_dir, tiny_pairs_parquet, tmp_path):
    out = str(tmp_path / "out")
    flags = ["--output_dir", out, "--max_train_steps", 2, "--num_validation_prompts", 4, *objective]
    run(SCRIPT, common(tiny_sdxl_dir, tiny_pairs_parquet) + flags, launcher="accelerate")
    check_run(out, objective)


@pytest.fixture(scope="module")
def inpo_runs(tiny_sdxl_dir, tiny_pairs_parquet, tmp_path_factory):
    """inpo (fresh noise every step: the random streams must continue) 4 steps straight with a checkpoint every step
    and validation; and a run resumed from the latest checkpoint of a folder holding that run's step 2 (what a 2-step
    run leaves: one launch fewer on a 2-core machine) up to 4."""
    root = tmp_path_factory.mktemp("sdxl-runs")
    straight, resumed = str(root / "straight"), str(root / "resumed")
    args = common(tiny_sdxl_dir, tiny_pairs_parquet) + ["--train_batch_size", 1, "--checkpointing_steps", 1]
    args += RESUMABLE
    validation = ["--validation_prompts", "a red circle", "--validation_steps", 2]
    validation += ["--validation_num_inference_steps", 2]
    run(SCRIPT, args + ["--output_dir", straight, "--max_train_steps", 4, *validation])
    shutil.copytree(os.path.join(straight, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    run(SCRIPT, args + ["--output_dir", resumed, "--max_train_steps", 4, "--resume_from_checkpoint", "latest"])
    return straight, resumed


@pytest.mark.slow
def test_inpo_trains_a_lora(inpo_runs):
    check_run(inpo_runs[0], RESUMABLE, steps=4, samples=1)


@pytest.mark.slow
def test_resume_continues_the_same_adapter(inpo_runs):
    straight, resumed = inpo_runs
    assert [r["step"] for r in metrics(resumed) if "loss" in r] == [3, 4]
    a, b = lora(straight), lora(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    # the same losses step by step: same data order and the same noise draws
    assert [round(r["loss"], 5) for r in metrics(straight) if "loss" in r][2:] == [
        round(r["loss"], 5) for r in metrics(resumed) if "loss" in r
    ]
    assert sorted(os.listdir(os.path.join(straight, "validation"))) == ["final-000004.png", "validation-000002.png"]


@pytest.mark.slow
def test_lora_loads_into_stock_sdxl_pipeline_and_changes_output(inpo_runs, tiny_sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    straight, _ = inpo_runs
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)

    def sample():
        g = torch.Generator().manual_seed(0)
        return pipe("a red circle", num_inference_steps=3, height=32, width=32, generator=g, output_type="pt").images

    before = sample()
    pipe.load_lora_weights(straight)
    after = sample()
    assert (after - before).abs().max() > 1e-4


@pytest.mark.slow
def test_the_sft_anchor_trains_from_the_cache(tiny_sdxl_dir, tiny_pairs_parquet, tmp_path):
    # a cached run has no text encoder: the dropped rows get the null conditioning built from the cached one (zeros
    # text and pooled, the image's own time ids), for the sft term and the reference anchor
    out = str(tmp_path / "out")
    sft = ["--sft_weight", 10, "--sft_min_timestep", 500, "--sft_caption_dropout", 0.5, "--inversion_target", "x0",
           "--anchor_weight", 10]  # fmt: skip
    cache = ["--inversion_cache", str(tmp_path / "cache")]
    run(
        SCRIPT, common(tiny_sdxl_dir, tiny_pairs_parquet) + ["--output_dir", out, "--max_train_steps", 2, *sft, *cache]
    )
    steps = [r for r in metrics(out) if "loss" in r]
    assert len(steps) == 2 and all(math.isfinite(r["sft"]) and r["sft"] > 0 for r in steps)
    assert steps[0]["loss"] == pytest.approx(math.log(2) + 10 * steps[0]["sft"], rel=1e-5)
    # the preference's own loss is logged beside the unweighted terms: the total is their weighted sum
    for r in steps:
        assert r["loss"] == pytest.approx(r["preference_loss"] + 10 * r["sft"] + 10 * r["anchor"], rel=1e-5)
    # the reference anchor runs from the cache too: zero at the first step (but for rounding: the policy's rows share
    # a batch with the sft rows), then the policy has moved
    assert steps[0]["anchor"] < 1e-9 and steps[1]["anchor"] > 1e3 * max(steps[0]["anchor"], 1e-12)
    # the model card says how the adapter was trained, both terms included
    card = open(os.path.join(out, "README.md")).read()
    assert "+ 10 x sft on the winners, sft t >= 500" in card
    assert "+ 10 x distance to the reference on the winners at t < 500" in card
    assert any(v.abs().max() > 0 for k, v in lora(out).items() if "lora_B" in k or "lora.up" in k)
