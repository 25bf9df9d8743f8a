"""Reading raw text documents from .jsonl, .txt and .parquet files.

Formats (by suffix):

* ``.jsonl``: one JSON object per line, the text under ``json_key``;
* ``.txt``: one document per line, or the whole file with ``txt_document_per_file``;
* ``.parquet``: the string column ``json_key``, one document per row, read in row-group batches
  (what Hugging Face datasets ship; needs ``pyarrow``).

``.jsonl`` and ``.txt`` may be compressed: ``.gz`` (gzip, standard library) or ``.zst``
(Zstandard, needs the ``zstandard`` package), decompressed as a stream.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
from pathlib import Path
from typing import IO, Iterator

from kdtrain.cli import missing
from kdtrain.optional import need

TEXT_KINDS = (".jsonl", ".txt")
COMPRESSIONS = (".gz", ".zst")
SUPPORTED = ".jsonl, .txt (either optionally .gz or .zst) or .parquet"
_PARQUET_BATCH_ROWS = 1024


def _kind(p: Path) -> tuple[str, str]:
    """(format suffix, compression suffix or '') of ``p``; ValueError for anything else."""
    suffixes = [s.lower() for s in p.suffixes]
    compression = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSIONS else ""
    kind = suffixes[-1] if suffixes else ""
    if kind in TEXT_KINDS or (kind == ".parquet" and not compression):
        return kind, compression
    raise ValueError(f"input file {p} has unsupported suffix {''.join(p.suffixes)!r}; expected {SUPPORTED}")


def check_input_file(path: str) -> Path:
    """Return `path` as a Path after checking it is an existing, non-empty file of a supported format."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"input file {path} is a directory: name the files (--input takes several)")
    if not p.is_file():
        raise ValueError(f"input file {missing(path)} does not exist")
    _kind(p)
    if p.stat().st_size == 0:
        raise ValueError(f"input file {path} is empty")
    return p


def _open_text(p: Path, compression: str) -> IO[str]:
    if compression == ".gz":
        return gzip.open(p, "rt", encoding="utf-8")
    if compression == ".zst":
        zstandard = need("zstandard", f"input file {p}: reading .zst (or decompress it first)")
        raw = open(p, "rb")
        try:
            return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True), encoding="utf-8")
        except Exception:
            raw.close()
            raise
    return open(p, encoding="utf-8")


def _iter_jsonl_records(f: IO[str], p: Path) -> Iterator[tuple[str, dict]]:
    for lineno, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{p}:{lineno}: a record must be a JSON object, got {type(record).__name__}")
        yield f"{p}:{lineno}", record


def _iter_jsonl(f: IO[str], p: Path, json_key: str) -> Iterator[str]:
    for where, record in _iter_jsonl_records(f, p):
        if json_key not in record:
            raise ValueError(f"{where}: record has no {json_key!r} key (its keys: {sorted(record)[:8]}); pass "
                             "--json-key with the text field")
        text = record[json_key]
        if not isinstance(text, str):
            raise ValueError(f"{where}: field {json_key!r} is {type(text).__name__}, expected a string")
        yield text


def _open_parquet(p: Path):
    pq = need("pyarrow.parquet", f"input file {p}: reading .parquet")
    try:
        return pq.ParquetFile(p)
    except Exception as e:  # pyarrow's own error types: not a parquet file, truncated footer, ...
        raise ValueError(f"input file {p} is not a readable parquet file ({e})") from None


def _iter_parquet_records(p: Path) -> Iterator[tuple[str, dict]]:
    row = 0
    for batch in _open_parquet(p).iter_batches(batch_size=_PARQUET_BATCH_ROWS):
        for record in batch.to_pylist():
            yield f"{p}: row {row}", record
            row += 1


def _iter_parquet(p: Path, column: str) -> Iterator[str]:
    pf = _open_parquet(p)
    names = pf.schema_arrow.names
    if column not in names:
        raise ValueError(f"{p}: no column {column!r} (columns: {names}); pass --json-key with the text column")
    row = 0
    for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[column]):
        for text in batch.column(0).to_pylist():
            if text is not None and not isinstance(text, str):
                raise ValueError(f"{p}: row {row} of column {column!r} is {type(text).__name__}, expected a string")
            row += 1
            if text is not None:
                yield text


def _raw_documents(p: Path, kind: str, compression: str, json_key: str, per_file: bool) -> Iterator[str]:
    if kind == ".parquet":
        yield from _iter_parquet(p, json_key)
        return
    with _open_text(p, compression) as f:
        if kind == ".jsonl":
            yield from _iter_jsonl(f, p, json_key)
        elif per_file:
            yield f.read()
        else:
            yield from (line.rstrip("\n") for line in f)


@contextlib.contextmanager
def _read_errors(path: str, compression: str):
    """Decoding and decompression failures while reading ``path`` -> ValueError naming it."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise ValueError(f"input file {path} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except Exception as e:  # gzip: EOFError / BadGzipFile (an OSError); zstandard: ZstdError
        if compression and (isinstance(e, (EOFError, OSError)) or type(e).__name__ == "ZstdError"):
            raise ValueError(f"input file {path} is truncated or not {compression} data ({e})") from None
        raise


def iter_documents(path: str, json_key: str = "text", txt_document_per_file: bool = False) -> Iterator[str]:
    """Yield the non-blank documents of one input file (formats: see the module docstring).

    ``json_key`` names the text field of .jsonl records and the text column of .parquet files; a
    .txt file holds one document per line, or is a single document when ``txt_document_per_file``
    is set."""
    p = check_input_file(path)
    kind, compression = _kind(p)
    with _read_errors(path, compression):
        for doc in _raw_documents(p, kind, compression, json_key, txt_document_per_file):
            if doc.strip():
                yield doc


def iter_records(path: str) -> Iterator[tuple[str, dict]]:
    """Yield ``(location, record)`` for every record of a .jsonl (optionally compressed) or
    .parquet file, ``location`` naming the file and line or row for error messages."""
    p = check_input_file(path)
    kind, compression = _kind(p)
    if kind == ".txt":
        raise ValueError(f"input file {path}: records (conversations) are read from .jsonl or .parquet, not .txt")
    with _read_errors(path, compression):
        if kind == ".parquet":
            yield from _iter_parquet_records(p)
            return
        with _open_text(p, compression) as f:
            yield from _iter_jsonl_records(f, p)
