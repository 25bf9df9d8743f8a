"""Reading raw text documents from .jsonl and .txt files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

SUPPORTED_SUFFIXES = (".jsonl", ".txt")


def check_input_file(path: str) -> Path:
    """Return `path` as a Path after checking it is an existing, non-empty .jsonl or .txt file."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"input file {path} does not exist")
    if p.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise ValueError(f"input file {path} has unsupported suffix {p.suffix!r}; expected .jsonl or .txt")
    if p.stat().st_size == 0:
        raise ValueError(f"input file {path} is empty")
    return p


def _iter_jsonl(p: Path, json_key: str) -> Iterator[str]:
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict) or json_key not in record:
                raise ValueError(f"{p}:{lineno}: record has no {json_key!r} key")
            text = record[json_key]
            if not isinstance(text, str):
                raise ValueError(f"{p}:{lineno}: field {json_key!r} is {type(text).__name__}, expected a string")
            yield text


def _iter_lines(p: Path) -> Iterator[str]:
    with open(p, encoding="utf-8") as f:
        for line in f:
            yield line.rstrip("\n")


def iter_documents(path: str, json_key: str = "text", txt_document_per_file: bool = False) -> Iterator[str]:
    """Yield the non-blank documents of one input file.

    A .jsonl file holds one JSON object per line with the text under `json_key`. A .txt file holds
    one document per line, or is a single document when `txt_document_per_file` is set.
    """
    p = check_input_file(path)
    try:
        if p.suffix.lower() == ".jsonl":
            docs: Iterator[str] = _iter_jsonl(p, json_key)
        elif txt_document_per_file:
            docs = iter([p.read_text(encoding="utf-8")])
        else:
            docs = _iter_lines(p)
        for doc in docs:
            if doc.strip():
                yield doc
    except UnicodeDecodeError as e:
        raise ValueError(f"input file {path} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
