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

from ..durable import fsync_dir, fsync_file


# megatron-core .idx layout: magic, version, dtype code, sequence count, document count, then
# int32 sequence lengths, int64 sequence pointers and int64 document indices.
_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_HEADER = struct.Struct("<9sQBQQ")


def _megatron_indexed():
    # Imported on use: megatron-core pulls in torch and takes seconds to import.
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
    """A validated, read-only tokenized corpus: the flat token stream and its document lengths."""

    def __init__(self, prefix: str, tokens: np.memmap, document_lengths: np.ndarray, meta: dict | None,
                 mask_bits: np.memmap | None = None):
        assert tokens.ndim == 1 and int(document_lengths.sum()) == tokens.shape[0]
        assert mask_bits is None or mask_bits.shape[0] == (tokens.shape[0] + 7) // 8
        self.prefix = prefix
        self.tokens = tokens
        self.document_lengths = document_lengths
        self.meta = meta
        self._mask_bits = mask_bits
        self._max_token_id: int | None = None

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


def _document_lengths(sequence_lengths: np.ndarray, document_indices: np.ndarray) -> np.ndarray:
    bounds = np.concatenate([[0], np.cumsum(sequence_lengths, dtype=np.int64)])
    return bounds[document_indices[1:]] - bounds[document_indices[:-1]]


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


def _check_idx_layout(idx_file: str) -> None:
    """Header and size checks, so megatron-core only ever reads a well-formed index."""
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
        _megatron_indexed().DType(code)
    except ValueError:
        raise ValueError(f"index file {idx_file} is corrupt: unknown dtype code {code}") from None
    expected = _IDX_HEADER.size + 12 * n_sequences + 8 * n_documents
    actual = os.path.getsize(idx_file)
    if actual < expected:
        raise ValueError(f"index file {idx_file} is corrupt or truncated: {actual} bytes, its header needs {expected}")


def open_indexed_dataset(prefix: str) -> IndexedTokens:
    """Open and validate `<prefix>.bin` / `<prefix>.idx` (and `<prefix>.meta.json` if present)."""
    prefix = str(prefix)
    bin_file, idx_file = bin_path(prefix), idx_path(prefix)
    for path in (bin_file, idx_file):
        if not os.path.isfile(path):
            raise ValueError(f"indexed dataset file {path} does not exist (prefix {prefix})")

    _check_idx_layout(idx_file)
    mi = _megatron_indexed()
    try:
        # mmap=False: megatron then never touches the .bin, which is memory-mapped below instead.
        index = mi.IndexedDataset(prefix, mmap=False).index
        dtype = np.dtype(index.dtype)
        sequence_lengths = np.array(index.sequence_lengths, dtype=np.int64)
        document_indices = np.array(index.document_indices, dtype=np.int64)
        del index
    except (AssertionError, struct.error, ValueError, IndexError, KeyError, OverflowError) as e:
        raise ValueError(f"index file {idx_file} is corrupt or truncated ({type(e).__name__}: {e})") from None
    if dtype.kind not in "iu":
        raise ValueError(f"index file {idx_file} declares non-integer token dtype {dtype}")
    if (
        document_indices.size == 0
        or document_indices[0] != 0
        or document_indices[-1] != sequence_lengths.size
        or np.any(np.diff(document_indices) < 0)
        or np.any(sequence_lengths < 0)
    ):
        raise ValueError(f"index file {idx_file} is corrupt (inconsistent document boundaries or lengths)")

    num_tokens = int(sequence_lengths.sum())
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
            f"metadata file {meta_path(prefix)} records num_tokens={meta['num_tokens']} but {bin_file} "
            f"holds {num_tokens}: stale metadata from another run"
        )
    top = None if meta is None else meta.get("max_token_id")
    if top is not None and (type(top) is not int or not 0 <= top <= np.iinfo(dtype).max):
        raise ValueError(f"metadata file {meta_path(prefix)} records max_token_id={top!r}, not a {dtype} token id")
    tokens = np.memmap(bin_file, dtype=dtype, mode="r", shape=(num_tokens,))
    return IndexedTokens(prefix, tokens, _document_lengths(sequence_lengths, document_indices), meta,
                         _open_loss_mask(prefix, num_tokens, meta))


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


def _remove(paths: Sequence[str]) -> None:
    for path in paths:
        if os.path.exists(path):
            os.remove(path)


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
    tmp = f"{prefix}.tmp-{os.getpid()}"
    tmp_bin, tmp_idx, tmp_meta, tmp_mask = bin_path(tmp), idx_path(tmp), meta_path(tmp), loss_mask_path(tmp)
    num_documents = num_tokens = max_token_id = 0
    builder = mask_writer = None
    try:
        builder = _megatron_indexed().IndexedDatasetBuilder(tmp_bin, dtype=dtype.type)
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
            if masked:
                mask = np.asarray(doc[1])
                if mask.shape != ids.shape:
                    raise ValueError(f"document {i} for {prefix}: loss mask of shape {mask.shape} for {ids.size} tokens")
                mask_writer.write(mask)
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"document {i} for {prefix} has token id {bad} outside [0, vocab_size={vocab_size})")
            builder.add_document(ids.astype(dtype), [ids.size])
            max_token_id = max(max_token_id, hi)
            num_documents += 1
            num_tokens += ids.size
        builder.finalize(tmp_idx)
        if num_tokens == 0:
            raise ValueError(f"no tokens to write for {prefix}: the input has no non-empty documents")
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
        if builder is not None:
            builder.data_file.close()
        if mask_writer is not None:
            mask_writer.close()
        _remove([tmp_bin, tmp_idx, tmp_meta, tmp_mask])
    return meta
