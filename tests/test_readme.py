"""The README stays true: every flag is documented, and CI runs the test command it shows."""

import contextlib
import importlib
import io
import os
import re
import subprocess

import pytest
from conftest import REPO


def readme():
    with open(os.path.join(REPO, "README.md")) as f:
        return f.read()


def trainer_flags(module):
    """Every flag the trainer's --help shows."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), pytest.raises(SystemExit):
        importlib.import_module(module).parse_args(["--help"])
    flags = sorted(set(re.findall(r"(--[a-z0-9_]+)", buffer.getvalue())) - {"--help"})
    assert "--objective" in flags and "--pretrained_model_name_or_path" in flags
    return flags


def test_every_flag_of_the_trainer_is_in_the_readme():
    text = readme()
    flags = trainer_flags("train_inversion_dpo")
    missing = [f for f in flags if f"`{f}`" not in text]
    assert not missing, f"README lacks {missing}"


def test_every_flag_of_the_sdxl_trainer_is_in_the_readme():
    text = readme()
    flags = trainer_flags("train_inversion_dpo_sdxl")
    missing = [f for f in flags if f"`{f}`" not in text]
    assert not missing, f"README lacks {missing}"


def test_ci_runs_the_readme_test_command():
    out = subprocess.run(
        ["awk", "/<!-- test-command -->/{found=1; next} found && /^```bash/{getline; print; exit}", "README.md"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert "pytest" in out and "requirements-test.txt" in out
    ci = open(os.path.join(REPO, ".ci", "run")).read()
    assert "test-command" in ci and re.search(r'bash -c "\$cmd"', ci)


def test_every_flag_of_evaluate_is_in_the_readme():
    from evaluate import make_parser

    text = readme()
    flags = [a.option_strings[0] for a in make_parser()._actions if a.option_strings[0] != "-h"]
    assert "--pickscore" in flags
    missing = [f for f in flags if f"`{f}`" not in text]
    assert not missing, f"README lacks {missing}"
