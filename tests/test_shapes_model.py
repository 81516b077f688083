"""The committed shapes-world base model (models/shapes-sd-tiny), its evaluation and the pair generator."""

import io
import os

import numpy as np
import pytest
import torch

from shapes import world


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(REPO, "models", "shapes-sd-tiny")

pytestmark = pytest.mark.skipif(not os.path.isdir(MODEL), reason="models/shapes-sd-tiny is not there")


@pytest.fixture(scope="module")
def pipe():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch.set_num_threads(1)
    p = StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None, feature_extractor=None)
    p.scheduler = DDIMScheduler.from_config(p.scheduler.config)
    p.set_progress_bar_config(disable=True)
    return p


def test_model_files_are_small_safetensors():
    files = [os.path.join(d, f) for d, _, fs in os.walk(MODEL) for f in fs]
    assert any(f.endswith(".safetensors") for f in files)
    assert not any(f.endswith((".bin", ".pt", ".ckpt")) for f in files)
    assert sum(os.path.getsize(f) for f in files) <= 15 * 2**20


def test_stock_pipeline_samples_32px(pipe):
    out = pipe(
        "a red circle",
        num_inference_steps=5,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert out.shape == (1, 32, 32, 3)
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_tokenizer_one_token_per_word(pipe):
    tok = pipe.tokenizer
    assert tok.model_max_length == pipe.text_encoder.config.max_position_embeddings
    for text in ["a blue square left of a yellow triangle", "a green circle below a red square", "a red circle"]:
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert tok.convert_ids_to_tokens(ids[1:-1]) == [w + "</w>" for w in text.split()]
    words = {w for n in (1, 2) for p in world.all_prompts(n) for w in str(p).split()}
    for w in words:
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w


def test_make_pairs_writes_valid_schema(pipe, tmp_path):
    import pyarrow.parquet as pq
    from PIL import Image

    from shapes import pairs

    out = str(tmp_path / "pairs.parquet")
    stats = pairs.make_pairs(pipe, num_prompts=2, images_per_prompt=3, out_path=out, seed=1, steps=4)
    table = pq.read_table(out)
    assert {"jpg_0", "jpg_1", "label_0", "caption"} <= set(table.column_names)
    rows = table.to_pylist()
    assert len(rows) == stats["pairs"] <= 2 * 3
    for r in rows:
        assert not world.is_heldout(r["caption"])
        assert r["label_0"] in (0.0, 1.0)
        assert r["score_0"] != r["score_1"]
        assert (r["label_0"] == 1.0) == (r["score_0"] > r["score_1"])
        for key in ("jpg_0", "jpg_1"):
            im = Image.open(io.BytesIO(r[key]))
            assert im.format == "JPEG" and im.size == (32, 32)


def test_pairs_refuse_heldout_and_drop_ties():
    from PIL import Image

    from shapes import pairs

    good = world.render("a red circle left of a green square", 0)
    blank = Image.new("RGB", (32, 32), "white")
    rows = pairs.pairs_from_samples(["a red circle left of a green square"], [[good, blank, blank]], seed=0)
    assert len(rows["caption"]) == 2  # (good, blank) twice; (blank, blank) is a tie
    assert all(max(a, b) == 1.0 for a, b in zip(rows["score_0"], rows["score_1"]))
    with pytest.raises(ValueError):
        pairs.pairs_from_samples([str(world.heldout_prompts()[0])], [[good, blank]])
    # min_winner_score 1.0 keeps only pairs whose winner passes: a mirrored render (order wrong, 0.75) beats a blank
    # image but is not kept as a winner
    mirrored = world.render("a red circle right of a green square", 0)
    prompt = "a red circle left of a green square"
    every = pairs.pairs_from_samples([prompt], [[good, mirrored, blank]], seed=0)
    passing = pairs.pairs_from_samples([prompt], [[good, mirrored, blank]], seed=0, min_winner_score=1.0)
    assert sorted(max(a, b) for a, b in zip(every["score_0"], every["score_1"])) == [0.75, 1.0, 1.0]
    assert [max(a, b) for a, b in zip(passing["score_0"], passing["score_1"])] == [1.0, 1.0]
    # loser_outcome "relation" keeps the pairs whose loser has both objects and only the order wrong: good over
    # mirrored, not good or mirrored over blank
    relation = pairs.pairs_from_samples([prompt], [[good, mirrored, blank]], seed=0, loser_outcome="relation")
    assert len(relation["caption"]) == 1
    assert sorted([relation["score_0"][0], relation["score_1"][0]]) == [0.75, 1.0]
    for p in pairs.choose_prompts(50, seed=3, single_fraction=0.2):
        assert not world.is_heldout(p)


def test_eval_on_two_prompts(pipe):
    from shapes import sampling

    groups = {"single": ["a red circle"], "two": ["a blue square left of a yellow triangle"]}
    results = sampling.evaluate(pipe, groups, num_images=2, seed=0, steps=4)
    assert [r.name for r in results] == ["single", "two"]
    for r in results:
        assert r.num_samples == 2 and 0.0 <= r.mean_score <= 1.0 and 0.0 <= r.pass_rate <= 1.0


SD3_MODEL = os.path.join(REPO, "models", "shapes-sd3-tiny")


def test_the_sd3_twin_is_small_safetensors_and_loads_in_the_stock_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    files = [os.path.join(d, f) for d, _, fs in os.walk(SD3_MODEL) for f in fs]
    assert not any(f.endswith((".bin", ".pt", ".ckpt")) for f in files)
    assert sum(os.path.getsize(f) for f in files) <= 15 * 2**20
    torch.set_num_threads(1)
    pipe = StableDiffusion3Pipeline.from_pretrained(SD3_MODEL)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.transformer.config.dual_attention_layers  # SD3.5's second attention
    words = {w for n in (1, 2) for p in world.all_prompts(n) for w in str(p).split()}
    for tokenizer in (pipe.tokenizer, pipe.tokenizer_3):
        assert all(len(tokenizer(w, add_special_tokens=False).input_ids) == 1 for w in words)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle", num_inference_steps=5, max_sequence_length=pipe.tokenizer_3.model_max_length,
               generator=torch.Generator().manual_seed(0), output_type="np").images  # fmt: skip
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()


