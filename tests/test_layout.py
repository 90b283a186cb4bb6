"""The layout's promises (docs/layout.md), read from the source: no module over 400 lines, and
argument parsing only in the packages' `cli.py` modules (plus `decoding/derive.py`, which builds the
decoding flags every command line shares)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "paddle_caption"
MAX_LINES = 400
PARSES_ARGUMENTS_ALLOWED = {"decoding/derive.py"}


def modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_no_module_over_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in modules()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_argument_parsing_lives_in_cli_modules():
    offenders = []
    for path in modules():
        rel = str(path.relative_to(PACKAGE))
        if path.name == "cli.py" or rel in PARSES_ARGUMENTS_ALLOWED:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(a.name == "argparse" for a in node.names):
                offenders.append(rel)
            elif isinstance(node, ast.ImportFrom) and node.module == "argparse":
                offenders.append(rel)
    assert not offenders, f"argument parsing outside cli.py: {sorted(set(offenders))}"


def test_every_command_points_at_a_cli_module():
    from paddle_caption.entry_points import COMMANDS

    for name, (target, _) in COMMANDS.items():
        module = target.split(":")[0]
        assert module.endswith(".cli"), f"command {name} runs {target}, not a cli module"
