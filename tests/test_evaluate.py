"""evaluate.py: base against adapters on fixed seeds under every scorer, on tiny stand-ins built in code (the real
CLIP and BLIP architectures at toy sizes); the scorers' formulas; a missing model is one line naming it."""

import csv
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, random_lora
from PIL import Image

from evaluation.scorers import SCORE_RANGES, AestheticScorer, ClipScorer, ImageRewardScorer, InputError
from evaluation.stats import mean_interval, win_rate
from tests.tiny import save_linear_head, save_tiny_clip, save_tiny_imagereward


PROMPTS = ["a red circle", "a blue square left of a yellow triangle"]
IMAGES = [Image.new("RGB", (32, 32), "red"), Image.new("RGB", (40, 32), "blue")]


@pytest.fixture(scope="module")
def scorer_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("scorers")
    return {
        "clip": save_tiny_clip(str(root / "clip")),
        "imagereward": save_tiny_imagereward(str(root / "imagereward")),
        "head": save_linear_head(str(root / "aesthetic.safetensors"), [16, 8, 4, 1]),
    }


@pytest.fixture(scope="module")
def adapter(tiny_sd_dir, tmp_path_factory):
    """A LoRA with random up-projections: it changes the tiny model's images."""
    return random_lora(tiny_sd_dir, tmp_path_factory.mktemp("adapter") / "lora")


def test_clip_scores_are_one_cosine_at_three_scales(scorer_models):
    from transformers import CLIPModel, CLIPProcessor

    pick, hps, clip = (ClipScorer(k, scorer_models["clip"]) for k in ("pickscore", "hpsv2", "clip_score"))
    model, processor = (
        CLIPModel.from_pretrained(scorer_models["clip"]),
        CLIPProcessor.from_pretrained(scorer_models["clip"]),
    )
    inputs = processor(text=PROMPTS, images=IMAGES, return_tensors="pt", padding=True, truncation=True)
    with torch.no_grad():
        image = model.get_image_features(pixel_values=inputs.pixel_values).pooler_output
        text = model.get_text_features(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask).pooler_output
    cos = torch.nn.functional.cosine_similarity(image, text).tolist()
    assert hps(IMAGES, PROMPTS) == pytest.approx(cos, abs=1e-5)
    assert pick(IMAGES, PROMPTS) == pytest.approx([c * model.logit_scale.exp().item() for c in cos], abs=1e-4)
    assert clip(IMAGES, PROMPTS) == pytest.approx([100 * max(c, 0) for c in cos], abs=1e-3)
    assert cos[0] * cos[1] < 0  # the max(., 0) was exercised


def test_aesthetic_head_reads_safetensors_and_the_released_pth(scorer_models, tmp_path):
    from safetensors.torch import load_file

    scores = AestheticScorer(scorer_models["clip"], scorer_models["head"])(IMAGES, PROMPTS)
    torch.save(load_file(scorer_models["head"]), tmp_path / "head.pth")  # LAION ships a state dict .pth
    assert AestheticScorer(scorer_models["clip"], str(tmp_path / "head.pth"))(IMAGES, PROMPTS) == scores
    # the head sees the unit-norm image embedding: a 1-layer head picking coordinate 0 returns it
    from safetensors.torch import save_file

    save_file(
        {"layers.0.weight": torch.eye(16)[:1].contiguous(), "layers.0.bias": torch.zeros(1)},
        tmp_path / "pick0.safetensors",
    )
    from transformers import CLIPModel, CLIPProcessor

    model, processor = (
        CLIPModel.from_pretrained(scorer_models["clip"]),
        CLIPProcessor.from_pretrained(scorer_models["clip"]),
    )
    with torch.no_grad():
        features = model.get_image_features(pixel_values=processor(images=IMAGES, return_tensors="pt").pixel_values)
    expected = torch.nn.functional.normalize(features.pooler_output, dim=-1)[:, 0].tolist()
    assert AestheticScorer(scorer_models["clip"], str(tmp_path / "pick0.safetensors"))(
        IMAGES, PROMPTS
    ) == pytest.approx(expected, abs=1e-6)


