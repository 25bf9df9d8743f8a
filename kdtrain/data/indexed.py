"""Tokenized corpora on disk in megatron-core's indexed format, plus a JSON sidecar.

`<prefix>.bin` is the concatenation of all documents' token ids, `<prefix>.idx` megatron-core's
index of sequence lengths and document boundaries (one sequence per document here), and
`<prefix>.meta.json` records how the tokens were made (tokenizer path and fingerprint, vocab size,
eos id, counts, dtype) and the largest token id, so that a reader checks the ids against its
vocabulary without reading the data. Writing is atomic and durable: each file is synced to disk
before it is renamed into place, and `.idx` is renamed last, so neither an interrupted run nor a
crash of the machine leaves a pair that opens with the wrong data.

Conversation data (kdtrain/data/chat.py) adds `<prefix>.loss_mask.bin`: one bit per token of the
stream (numpy's little-endian bit order, zero-padded to a whole byte), 1 where the token is a
prediction target (an assistant reply), 0 where it is only context (the prompt). The meta file
records `loss_mask: true` and the number of target tokens; without the file every token counts.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..cli import missing
from ..durable import fsync_dir, fsync_file, reap_scratch, scratch_tag


# megatron-core .idx layout: magic, version, dtype code, sequence count, document count, then
# int32 sequence lengths, int64 sequence pointers and int64 document indices.
_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_HEADER = struct.Struct("<9sQBQQ")


def _megatron_indexed():
    # Imported on use: megatron-core pulls in torch and takes seconds to import.
    from ..te_guard import guard_transformer_engine

    guard_transformer_engine()
    from megatron.core.datasets import indexed_dataset

    return indexed_dataset


def bin_path(prefix: str) -> str:
    return f"{prefix}.bin"


def idx_path(prefix: str) -> str:
    return f"{prefix}.idx"


def meta_path(prefix: str) -> str:
    return f"{prefix}.meta.json"


def loss_mask_path(prefix: str) -> str:
    return f"{prefix}.loss_mask.bin"


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest dtype megatron-core stores for this vocabulary: uint16 below 65500 ids, else int32."""
    return np.dtype(_megatron_indexed().DType.optimal_dtype(vocab_size))


