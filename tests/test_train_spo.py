"""train_spo.py and train_spo_sdxl.py end to end on tiny models, with every preference model that runs offline."""

import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from script_runner import REPO, env, lora, metrics, run

from demo import cpu_launch_command
from tests.tiny import save_tiny_clip, save_tiny_step_aware_model


pytestmark = pytest.mark.slow  # training runs

SD, SDXL = "train_spo.py", "train_spo_sdxl.py"

QUICK = [
    "--resolution", "32", "--num_inference_steps", "4", "--spo_untrained_steps", "1", "--train_batch_size", "2",
    "--seed", "0", "--report_to", "none", "--learning_rate", "1e-2", "--num_validation_prompts", "0",
    "--validation_num_inference_steps", "2",
]  # fmt: skip

# a preference model of the user's own: the brightness of the predicted image, far apart enough to pass the threshold
BRIGHTNESS = """
import numpy as np

def score(images, prompts, timesteps):
    assert len(images) == len(prompts) == len(timesteps)
    return [float(np.asarray(image, dtype=np.float32).mean()) for image in images]
"""


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red circle\na blue square above a green triangle\n\na red circle\na yellow square\n")
    return str(path)


@pytest.fixture(scope="module")
def brightness(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugin") / "brightness.py"
    path.write_text(BRIGHTNESS)
    return f"{path}:score"


def pool_count(args):
    steps = int(args[args.index("--num_inference_steps") + 1])
    return steps - int(args[args.index("--spo_untrained_steps") + 1])


def check_run(out, max_steps, batch=2, pools=3):
    rows = [r for r in metrics(out) if "pairs_kept" in r]
    assert [r["step"] for r in rows] == list(range(1, max_steps + 1))
    for r in rows:
        assert r["pairs_kept"] + r["pairs_skipped"] == batch * pools
        assert r["unet_evals"] > 0 and r["unet_grad_evals"] == 2 * batch * pools  # guided policy calls with grad
        for key in ("lr", "step_seconds", "grad_norm", "preference_gap"):
            assert math.isfinite(r[key])
    first = rows[0]
    assert first["pairs_kept"] > 0
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at the first step
    assert {"accuracy", "margin", "unet_grad_evals_per_pair", "unet_evals_per_pair"} <= first.keys()
    final = metrics(out)[-1]
    assert final["final"] and final["prompts"] == 3 and final["duplicate_prompts"] == 1 and final["empty_prompts"] == 1
    return rows


def sample(pipe, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return pipe("a red circle", num_inference_steps=3, generator=generator, height=32, width=32, output_type="pt")


@pytest.mark.parametrize("script", [SD, SDXL])
def test_spo_trains_an_adapter_that_stock_diffusers_loads(script, tiny_sd_dir, tiny_sdxl_dir, prompts_file,
                                                          brightness, tmp_path):  # fmt: skip
    """Through accelerate launch with the user's flags (8-bit Adam, gradient checkpointing, validation), the script
    copied alone into an empty folder and run from another: the first loss is log 2, every pool's pair is kept or
    counted skipped, and the adapter changes a stock pipeline's images."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    model, pipeline_class = (tiny_sd_dir, StableDiffusionPipeline) if script == SD else (tiny_sdxl_dir, StableDiffusionXLPipeline)  # fmt: skip
    out = str(tmp_path / "out")
    args = [
        "--pretrained_model_name_or_path", model, "--prompts", prompts_file, "--preference_model", brightness,
        "--preference_score_scale", "1000", *QUICK, "--max_train_steps", "2", "--output_dir", out,
        "--use_8bit_adam", "--gradient_checkpointing", "--validation_prompts", "a red circle",
        "--spo_segment_steps", "1", "--spo_pool_size", "3",
    ]  # fmt: skip
    alone, elsewhere = tmp_path / "alone", tmp_path / "elsewhere"
    alone.mkdir()
    elsewhere.mkdir()
    copied = shutil.copy(os.path.join(REPO, script), alone)
    proc = subprocess.run(cpu_launch_command(copied) + args, cwd=elsewhere, env=env(), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.listdir(elsewhere) == [] and os.listdir(alone) == [script]
    check_run(out, 2)
    assert os.path.isfile(os.path.join(out, "samples", "00.png"))
    with open(os.path.join(out, "README.md")) as f:
        card = f.read()
    assert "# SPO LoRA for tiny-" in card and "3 prompts" in card and "pairs kept" in card

    pipe = pipeline_class.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    before = sample(pipe).images
    pipe.load_lora_weights(out)
    assert (sample(pipe).images - before).abs().max() > 1e-4


def test_the_step_aware_model_and_a_clip_scorer_judge_the_candidates(tiny_sd_dir, prompts_file, tmp_path):
    """--preference_model step_aware (a converted folder) under bf16 autocast, and clip_score (an evaluate.py
    scorer, step-unaware) both train."""
    spm = save_tiny_step_aware_model(str(tmp_path / "spm"))
    clip = save_tiny_clip(str(tmp_path / "clip"))
    for kind, path, extra in (("step_aware", spm, ["--mixed_precision", "bf16"]), ("clip_score", clip, [])):
        out = str(tmp_path / kind)
        args = [
            "--pretrained_model_name_or_path", tiny_sd_dir, "--prompts", prompts_file, "--preference_model", kind,
            "--preference_model_path", path, "--preference_score_scale", "1000", *QUICK, "--max_train_steps", "1",
            "--output_dir", out, *extra,
        ]  # fmt: skip
        run(SD, args)
        rows = check_run(out, 1)
        assert rows[0]["pairs_kept"] > 0, kind


def test_the_shapes_world_judges_without_a_download(prompts_file, tmp_path):
    """--preference_model shapes on the committed shapes base, judging the images two deterministic steps make of
    the candidates (--spo_lookahead_steps): the embedded default, offline."""
    out = str(tmp_path / "out")
    model = os.path.join(REPO, "models", "shapes-sd-tiny")
    args = ["--pretrained_model_name_or_path", model, "--prompts", prompts_file, "--preference_model", "shapes",
            "--spo_lookahead_steps", "2", *QUICK, "--max_train_steps", "1", "--output_dir", out]  # fmt: skip
    run(SD, args)
    rows = [r for r in metrics(out) if "pairs_kept" in r]
    assert rows[0]["pairs_kept"] + rows[0]["pairs_skipped"] == 6


def test_resume_equals_an_uninterrupted_run(tiny_sd_dir, prompts_file, brightness, tmp_path):
    args = [
        "--pretrained_model_name_or_path", tiny_sd_dir, "--prompts", prompts_file, "--preference_model", brightness,
        "--preference_score_scale", "1000", *QUICK, "--checkpointing_steps", "1",
    ]  # fmt: skip
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    run(SD, args + ["--output_dir", straight, "--max_train_steps", "3"])
    run(SD, args + ["--output_dir", resumed, "--max_train_steps", "1"])
    run(SD, args + ["--output_dir", resumed, "--max_train_steps", "3", "--resume_from_checkpoint", "latest"])
    a, b = lora(straight), lora(resumed)
    assert a.keys() == b.keys() and any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k or "up" in k)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    by_step = lambda out: [(r["step"], r["pairs_kept"], r.get("loss")) for r in metrics(out) if "pairs_kept" in r]  # noqa: E731
    assert by_step(straight) == by_step(resumed)


def test_a_bad_input_ends_in_one_line_with_exit_code_2(tiny_sd_dir, tmp_path):
    """As the user sees it: the error's one line, no traceback (the messages themselves: test_spo_objective.py)."""
    args = ["--pretrained_model_name_or_path", tiny_sd_dir, "--prompts", "nosuch.txt", "--preference_model", "shapes",
            *QUICK, "--output_dir", str(tmp_path / "o")]  # fmt: skip
    proc = subprocess.run([sys.executable, os.path.join(REPO, SD), *args], cwd=tmp_path, env=env(),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == ["error: --prompts: no such file or folder: 'nosuch.txt'"]


def test_two_processes_train_what_one_does_with_twice_the_batch(tiny_sd_dir, prompts_file, brightness, tmp_path):
    """Data parallel on 2 CPU processes (accelerate's multi-GPU launcher on gloo), one prompt each: each process backs
    up its own pools' pairs and the gradients meet once per step, so the adapter equals one process's with batches of
    two (a trajectory is a function of its own seed)."""
    args = [
        "--pretrained_model_name_or_path", tiny_sd_dir, "--prompts", prompts_file, "--preference_model", brightness,
        "--preference_score_scale", "1000", *QUICK, "--max_train_steps", "2",
    ]  # fmt: skip
    args[args.index("--train_batch_size") + 1] = "1"
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    run(SD, args + ["--output_dir", two], num_processes=2)
    args[args.index("--train_batch_size") + 1] = "2"
    run(SD, args + ["--output_dir", one])
    rows = lambda out: [r for r in metrics(out) if "pairs_kept" in r]  # noqa: E731
    for a, b in zip(rows(two), rows(one), strict=True):
        assert (a["pairs_kept"], a["pairs_skipped"]) == (b["pairs_kept"], b["pairs_skipped"])
        assert a["pairs_kept"] + a["pairs_skipped"] == 2 * 3
        # the gradient (its norm before clipping) and the loss are the same up to float summation order
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5) and a["grad_norm"] > 0
        assert a.get("loss") == pytest.approx(b.get("loss"), rel=1e-5)
    # Adam's first steps move each weight by about the learning rate whatever the gradient's size, so float noise in
    # a gradient near zero shows as up to a few hundredths of a step
    a, b = lora(two), lora(one)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-3), k


def test_a_non_finite_loss_stops_the_step_without_saving_it(tiny_sd_dir, prompts_file, brightness, tmp_path,
                                                           monkeypatch):  # fmt: skip
    """Every pool's loss nan (as a diverged fp16 run gives): the run stops at that step with one line, after the
    step's pools (where every process checks at once), and no checkpoint of it is written."""
    import train_spo

    def nan_loss(*args, **kwargs):
        loss, margin = spo_loss(*args, **kwargs)
        return loss * float("nan"), margin

    spo_loss = train_spo.spo_loss
    monkeypatch.setattr(train_spo, "spo_loss", nan_loss)
    out = str(tmp_path / "out")
    args = train_spo.parse_args(
        [
            "--pretrained_model_name_or_path",
            tiny_sd_dir,
            "--prompts",
            prompts_file,
            "--preference_model",
            brightness,
            "--preference_score_scale",
            "1000",
            *QUICK,
            "--max_train_steps",
            "2",
            "--output_dir",
            out,
        ]  # fmt: skip
    )
    with pytest.raises(train_spo.TrainingError, match="step 1: the loss is nan .* no checkpoint had been written"):
        train_spo.main(args)
    assert not [name for name in os.listdir(out) if name.startswith("checkpoint")]


def test_processes_that_keep_different_numbers_of_pairs_step_together(tiny_sd_dir, prompts_file, tmp_path):
    """On 2 processes, one whose preference model ties every candidate (it keeps no pair) and one that keeps them
    all: every collective stands where both processes reach it, so the step completes (a check inside the per-pair
    branch once left the two waiting on different collectives)."""
    plugin = tmp_path / "one_rank_ties.py"
    plugin.write_text(BRIGHTNESS.replace("    return [", "    if os.environ.get('RANK') == '1':\n        return [0.0] * len(images)\n    return [")
                      .replace("import numpy as np", "import os\n\nimport numpy as np"))  # fmt: skip
    out = str(tmp_path / "out")
    args = ["--pretrained_model_name_or_path", tiny_sd_dir, "--prompts", prompts_file, "--preference_model",
            f"{plugin}:score", "--preference_score_scale", "1000", *QUICK, "--max_train_steps", "2",
            "--output_dir", out]  # fmt: skip
    args[args.index("--train_batch_size") + 1] = "1"
    run(SD, args, num_processes=2, timeout=240)
    rows = [r for r in metrics(out) if "pairs_kept" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["pairs_kept"] == 3 and r["pairs_skipped"] == 3 for r in rows)  # rank 0's kept, rank 1's skipped
