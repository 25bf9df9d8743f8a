"""Module docstrings are the commands' --help text (argparse's RawDescriptionHelpFormatter) and
show the commands that run them: a line ending in a backslash must stay a line. In a non-raw
docstring the backslash joins it to the next, and --help prints one long line of commands."""

import ast

from conftest import REPO


def test_every_docstring_keeps_its_lines():
    joined = []
    for path in sorted([*REPO.glob("scripts/*.py"), *REPO.glob("kdtrain/**/*.py"), *REPO.glob("benchmarks/*.py")]):
        tree = ast.parse(path.read_text())
        node = tree.body[0] if tree.body else None
        if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)):
            continue
        if node.value.value.count("\n") != node.end_lineno - node.lineno:
            joined.append(str(path.relative_to(REPO)))
    assert not joined, f"docstrings with lines joined by a trailing backslash (make them r-strings): {joined}"


def test_subcommands_show_each_default_once(capsys):
    """--help of every kdtrain subcommand states an option's default (argparse's own, or the help
    text's words), never twice, and keeps the command's docstring lines."""
    import re

    import pytest

    from kdtrain.cli import main

    for cmd in (["model"], ["plan"], ["calibrate"], ["eval"], ["generate"], ["prune"], ["convert", "hf-to-kdtrain"],
                ["convert", "kdtrain-to-hf"]):
        with pytest.raises(SystemExit):
            main([*cmd, "--help"])
        text = capsys.readouterr().out
        options = re.split(r"\n  (?=-)", text.split("options:", 1)[1])
        twice = [o.split()[0] for o in options if len(re.findall(r"\bdefault", o)) > 1]
        assert not twice, (cmd, twice)
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    assert re.search(r"--top-p TOP_P\s+then among the smallest set holding this mass \(1: all\)\s+\(default: 1\.0\)", text)
    assert "--json " in text and "(default: False)" not in text


def test_python_dash_m_kdtrain_is_the_kdtrain_command():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "kdtrain", "prune", "--help"], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: kdtrain prune"), proc.stdout[:300] + proc.stderr
