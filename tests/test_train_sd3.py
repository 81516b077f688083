"""train_inversion_dpo_sd3.py: its conditioning against StableDiffusion3Pipeline's own, then end to end through
`accelerate launch` on a tiny SD3 (three text encoders, SD3.5's second attention) and a Pick-a-Pic-schema parquet."""

import math
import os
import shutil

import pytest
import torch
from huggingface_hub import ModelCard
from script_runner import QUICK, lora, metrics, run


SCRIPT = "train_inversion_dpo_sd3.py"


@pytest.fixture(scope="module")
def sd3(tiny_sd3_dir):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("t5", [True, False], ids=["t5", "no_t5"])
def test_conditioning_is_the_pipelines(sd3, t5):
    from train_inversion_dpo_sd3 import encode_prompt

    captions = ["a red circle", "a blue square above a green triangle"]
    tokenizers = [sd3.tokenizer, sd3.tokenizer_2, sd3.tokenizer_3 if t5 else None]
    encoders = [sd3.text_encoder, sd3.text_encoder_2] + ([sd3.text_encoder_3] if t5 else [])
    width = sd3.transformer.config.joint_attention_dim
    with torch.no_grad():
        embeds, pooled = encode_prompt(captions, tokenizers, encoders, 24, width)
        stock = sd3 if t5 else type(sd3)(**{**sd3.components, "text_encoder_3": None, "tokenizer_3": None})
        expected, _, expected_pooled, _ = stock.encode_prompt(
            captions, None, None, device="cpu", do_classifier_free_guidance=False, max_sequence_length=24
        )
    torch.testing.assert_close(embeds, expected)
    torch.testing.assert_close(pooled, expected_pooled)
    clip = sd3.tokenizer.model_max_length  # 77 for the real CLIP, 16 here
    assert embeds.shape == (2, clip + 24, width)
    if not t5:
        assert not embeds[:, clip:].any()  # T5's part: zeros, as the pipeline runs without it


def test_parser_defaults_and_flow_flags():
    from train_inversion_dpo_sd3 import InputError, parse_args

    base = ["--pretrained_model_name_or_path", "m", "--dataset_name", "d"]
    args = parse_args(base)
    assert args.resolution == 1024 and args.max_sequence_length == 77 and not args.no_t5
    assert {"add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "to_out.0"} <= set(
        args.lora_target_modules.split(",")
    )
    assert args.weighting_scheme == "none" and args.timestep_weighting == "uniform"
    with pytest.raises(InputError, match="--inpo_eta"):
        parse_args(base + ["--inpo_eta", "0.1"])
    with pytest.raises(InputError, match="multiple of 16"):
        parse_args(base + ["--resolution", "40"])
    with pytest.raises(SystemExit):  # DDIM's weighting has no meaning on sigmas
        parse_args(base + ["--timestep_weighting", "official"])


def common(model, data):
    return ["--pretrained_model_name_or_path", model, "--dataset_name", data, "--max_sequence_length", 16, *QUICK]


def check_run(out, objective, steps=2, samples=4):
    rows = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(math.isfinite(r["loss"]) for r in rows)
    name = objective[1]
    if name != "sft":
        assert rows[0]["margin"] == 0.0
        assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    weights = lora(out)
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and max(v.abs().max().item() for v in lora_b) > 0.0
    # both streams of the joint attention and SD3.5's second attention carry the adapter
    for module in ("attn.to_q", "attn.add_q_proj", "attn.to_add_out", "attn2.to_q"):
        assert any(f".{module}.lora_A" in k for k in weights), module
    card = open(os.path.join(out, "README.md")).read()
    for tag in ("lora", "inversion-dpo", "sd3", f"`{name}`"):
        assert tag in card
    assert len(ModelCard(card).data.widget) == samples


OBJECTIVES = [
    ["--objective", "diffusion_dpo", "--gradient_checkpointing", "--weighting_scheme", "logit_normal"],
    # guidance 2 through the empty prompt's embeddings; T5 left out (zeros)
    ["--objective", "inversion_dpo", "--inversion_target", "step", "--inversion_guidance_scale", "2", "--no_t5"],
    ["--objective", "inversion_dpo", "--inversion_target", "x0", "--timestep_weighting", "x0"],
    ["--objective", "inversion_dpo", "--inversion_target", "reference"],
    ["--objective", "sft", "--mixed_precision", "bf16"],
]
RESUMABLE = ["--objective", "inpo"]  # fresh levels and inversions every step: the random streams must continue