def test_imagereward_is_normalised_and_reads_the_prompt(scorer_models, tmp_path):
    a = ImageRewardScorer(scorer_models["imagereward"])(IMAGES, PROMPTS)
    other = save_tiny_imagereward(str(tmp_path / "ir"), mean=-1.0, std=0.25)  # same weights, other normalisation
    b = ImageRewardScorer(other)(IMAGES, PROMPTS)
    assert b == pytest.approx([(x * 2.0 + 0.5 + 1.0) / 0.25 for x in a], abs=1e-4)
    # the text encoder attends to the image and the reward depends on the prompt
    same_image = ImageRewardScorer(scorer_models["imagereward"])([IMAGES[0]] * 2, ["a red circle", "a green square"])
    assert abs(same_image[0] - same_image[1]) > 1e-6


def test_missing_models_and_files_are_one_line_naming_them(scorer_models, tmp_path):
    with pytest.raises(InputError, match=r"--pickscore: no folder '/nonexistent/pick'"):
        ClipScorer("pickscore", "/nonexistent/pick")
    with pytest.raises(InputError, match=r"--hpsv2: could not load 'someone/hps' as a Hub id"):
        ClipScorer("hpsv2", "someone/hps")
    with pytest.raises(InputError, match=r"--aesthetic_head: no file '/nonexistent/head.pth'"):
        AestheticScorer(scorer_models["clip"], "/nonexistent/head.pth")
    with pytest.raises(InputError, match=r"--imagereward: could not load '.*not-blip' as a local folder"):
        ImageRewardScorer(save_tiny_clip(str(tmp_path / "not-blip")))  # a CLIP, not a BLIP
    headless = save_tiny_imagereward(str(tmp_path / "headless"))
    os.remove(os.path.join(headless, "imagereward_head.safetensors"))
    with pytest.raises(InputError, match=r"--imagereward: no file .*headless/imagereward_head.safetensors"):
        ImageRewardScorer(headless)


def run_evaluate(args):
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "evaluate.py"), *[str(a) for a in args]],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"),
    )  # fmt: skip


