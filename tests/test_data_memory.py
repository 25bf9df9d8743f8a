"""Memory of the data pipeline at corpus scale: opening a corpus maps its index instead of copying
per-document arrays, and writing one keeps no per-document Python state, with the same bytes and
the same samples as the plain per-document arrays give."""

from __future__ import annotations

import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from kdtrain.data import GPTWindowDataset, open_indexed_dataset, write_indexed_dataset
from kdtrain.data import indexed
from kdtrain.data.gpt_dataset import positions_from_starts
from kdtrain.data.preprocess import _ordered_map


def _traced_peak(fn):
    """(fn's result, the most memory Python and numpy held at once while it ran, in bytes)."""
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _megatron_corpus(prefix: str, documents: list[list[list[int]]], dtype=np.uint16) -> None:
    """A corpus written by megatron-core's own builder: each document a list of sequences (an
    empty list: an empty document)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for sequences in documents:
        if sequences:
            builder.add_document(np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences]),
                                 [len(s) for s in sequences])
        else:
            builder.end_document()
    builder.finalize(f"{prefix}.idx")


def _short_documents(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ends = np.cumsum(rng.integers(1, 9, size=n)).tolist()
    starts = [0] + ends[:-1]
    tokens = rng.integers(0, 1000, size=ends[-1])
    return lambda: (tokens[a:b] for a, b in zip(starts, ends))


# ---------------------------------------------------------------- writer


@pytest.mark.parametrize("vocab", [1000, 100_000], ids=["uint16", "int32"])
def test_the_writer_writes_the_bytes_of_megatrons_builder(tmp_path, vocab):
    rng = np.random.default_rng(vocab)
    docs = [rng.integers(0, vocab, size=n) for n in rng.integers(1, 50, size=300)]
    write_indexed_dataset(str(tmp_path / "ours"), docs + [[]], vocab, {})
    _megatron_corpus(str(tmp_path / "ref"), [[d] for d in docs], dtype=indexed.token_dtype(vocab).type)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes(), ext


def test_the_writer_holds_no_memory_per_document(tmp_path, monkeypatch):
    """Megatron's builder kept Python lists of every document's length and index (about 100 bytes
    a document at its peak); the writer now streams them to the index file."""
    monkeypatch.setattr(indexed, "_CHUNK", 1024)
    docs = _short_documents(100_000)
    meta, peak = _traced_peak(lambda: write_indexed_dataset(str(tmp_path / "c"), docs(), 1000, {}))
    assert meta["num_documents"] == 100_000
    assert peak < 300_000, peak  # < 3 bytes a document, most of it the fixed chunks
    ds = open_indexed_dataset(str(tmp_path / "c"))
    np.testing.assert_array_equal(ds.document_lengths, [d.size for d in docs()])
    np.testing.assert_array_equal(ds.tokens, np.concatenate(list(docs())))


def test_encoding_keeps_a_bounded_number_of_batches_in_flight():
    """A pool's map reads its input as fast as the workers take it and holds every result not
    yet taken: with workers faster than the writer, encoded documents pile up."""
    pulled = 0

    def batches():
        nonlocal pulled
        for i in range(200):
            pulled += 1
            yield [i]

    with ThreadPoolExecutor(2) as pool:
        out = []
        for result in _ordered_map(pool, lambda batch: [x * 2 for x in batch], batches(), ahead=4):
            assert pulled - len(out) <= 4
            out.append(result)
    assert out == [[2 * i] for i in range(200)]


# ---------------------------------------------------------------- reader


def test_open_maps_the_index_instead_of_copying_per_document_arrays(tmp_path, monkeypatch):
    prefix = str(tmp_path / "c")
    docs = _short_documents(100_000, seed=1)
    write_indexed_dataset(prefix, docs(), 1000, {})
    monkeypatch.setattr(indexed, "_CHUNK", 1024)
    ds, peak = _traced_peak(lambda: open_indexed_dataset(prefix))
    # The lengths are the .idx's int32 sequence lengths, shared with every other reader of the file.
    assert isinstance(ds.document_lengths, np.memmap) and ds.document_lengths.dtype == np.int32
    assert not ds.document_lengths.flags.owndata and not ds.document_lengths.flags.writeable
    np.testing.assert_array_equal(ds.document_lengths, [d.size for d in docs()])
    assert peak < 200_000, peak  # 100k documents: 8 bytes each kept and 40 at the peak before


def test_document_positions_build_no_per_document_array(tmp_path, monkeypatch):
    prefixes = []
    for i, n in enumerate((60_000, 40_000)):
        prefixes.append(str(tmp_path / f"c{i}"))
        write_indexed_dataset(prefixes[-1], _short_documents(n, seed=i)(), 1000, {"eos_id": 0})
    monkeypatch.setattr(indexed, "_CHUNK", 1024)
    ds, peak = _traced_peak(lambda: GPTWindowDataset(prefixes, 64, split=(0.9, 0.1), document_positions=True))
    lengths = np.concatenate([open_indexed_dataset(p).document_lengths for p in prefixes]).astype(np.int64)
    starts = np.cumsum(lengths) - lengths

    def read_positions():
        for w in range(0, ds.num_windows, 97):
            ds.window_positions(w)

    _, window_peak = _traced_peak(read_positions)
    assert peak < 150_000 and window_peak < 150_000, (peak, window_peak)  # 16 bytes a document before
    for w in list(range(0, ds.num_windows, 37)) + [ds.num_windows - 1]:
        a = w * 64
        inside = starts[(starts > a) & (starts < a + 65)]
        assert np.array_equal(ds.window_positions(w), positions_from_starts(65, inside - a)), w


def _plain_lengths(documents: list[list[list[int]]]) -> list[int]:
    return [sum(len(s) for s in seqs) for seqs in documents]


def test_documents_of_several_sequences_and_empty_ones(tmp_path, monkeypatch):
    """An index of several sequences per document (other tools write them), empty sequences and
    empty documents (at the start, between, at the end) included: private lengths, in int32, and
    document starts from the mapped pointers."""
    monkeypatch.setattr(indexed, "_CHUNK", 7)
    monkeypatch.setattr(indexed._SortedArray, "STRIDE", 3)
    rng = np.random.default_rng(5)
    documents = [[]]
    for _ in range(60):
        shape = rng.integers(0, 4)
        documents.append([rng.integers(0, 500, size=rng.integers(0, 6)).tolist() for _ in range(shape)])
    documents += [[[1, 2]], [], []]
    _megatron_corpus(str(tmp_path / "m"), documents)
    ds = open_indexed_dataset(str(tmp_path / "m"))
    lengths = np.array(_plain_lengths(documents))
    assert ds.document_lengths.dtype == np.int32 and not isinstance(ds.document_lengths, np.memmap)
    assert ds.document_lengths.tolist() == lengths.tolist()
    assert ds.tokens.tolist() == [t for seqs in documents for s in seqs for t in s]
    starts = np.cumsum(lengths) - lengths
    for lo in range(ds.num_tokens + 1):
        for hi in range(lo, ds.num_tokens + 1):
            want = starts[(starts >= lo) & (starts < hi)]
            assert ds.document_starts(lo, hi).tolist() == want.tolist(), (lo, hi)


def test_one_document_per_sequence_with_empty_documents(tmp_path, monkeypatch):
    monkeypatch.setattr(indexed._SortedArray, "STRIDE", 2)
    documents = [[[]], [[5, 6, 7]], [[]], [[]], [[8]], [[9, 9]], [[]]]
    _megatron_corpus(str(tmp_path / "e"), documents)
    ds = open_indexed_dataset(str(tmp_path / "e"))
    assert isinstance(ds.document_lengths, np.memmap)
    assert ds.document_lengths.tolist() == [0, 3, 0, 0, 1, 2, 0]
    assert ds.document_starts(0, 6).tolist() == [0, 0, 3, 3, 3, 4]
    assert ds.document_starts(1, 4).tolist() == [3, 3, 3]


@pytest.mark.parametrize("stride", [1, 2, 3, 5, 4096])
def test_sorted_array_search_matches_numpy_on_a_misaligned_map(tmp_path, stride, monkeypatch):
    monkeypatch.setattr(indexed._SortedArray, "STRIDE", stride)
    values = np.sort(np.random.default_rng(stride).integers(0, 40, size=101))
    path = tmp_path / "v"
    path.write_bytes(b"\0" * 34 + values.tobytes())
    mapped = np.memmap(path, dtype=np.int64, mode="r", offset=34, shape=values.shape)
    assert not mapped.flags.aligned
    for array in (mapped, values, values[:1], values[:0]):
        search = indexed._SortedArray(array)
        for x in range(-1, 42):
            assert search.left(x) == np.searchsorted(np.asarray(array), x), (x, len(array))