class IndexedTokens:
    """A validated, read-only tokenized corpus: the flat token stream and its documents.

    Opened from disk, ``document_lengths`` is the .idx's own memory-mapped array of sequence
    lengths when every document is one sequence (as kdtrain writes them), so ranks that open one
    corpus share it through the page cache; only an index of several sequences per document needs
    a private array. ``document_starts`` searches the .idx's sequence pointers likewise.
    """

    def __init__(self, prefix: str, tokens: np.memmap, document_lengths: np.ndarray, meta: dict | None,
                 mask_bits: np.memmap | None = None, sequence_pointers: np.ndarray | None = None,
                 document_index: np.ndarray | None = None):
        assert tokens.ndim == 1 and int(document_lengths.sum(dtype=np.int64)) == tokens.shape[0]
        assert mask_bits is None or mask_bits.shape[0] == (tokens.shape[0] + 7) // 8
        assert document_index is None or sequence_pointers is not None
        self.prefix = prefix
        self.tokens = tokens
        self.document_lengths = document_lengths
        self.meta = meta
        self._mask_bits = mask_bits
        self._max_token_id: int | None = None
        # Sequence pointers (bytes into the .bin) and each document's first sequence (None: one
        # sequence per document); without an index, the documents' token starts, made on first use.
        self._pointers = None if sequence_pointers is None else _SortedArray(sequence_pointers)
        self._first_sequence = None if document_index is None else _SortedArray(document_index[:-1])
        self._scale = 1 if sequence_pointers is None else self.dtype.itemsize  # pointer units per token

    def __reduce__(self):
        return (open_indexed_dataset, (self.prefix,))

    def __repr__(self) -> str:
        return (f"IndexedTokens({self.prefix!r}, num_documents={self.num_documents}, "
                f"num_tokens={self.num_tokens}, dtype={self.dtype})")

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_documents(self) -> int:
        return int(self.document_lengths.shape[0])

    @property
    def dtype(self) -> np.dtype:
        return self.tokens.dtype

    @property
    def has_loss_mask(self) -> bool:
        return self._mask_bits is not None

    def loss_mask(self, start: int, stop: int) -> np.ndarray:
        """Target flags (bool) of tokens [start, stop); all True for a corpus without a mask."""
        assert 0 <= start <= stop <= self.num_tokens, (start, stop, self.num_tokens)
        if self._mask_bits is None:
            return np.ones(stop - start, dtype=bool)
        lo = start // 8
        bits = np.unpackbits(self._mask_bits[lo: (stop + 7) // 8], bitorder="little")
        return bits[start - 8 * lo: stop - 8 * lo].astype(bool)

    def document_starts(self, start: int, stop: int) -> np.ndarray:
        """Token positions in [start, stop) where documents start, in order (int64; an empty
        document starts where the next one does, a repeat); 0 <= start <= stop <= num_tokens."""
        assert 0 <= start <= stop <= self.num_tokens, (start, stop, self.num_tokens)
        if self._pointers is None:
            lengths = self.document_lengths
            self._pointers = _SortedArray(np.cumsum(lengths, dtype=np.int64) - lengths)
        lo, hi = self._pointers.left(start * self._scale), self._pointers.left(stop * self._scale)
        if self._first_sequence is None:
            first = slice(lo, hi)
        else:
            # A document starts where its first sequence does; one whose first sequence is past the
            # last (trailing empty documents) starts at num_tokens, outside [start, stop).
            first = self._first_sequence.values[self._first_sequence.left(lo): self._first_sequence.left(hi)]
        return self._pointers.values[first] // self._scale

    @property
    def records_max_token_id(self) -> bool:
        """Whether the metadata records the largest id (``max_token_id`` reads no data)."""
        return (self.meta or {}).get("max_token_id") is not None

    def max_token_id(self) -> int:
        """Largest token id in the corpus: the one its metadata records, else one pass over the data."""
        if self._max_token_id is None:
            recorded = (self.meta or {}).get("max_token_id")
            # Corpora written before the writer recorded it, or by other tools, have no value: they
            # are scanned, a read of the whole .bin.
            self._max_token_id = recorded if recorded is not None else self._scan_max_token_id()
        return self._max_token_id

    def _scan_max_token_id(self) -> int:
        return int(self.tokens.max())


class _SortedArray:
    """Binary search in a sorted array, memory-mapped ones included, without copying it.

    numpy's searchsorted copies a haystack that is not aligned, and every array of a .idx is
    misaligned by its 34-byte header. A private sample of every ``STRIDE``-th value narrows each
    search to a slice of ``STRIDE`` values first, which is all that is copied.
    """

    STRIDE = 4096

    def __init__(self, values: np.ndarray):
        self.values = values
        self._samples: np.ndarray | None = None

    def left(self, x: int) -> int:
        """The number of values < x (numpy's searchsorted, side='left')."""
        if self._samples is None:
            self._samples = np.array(self.values[:: self.STRIDE])
        # samples[j - 1] < x <= samples[j], so (j - 1) * STRIDE < answer <= j * STRIDE.
        j = int(np.searchsorted(self._samples, x))
        lo, hi = max(0, (j - 1) * self.STRIDE), min(len(self.values), j * self.STRIDE)
        return lo + int(np.searchsorted(self.values[lo:hi], x))


def _read_meta(prefix: str) -> dict | None:
    path = meta_path(prefix)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"metadata file {path} is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"metadata file {path} must hold a JSON object, got {type(meta).__name__}")
    return meta


def corpus_tokenizer(prefix: str) -> str | None:
    """The fingerprint of the tokenizer a corpus was written with (its metadata), or None."""
    return (_read_meta(prefix) or {}).get("tokenizer_fingerprint")


def corpus_tokenizer_path(prefix: str) -> str | None:
    """The path of the tokenizer a corpus was written with (its metadata), or None."""
    path = (_read_meta(prefix) or {}).get("tokenizer_path")
    return path if isinstance(path, str) else None


def _check_idx_layout(idx_file: str) -> tuple[np.dtype, int, int]:
    """Header and size checks, so that only a well-formed index is mapped; returns the token dtype,
    the number of sequences and the number of document indices (documents + 1)."""
    with open(idx_file, "rb") as f:
        head = f.read(_IDX_HEADER.size)
    if len(head) < _IDX_HEADER.size:
        raise ValueError(f"index file {idx_file} is corrupt or truncated ({len(head)}-byte header)")
    magic, version, code, n_sequences, n_documents = _IDX_HEADER.unpack(head)
    if magic != _IDX_MAGIC:
        raise ValueError(f"index file {idx_file} is corrupt: bad header {magic!r}, not a megatron-core index")
    if version != 1:
        raise ValueError(f"index file {idx_file} is corrupt: unsupported version {version}")
    try:
        dtype = np.dtype(_megatron_indexed().DType.dtype_from_code(code))
    except ValueError:
        raise ValueError(f"index file {idx_file} is corrupt: unknown dtype code {code}") from None
    expected = _IDX_HEADER.size + 12 * n_sequences + 8 * n_documents
    actual = os.path.getsize(idx_file)
    if actual < expected:
        raise ValueError(f"index file {idx_file} is corrupt or truncated: {actual} bytes, its header needs {expected}")
    return dtype, n_sequences, n_documents


def _map(path: str, dtype, offset: int, count: int) -> np.ndarray:
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))


