"""The docs stay true: docs/flags.md is what the scripts' parsers say, and CI runs the README's test command."""

import argparse
import contextlib
import importlib
import importlib.util
import io
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO


FLAGS_REFERENCE = os.path.join(REPO, "scripts", "flags_reference.py")


def flags_reference():
    spec = importlib.util.spec_from_file_location("flags_reference", FLAGS_REFERENCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_flags_reference_is_current():
    proc = subprocess.run(
        [sys.executable, FLAGS_REFERENCE, "--check"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_stale_flags_reference_fails_the_check(tmp_path, capsys):
    reference = flags_reference()
    lines = open(os.path.join(REPO, "docs", "flags.md")).read().splitlines(keepends=True)
    row = [i for i, line in enumerate(lines) if line.startswith("| `--overwrite_output_dir` |")][
        0
    ]  # the first trainer's
    stale = tmp_path / "flags.md"
    stale.write_text("".join(lines[:row] + lines[row + 1 :]))
    assert reference.main(["--check", "--output", str(stale)]) == 1
    err = capsys.readouterr().err
    assert f"error: {stale} is not current: rewrite it with python scripts/flags_reference.py" in err
    assert "+| `--overwrite_output_dir` |" in err  # the diff shows what is missing
    assert reference.main(["--output", str(stale)]) == 0 and reference.main(["--check", "--output", str(stale)]) == 0


def test_every_flag_has_a_help_text_and_shows_its_default():
    """argparse prints neither a flag's help nor its default when the help text is empty."""
    reference = flags_reference()
    for script, _ in reference.SCRIPTS:
        parser = reference.parser_of(reference.load_module(script))
        parsers = [parser, *reference.subparsers(parser).values()]
        for p in parsers:
            assert p.formatter_class is argparse.ArgumentDefaultsHelpFormatter, script
            missing = [a.dest for a in p._actions if not a.help and not isinstance(a, argparse._SubParsersAction)]
            assert not missing, f"{script}: no help for {missing}"
    # and --help prints each default
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), pytest.raises(SystemExit):
        importlib.import_module("train_inversion_dpo").parse_args(["--help"])
    text = " ".join(buffer.getvalue().split())
    assert "--num_validation_prompts NUM_VALIDATION_PROMPTS Without --validation_prompts" in text
    assert "(default: 4)" in text and "(default: inversion-dpo-lora)" in text


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


def readme_training_commands():
    """Every complete ``accelerate launch train_*.py ...`` command of the README's bash blocks, as argument lists."""
    import shlex

    with open(os.path.join(REPO, "README.md")) as f:
        blocks = re.findall(r"```bash\n(.*?)```", f.read(), flags=re.S)
    commands = []
    for block in blocks:
        for command in block.replace("\\\n", " ").splitlines():
            words = shlex.split(command)
            scripts = [w for w in words if re.fullmatch(r"train_\w+\.py", w)]
            # "<flags>" and "..." mark a command that shows a few flags of one above
            if words[:2] == ["accelerate", "launch"] and scripts and "<" not in command and "..." not in words:
                commands.append((scripts[0], words[words.index(scripts[0]) + 1 :]))
    return commands


def test_the_readmes_training_commands_parse():
    # a renamed or mistyped flag in a quick start fails here, not on a user's GPU
    commands = readme_training_commands()
    assert {script for script, _ in commands} >= {
        "train_inversion_dpo.py", "train_inversion_dpo_sdxl.py", "train_inversion_dpo_sd3.py", "train_spo.py",
    }  # fmt: skip
    for script, args in commands:
        importlib.import_module(script[:-3]).parse_args(args)