@pytest.mark.slow
@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda o: "-".join(o[1:4:2]))
def test_every_objective_trains_a_lora(objective, tiny_sd3_dir, tiny_pairs_parquet, tmp_path):
    out = str(tmp_path / "out")
    flags = ["--output_dir", out, "--max_train_steps", 2, "--num_validation_prompts", 4, *objective]
    run(SCRIPT, common(tiny_sd3_dir, tiny_pairs_parquet) + flags, launcher="accelerate")
    if objective[3:4] == ["reference"]:  # the paper's figure: zero gradient at initialisation, the adapter stays 0
        rows = [r for r in metrics(out) if "loss" in r]
        assert [r["loss"] for r in rows] == pytest.approx([math.log(2)] * 2, abs=1e-7)
        assert all(v.abs().max() == 0 for k, v in lora(out).items() if "lora_B" in k)
        return
    check_run(out, objective)
    # the card's snippet samples as the adapter was trained: the T5 tokens, and no T5 where there was none
    card = open(os.path.join(out, "README.md")).read()
    assert "max_sequence_length=16" in card and "torch.bfloat16" in card
    assert ("text_encoder_3=None, tokenizer_3=None" in card) == ("--no_t5" in objective)


@pytest.fixture(scope="module")
def inpo_runs(tiny_sd3_dir, tiny_pairs_parquet, tmp_path_factory):
    """inpo 4 steps straight with a checkpoint every step and validation; and a run resumed from that run's step 2."""
    root = tmp_path_factory.mktemp("sd3-runs")
    straight, resumed = str(root / "straight"), str(root / "resumed")
    args = common(tiny_sd3_dir, tiny_pairs_parquet) + ["--train_batch_size", 1, "--checkpointing_steps", 1]
    args += RESUMABLE
    validation = ["--validation_prompts", "a red circle", "--validation_steps", 2]
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
    assert [round(r["loss"], 5) for r in metrics(straight) if "loss" in r][2:] == [
        round(r["loss"], 5) for r in metrics(resumed) if "loss" in r
    ]
    assert sorted(os.listdir(os.path.join(straight, "validation"))) == ["final-000004.png", "validation-000002.png"]


@pytest.mark.slow
def test_lora_loads_into_stock_sd3_pipeline_and_changes_output(inpo_runs, tiny_sd3_dir):
    from diffusers import StableDiffusion3Pipeline

    straight, _ = inpo_runs
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)
    pipe.set_progress_bar_config(disable=True)

    def sample():
        g = torch.Generator().manual_seed(0)
        return pipe(
            "a red circle", num_inference_steps=3, height=32, width=32, generator=g, output_type="pt",
            max_sequence_length=16,
        ).images  # fmt: skip

    before = sample()
    pipe.load_lora_weights(straight)
    after = sample()
    assert (after - before).abs().max() > 1e-4