def test_the_sd3_twin_samples_through_shapes_sampling_and_takes_a_lora(tmp_path):
    """shapes.sampling keeps SD3's flow sampler, gives T5 the tokens it was trained with, and loads an adapter with
    the stock load_lora_weights (the format train_inversion_dpo_sd3.py saves), which changes the samples."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from shapes import sampling

    torch.set_num_threads(1)
    base = sampling.load_pipeline(SD3_MODEL)
    assert isinstance(base.scheduler, FlowMatchEulerDiscreteScheduler)
    assert sampling.call_kwargs(base) == {"max_sequence_length": base.tokenizer_3.model_max_length}
    prompts = ["a red circle left of a blue square"]
    before = np.asarray(sampling.sample(base, prompts, steps=4)[0][0], dtype=np.float32)
    assert before.shape == (32, 32, 3)

    torch.manual_seed(0)
    transformer = StableDiffusion3Pipeline.from_pretrained(SD3_MODEL).transformer
    transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_v"])
    )
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # a zero B (the initialisation) would leave the samples unchanged
    StableDiffusion3Pipeline.save_lora_weights(
        tmp_path, transformer_lora_layers=get_peft_model_state_dict(transformer)
    )
    aligned = sampling.load_pipeline(SD3_MODEL, lora_path=str(tmp_path))
    after = np.asarray(sampling.sample(aligned, prompts, steps=4)[0][0], dtype=np.float32)
    assert np.abs(after - before).mean() > 1.0