_CHUNK = 1 << 18  # entries per step of the passes over a whole index: their temporaries stay a few MB


def _check_index(idx_file: str, lengths: np.ndarray, pointers: np.ndarray, document_index: np.ndarray,
                 itemsize: int) -> tuple[int, bool]:
    """Check the index's arrays agree, a chunk at a time; return the number of tokens and whether
    every document is exactly one sequence."""
    corrupt = f"index file {idx_file} is corrupt (inconsistent document boundaries or lengths)"
    n = lengths.shape[0]
    if document_index.size == 0 or document_index[0] != 0 or document_index[-1] != n:
        raise ValueError(corrupt)
    total = 0
    for a in range(0, n, _CHUNK):
        part = lengths[a: a + _CHUNK].astype(np.int64)
        if part.min() < 0:
            raise ValueError(corrupt)
        ends = total + np.cumsum(part)
        if not np.array_equal(pointers[a: a + _CHUNK], (ends - part) * itemsize):
            raise ValueError(f"index file {idx_file} is corrupt (sequence pointers do not match sequence lengths)")
        total = int(ends[-1])
    single = document_index.shape[0] == n + 1
    for a in range(0, document_index.shape[0] - 1, _CHUNK):
        least = int(np.diff(document_index[a: a + _CHUNK + 1]).min())
        if least < 0:
            raise ValueError(corrupt)
        # n + 1 indices from 0 to n that all step up: every step is one sequence.
        single = single and least > 0
    return total, single


def _document_lengths(pointers: np.ndarray, document_index: np.ndarray, itemsize: int,
                      num_tokens: int) -> np.ndarray:
    """Tokens per document of an index with documents of several (or no) sequences, in int32 unless
    a document needs more."""
    n_sequences = pointers.shape[0]
    out = np.empty(document_index.shape[0] - 1, dtype=np.int32)
    for a in range(0, out.shape[0], _CHUNK):
        first = np.array(document_index[a: a + _CHUNK + 1])
        starts = np.full(first.shape, num_tokens, dtype=np.int64)  # documents past the last sequence
        inside = first < n_sequences
        starts[inside] = pointers[first[inside]] // itemsize
        part = np.diff(starts)
        if out.dtype == np.int32 and part.max() > np.iinfo(np.int32).max:
            out = out.astype(np.int64)
        out[a: a + part.shape[0]] = part
    return out


def open_indexed_dataset(prefix: str) -> IndexedTokens:
    """Open and validate `<prefix>.bin` / `<prefix>.idx` (and `<prefix>.meta.json` if present)."""
    prefix = str(prefix)
    bin_file, idx_file = bin_path(prefix), idx_path(prefix)
    for path in (bin_file, idx_file):
        if not os.path.isfile(path):
            raise ValueError(f"indexed dataset file {missing(path)} does not exist (prefix {prefix})")

    dtype, n_sequences, n_documents = _check_idx_layout(idx_file)
    if dtype.kind not in "iu":
        raise ValueError(f"index file {idx_file} declares non-integer token dtype {dtype}")
    # The index's arrays, memory-mapped where they lie: int32 sequence lengths, int64 sequence
    # pointers (bytes into the .bin) and int64 document indices (each document's first sequence).
    offset = _IDX_HEADER.size
    sequence_lengths = _map(idx_file, np.int32, offset, n_sequences)
    sequence_pointers = _map(idx_file, np.int64, offset + 4 * n_sequences, n_sequences)
    document_index = _map(idx_file, np.int64, offset + 12 * n_sequences, n_documents)
    num_tokens, single = _check_index(idx_file, sequence_lengths, sequence_pointers, document_index, dtype.itemsize)

    expected_bytes = num_tokens * dtype.itemsize
    actual_bytes = os.path.getsize(bin_file)
    if actual_bytes != expected_bytes:
        raise ValueError(
            f"data file {bin_file} has {actual_bytes} bytes but {idx_file} describes {num_tokens} {dtype} "
            f"tokens ({expected_bytes} bytes): the pair is truncated or mismatched; re-run preprocessing"
        )
    if num_tokens == 0:
        raise ValueError(f"indexed dataset {prefix} is empty (0 tokens in {bin_file})")

    meta = _read_meta(prefix)
    if meta is not None and meta.get("num_tokens", num_tokens) != num_tokens:
        raise ValueError(
            f"metadata file {meta_path(prefix)} records num_tokens={meta['num_tokens']!r} but {bin_file} "
            f"holds {num_tokens}: stale metadata from another run"
        )
    top = None if meta is None else meta.get("max_token_id")
    if top is not None and (type(top) is not int or not 0 <= top <= np.iinfo(dtype).max):
        raise ValueError(f"metadata file {meta_path(prefix)} records max_token_id={top!r}, not a {dtype} token id")
    tokens = np.memmap(bin_file, dtype=dtype, mode="r", shape=(num_tokens,))
    if single:
        document_lengths, document_index = sequence_lengths, None
    else:
        document_lengths = _document_lengths(sequence_pointers, document_index, dtype.itemsize, num_tokens)
    return IndexedTokens(prefix, tokens, document_lengths, meta, _open_loss_mask(prefix, num_tokens, meta),
                         sequence_pointers, document_index)


