"""train_inversion_dpo.py end to end through `accelerate launch`, on a tiny SD and a Pick-a-Pic-schema parquet."""

import json
import math
import os
import re
import signal
import subprocess

import pytest
import torch
from script_runner import QUICK, REPO, env, lora, metrics, run, start, steps_logged, wait_for

from demo import cpu_launch_command


pytestmark = pytest.mark.slow  # training runs through accelerate launch


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
    proc = run(
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
            "--num_validation_prompts",
            4,
            *objective,
        ],
        launcher="accelerate",
    )
    rows = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("loss", "lr", "step_seconds", "unet_grad_evals_per_pair"):
        assert all(math.isfinite(r[key]) for r in rows)
    name = objective[1]
    if name != "sft":
        assert {"margin", "accuracy", "preference_loss"} <= set(rows[0])
        # policy == reference at the first step: margin 0, loss log 2 (hinge: 1)
        assert rows[0]["margin"] == 0.0
        assert rows[0]["loss"] == pytest.approx(1.0 if "hinge" in objective else math.log(2), abs=1e-4)
        assert all(r["preference_loss"] == pytest.approx(r["loss"], rel=1e-6) for r in rows)  # no winner terms
    else:
        assert "preference_loss" not in rows[0]
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
    # the final validation's samples: the one prompt given, else the data's first 4 distinct captions
    from huggingface_hub import ModelCard

    widget = ModelCard(card).data.widget
    assert len(widget) == (1 if "--validation_prompts" in objective else 4)
    assert sorted(os.listdir(os.path.join(out, "samples"))) == [f"{i:02d}.png" for i in range(len(widget))]
    assert "| 6 | 2 |" in card and "means over the last 2 steps" in card
    assert "gemm_4bit_forward" not in proc.stderr  # 8-bit Adam's bitsandbytes, imported at start-up


