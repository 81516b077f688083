"""Nothing loads a pickle (unpickling runs code): no pickle.load, torch.load only with weights_only=True, no
trust_remote_code, model weights from safetensors only."""

import ast
import os

import pytest
import torch
from conftest import REPO


def shipped_python_files():
    """Every .py file of the project but the tests (which load the repository's own custom-pipeline file)."""
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("tests", "__pycache__")]
        for name in files:
            if name.endswith(".py"):
                yield os.path.join(folder, name)


def unsafe_calls(source: str):
    """(line, what) of every call that can unpickle: pickle/dill/joblib loads, torch.load without weights_only=True,
    numpy loads with allow_pickle=True, anything with trust_remote_code=True."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        keywords = {k.arg: k.value for k in node.keywords}

        def is_true(arg):
            return isinstance(keywords.get(arg), ast.Constant) and keywords[arg].value is True

        if name.split(".")[-1] in ("load", "loads", "Unpickler") and name.split(".")[0] in (
            "pickle",
            "dill",
            "joblib",
            "cloudpickle",
        ):
            found.append((node.lineno, name))
        if name == "torch.load" and not is_true("weights_only"):
            found.append((node.lineno, "torch.load without weights_only=True"))
        if name in ("np.load", "numpy.load") and is_true("allow_pickle"):
            found.append((node.lineno, "np.load(allow_pickle=True)"))
        if is_true("trust_remote_code"):
            found.append((node.lineno, "trust_remote_code=True"))
    return found


def test_the_scanner_finds_what_it_looks_for():
    bad = "import torch, pickle\npickle.load(f)\ntorch.load(p)\ntorch.load(p, weights_only=False)\nX.from_pretrained(m, trust_remote_code=True)\n"
    assert [line for line, _ in unsafe_calls(bad)] == [2, 3, 4, 5]
    assert unsafe_calls("torch.load(p, weights_only=True)\nX.from_pretrained(m)\n") == []


def test_no_shipped_code_loads_a_pickle():
    files = list(shipped_python_files())
    assert any(f.endswith("train_inversion_dpo.py") for f in files) and any(f.endswith("evaluate.py") for f in files)
    found = {}
    for path in files:
        with open(path) as f:
            calls = unsafe_calls(f.read())
        if calls:
            found[os.path.relpath(path, REPO)] = calls
    assert not found


def test_model_weights_load_from_safetensors_only(tiny_sd_dir, tmp_path):
    """A component whose weights exist only as a pickled .bin is refused with one line naming the model."""
    from diffusers import UNet2DConditionModel

    from train_inversion_dpo import DataError, load_component

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    unet.save_pretrained(str(tmp_path / "unet"), safe_serialization=False)
    assert os.listdir(tmp_path / "unet") and not any(f.endswith(".safetensors") for f in os.listdir(tmp_path / "unet"))
    with pytest.raises(DataError, match=f"of model '{tmp_path}'"):
        load_component(UNet2DConditionModel, str(tmp_path), "unet")
    assert isinstance(load_component(UNet2DConditionModel, tiny_sd_dir, "unet"), torch.nn.Module)
