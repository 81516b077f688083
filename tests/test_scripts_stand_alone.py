"""The training scripts are single files a user copies out of the repository and changes: they import installed
packages only, run alone from any folder, and what the SDXL script copies from the SD one stays equal to it."""

import ast
import math
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO
from script_runner import QUICK, cpu_launch_command, env, metrics


TRAINERS = [
    "train_inversion_dpo.py",
    "train_inversion_dpo_sdxl.py",
    "train_spo.py",
    "train_spo_sdxl.py",
    "train_inversion_dpo_sd3.py",
]
CHECK_COPIES = os.path.join(REPO, "scripts", "check_copies.py")


def local_names():
    """What an import could find in this repository: its top-level modules and packages."""
    return {
        os.path.splitext(n)[0] for n in os.listdir(REPO) if n.endswith(".py") or os.path.isdir(os.path.join(REPO, n))
    }


def imported_modules(path):
    with open(path) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield "." if node.level else node.module.split(".")[0]


@pytest.mark.parametrize("script", TRAINERS)
def test_a_trainer_imports_installed_packages_only(script):
    modules = set(imported_modules(os.path.join(REPO, script)))
    assert {"torch", "diffusers", "peft", "accelerate"} <= modules
    local = sorted(m for m in modules if m == "." or (m in local_names() and m not in sys.stdlib_module_names))
    assert not local, f"{script} imports {local} from the repository"
    third_party = sorted(modules - set(sys.stdlib_module_names))
    assert set(third_party) <= {
        "accelerate", "bitsandbytes", "datasets", "diffusers", "huggingface_hub", "numpy", "peft", "PIL", "pyarrow",
        "safetensors", "torch", "tqdm", "transformers", "wandb",
    }, third_party  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, model", [(TRAINERS[0], "tiny_sd_dir"), (TRAINERS[1], "tiny_sdxl_dir"), (TRAINERS[4], "tiny_sd3_dir")]
)
def test_a_trainer_copied_alone_into_an_empty_folder_trains_from_elsewhere(
    script, model, tiny_pairs_parquet, tmp_path, request
):
    alone, elsewhere = tmp_path / "alone", tmp_path / "elsewhere"
    alone.mkdir()
    elsewhere.mkdir()
    copied = shutil.copy(os.path.join(REPO, script), alone)
    out = str(tmp_path / "out")
    args = ["--pretrained_model_name_or_path", request.getfixturevalue(model), "--dataset_name", tiny_pairs_parquet,
            "--output_dir", out, "--max_train_steps", 2, *QUICK]  # fmt: skip
    proc = subprocess.run(
        cpu_launch_command(copied) + [str(a) for a in args],
        cwd=elsewhere,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert os.path.isfile(os.path.join(out, "pytorch_lora_weights.safetensors"))
    assert os.listdir(elsewhere) == [] and sorted(os.listdir(alone)) == [script]  # nothing written beside it


def run_check(*args, cwd=REPO):
    return subprocess.run([sys.executable, CHECK_COPIES, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_every_marked_copy_equals_its_original():
    proc = run_check()
    assert proc.returncode == 0, proc.stderr
    with open(os.path.join(REPO, "train_inversion_dpo_sdxl.py")) as f:
        sdxl = f.read()
    # the loop, the objectives, the cache and the checkpoints are shared; the text side is SDXL's own
    for name in ("main", "parse_args", "diffusion_dpo", "inversion_dpo", "inpo", "save_checkpoint", "ddim_move"):
        assert f"# Copied from train_inversion_dpo.{name}\n" in sdxl
    assert "# Copied from train_inversion_dpo.encode_prompt" not in sdxl


def test_a_drifted_copy_fails_the_check_and_fix_rewrites_it(tmp_path):
    for name in ("train_inversion_dpo.py", "train_inversion_dpo_sdxl.py", "pipeline_inversion.py"):
        shutil.copy(os.path.join(REPO, name), tmp_path)
    sdxl = tmp_path / "train_inversion_dpo_sdxl.py"
    original = sdxl.read_text()
    # a fix made in one script only: the SDXL copy of the sigmoid link loses its 1/2
    drifted = original.replace("    z = -0.5 * beta * margin\n", "    z = -beta * margin\n", 1)
    assert drifted != original
    sdxl.write_text(drifted)

    proc = run_check(str(sdxl))
    assert proc.returncode == 1
    assert "preference_loss differs from train_inversion_dpo.preference_loss" in proc.stderr
    assert "-    z = -0.5 * beta * margin" in proc.stderr and "+    z = -beta * margin" in proc.stderr

    proc = run_check(str(sdxl), "--fix")
    assert proc.returncode == 0 and "rewrote 1 copies" in proc.stderr
    assert sdxl.read_text() == original
    assert run_check(str(sdxl)).returncode == 0


def test_a_marker_that_names_nothing_is_an_error(tmp_path):
    shutil.copy(os.path.join(REPO, "train_inversion_dpo.py"), tmp_path)
    copy = tmp_path / "copy.py"
    copy.write_text("# Copied from train_inversion_dpo.no_such_function\ndef f():\n    pass\n")
    proc = run_check(str(copy))
    assert proc.returncode != 0 and "train_inversion_dpo.py has no top-level no_such_function" in proc.stderr


def test_a_renamed_copy_is_compared_as_ruff_formats_it(tmp_path):
    # the SD3 script's main is the SD main with unet->transformer (longer lines, which ruff re-wraps) and a rename
    # whose replacement holds a comma; a drift in it is found, and --fix writes it back formatted
    for name in ("train_inversion_dpo.py", "train_inversion_dpo_sd3.py", "pipeline_inversion_sd3.py"):
        shutil.copy(os.path.join(REPO, name), tmp_path)
    sd3 = tmp_path / "train_inversion_dpo_sd3.py"
    original = sd3.read_text()
    assert (
        "with unet->transformer, UNet->Transformer, load_text_encoders(args->load_text_encoders(pairs, transformer, args\n"
        in (original)
    )
    assert (
        "            images = validate(\n                args, accelerator, text, vae, final_transformer" in original
    )
    drifted = original.replace("    text = load_text_encoders(pairs, transformer, args, device, weight_dtype)\n",
                               "    text = load_text_encoders(pairs, transformer, args, device, torch.float32)\n", 1)  # fmt: skip
    assert drifted != original
    sd3.write_text(drifted)
    proc = run_check(str(sd3))
    assert proc.returncode == 1 and "main differs from train_inversion_dpo.main" in proc.stderr
    assert run_check(str(sd3), "--fix").returncode == 0
    assert sd3.read_text() == original