@pytest.fixture(scope="module")
def zero_snr_v_model(tiny_sd_dir, tmp_path_factory):
    """The tiny SD read as a v-prediction model with zero terminal SNR and trailing steps (stock scheduler options)."""
    import shutil

    path = str(tmp_path_factory.mktemp("models") / "tiny-sd-zero-snr-v")
    shutil.copytree(tiny_sd_dir, path)
    config_file = os.path.join(path, "scheduler", "scheduler_config.json")
    config = json.load(open(config_file))
    config.update(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    json.dump(config, open(config_file, "w"))
    return path


@pytest.mark.parametrize("objective", ["inversion_dpo", "diffusion_dpo", "inpo"])
def test_a_zero_snr_v_prediction_model_trains(objective, zero_snr_v_model, tiny_pairs_parquet, tmp_path):
    """The top level of a trailing grid is pure noise there (alphas_cumprod 0): the official 1/(2a) weight and the
    v -> eps conversion must not turn it into nan."""
    out = str(tmp_path / "out")
    flags = ["--inversion_steps", "4", "--timestep_weighting", "official"] if objective == "inversion_dpo" else []
    run(
        SCRIPT,
        [
            "--pretrained_model_name_or_path",
            zero_snr_v_model,
            "--dataset_name",
            tiny_pairs_parquet,
            "--output_dir",
            out,
            "--max_train_steps",
            2,
            *QUICK,
            "--objective",
            objective,
            *flags,
        ],
    )
    rows = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    assert max(v.abs().max().item() for k, v in lora(out).items() if "lora_B" in k or "lora.up" in k) > 0


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
    # the final samples, one per prompt, are the card's widget and shown in its text
    from huggingface_hub import ModelCard

    card = ModelCard.load(os.path.join(out, "README.md"))
    assert card.data.widget == [
        {"text": "a red circle", "output": {"url": "samples/00.png"}},
        {"text": "a blue square", "output": {"url": "samples/01.png"}},
    ]
    assert sorted(os.listdir(os.path.join(out, "samples"))) == ["00.png", "01.png"]
    assert "![a blue square](./samples/01.png)" in card.text


def test_the_card_names_the_base_by_its_folder_and_shows_the_runs_numbers(four_steps, tiny_sd_dir):
    out, _ = four_steps
    card = open(os.path.join(out, "README.md")).read()
    assert "# Inversion-DPO LoRA for tiny-sd\n" in card and os.path.dirname(tiny_sd_dir) not in card
    assert "6 preference pairs from `train.parquet` for 4 optimizer steps" in card
    assert "| 6 | 4 |" in card and "means over the last 4 steps" in card
    # a snippet for someone who downloads the adapter: the local base is a placeholder that says so
    assert 'DiffusionPipeline.from_pretrained("path/to/tiny-sd", torch_dtype=torch.float16)' in card
    assert "# trained on the local model folder 'tiny-sd'" in card
    assert 'pipe.load_lora_weights("<your-username>/out")' in card and 'pipe("a red circle")' in card


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


def test_a_lora_beyond_the_attention_projections_loads_whole_and_resumes(tiny_sd_dir, tiny_pairs_parquet, tmp_path):
    """--lora_target_modules with the convolutions, the transformer projections and the MLP: every trained weight of
    the file lands in a stock pipeline's UNet (diffusers' old key names for the attention projections next to peft's
    for the rest once made load_lora_weights drop the attention's half with a warning), and a run resumes from it."""
    from diffusers import StableDiffusionPipeline

    targets = "to_q,to_k,to_v,to_out.0,proj_in,proj_out,conv1,conv2,ff.net.2"
    args = [
        "--pretrained_model_name_or_path", tiny_sd_dir, "--dataset_name", tiny_pairs_parquet, *QUICK,
        "--objective", "diffusion_dpo", "--lora_target_modules", targets, "--checkpointing_steps", 1,
    ]  # fmt: skip
    out = str(tmp_path / "out")
    run(SCRIPT, args + ["--output_dir", out, "--max_train_steps", 2])
    saved = {k: v for k, v in lora(out).items() if k.endswith("lora_B.weight") or k.endswith("lora.up.weight")}
    modules = {k.rsplit(".lora", 1)[0] for k in saved}
    for name in targets.split(","):
        assert any(m.endswith("." + name) for m in modules), name

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, feature_extractor=None)
    pipe.load_lora_weights(out)
    loaded = {n: p for n, p in pipe.unet.named_parameters() if "lora_B" in n}
    assert len(loaded) == len(saved)
    trained = [n for n, p in loaded.items() if p.abs().max() > 0]
    assert any(".attn2.to_k." in n for n in trained) and any(".ff.net.2." in n for n in trained)
    assert len(trained) == sum(v.abs().max() > 0 for v in saved.values())

    run(SCRIPT, args + ["--output_dir", out, "--max_train_steps", 3, "--resume_from_checkpoint", "latest"])
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2, 3]


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
            "--resolution",  # the data is checked first: at the default 512, 32 px images are too small
            32,
        ],
        launcher="python",
        check=False,
    )
    # the model is checked before the data: a Hub id offline, from the Hub cache alone
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1] == (
        "error: --pretrained_model_name_or_path: 'someone/sd' is not a local folder and not in the Hub cache, and "
        "HF_HUB_OFFLINE=1 allows no download: pass the model's local folder, or run once online to cache it"
    )
    assert "Traceback" not in proc.stderr and "checking rows" not in proc.stderr


def test_a_missing_model_folder_is_one_line_before_the_data_is_read(tiny_pairs_parquet, tmp_path):
    missing = str(tmp_path / "models" / "tiny-sd")
    proc = run(
        SCRIPT,
        ["--pretrained_model_name_or_path", missing, "--dataset_name", tiny_pairs_parquet, "--output_dir", tmp_path],
        launcher="python",
        check=False,
    )
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1] == (
        f"error: --pretrained_model_name_or_path: no such folder: '{missing}'"
    )
    assert "Traceback" not in proc.stderr and "checking rows" not in proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# Interruptions, divergence, pickles: the run keeps a complete checkpoint and resumes to the same adapter


def by_step(output_dir):
    """The record of each step."""
    return {r["step"]: r for r in metrics(output_dir) if "loss" in r}


