"""What a user of the trainers meets before and around a run, without a training run: the paths and numbers they type
are one-line errors before any data is decoded, a run folder is continued or started over but never mixed with
another run, an unreadable checkpoint is named, metrics.jsonl keeps each step once and logs the preference loss, and
the libraries' known-harmless messages are silenced, those alone."""

import json
import logging
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from test_objectives import make_cfg, moved_model, pair_batch

import train_inversion_dpo as trainer
from train_inversion_dpo import InputError, check_paths, parse_args


def make_args(tmp_path, *extra, model=None):
    """Flags naming a local model folder and data file that exist, and an --output_dir under ``tmp_path``."""
    if model is None:
        model = tmp_path / "model"
        model.mkdir(exist_ok=True)
    data = tmp_path / "pairs.parquet"
    data.touch()
    return parse_args(["--pretrained_model_name_or_path", str(model), "--dataset_name", str(data),
                       "--output_dir", str(tmp_path / "out"), *extra])  # fmt: skip


def error_of(args) -> str:
    with pytest.raises(InputError) as e:
        check_paths(args)
    message = str(e.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------------------------
# Paths and numbers


@pytest.mark.parametrize("name", ["/no/such/model", "./no-such-model", "~/no-such-model", "a/b/c", "two words"])
def test_a_missing_local_model_folder_is_named_as_such(tmp_path, name):
    message = error_of(make_args(tmp_path, model=name))
    assert message == f"--pretrained_model_name_or_path: no such folder: '{name}'"


def test_a_file_where_a_model_folder_belongs_is_named(tmp_path):
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"x")
    assert error_of(make_args(tmp_path, model=str(model))) == (
        f"--pretrained_model_name_or_path: no such folder: '{model}' is a file; pass the model's diffusers folder "
        "(the one with model_index.json) or a Hub id"
    )
    args = make_args(tmp_path, "--pretrained_vae_model_name_or_path", str(tmp_path / "no-vae"))
    assert error_of(args) == f"--pretrained_vae_model_name_or_path: no such folder: '{tmp_path / 'no-vae'}'"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hub cache, offline; ``add(repo_id, filename)`` caches one file of a repository."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def add(repo_id, filename, text="{}"):
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text("abc")
        (repo / "snapshots" / "abc").mkdir(parents=True, exist_ok=True)
        (repo / "snapshots" / "abc" / filename).write_text(text)
        return repo / "snapshots" / "abc"

    return add


def test_a_hub_id_offline_is_checked_in_the_cache_at_once(tmp_path, hub_cache):
    message = error_of(make_args(tmp_path, model="someone/sd"))
    assert message == (
        "--pretrained_model_name_or_path: 'someone/sd' is not a local folder and not in the Hub cache, and "
        "HF_HUB_OFFLINE=1 allows no download: pass the model's local folder, or run once online to cache it"
    )
    hub_cache("someone/sd", "model_index.json")
    check_paths(make_args(tmp_path, model="someone/sd"))
    args = make_args(tmp_path, "--pretrained_vae_model_name_or_path", "someone/vae")
    assert error_of(args).startswith("--pretrained_vae_model_name_or_path: 'someone/vae' is not a local folder")
    hub_cache("someone/vae", "config.json")
    check_paths(args)


def test_a_missing_dataset_checkpoint_or_output_folder_is_named(tmp_path):
    args = make_args(tmp_path)
    args.dataset_name = str(tmp_path / "nope.parquet")
    assert error_of(args) == f"--dataset_name: no such file or folder: '{tmp_path / 'nope.parquet'}'"
    args = make_args(tmp_path, "--resume_from_checkpoint", str(tmp_path / "out" / "checkpoint-9"))
    assert error_of(args) == f"--resume_from_checkpoint: no such folder: '{tmp_path / 'out' / 'checkpoint-9'}'"
    (tmp_path / "out").write_text("x")
    assert error_of(make_args(tmp_path)) == (
        f"--output_dir: '{tmp_path / 'out'}' is a file; pass a folder (it is created if missing)"
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max_train_steps", "0"], "--max_train_steps must be at least 1, got 0"),
        (["--num_train_epochs", "0"], "--num_train_epochs must be at least 1, got 0"),
        (["--validation_num_inference_steps", "0"], "--validation_num_inference_steps must be at least 1, got 0"),
        (["--num_validation_prompts", "-1"], "--num_validation_prompts must be at least 0, got -1"),
        (["--learning_rate", "0"], "--learning_rate must be above 0, got 0"),
        (["--beta_dpo", "-5"], "--beta_dpo must be above 0, got -5"),
        (["--lr_warmup_steps", "-1"], "--lr_warmup_steps must be at least 0, got -1"),
        (
            ["--overwrite_output_dir", "--resume_from_checkpoint", "latest"],
            "--overwrite_output_dir starts the run over, --resume_from_checkpoint continues it: pass one of them",
        ),
    ],
)
def test_numbers_that_cannot_work_are_one_line(tmp_path, flags, message):
    with pytest.raises(InputError, match="^" + re.escape(message) + "$"):
        make_args(tmp_path, *flags)


