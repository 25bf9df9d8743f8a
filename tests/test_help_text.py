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