def assert_same_run(straight, resumed):
    a, b = lora(straight), lora(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert {s: round(r["loss"], 5) for s, r in by_step(straight).items()} == {
        s: round(r["loss"], 5) for s, r in by_step(resumed).items()
    }


def checkpoints(output_dir):
    return sorted(d for d in os.listdir(output_dir) if "checkpoint" in d)


def copy_run(four_steps, folder):
    import shutil

    out, args = four_steps
    shutil.copytree(out, folder)
    return str(folder), args


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_a_folder_holding_a_run_is_never_mixed_with_a_new_one(four_steps, tmp_path):
    run_dir, args = copy_run(four_steps, tmp_path / "run")
    with open(os.path.join(run_dir, "notes.txt"), "w") as f:
        f.write("mine")
    proc = run(SCRIPT, args + ["--output_dir", run_dir, "--max_train_steps", 2], launcher="python", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert error_lines(proc.stderr) == [
        f"error: --output_dir '{run_dir}' holds a run (checkpoint-4, logs/metrics.jsonl, "
        "pytorch_lora_weights.safetensors): continue it with --resume_from_checkpoint latest, or start over with "
        "--overwrite_output_dir"
    ]
    new_run = [
        "--output_dir",
        run_dir,
        "--max_train_steps",
        2,
        "--overwrite_output_dir",
        "--num_validation_prompts",
        4,
    ]
    proc = run(SCRIPT, args + new_run)
    assert "--overwrite_output_dir: removed the previous run's checkpoint-3, checkpoint-4" in proc.stderr
    # the new run alone: its steps, checkpoints, validation images and samples; the user's file stays
    assert [r["step"] for r in metrics(run_dir) if "loss" in r] == [1, 2]
    assert checkpoints(run_dir) == ["checkpoint-1", "checkpoint-2"]
    assert os.listdir(os.path.join(run_dir, "validation")) == ["final-000002.png"]
    assert open(os.path.join(run_dir, "notes.txt")).read() == "mine"


def test_an_unreadable_latest_checkpoint_is_skipped_for_the_one_before(four_steps, tmp_path):
    out, _ = four_steps
    run_dir, args = copy_run(four_steps, tmp_path / "run")
    broken = os.path.join(run_dir, "checkpoint-4")
    with open(os.path.join(broken, "pytorch_lora_weights.safetensors"), "r+b") as f:
        f.truncate(100)
    # named: one line saying what is wrong and which checkpoint to take instead
    proc = run(
        SCRIPT,
        args + ["--output_dir", run_dir, "--max_train_steps", 4, "--resume_from_checkpoint", broken],
        launcher="python",
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = error_lines(proc.stderr)
    assert line.startswith(
        f"error: checkpoint '{broken}' has an unreadable pytorch_lora_weights.safetensors, truncated or not written "
        "by this trainer (SafetensorError: "
    )
    assert line.endswith(
        f"; the last complete checkpoint before it is '{os.path.join(run_dir, 'checkpoint-3')}': pass that to "
        "--resume_from_checkpoint"
    )
    # latest: skipped with a warning, the run goes on from checkpoint-3 and ends as the uninterrupted one
    proc = run(SCRIPT, args + ["--output_dir", run_dir, "--max_train_steps", 4, "--resume_from_checkpoint", "latest"])
    assert re.search(
        rf"WARNING \S+: checkpoint '{re.escape(broken)}' has an unreadable pytorch_lora_weights.safetensors, .*: "
        "skipped for checkpoint-3\n",
        proc.stderr,
    )
    assert re.search(r"resumed from \S+checkpoint-3 at step 3", proc.stderr)
    assert [r["step"] for r in metrics(run_dir) if "loss" in r] == [1, 2, 3, 4]
    assert_same_run(out, run_dir)


def test_a_run_prints_none_of_the_known_harmless_messages(tiny_sd_dir, tiny_pairs_parquet, tmp_path):
    """bitsandbytes' missing optional kernel, transformers' PIL fallback for image processors, diffusers' empty list
    of float32 modules, and counts of one in the plural, under the libraries' own log levels."""
    args = ["--pretrained_model_name_or_path", tiny_sd_dir, "--dataset_name", tiny_pairs_parquet, *QUICK,
            "--output_dir", tmp_path / "out", "--max_train_steps", 1, "--use_8bit_adam", "--train_batch_size", 6,
            "--inversion_cache", tmp_path / "cache", "--inversion_cache_shard_size", 8]  # fmt: skip
    e = {k: v for k, v in env().items() if not k.endswith("_VERBOSITY")}
    proc = subprocess.run(
        cpu_launch_command(os.path.join(REPO, SCRIPT)) + [str(a) for a in args],
        cwd=REPO,
        env=e,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 flip x" in proc.stderr and "1 epoch," in proc.stderr  # the lines that say them are there
    for fragment in ("gemm_4bit_forward", "requires torchvision", "should be kept in float32: []"):
        assert fragment not in proc.stderr, proc.stderr
    assert not re.search(r"\b1 (epoch|step|pair|flip|shard|row|tie|prompt)s\b", proc.stderr), proc.stderr


def test_checkpoints_hold_no_pickles(four_steps):
    out, _ = four_steps
    assert sorted(os.listdir(os.path.join(out, "checkpoint-4"))) == [
        "optimizer.safetensors",
        "pytorch_lora_weights.safetensors",
        "random_states_0.safetensors",
        "training_state.json",
    ]
    found = [
        os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs if f.endswith((".bin", ".pkl", ".pt", ".pth"))
    ]
    assert not found


def interrupt_and_resume(four_steps, run_dir, launcher, after_steps, send):
    """Runs the 4-step run with checkpoints only when interrupted, calls ``send(proc)`` once ``after_steps`` steps
    are logged, checks the stop, resumes with ``latest`` and checks it ends as the uninterrupted run."""
    out, args = four_steps
    proc = start(
        SCRIPT, args + ["--output_dir", run_dir, "--max_train_steps", 4, "--checkpointing_steps", 100], launcher
    )
    wait_for(lambda: steps_logged(run_dir) >= after_steps, proc)
    send(proc)
    _, stderr = proc.communicate(timeout=240)
    stopped = re.search(
        r"stopped by (SIG\w+) at step (\d) of 4: \S+checkpoint-\2 is complete. To continue, run the same command "
        r"with --resume_from_checkpoint latest",
        stderr,
    )
    assert stopped and "Traceback" not in stderr, stderr[-3000:]
    step = int(stopped.group(2))
    assert after_steps <= step < 4 and checkpoints(run_dir) == [f"checkpoint-{step}"]
    assert {"interrupted": stopped.group(1), "step": step, "pairs": 6}.items() <= metrics(run_dir)[-1].items()
    run(SCRIPT, args + ["--output_dir", run_dir, "--max_train_steps", 4, "--resume_from_checkpoint", "latest"])
    assert_same_run(out, run_dir)
    assert [r["step"] for r in metrics(run_dir) if "loss" in r] == [1, 2, 3, 4]
    return proc


def test_sigterm_to_the_launcher_saves_stops_and_resumes_to_the_same_adapter(four_steps, tmp_path):
    # `kill <pid of accelerate launch>`: the launcher dies at once without passing it on; Linux tells the trainer
    interrupt_and_resume(four_steps, str(tmp_path / "run"), "accelerate", 1, lambda p: os.kill(p.pid, signal.SIGTERM))


def test_ctrl_c_saves_and_exits_0_and_resumes_to_the_same_adapter(four_steps, tmp_path):
    def ctrl_c(proc):
        # at once, after step 1: a tiny step takes ~0.1 s, and on loaded cores a signal sent "into step 3" was seen
        # in step 4, the last, which ends the run normally; from step 1 it has two steps of slack
        proc.send_signal(signal.SIGINT)

    proc = interrupt_and_resume(four_steps, str(tmp_path / "run"), "python", 1, ctrl_c)
    assert proc.returncode == 0


SLOW_SAVE = """import runpy, sys, time
import safetensors.torch

save_file = safetensors.torch.save_file


def slow_save_file(tensors, filename, metadata=None):
    if filename.endswith("optimizer.safetensors"):
        time.sleep(2)
    return save_file(tensors, filename, metadata)


safetensors.torch.save_file = slow_save_file
sys.argv[0] = {script!r}
runpy.run_path({script!r}, run_name="__main__")
"""


def slow_save_wrapper(folder):
    """A script that runs the trainer with slow optimizer-state writes (the trainer imports ``save_file`` from
    ``safetensors.torch`` when it starts, after the wrapper has replaced it)."""
    path = os.path.join(str(folder), "slow_save.py")
    with open(path, "w") as f:
        f.write(SLOW_SAVE.format(script=os.path.join(REPO, SCRIPT)))
    return path


def test_kill_9_during_a_save_leaves_the_last_complete_checkpoint_latest(four_steps, tmp_path):
    out, args = four_steps
    run_dir = str(tmp_path / "run")
    # the trainer run through a wrapper whose safetensors writes sleep before each optimizer file: every checkpoint
    # save pauses after its adapter is written, and the kill lands inside one
    proc = start(slow_save_wrapper(tmp_path), args + ["--output_dir", run_dir, "--max_train_steps", 4])
    partial = os.path.join(run_dir, ".partial-checkpoint-2")
    wait_for(lambda: os.path.exists(os.path.join(partial, "pytorch_lora_weights.safetensors")), proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert checkpoints(run_dir) == [".partial-checkpoint-2", "checkpoint-1"]
    assert "training_state.json" not in os.listdir(partial)  # broken, and never called checkpoint-2
    resumed = run(
        SCRIPT, args + ["--output_dir", run_dir, "--max_train_steps", 4, "--resume_from_checkpoint", "latest"]
    )
    assert "removed .partial-checkpoint-2" in resumed.stderr and "resumed from" in resumed.stderr
    assert re.search(r"resumed from \S+checkpoint-1 at step 1", resumed.stderr)
    assert checkpoints(run_dir) == ["checkpoint-3", "checkpoint-4"]
    assert_same_run(out, run_dir)
    # step 2, logged before its checkpoint's save was killed, is logged once: by the run that resumed at step 1
    assert [r["step"] for r in metrics(run_dir) if "loss" in r] == [1, 2, 3, 4]


def test_a_non_finite_loss_stops_with_one_line_naming_the_step_and_keeps_the_last_checkpoint(
    tiny_sd_dir, tiny_pairs_parquet, tmp_path
):
    # a learning rate of 1e30 makes step 1's update blow the adapter's output up: step 2's loss is not finite
    out = str(tmp_path / "out")
    proc = run(
        SCRIPT,
        ["--pretrained_model_name_or_path", tiny_sd_dir, "--dataset_name", tiny_pairs_parquet, "--output_dir", out,
         "--max_train_steps", 3, "--checkpointing_steps", 1, *QUICK, "--objective", "diffusion_dpo",
         "--learning_rate", 1e30],
        launcher="python",
        check=False,
    )  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert re.match(
        r"error: step 2: the loss is (nan|inf|-inf) \(not finite\); .*checkpoint-1 stays the latest", errors[0]
    )
    assert "Traceback" not in proc.stderr
    assert checkpoints(out) == ["checkpoint-1"]
    assert [r["step"] for r in metrics(out)] == [1]


def write_bad_pairs(path):
    """The tiny pairs plus one row of each kind a scraped dataset holds; the RGBA and 16-bit rows are usable."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from tests.tiny import jpeg_bytes, tiny_pairs

    def png(image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    rows = tiny_pairs(num_rows=8, tie_every=4)
    good = rows["jpg_0"][0]
    extra = [
        (good[:200], good, 1.0, "truncated"),
        (good, b"not an image", 0.0, "undecodable"),
        (png(Image.new("RGB", (4, 4))), good, 1.0, "tiny"),
        (good, good, 2.0, "label 2"),
        (good, good, 1.0, ""),
        (png(Image.new("RGBA", (32, 32), (0, 0, 0, 0))), good, 1.0, "transparent"),
        (png(Image.fromarray(np.full((32, 32), 30000, np.uint16))), jpeg_bytes(Image.new("CMYK", (32, 32))), 0.0, "16-bit"),
    ]  # fmt: skip
    for jpg_0, jpg_1, label, caption in extra:
        for k, v in zip(("jpg_0", "jpg_1", "label_0", "caption"), (jpg_0, jpg_1, label, caption)):
            rows[k].append(v)
    pq.write_table(pa.table(rows), path)
    return path


def test_bad_rows_are_skipped_counted_and_reported(tiny_sd_dir, tmp_path):
    data = write_bad_pairs(str(tmp_path / "bad.parquet"))
    common = ["--pretrained_model_name_or_path", tiny_sd_dir, "--dataset_name", data, *QUICK, "--max_train_steps", 1]
    # 5 bad rows of 15: past the default --max_bad_fraction, one line naming the first
    proc = run(SCRIPT, common + ["--output_dir", tmp_path / "a"], launcher="python", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        "5 of 15 rows are bad (33.3%, more than --max_bad_fraction 0.05); the first, row 8: column 'jpg_0'"
        in proc.stderr
    )
    out = str(tmp_path / "b")
    proc = run(SCRIPT, common + ["--output_dir", out, "--max_bad_fraction", 0.4])
    counts = {"rows": 15, "ties_dropped": 2, "bad_rows": 5, "bad_label": 1, "bad_caption": 1, "bad_image": 2,
              "small_image": 1, "large_image": 0, "pairs": 8}  # fmt: skip
    assert counts.items() <= metrics(out)[-1].items()
    assert str(counts) in proc.stderr  # the end-of-run summary
    with open(os.path.join(out, "logs", "bad_rows.jsonl")) as f:
        bad = [json.loads(line) for line in f]
    assert [(b["row"], b["reason"]) for b in bad] == [
        (8, "bad_image"), (9, "bad_image"), (10, "small_image"), (11, "bad_label"), (12, "bad_caption")
    ]  # fmt: skip