@pytest.mark.slow
def test_training_from_the_cache_equals_recomputing(tiny_sd3_dir, tiny_pairs_parquet, tmp_path):
    # float32 storage: the cached reference side is the recomputed one to float precision, so the same adapter
    # trains; the second run reuses the cache and runs no text encoder or inversion
    flags = common(tiny_sd3_dir, tiny_pairs_parquet) + ["--max_train_steps", 3, "--inversion_target", "x0"]
    run(SCRIPT, flags + ["--output_dir", str(tmp_path / "plain")])
    cached = flags + ["--inversion_cache", str(tmp_path / "cache"), "--inversion_cache_dtype", "float32"]
    run(SCRIPT, cached + ["--output_dir", str(tmp_path / "cached")])
    plain = [r for r in metrics(str(tmp_path / "plain")) if "loss" in r]
    from_cache = [r for r in metrics(str(tmp_path / "cached")) if "loss" in r]
    assert [r["loss"] for r in from_cache] == pytest.approx([r["loss"] for r in plain], rel=1e-4)
    # the policy alone from the cache: N = 3 steps x 2 images fewer inversion rows and as many fewer reference rows
    # (what is left is the two-pass scheme's first, no-grad pass of the policy)
    no_grad = "transformer_evals_per_pair"
    assert from_cache[0][no_grad] == plain[0][no_grad] - 12 == 6
    a, b = lora(str(tmp_path / "plain")), lora(str(tmp_path / "cached"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_the_caption_table_is_on_disk_and_reads_back_what_was_written(monkeypatch):
    import gc

    import train_inversion_dpo_sd3 as trainer

    monkeypatch.setattr(trainer, "TEXT_SHARD", 4)
    table = trainer.CaptionTable()
    captions = [f"caption {i}" for i in range(10)]
    embeds, pooled = torch.randn(10, 6, 8, dtype=torch.bfloat16), torch.randn(10, 5, dtype=torch.bfloat16)
    table.add(captions[:7], embeds[:7], pooled[:7])
    table.add(captions[7:], embeds[7:], pooled[7:])
    table.close()
    folder = table._folder.name
    assert len(table) == 10 and sorted(os.listdir(folder)) == [f"shard-0000{i}.safetensors" for i in range(3)]
    for i, caption in enumerate(captions):
        e, p = table.get(caption)
        assert torch.equal(e, embeds[i]) and torch.equal(p, pooled[i])
    assert "another" not in table
    text = trainer.TextEncoders([], [], table, 16, torch.device("cpu"))
    got, got_pooled = text.lookup(["caption 3", "caption 9", "caption 3"])
    assert torch.equal(got, embeds[[3, 9, 3]]) and torch.equal(got_pooled, pooled[[3, 9, 3]])
    with pytest.raises(KeyError, match="was not encoded"):
        text.lookup(["another"])
    del table, text
    gc.collect()
    assert not os.path.exists(folder)  # the files go with the table


def test_t5_offloaded_layer_by_layer_embeds_the_same_captions(tiny_sd3_dir, monkeypatch):
    """--sequential_offload_t5 keeps T5's weights off the device while the table is built (they are meta tensors
    there, each layer's brought in for its own forward) and writes the same embeddings."""
    from types import SimpleNamespace

    from datasets import Dataset

    import train_inversion_dpo_sd3 as trainer

    captions = ["a red circle", "a blue square above a green triangle"]
    pairs = SimpleNamespace(
        columns=SimpleNamespace(caption="caption"), dataset=Dataset.from_dict({"caption": captions})
    )
    devices, encode = [], trainer.encode_prompt

    def spy(prompts, tokenizers, encoders, *rest):
        devices.append({p.device.type for p in encoders[2].parameters()})
        return encode(prompts, tokenizers, encoders, *rest)

    monkeypatch.setattr(trainer, "encode_prompt", spy)

    def table(*flags):
        devices.clear()
        base = ["--pretrained_model_name_or_path", tiny_sd3_dir, "--dataset_name", "d", "--resolution", "32"]
        args = trainer.parse_args([*base, "--max_sequence_length", "16", *flags])
        text = trainer.load_text_encoders(pairs, torch.nn.Linear(1, 1), args, "cpu", torch.float32)
        return {c: text.table.get(c) for c in ["", *captions]}

    plain = table()
    assert devices and all(d == {"cpu"} for d in devices)
    offloaded = table("--sequential_offload_t5")
    assert devices and all(d == {"meta"} for d in devices)
    for caption, (embeds, pooled) in plain.items():
        assert torch.equal(offloaded[caption][0], embeds) and torch.equal(offloaded[caption][1], pooled)
    with pytest.raises(trainer.InputError, match="--no_t5"):
        trainer.parse_args(["--pretrained_model_name_or_path", "m", "--dataset_name", "d", "--no_t5",
                            "--sequential_offload_t5"])  # fmt: skip


def test_a_resolution_beyond_the_position_embedding_is_refused_before_training(tiny_sd3_dir):
    import train_inversion_dpo_sd3 as trainer

    base = ["--pretrained_model_name_or_path", tiny_sd3_dir, "--dataset_name", "d"]
    trainer.load_diffusion_models(trainer.parse_args([*base, "--resolution", "128"]), "cpu", torch.float32)
    with pytest.raises(trainer.InputError, match="pos_embed_max_size 32: at most 128 px"):
        trainer.load_diffusion_models(trainer.parse_args([*base, "--resolution", "144"]), "cpu", torch.float32)