def test_an_unknown_lr_scheduler_is_refused_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        make_args(tmp_path, "--lr_scheduler", "cosine_annealing")
    assert e.value.code == 2 and "invalid choice: 'cosine_annealing'" in capsys.readouterr().err


def test_a_long_message_is_cut_between_words():
    words = ["word"] * 50 + ["/a/very/long/path/" + "x" * 60]
    line = trainer.first_line(ValueError(" ".join(words) + "\nsecond line"), limit=230)
    assert line.endswith(" ...") and len(line) <= 234
    assert all(w in words for w in line[: -len(" ...")].split())
    assert trainer.first_line(ValueError("short\nsecond")) == "short"


# ---------------------------------------------------------------------------------------------------------------
# A run folder is continued or started over, never mixed


RUN_FILES = [
    "checkpoint-2/optimizer.safetensors",
    "checkpoint-4/pytorch_lora_weights.safetensors",
    ".partial-checkpoint-5/optimizer.safetensors",
    "pytorch_lora_weights.safetensors",
    "README.md",
    "validation.png",
    "samples/00.png",
    "samples/01.png",
    "validation/validation-000002.png",
    "validation/final-000004.png",
    "logs/metrics.jsonl",
    "logs/bad_rows.jsonl",
    "logs/inversion-dpo/events.out.tfevents",
]
USER_FILES = ["notes.txt", "pairs.parquet", "inversion_cache/abc/cache.json", "samples/mine.txt", "logs/mine.txt"]


def write_files(folder, names):
    for name in names:
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write("x")


