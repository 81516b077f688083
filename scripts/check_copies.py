#!/usr/bin/env python
"""Checks that every marked copy still equals its original, as diffusers' ``utils/check_copies.py`` does.

A top-level function, class or assignment (or a method) that stands right below a line

    # Copied from train_inversion_dpo.ddim_move
    # Copied from train_inversion_dpo.encode_prompt with StableDiffusionPipeline->StableDiffusionXLPipeline

must read exactly as the original named there (a top-level name, or ``Class.method``, of the file ``<module>.py``
beside the copy, or ``<package>/<module>.py`` for a dotted module such as ``evaluation.scorers``), after the renames
``A->B`` (plain text replacements, applied in order, then formatted with ``ruff format`` as the file is). The
scripts are single
files a user can copy out of the repository, so what they share is copied, and this check keeps the copies from
drifting apart.

    python scripts/check_copies.py          # lists each copy that differs, exits 1 if any
    python scripts/check_copies.py --fix    # rewrites each such copy from its original

With no files given it checks every ``*.py`` at the repository's top level.
"""

import argparse
import ast
import difflib
import glob
import os
import re
import subprocess
import sys
import textwrap
from typing import Dict, List, NamedTuple, Optional, Tuple


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "pyproject.toml")  # ruff's settings, for the renamed copies
MARKER = re.compile(r"^(\s*)# Copied from ([\w.]+)(?: with (.+))?\s*$")


class Copy(NamedTuple):
    path: str
    marker_line: int  # 0-based index of the marker line
    start: int  # 0-based index of the copy's first line (decorators included)
    end: int  # 0-based index one past its last line
    module: str
    name: str  # "func", or "Class.method"
    renames: List[Tuple[str, str]]


def parse_renames(text: Optional[str], where: str) -> List[Tuple[str, str]]:
    if not text:
        return []
    renames = []
    # a comma starts the next rename only where one follows (``A->B(x, y), C->D``): a replacement may hold commas
    for part in re.split(r",(?=[^,]*->)", text):
        if "->" not in part:
            raise SystemExit(f"error: {where}: rename '{part.strip()}' is not of the form A->B")
        old, new = part.split("->", 1)
        renames.append((old.strip(), new.strip()))
    return renames


def _definitions(tree: ast.Module) -> Dict[str, ast.AST]:
    """Top-level functions, classes and single-name assignments, and the methods of the classes as Class.method."""
    found = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found[node.name] = node
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        found[f"{node.name}.{item.name}"] = item
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if len(targets) == 1 and isinstance(targets[0], ast.Name):
                found[targets[0].id] = node
    return found


def _span(node: ast.AST) -> Tuple[int, int]:
    """0-based [first, last + 1) lines of a definition, decorators included."""
    decorators = getattr(node, "decorator_list", [])
    first = min([node.lineno] + [d.lineno for d in decorators]) - 1
    return first, node.end_lineno


_parsed: Dict[str, Tuple[str, List[str], Dict[str, ast.AST]]] = {}


def _read(path: str) -> Tuple[List[str], Dict[str, ast.AST]]:
    """A file's lines and definitions, parsed once for as long as its text stays the same."""
    with open(path) as f:
        text = f.read()
    if path not in _parsed or _parsed[path][0] != text:
        _parsed[path] = (text, text.splitlines(keepends=True), _definitions(ast.parse(text, filename=path)))
    return _parsed[path][1], _parsed[path][2]


def module_file(copy_path: str, module: str) -> str:
    return os.path.join(os.path.dirname(copy_path), *module.split(".")) + ".py"


def split_target(copy_path: str, target: str) -> Tuple[str, str]:
    """``module.name`` -> (module, name), where module is the longest dotted prefix naming a file beside the copy
    (``evaluation.scorers.ClipScorer`` -> ``evaluation/scorers.py``); a single-file module otherwise."""
    parts = target.split(".")
    for k in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:k])
        if os.path.isfile(module_file(copy_path, module)):
            return module, ".".join(parts[k:])
    module, _, name = target.partition(".")
    return module, name


