#!/usr/bin/env python
"""Writes docs/flags.md, the flags of the command-line scripts, from their own argument parsers (what --help shows).

    python scripts/flags_reference.py          # rewrites docs/flags.md
    python scripts/flags_reference.py --check  # exits 1 when docs/flags.md is not what the parsers say

For the trainers a table per argument group (flag, default, help); for the SDXL and SD3 trainers only what differs
from the SD one; a table for each of evaluate.py, demo.py and scripts/convert_scorer_weights.py (one per subcommand).
"""

import argparse
import contextlib
import difflib
import importlib
import importlib.util
import io
import os
import sys
from typing import Dict, List, Optional, Tuple


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUT = os.path.join(REPO, "docs", "flags.md")

# (script, how it is run): the trainers under accelerate, the rest with python
SCRIPTS = [
    ("train_inversion_dpo.py", "accelerate launch train_inversion_dpo.py"),
    ("train_inversion_dpo_sdxl.py", "accelerate launch train_inversion_dpo_sdxl.py"),
    ("train_spo.py", "accelerate launch train_spo.py"),
    ("train_spo_sdxl.py", "accelerate launch train_spo_sdxl.py"),
    ("train_inversion_dpo_sd3.py", "accelerate launch train_inversion_dpo_sd3.py"),
    ("evaluate.py", "python evaluate.py"),
    ("demo.py", "python demo.py"),
    ("scripts/convert_scorer_weights.py", "python scripts/convert_scorer_weights.py"),
    ("scripts/convert_step_aware_preference_model.py", "python scripts/convert_step_aware_preference_model.py"),
]


def load_module(script: str):
    """Imports a script of the repository by its path (its top-level code defines the parser; nothing runs)."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    name = os.path.splitext(os.path.basename(script))[0]
    if os.path.dirname(script) == "":
        return importlib.import_module(name)
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Captured(Exception):
    pass


def parser_of(module) -> argparse.ArgumentParser:
    """The script's parser: its ``make_parser()``, or the one its ``parse_args`` builds (caught as it parses)."""
    if hasattr(module, "make_parser"):
        return module.make_parser()
    captured = []

    def capture(self, *args, **kwargs):
        captured.append(self)
        raise _Captured

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = capture
    try:
        with contextlib.suppress(_Captured), contextlib.redirect_stdout(io.StringIO()):
            module.parse_args([])
    finally:
        argparse.ArgumentParser.parse_args = original
    return captured[0]