def all_files(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


@pytest.mark.parametrize(
    "files, named",
    [
        (["checkpoint-2/training_state.json", "checkpoint-4/training_state.json"], "checkpoint-4"),
        (["logs/metrics.jsonl"], "logs/metrics.jsonl"),
        (["pytorch_lora_weights.safetensors"], "pytorch_lora_weights.safetensors"),
    ],
)
def test_a_folder_holding_a_run_is_continued_or_started_over_only_when_asked(tmp_path, files, named):
    args = make_args(tmp_path)
    write_files(args.output_dir, files)
    assert error_of(args) == (
        f"--output_dir '{args.output_dir}' holds a run ({named}): continue it with --resume_from_checkpoint latest, "
        "or start over with --overwrite_output_dir"
    )
    check_paths(make_args(tmp_path, "--resume_from_checkpoint", "latest"))
    check_paths(make_args(tmp_path, "--overwrite_output_dir"))


def test_a_folder_with_other_files_is_no_run(tmp_path):
    args = make_args(tmp_path)
    write_files(args.output_dir, USER_FILES + ["README.md", ".partial-checkpoint-1/optimizer.safetensors"])
    check_paths(args)


def test_overwrite_removes_the_runs_files_and_nothing_else(tmp_path):
    args = make_args(tmp_path, "--overwrite_output_dir")
    write_files(args.output_dir, RUN_FILES + USER_FILES)
    removed = trainer.remove_previous_run(args)
    assert all_files(args.output_dir) == sorted(USER_FILES)
    assert {"checkpoint-2", "checkpoint-4", ".partial-checkpoint-5", "logs/inversion-dpo"} <= set(removed)
    assert not os.path.exists(os.path.join(args.output_dir, "validation"))  # emptied, so removed


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints that cannot be read


def write_checkpoint(folder, step):
    os.makedirs(folder)
    trainer.save_file({"unet.a.lora_A.weight": torch.zeros(2, 2)}, os.path.join(folder, trainer.LORA_FILE))
    trainer.save_tree(os.path.join(folder, trainer.OPTIMIZER_FILE), {"state": {}, "param_groups": [{"lr": 1.0}]})
    trainer.save_tree(os.path.join(folder, trainer.random_states_file(0)), trainer.random_states())
    with open(os.path.join(folder, trainer.TRAINING_STATE_FILE), "w") as f:
        json.dump({"step": step, "accelerator_step": 0, "scheduler": {"value": None}, "scaler": None}, f)
    return folder


def truncate(path, size=100):
    with open(path, "r+b") as f:
        f.truncate(size)


def test_an_unreadable_checkpoint_is_named_with_what_is_wrong(tmp_path):
    folders = [write_checkpoint(str(tmp_path / f"checkpoint-{s}"), s) for s in (1, 2, 3)]
    assert all(trainer.checkpoint_problem(f) is None for f in folders)
    truncate(os.path.join(folders[2], trainer.LORA_FILE))
    assert trainer.checkpoint_problem(folders[2]).startswith(
        "has an unreadable pytorch_lora_weights.safetensors, truncated or not written by this trainer (SafetensorError"
    )
    with open(os.path.join(folders[1], trainer.TRAINING_STATE_FILE), "w") as f:
        f.write('{"step": 2')
    assert trainer.checkpoint_problem(folders[1]).startswith("has an unreadable training_state.json (JSONDecodeError")
    # the last complete checkpoint before a broken one skips the broken ones between
    assert trainer.previous_complete_checkpoint(folders[2]) == folders[0]
    assert trainer.previous_complete_checkpoint(folders[0]) is None
    os.remove(os.path.join(folders[0], trainer.OPTIMIZER_FILE))
    assert trainer.checkpoint_problem(folders[0]) == "has no optimizer.safetensors"
    write_checkpoint(str(tmp_path / "checkpoint-4"), 4)
    truncate(str(tmp_path / "checkpoint-4" / trainer.OPTIMIZER_FILE), 8)
    assert "unreadable optimizer.safetensors" in trainer.checkpoint_problem(str(tmp_path / "checkpoint-4"))


def test_resuming_where_no_checkpoint_reads_is_one_line(tmp_path, caplog):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    accelerator = SimpleNamespace(
        distributed_type=DistributedType.NO, process_index=0, num_processes=1, is_main_process=True
    )
    out = tmp_path / "out"
    folders = [write_checkpoint(str(out / f"checkpoint-{s}"), s) for s in (1, 2)]
    for folder in folders:
        truncate(os.path.join(folder, trainer.LORA_FILE))
    args = make_args(tmp_path, "--resume_from_checkpoint", "latest")
    with pytest.raises(trainer.CheckpointError) as e, caplog.at_level(logging.WARNING):
        trainer.resume_run(args, accelerator, (None, None, None))  # fails on the files, before touching the model
    assert str(e.value).startswith(
        f"no checkpoint of '{out}' can be read, down to the earliest: checkpoint '{folders[0]}' has an unreadable "
        "pytorch_lora_weights.safetensors"
    )
    assert str(e.value).endswith("; start over with --overwrite_output_dir")
    assert f"checkpoint '{folders[1]}' has an unreadable" in caplog.text and "skipped for checkpoint-1" in caplog.text
    args = make_args(tmp_path, "--resume_from_checkpoint", folders[1])
    with pytest.raises(trainer.CheckpointError, match="; no complete checkpoint precedes it$"):
        trainer.resume_run(args, accelerator, (None, None, None))


# ---------------------------------------------------------------------------------------------------------------
# metrics.jsonl


def test_on_resume_the_rows_of_later_steps_are_dropped(tmp_path):
    log = trainer.MetricsLog(str(tmp_path / "metrics.jsonl"), True)
    for step in (1, 2, 3, 4):
        log.write({"loss": 0.5, "step": step})
    log.write({"final": True, "step": 4, "pairs": 6})
    with open(log.path, "a") as f:
        f.write('{"loss": 0.4, "st')  # a row cut short by a kill
    log.drop_after(2)
    assert log.records() == [{"loss": 0.5, "step": 1}, {"loss": 0.5, "step": 2}]
    log.write({"loss": 0.3, "step": 3})
    assert [r["step"] for r in log.records()] == [1, 2, 3]


def test_the_preference_loss_is_logged_beside_the_unweighted_winner_terms():
    from train_inversion_dpo import training_loss

    z0, cond, null = pair_batch()
    model = moved_model()
    for objective in ("diffusion_dpo", "inversion_dpo", "inpo"):
        plain = training_loss(objective, model.policy, model.reference, z0, cond, null, make_cfg())
        assert torch.allclose(plain.logs["preference_loss"], plain.loss.mean())
        cfg = make_cfg(sft_weight=2.0, anchor_weight=3.0, anchor_max_timestep=500)
        out = training_loss(objective, model.policy, model.reference, z0, cond, null, cfg)
        total = out.logs["preference_loss"] + 2.0 * out.logs["sft"] + 3.0 * out.logs["anchor"]
        assert torch.allclose(out.loss.mean(), total, rtol=1e-5), objective
    sft = training_loss("sft", model.policy, model.reference, z0, cond, null, make_cfg())
    assert "preference_loss" not in sft.logs  # no pair objective: its loss is the sft term itself


def test_the_cards_headline_metrics_are_the_last_steps_means():
    rows = [
        {"loss": float(s), "accuracy": 1.0, "margin": -1.0, "preference_loss": 0.5, "step": s} for s in range(1, 6)
    ]
    rows.insert(2, {"loss": 100.0, "accuracy": 0.0, "margin": 0.0, "step": 4})  # logged again later: the last wins
    rows.append({"final": True, "step": 5})
    means = trainer.headline_metrics(rows, window=3)
    assert means == {"steps": 3, "loss": 4.0, "preference_loss": 0.5, "accuracy": 1.0, "margin": -1.0}


def test_default_validation_prompts_are_the_first_distinct_captions():
    import datasets

    captions = ["a cat", "a cat", "a dog", "a bird", "a cat", "a fish", "a cow"]
    data = datasets.Dataset.from_dict({"caption": captions, "label_0": [1.0] * len(captions)})
    pairs = trainer.PreferencePairs(data, trainer.PairColumns(), 32)
    assert trainer.default_validation_prompts(pairs, 4) == ["a cat", "a dog", "a bird", "a fish"]
    assert trainer.default_validation_prompts(pairs, 10) == ["a cat", "a dog", "a bird", "a fish", "a cow"]


# ---------------------------------------------------------------------------------------------------------------
# Known-harmless library messages


HARMLESS = [
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community: No module named "
     "'kernels'. Please make sure you already `pip install kernels` and the kernels >= 0.11.1"),
    ("transformers.utils.import_utils", "`CLIPImageProcessor` requires torchvision (not installed); falling back to "
     "`CLIPImageProcessorPil` for backward compatibility."),
    ("diffusers.models.modeling_utils", "There are modules in AutoencoderKL that should be kept in float32: []. "
     "Casting directly with `to()` can lead to inconsistent results"),
]  # fmt: skip


def test_the_known_harmless_messages_are_filtered_and_the_rest_of_those_loggers_is_not():
    for name, message in HARMLESS:
        assert not logging.getLogger(name).filter(logging.makeLogRecord({"msg": message, "name": name})), name
        other = logging.makeLogRecord({"msg": "something else went wrong", "name": name})
        assert logging.getLogger(name).filter(other), name
    kept = "There are modules in UNet2DConditionModel that should be kept in float32: ['conv_in']. Casting"
    assert logging.getLogger("diffusers.models.modeling_utils").filter(logging.makeLogRecord({"msg": kept}))


def test_importing_the_trainer_prints_none_of_them():
    # two of them are logged while diffusers and peft import (the SDXL script's filters are checked copies)
    env = {k: v for k, v in os.environ.items() if not k.endswith("_VERBOSITY")}  # the libraries' own defaults
    proc = subprocess.run(
        [sys.executable, "-c", "import train_inversion_dpo"], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    for fragment in ("gemm_4bit_forward", "requires torchvision", "should be kept in float32"):
        assert fragment not in proc.stderr, proc.stderr