def _open_loss_mask(prefix: str, num_tokens: int, meta: dict | None) -> np.memmap | None:
    path = loss_mask_path(prefix)
    recorded = bool(meta and meta.get("loss_mask"))
    if not os.path.isfile(path):
        if recorded:
            raise ValueError(f"{meta_path(prefix)} records a loss mask, but {path} does not exist; re-run preprocessing")
        return None
    expected = (num_tokens + 7) // 8
    if os.path.getsize(path) != expected:
        raise ValueError(f"loss mask {path} has {os.path.getsize(path)} bytes, but {num_tokens} tokens need "
                         f"{expected} (one bit each): the files are truncated or mismatched; re-run preprocessing")
    return np.memmap(path, dtype=np.uint8, mode="r", shape=(expected,))


class _BitWriter:
    """Appends bits to a file as whole bytes (little-endian bit order), the rest zero-padded at close."""

    def __init__(self, path: str):
        self._f = open(path, "wb")
        self._carry = np.zeros(0, dtype=bool)
        self.ones = 0

    def write(self, bits: np.ndarray) -> None:
        bits = bits.astype(bool)
        self.ones += int(bits.sum())
        bits = np.concatenate([self._carry, bits])
        whole = bits.size - bits.size % 8
        self._f.write(np.packbits(bits[:whole], bitorder="little").tobytes())
        self._carry = bits[whole:]

    def close(self) -> None:
        if self._carry.size:
            self._f.write(np.packbits(self._carry, bitorder="little").tobytes())
            self._carry = self._carry[:0]
        self._f.close()


class _IndexWriter:
    """Writes megatron-core's .idx for documents of one sequence each, in the bytes of its
    IndexedDatasetBuilder, without a Python list per document: the lengths go to the file as they
    come (behind a header written last), and the pointers and document indices, computed a chunk
    at a time from the lengths read back, follow them at close. Memory stays constant."""

    def __init__(self, path: str, dtype: np.dtype):
        self._f = open(path, "w+b")
        self._f.write(bytes(_IDX_HEADER.size))
        self._dtype = dtype
        self._pending = np.empty(_CHUNK, dtype=np.int32)  # lengths not yet written
        self._used = 0
        self.count = 0

    def add(self, length: int) -> None:
        self._pending[self._used] = length
        self._used += 1
        self.count += 1
        if self._used == _CHUNK:
            self._flush()

    def _flush(self) -> None:
        self._f.write(self._pending[: self._used].tobytes())
        self._used = 0

    def finish(self) -> None:
        self._flush()
        f, n, itemsize = self._f, self.count, self._dtype.itemsize
        read_at, end = _IDX_HEADER.size, 0
        for a in range(0, n, _CHUNK):
            f.seek(read_at)
            lengths = np.frombuffer(f.read(4 * min(_CHUNK, n - a)), dtype=np.int32).astype(np.int64) * itemsize
            read_at = f.tell()
            ends = end + np.cumsum(lengths)
            f.seek(0, os.SEEK_END)
            f.write((ends - lengths).tobytes())
            end = int(ends[-1])
        for a in range(0, n + 1, _CHUNK):
            f.write(np.arange(a, min(n + 1, a + _CHUNK), dtype=np.int64).tobytes())
        f.seek(0)
        f.write(_IDX_HEADER.pack(_IDX_MAGIC, 1, _megatron_indexed().DType.code_from_dtype(self._dtype.type), n, n + 1))
        f.close()

    def close(self) -> None:
        self._f.close()