def help_text(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help as --help prints it (``%(default)s`` and ``%%`` expanded), without ArgumentDefaultsHelpFormatter's
    ``(default: ...)``, which the table gives its own column."""
    params = dict(vars(action), prog=parser.prog)
    params = {k: getattr(v, "__name__", v) for k, v in params.items() if v is not argparse.SUPPRESS}
    if params.get("choices") is not None:
        params["choices"] = ", ".join(str(c) for c in params["choices"])
    return " ".join(((action.help or "") % params).split())


def default_text(action: argparse.Action) -> str:
    if action.required or (not action.option_strings and action.nargs is None):
        return "required"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "on" if action.default else "off"
    if action.default is None:
        return "unset"
    value = action.default
    if isinstance(value, (list, tuple)):
        if not value:
            return "none"
        value = " ".join(str(v) for v in value)
    value = str(value)
    if value.startswith(REPO + os.sep):  # a path next to the script: the same in every checkout
        value = "<repository>/" + os.path.relpath(value, REPO).replace(os.sep, "/")
    return f"`{value}`" if value else '`""`'


def flag_text(action: argparse.Action) -> str:
    names = action.option_strings or [action.metavar or action.dest]
    return ", ".join(f"`{n}`" for n in names)


def prose(text: str) -> str:
    """A docstring's line as markdown: one line, reStructuredText's double backticks as single ones."""
    return " ".join(text.split()).replace("``", "`")


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def rows(parser: argparse.ArgumentParser, actions) -> List[Tuple[str, str, str]]:
    out = []
    for action in actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        text = help_text(parser, action)
        if action.choices is not None:
            text += (" " if text else "") + "One of: " + ", ".join(f"`{c}`" for c in action.choices) + "."
        out.append((flag_text(action), default_text(action), text))
    return out


def table(found: List[Tuple[str, str, str]]) -> List[str]:
    lines = ["| flag | default | help |", "|---|---|---|"]
    return lines + [f"| {cell(f)} | {cell(d)} | {cell(h)} |" for f, d, h in found]


def groups(parser: argparse.ArgumentParser) -> List[Tuple[str, list]]:
    """(title, actions) of each argument group that has any, in the parser's order."""
    out = []
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
        if actions:
            out.append((group.title, actions))
    return out


def subparsers(parser: argparse.ArgumentParser) -> Dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def anchor(script: str) -> str:
    return "".join(c for c in script.lower() if c.isalnum() or c in "-_ ").replace(" ", "-")


def section(script: str, command: str, parser: argparse.ArgumentParser, reference: Optional[tuple] = None) -> list:
    lines = [f"## {script}", ""]
    if parser.description:
        lines += [prose(parser.description), ""]
    subs = subparsers(parser)
    lines += [f"`{command} {'{' + ','.join(subs) + '} ' if subs else ''}[flags]`", ""]
    if reference is not None:
        ref_script, ref_parser = reference
        ref = {flag: (d, h) for _, actions in groups(ref_parser) for flag, d, h in rows(ref_parser, actions)}
        own = [(f, d, h) for _, actions in groups(parser) for f, d, h in rows(parser, actions)]
        differ = [(f, d, h) for f, d, h in own if ref.get(f) != (d, h)]
        gone = sorted(set(ref) - {f for f, _, _ in own})
        lines += [f"The flags of [{ref_script}](#{anchor(ref_script)}), except:", ""]
        lines += table(differ) if differ else ["(none)"]
        if gone:
            lines += ["", f"{ref_script}'s {', '.join(gone)} {'is' if len(gone) == 1 else 'are'} not here."]
        return lines + [""]
    for title, actions in groups(parser):
        found = rows(parser, actions)
        if not found:
            continue
        if len(groups(parser)) > 1 or subs:
            lines += [f"### {title}", ""]
        lines += table(found) + [""]
    for name, sub in subs.items():
        lines += [f"### {name}", ""]
        if sub.description:
            lines += [prose(sub.description), ""]
        lines += table([row for _, actions in groups(sub) for row in rows(sub, actions)]) + [""]
    return lines


def render() -> str:
    parsers = {script: parser_of(load_module(script)) for script, _ in SCRIPTS}
    lines = [
        "# Flags",
        "",
        "Every flag of the command-line scripts, with its default, as each script's `--help` shows it. Written by "
        "`python scripts/flags_reference.py` from the scripts' own parsers; `python scripts/flags_reference.py "
        "--check` (run by the tests) fails when this file is not current.",
        "",
    ]
    lines += [f"- [{script}](#{anchor(script)})" for script, _ in SCRIPTS] + [""]
    for script, command in SCRIPTS:
        reference = None
        for suffix in ("_sdxl.py", "_sd3.py"):
            if script.endswith(suffix):
                original = script.replace(suffix, ".py")
                reference = (original, parsers[original])
        lines += section(script, command, parsers[script], reference)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="Compare instead of writing: exit 1 when the file differs.")
    p.add_argument("--output", default=OUTPUT, help="The file to write or check.")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        found = open(args.output, encoding="utf-8").read() if os.path.isfile(args.output) else ""
        if found != text:
            diff = difflib.unified_diff(found.splitlines(), text.splitlines(), args.output, "the parsers", lineterm="")
            print("\n".join(list(diff)[:40]), file=sys.stderr)
            print(
                f"error: {args.output} is not current: rewrite it with python scripts/flags_reference.py",
                file=sys.stderr,
            )
            return 1
        return 0
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