def find_copies(path: str) -> List[Copy]:
    lines, definitions = _read(path)
    by_start = {}
    for name, node in definitions.items():
        by_start.setdefault(_span(node)[0], (name, node))
    copies = []
    for i, line in enumerate(lines):
        match = MARKER.match(line)
        if not match:
            continue
        where = f"{os.path.relpath(path, REPO)}:{i + 1}"
        if i + 1 not in by_start:
            raise SystemExit(f"error: {where}: '# Copied from' must stand right above a def, class or assignment")
        node = by_start[i + 1][1]
        start, end = _span(node)
        module, name = split_target(path, match.group(2))
        if not name:
            raise SystemExit(f"error: {where}: '# Copied from {module}' names no object (module.name)")
        copies.append(Copy(path, i, start, end, module, name, parse_renames(match.group(3), where)))
    return copies


def original_text(copy: Copy) -> List[str]:
    """The original's lines after the renames, re-indented to the copy's indentation."""
    source = module_file(copy.path, copy.module)
    where = f"{os.path.relpath(copy.path, REPO)}:{copy.marker_line + 1}"
    relative = os.path.relpath(source, os.path.dirname(copy.path))
    if not os.path.isfile(source):
        raise SystemExit(f"error: {where}: no file {relative} beside it")
    lines, definitions = _read(source)
    if copy.name not in definitions:
        raise SystemExit(f"error: {where}: {relative} has no top-level {copy.name}")
    start, end = _span(definitions[copy.name])
    text = "".join(lines[start:end])
    for old, new in copy.renames:
        text = text.replace(old, new)
    if copy.renames:
        text = formatted(text, copy.path)
    out = text.splitlines(keepends=True)
    # a method copied to the top level or the other way: shift by the difference of the first lines' indentation
    copy_first = _read(copy.path)[0][copy.start]
    shift = len(copy_first) - len(copy_first.lstrip()) - (len(out[0]) - len(out[0].lstrip()))
    if shift > 0:
        out = [(" " * shift + line) if line.strip() else line for line in out]
    elif shift < 0:
        out = [line[-shift:] if line[:-shift].strip() == "" else line for line in out]
    return out


def formatted(text: str, path: str) -> str:
    """``text`` as ``ruff format`` writes it (with the repository's settings, wherever the file is): a rename can change a line's length, and
    the copy is kept formatted as the rest of its file. Unchanged where ruff is not installed."""
    indent = text[: len(text) - len(text.lstrip(" "))]
    try:
        done = subprocess.run(
            [sys.executable, "-m", "ruff", "format", "--config", CONFIG, "--stdin-filename", path, "-"],
            input=textwrap.dedent(text),
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return text
    return textwrap.indent(done.stdout, indent) if indent else done.stdout


def check(paths: List[str], fix: bool) -> List[str]:
    """Differences as messages; with ``fix``, each differing copy is rewritten (repeated until every chain of copies
    of copies settles). With ``fix``, returns every difference it rewrote."""
    rewritten = []
    for _ in range(10):
        problems = []
        for path in paths:
            # bottom-up, so that rewriting one copy leaves the line numbers of the ones above it valid
            for copy in sorted(find_copies(path), key=lambda c: -c.start):
                lines = list(_read(path)[0])
                expected = original_text(copy)
                found = lines[copy.start : copy.end]
                if found == expected:
                    continue
                rel = os.path.relpath(path, REPO)
                diff = difflib.unified_diff(
                    expected, found, f"{copy.module}.{copy.name}", f"{rel}:{copy.start + 1}", n=1
                )
                problems.append(
                    f"{rel}:{copy.marker_line + 1}: {copy.name} differs from {copy.module}.{copy.name}\n"
                    + "".join(diff)
                )
                if fix:
                    lines[copy.start : copy.end] = expected
                    with open(path, "w") as f:
                        f.writelines(lines)
        if not fix:
            return problems
        if not problems:
            return rewritten
        rewritten += problems
    raise SystemExit("error: the copies did not settle after 10 rewrites (a copy of itself?)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="*", help="Files to check (default: every *.py at the repository's top level).")
    p.add_argument("--fix", action="store_true", help="Rewrite each copy that differs from its original.")
    args = p.parse_args(argv)
    paths = [os.path.abspath(f) for f in args.files] or sorted(glob.glob(os.path.join(REPO, "*.py")))
    problems = check(paths, args.fix)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems and args.fix:
        print(f"rewrote {len(problems)} copies from their originals", file=sys.stderr)
        return 0
    if problems:
        print(f"{len(problems)} copies differ from their originals; `python scripts/check_copies.py --fix` rewrites "
              "them", file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