@pytest.mark.slow
def test_evaluate_compares_base_and_adapters_under_every_scorer(tiny_sd_dir, adapter, scorer_models, tmp_path):
    (tmp_path / "prompts.txt").write_text("# shapes prompts\n" + "\n".join(PROMPTS) + "\n\n")
    out = tmp_path / "eval"
    proc = run_evaluate([
        "--pretrained_model_name_or_path", tiny_sd_dir, "--adapters", adapter, adapter, "--adapter_names", "a1", "a2",
        "--prompts", tmp_path / "prompts.txt", "--num_images_per_prompt", 2, "--num_inference_steps", 2,
        "--resolution", 32, "--output_dir", out, "--seed", 5,
        "--pickscore", scorer_models["clip"], "--hpsv2", scorer_models["clip"], "--clip_score", scorer_models["clip"],
        "--aesthetic_clip", scorer_models["clip"], "--aesthetic_head", scorer_models["head"],
        "--imagereward", scorer_models["imagereward"], "--shapes_score",
    ])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    scorers = ["pickscore", "hpsv2", "clip_score", "imagereward", "aesthetic", "shapes"]
    with open(out / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["model", "prompt_index", "prompt", "seed", *scorers]
    assert [(r["model"], r["prompt_index"], r["seed"]) for r in rows] == [
        (m, str(i), str(s)) for m in ("base", "a1", "a2") for i in (0, 1) for s in (5, 6)
    ]
    per_model = {m: {s: [float(r[s]) for r in rows if r["model"] == m] for s in scorers} for m in ("base", "a1", "a2")}
    # the same adapter twice gives the same images and scores: unloading one leaves the base untouched
    assert per_model["a1"] == per_model["a2"]
    image = lambda m, i, s: Image.open(out / "images" / m / f"{i:04d}-{s}.png")  # noqa: E731
    assert image("a1", 0, 5).tobytes() == image("a2", 0, 5).tobytes()
    assert image("a1", 0, 5).tobytes() != image("base", 0, 5).tobytes()
    assert image("base", 0, 5).tobytes() != image("base", 0, 6).tobytes()  # the seed moves the noise
    with open(out / "summary.csv") as f:
        summary = {(r["model"], r["scorer"]): r for r in csv.DictReader(f)}
    for scorer in scorers:
        assert summary[("base", scorer)]["win_rate"] == ""
        mean, low, high = mean_interval(per_model["a1"][scorer], bounds=SCORE_RANGES[scorer])
        assert float(summary[("a1", scorer)]["mean"]) == pytest.approx(mean)
        assert float(summary[("a1", scorer)]["mean_low"]) == pytest.approx(low)
        assert float(summary[("a1", scorer)]["mean_high"]) == pytest.approx(high)
        if SCORE_RANGES[scorer]:  # a mean's interval stays within its score's range
            lowest, highest = SCORE_RANGES[scorer]
            assert all(lowest <= float(r["mean_low"]) <= float(r["mean_high"]) <= highest
                       for (_, name), r in summary.items() if name == scorer)  # fmt: skip
        win = win_rate(per_model["a1"][scorer], per_model["base"][scorer])
        assert float(summary[("a1", scorer)]["win_rate"]) == pytest.approx(win["win_rate"])
        assert float(summary[("a1", scorer)]["win_high"]) == pytest.approx(win["high"])
    assert all(0 <= s <= 1 for s in per_model["base"]["shapes"])
    grid = Image.open(out / "grid.png")  # 3 models (rows) x 2 prompts (columns)
    assert grid.height > grid.width > 200
    assert "win rate vs base" in proc.stdout and "a2" in proc.stdout and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_evaluate_errors_are_one_line(tiny_sd_dir, adapter, scorer_models, tmp_path):
    import evaluate

    (tmp_path / "prompts.txt").write_text("a cat\n")
    base = ["--pretrained_model_name_or_path", tiny_sd_dir, "--prompts", str(tmp_path / "prompts.txt")]
    clip = ["--clip_score", scorer_models["clip"]]
    prompts = ["--prompts", str(tmp_path / "prompts.txt")]
    offline = r" \(nor a Hub repository in the local cache; HF_HUB_OFFLINE is set, so the Hub is not asked\)$"
    cases = {
        r"--shapes_score: prompt 1 'a cat' is not a shapes-world prompt": base + ["--shapes_score"],
        r"^--adapters: no such adapter folder: '/no/lora'$": base + clip + ["--adapters", "/no/lora"],
        r"^--adapters: no such adapter folder: 'some/typo'" + offline: base + clip + ["--adapters", "some/typo"],
        r"no scorer: give at least one of": base,
        r"--prompts: no file '/nonexistent/p.txt'": base[:2] + ["--prompts", "/nonexistent/p.txt"],
        r"^--pretrained_model_name_or_path: no such model folder: '/nonexistent/sd'$":
            ["--pretrained_model_name_or_path", "/nonexistent/sd", *prompts, *clip],
        r"^--pretrained_model_name_or_path: no such model folder: 'someone/sd'" + offline:
            ["--pretrained_model_name_or_path", "someone/sd", *prompts, *clip],
    }  # fmt: skip
    for message, args in cases.items():
        with pytest.raises(InputError, match=message):
            evaluate.main(evaluate.parse_args(args))
    # from the command line: one line, exit 2, no traceback
    proc = run_evaluate(base + ["--pickscore", "/nonexistent/PickScore_v1"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: --pickscore: no folder '/nonexistent/PickScore_v1'"
    # a mistyped adapter folder is named at once, before any scorer or model loads
    proc = run_evaluate(base + clip + ["--adapters", adapter, "lora/typo"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "weight_name" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --adapters: no such adapter folder: 'lora/typo' (")


def test_a_hub_id_offline_loads_from_its_cached_snapshot(tmp_path, monkeypatch):
    from huggingface_hub import constants

    import evaluate

    snapshot = tmp_path / "hub" / "models--someone--lora" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert os.path.samefile(evaluate.locate("someone/lora", "--adapters", "adapter"), snapshot)
    with pytest.raises(InputError, match=r"^--adapters: no such adapter folder: 'someone/typo' \(nor a Hub"):
        evaluate.locate("someone/typo", "--adapters", "adapter")
    assert evaluate.locate(str(tmp_path), "--adapters", "adapter") == str(tmp_path)  # a local path as given
    with pytest.raises(InputError, match=r"^--adapters: no such adapter folder: './typo'$"):
        evaluate.locate("./typo", "--adapters", "adapter")