def _remove(paths: Sequence[str]) -> None:
    for path in paths:
        if os.path.exists(path):
            os.remove(path)


_SCRATCH_SUFFIXES = (".bin", ".idx", ".meta.json", ".loss_mask.bin")  # bin_path, idx_path, ... of a prefix


def write_indexed_dataset(prefix: str, documents: Iterable, vocab_size: int, metadata: dict) -> dict:
    """Write token documents as `<prefix>.bin/.idx/.meta.json`; return the metadata written.

    A document is a sequence of token ids, or an ``(ids, mask)`` pair with one target flag per id
    (then every document must be a pair, and `<prefix>.loss_mask.bin` is written too).
    `metadata` should carry tokenizer_path, tokenizer_fingerprint and eos_id; vocab_size,
    num_documents, num_tokens, max_token_id, dtype (and loss_mask, loss_mask_tokens) are filled in
    here. Empty documents are skipped.
    """
    prefix = str(prefix)
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    dtype = token_dtype(vocab_size)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    # A killed writer's files (a whole corpus's tokens) go before this one writes its own.
    reap_scratch(Path(prefix).parent, Path(prefix).name + ".tmp-", _SCRATCH_SUFFIXES)
    tmp = f"{prefix}.tmp-{scratch_tag()}"
    tmp_bin, tmp_idx, tmp_meta, tmp_mask = bin_path(tmp), idx_path(tmp), meta_path(tmp), loss_mask_path(tmp)
    num_documents = num_tokens = max_token_id = 0
    data_file = index = mask_writer = None
    try:
        data_file = open(tmp_bin, "wb")
        index = _IndexWriter(tmp_idx, dtype)
        for i, doc in enumerate(documents):
            masked = isinstance(doc, tuple)
            if i == 0 and masked:
                mask_writer = _BitWriter(tmp_mask)
            if masked != (mask_writer is not None):
                raise ValueError(f"document {i} for {prefix}: either every document has a loss mask or none does")
            ids = np.asarray(doc[0] if masked else doc, dtype=np.int64)
            if ids.size == 0:
                continue
            if ids.ndim != 1:
                raise ValueError(f"document {i} for {prefix} is not a flat list of token ids (shape {ids.shape})")
            if ids.size > np.iinfo(np.int32).max:
                raise ValueError(f"document {i} for {prefix} has {ids.size} tokens, more than an index records "
                                 f"(2**31 - 1): split it")
            if masked:
                mask = np.asarray(doc[1])
                if mask.shape != ids.shape:
                    raise ValueError(f"document {i} for {prefix}: loss mask of shape {mask.shape} for {ids.size} tokens")
                mask_writer.write(mask)
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"document {i} for {prefix} has token id {bad} outside [0, vocab_size={vocab_size})")
            data_file.write(ids.astype(dtype).tobytes())
            index.add(ids.size)
            max_token_id = max(max_token_id, hi)
            num_documents += 1
            num_tokens += ids.size
        data_file.close()
        if num_tokens == 0:
            raise ValueError(f"no tokens to write for {prefix}: the input has no non-empty documents")
        index.finish()
        meta = dict(metadata)
        meta.update(vocab_size=vocab_size, num_documents=num_documents, num_tokens=num_tokens,
                    max_token_id=max_token_id, dtype=dtype.name)
        if mask_writer is not None:
            mask_writer.close()
            meta.update(loss_mask=True, loss_mask_tokens=mask_writer.ones)
        with open(tmp_meta, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
            f.write("\n")
        # .idx goes last: until it is in place, the prefix does not open. A mask left by an
        # earlier dataset under this prefix goes first: it must never pair with these tokens.
        # Each file's data reach the disk before its name does, and the directory is synced after
        # each step (removals, data files, .idx): a crash cannot keep a step without the one before.
        published = [(tmp_bin, bin_path(prefix)), (tmp_meta, meta_path(prefix))]
        if mask_writer is not None:
            published.append((tmp_mask, loss_mask_path(prefix)))
        for tmp_file, _ in published + [(tmp_idx, None)]:
            fsync_file(tmp_file)
        directory = Path(prefix).parent
        _remove([idx_path(prefix), loss_mask_path(prefix)])
        fsync_dir(directory)
        for tmp_file, final in published:
            os.replace(tmp_file, final)
        fsync_dir(directory)
        os.replace(tmp_idx, idx_path(prefix))
        fsync_dir(directory)
    finally:
        if data_file is not None:
            data_file.close()
        if index is not None:
            index.close()
        if mask_writer is not None:
            mask_writer.close()
        _remove([tmp_bin, tmp_idx, tmp_meta, tmp_mask])
    return meta
