"""A small, offline demo corpus built from the documentation text of the installed Python stdlib.

Sources are parsed with `ast` (never imported), so this works under `python -OO` and has no side
effects. One document per module: the module docstring followed by the docstrings of its classes
and functions, each under its qualified name. The language reference topics that `help()` shows
(the `topics` dict of `pydoc_data.topics`) are added as one document per topic at that module's
place. Documents are ordered by module path; output is deterministic for a given Python install.
"""

from __future__ import annotations

import ast
import json
import os
import sysconfig
from pathlib import Path
from typing import Iterator

MIN_DOCUMENT_CHARS = 200
_SKIP_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "__pycache__",
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "lib2to3",
        "turtledemo",
        "ensurepip",
        "lib-dynload",
    }
)
_PYDOC_TOPICS_MODULE = "pydoc_data.topics"
_DEF_TYPES = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _module_files(root: Path) -> list[tuple[str, Path]]:
    """(dotted module name, path) of every non-test stdlib source file, sorted by module name parts."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-")]
        rel_dir = Path(dirpath).relative_to(root)
        for name in filenames:
            if not name.endswith(".py") or name.startswith("test_"):
                continue
            parts = list(rel_dir.parts) + [name[: -len(".py")]]
            if parts[-1] == "__init__":
                parts.pop()
            if parts:
                found.append((tuple(parts), Path(dirpath) / name))
    found.sort()
    return [(".".join(parts), path) for parts, path in found]


def _definition_docs(body: list[ast.stmt], prefix: str) -> Iterator[tuple[str, str]]:
    for node in body:
        if not isinstance(node, _DEF_TYPES):
            continue
        qualname = f"{prefix}.{node.name}"
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield qualname, doc
        if isinstance(node, ast.ClassDef):
            yield from _definition_docs(node.body, qualname)


def module_document(module: str, path: Path) -> str | None:
    """The document text of one module, or None when the file does not parse or has no docstrings."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return None
    module_doc = ast.get_docstring(tree, clean=True)
    sections = [f"# {module}\n\n{module_doc}" if module_doc else f"# {module}"]
    for qualname, doc in _definition_docs(tree.body, module):
        sections.append(f"## {qualname}\n\n{doc}")
    if len(sections) == 1 and not module_doc:
        return None
    text = "\n\n".join(sections) + "\n"
    # Docstrings may spell lone surrogates as escapes; they cannot be written as UTF-8.
    return text.encode("utf-8", "replace").decode("utf-8")


def pydoc_topic_documents(path: Path) -> Iterator[tuple[str, str]]:
    """Yield (topic, text) from the literal `topics` dict of pydoc_data/topics.py, sorted by topic."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return
    for node in tree.body:
        if isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == ["topics"]:
            try:
                topics = ast.literal_eval(node.value)
            except ValueError:
                return
            if not isinstance(topics, dict):
                return
            for topic in sorted(k for k, v in topics.items() if isinstance(k, str) and isinstance(v, str)):
                text = f"# {topic}\n\n{topics[topic].strip()}\n"
                yield f"{_PYDOC_TOPICS_MODULE}:{topic}", text.encode("utf-8", "replace").decode("utf-8")


def iter_demo_documents(root: Path | None = None) -> Iterator[tuple[str, str]]:
    """Yield (source, text) for each document of at least MIN_DOCUMENT_CHARS, ordered by module path."""
    for module, path in _module_files(root or stdlib_dir()):
        if module == _PYDOC_TOPICS_MODULE:
            documents = pydoc_topic_documents(path)
        else:
            documents = [(module, module_document(module, path))]
        for name, text in documents:
            if text is not None and len(text) >= MIN_DOCUMENT_CHARS:
                yield name, text


def module_conversation(module: str, path: Path, max_turns: int = 6) -> list[dict] | None:
    """A conversation about one module: a system line, then up to ``max_turns`` questions "What
    does `name` do?" answered with the first paragraph of that definition's docstring; None when
    the module documents no definition."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return None
    messages = [{"role": "system", "content": f"You answer questions about the Python module {module}."}]
    for qualname, doc in _definition_docs(tree.body, module):
        answer = doc.split("\n\n", 1)[0].strip()
        if len(answer) < 20:
            continue
        messages += [{"role": "user", "content": f"What does `{qualname}` do?"},
                     {"role": "assistant", "content": answer.encode("utf-8", "replace").decode("utf-8")}]
        if len(messages) > 2 * max_turns:
            break
    return messages if len(messages) > 1 else None


def iter_demo_conversations(root: Path | None = None) -> Iterator[tuple[str, list[dict]]]:
    """Yield (module, messages) for each documented module, ordered by module path."""
    for module, path in _module_files(root or stdlib_dir()):
        if module != _PYDOC_TOPICS_MODULE and (messages := module_conversation(module, path)) is not None:
            yield module, messages


def build_demo_corpus(out_path: str, max_documents: int | None = None, root: str | None = None,
                      conversations: bool = False) -> dict:
    """Write the demo corpus as jsonl and return {documents, characters}.

    Each line is {"source": module name, "text": document}, or with ``conversations``
    {"source": module name, "messages": [...]} (``module_conversation``: chat data for
    ``preprocess_data.py --format chat``); `root` replaces the stdlib directory.
    """
    if max_documents is not None and max_documents < 1:
        raise ValueError(f"max_documents must be >= 1 or None, got {max_documents}")
    source = Path(root) if root is not None else stdlib_dir()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    documents = characters = 0
    records = (({"source": name, "messages": m} for name, m in iter_demo_conversations(source)) if conversations
               else ({"source": name, "text": text} for name, text in iter_demo_documents(source)))
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            if source.is_dir():
                for record in records:
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
                    documents += 1
                    characters += len(record["text"]) if "text" in record else sum(
                        len(m["content"]) for m in record["messages"])
                    if max_documents is not None and documents >= max_documents:
                        break
        if documents == 0:
            raise ValueError(
                f"no documented Python sources found under the standard library directory {source}: "
                "the stdlib .py sources are missing (stripped install?). Supply your own corpus "
                "instead, e.g. `python scripts/preprocess_data.py --input my_corpus.jsonl ...`"
            )
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"documents": documents, "characters": characters}
