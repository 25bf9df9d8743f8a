"""Data pipeline: demo corpus, tokenizer, indexed datasets, GPT windows (preprocessing:
tests/test_preprocess.py)."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kdtrain.data import (
    GPTWindowDataset,
    Tokenizer,
    build_demo_corpus,
    iter_documents,
    open_indexed_dataset,
    train_tokenizer,
    write_indexed_dataset,
)
from kdtrain.data.demo_corpus import MIN_DOCUMENT_CHARS
from kdtrain.data.tokenizer import MIN_VOCAB_SIZE

REPO = Path(__file__).resolve().parents[1]
VOCAB = 1000


def write_stream(prefix: Path, docs: list[np.ndarray], vocab_size: int = VOCAB, **meta) -> str:
    write_indexed_dataset(str(prefix), docs, vocab_size, meta)
    return str(prefix)


def synthetic_docs(n_tokens: int, seed: int = 0, vocab_size: int = VOCAB) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    stream = rng.integers(0, vocab_size, size=n_tokens)
    cuts = np.sort(rng.choice(np.arange(1, n_tokens), size=min(9, n_tokens - 1), replace=False))
    return [d for d in np.split(stream, cuts) if d.size]


# ---------------------------------------------------------------- demo corpus


def test_demo_corpus_is_deterministic_and_sorted(corpus, tmp_path):
    again = tmp_path / "again.jsonl"
    assert build_demo_corpus(str(again), max_documents=40) == corpus["stats"]
    assert again.read_bytes() == corpus["jsonl"].read_bytes()
    records = [json.loads(line) for line in corpus["jsonl"].read_text().splitlines()]
    assert len(records) == corpus["stats"]["documents"] == 40
    assert sum(len(r["text"]) for r in records) == corpus["stats"]["characters"]
    assert all(len(r["text"]) >= MIN_DOCUMENT_CHARS for r in records)
    keys = [tuple(r["source"].split(":")[0].split(".")) for r in records]
    assert keys == sorted(keys)
    assert all(r["text"].startswith(f"# {r['source']}") for r in records)


def test_demo_corpus_under_optimize_flag_is_identical(corpus, tmp_path):
    out = tmp_path / "oo.jsonl"
    code = f"from kdtrain.data.demo_corpus import build_demo_corpus; build_demo_corpus({str(out)!r}, 40)"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-OO", "-c", code], check=True, env=env, timeout=120)
    assert out.read_bytes() == corpus["jsonl"].read_bytes()


def test_demo_corpus_walk_order_and_skips(tmp_path):
    src = tmp_path / "lib"
    doc = '"""' + "Documentation sentence. " * 12 + '"""\n'
    files = {
        "b.py": doc + "def f():\n    " + doc,
        "aa.py": doc,
        "a/__init__.py": doc,
        "a/z.py": doc + "class C:\n    " + doc + "    def m(self):\n        " + doc,
        "a/test_a.py": doc,
        "test/x.py": doc,
        "site-packages/pkg.py": doc,
        "broken.py": doc + "def (:\n",
        "tiny.py": '"""short"""\n',
    }
    for rel, text in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    out = tmp_path / "c.jsonl"
    assert build_demo_corpus(str(out), root=str(src))["documents"] == 4
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["source"] for r in records] == ["a", "a.z", "aa", "b"]
    assert "## a.z.C\n\nDocumentation" in records[1]["text"] and "## a.z.C.m\n" in records[1]["text"]
    assert "## b.f\n" in records[3]["text"]


def test_demo_corpus_without_stdlib_sources_is_an_error(tmp_path):
    empty = tmp_path / "stripped"
    (empty / "pkg").mkdir(parents=True)
    (empty / "pkg" / "mod.pyc").write_bytes(b"\0")
    with pytest.raises(ValueError, match="stdlib .py sources are missing"):
        build_demo_corpus(str(tmp_path / "out.jsonl"), root=str(empty))
    assert not (tmp_path / "out.jsonl").exists()


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_ids(corpus):
    tok = Tokenizer(corpus["model"])
    assert tok.vocab_size == 320
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (2, 1, -1)
    samples = [
        json.loads(corpus["jsonl"].read_text().splitlines()[3])["text"],
        "  indented\n\tcode(x)  \n\n",
        "ünïcödé 漢字 😀 \x00",
    ]
    for text in samples:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
        assert tok.decode(np.array(ids, dtype=np.uint16)) == text
    assert tok.encode_batch(samples) == [tok.encode(s) for s in samples]


def test_tokenizer_training_is_deterministic_and_fingerprinted(corpus, tmp_path):
    again = train_tokenizer([str(corpus["jsonl"])], str(tmp_path / "other_name"), vocab_size=320)
    assert Path(again).read_bytes() == Path(corpus["model"]).read_bytes()
    assert Tokenizer(again).fingerprint == Tokenizer(corpus["model"]).fingerprint
    bigger = train_tokenizer([str(corpus["jsonl"])], str(tmp_path / "big"), vocab_size=1024)
    assert Tokenizer(bigger).fingerprint != Tokenizer(corpus["model"]).fingerprint
    text = corpus["jsonl"].read_text()[:20000]
    assert len(Tokenizer(bigger).encode(text)) < 0.8 * len(Tokenizer(corpus["model"]).encode(text))


def test_tokenizer_trains_on_txt_and_rejects_bad_inputs(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    tok = Tokenizer(train_tokenizer([str(txt)], str(tmp_path / "t"), vocab_size=MIN_VOCAB_SIZE))
    assert tok.decode(tok.encode("lazy fox")) == "lazy fox"
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    with pytest.raises(ValueError, match="does not exist"):
        train_tokenizer([str(tmp_path / "nope.txt")], str(tmp_path / "t"), vocab_size=300)
    with pytest.raises(ValueError, match="no text"):
        train_tokenizer([str(blank)], str(tmp_path / "t"), vocab_size=300)
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer([str(txt)], str(tmp_path / "t"), vocab_size=256)
    with pytest.raises(ValueError, match="sentencepiece could not train"):
        train_tokenizer([str(txt)], str(tmp_path / "t"), vocab_size=32000)


def test_tokenizer_missing_or_corrupt_model(tmp_path):
    with pytest.raises(ValueError, match=str(tmp_path / "missing.model")):
        Tokenizer(str(tmp_path / "missing.model"))
    for name, data in [("garbage.model", b"definitely not a protobuf"), ("empty.model", b"")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=f"{name} is not a valid sentencepiece model"):
            Tokenizer(str(tmp_path / name))


def test_a_missing_relative_path_names_the_working_directory(tmp_path, monkeypatch):
    """Configs name paths from the repository root: run from elsewhere, 'data/x does not exist'
    said nothing of where it was looked for."""
    from kdtrain.data.sources import check_input_file

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=rf"tokenizer model data/t\.model \(relative to the working directory "
                                         rf"{re.escape(str(tmp_path))}\) does not exist"):
        Tokenizer("data/t.model")
    with pytest.raises(ValueError, match=r"input file c\.jsonl \(relative to the working directory .*\) does not"):
        check_input_file("c.jsonl")
    with pytest.raises(ValueError, match=rf"input file {re.escape(str(tmp_path))}/c\.jsonl does not exist"):
        check_input_file(str(tmp_path / "c.jsonl"))


def test_jsonl_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text key"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: record has no 'text' key \(its keys: \['body'\]\); pass "
                                         r"--json-key"):
        list(iter_documents(str(bad)))
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        list(iter_documents(str(bad)))
    csv = tmp_path / "x.csv"
    csv.write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"x\.csv has unsupported suffix"):
        list(iter_documents(str(csv)))


# ---------------------------------------------------------------- indexed datasets


def test_indexed_round_trip(tmp_path):
    docs = synthetic_docs(5000)
    meta = write_indexed_dataset(str(tmp_path / "c"), docs, VOCAB, {"tokenizer_fingerprint": "abc", "eos_id": 2})
    assert meta["num_tokens"] == 5000 and meta["num_documents"] == len(docs) and meta["dtype"] == "uint16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.bin", "c.idx", "c.meta.json"]
    ds = open_indexed_dataset(str(tmp_path / "c"))
    assert ds.num_tokens == 5000 and ds.num_documents == len(docs)
    np.testing.assert_array_equal(ds.tokens, np.concatenate(docs))
    np.testing.assert_array_equal(ds.document_lengths, [d.size for d in docs])
    assert ds.meta["tokenizer_fingerprint"] == "abc" and ds.meta["vocab_size"] == VOCAB
    assert not ds.tokens.flags.writeable
    assert ds.max_token_id() == max(int(d.max()) for d in docs)


def test_indexed_uses_int32_for_large_vocab(tmp_path):
    docs = [np.array([0, 70000, 5]), np.array([99999])]
    write_indexed_dataset(str(tmp_path / "big"), docs, 100000, {})
    ds = open_indexed_dataset(str(tmp_path / "big"))
    assert ds.dtype == np.int32
    np.testing.assert_array_equal(ds.tokens, [0, 70000, 5, 99999])


def test_indexed_write_rejects_bad_input_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="no tokens"):
        write_indexed_dataset(str(tmp_path / "e"), [], VOCAB, {})
    with pytest.raises(ValueError, match="no tokens"):
        write_indexed_dataset(str(tmp_path / "e"), [[], []], VOCAB, {})
    with pytest.raises(ValueError, match=r"token id 1000 outside \[0, vocab_size=1000\)"):
        write_indexed_dataset(str(tmp_path / "e"), [[1, 2], [3, 1000]], VOCAB, {})
    assert list(tmp_path.iterdir()) == []


def test_interrupted_rewrite_never_leaves_an_openable_mismatched_pair(tmp_path):
    prefix = write_stream(tmp_path / "c", synthetic_docs(3000))

    def failing_docs():
        yield np.arange(10)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_indexed_dataset(prefix, failing_docs(), VOCAB, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.bin", "c.idx", "c.meta.json"]
    assert open_indexed_dataset(prefix).num_tokens == 3000


@pytest.mark.parametrize("masked", [False, True], ids=["tokens", "loss-mask"])
def test_written_files_reach_the_disk_before_their_names(tmp_path, monkeypatch, masked):
    prefix = write_stream(tmp_path / "c", synthetic_docs(300))  # files to be replaced
    docs = synthetic_docs(500, seed=3)
    if masked:
        docs = [(d, np.arange(d.size) % 2 == 0) for d in docs]
    events = []
    real_fsync, real_replace, real_remove = os.fsync, os.replace, os.remove

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    def remove(path):
        events.append(("remove", str(path)))
        return real_remove(path)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "remove", remove)
    write_indexed_dataset(prefix, docs, VOCAB, {})
    renames = [(i, e[1], e[2]) for i, e in enumerate(events) if e[0] == "replace"]
    published = {".bin", ".idx", ".meta.json"} | ({".loss_mask.bin"} if masked else set())
    assert sorted(dst[len(prefix):] for _, _, dst in renames) == sorted(published)
    for i, src, _ in renames:
        assert ("fsync", src) in events[:i], f"{src} renamed before it was synced"
    # The directory is synced after the old .idx is removed, after the other files are renamed
    # and after the new .idx is.
    removed_idx = events.index(("remove", prefix + ".idx"))
    first, idx_at = renames[0][0], renames[-1][0]
    assert renames[-1][2] == prefix + ".idx" and removed_idx < first
    for lo, hi in ((removed_idx, first), (renames[-2][0], idx_at), (idx_at, len(events))):
        assert ("fsync", str(tmp_path)) in events[lo:hi]
    assert open_indexed_dataset(prefix).num_tokens == 500


def test_open_missing_files(tmp_path):
    prefix = write_stream(tmp_path / "c", synthetic_docs(100))
    os.remove(prefix + ".bin")
    with pytest.raises(ValueError, match=r"c\.bin does not exist"):
        open_indexed_dataset(prefix)
    prefix = write_stream(tmp_path / "d", synthetic_docs(100))
    os.remove(prefix + ".idx")
    with pytest.raises(ValueError, match=r"d\.idx does not exist"):
        open_indexed_dataset(prefix)


def test_open_truncated_bin(tmp_path):
    prefix = write_stream(tmp_path / "c", synthetic_docs(100))
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(150)
    with pytest.raises(ValueError, match=r"c\.bin has 150 bytes but .*c\.idx describes 100 uint16 tokens"):
        open_indexed_dataset(prefix)


def _pointers_at(idx: bytes) -> int:
    """Offset of the sequence pointers in a .idx: after the header and the int32 sequence lengths."""
    return 34 + 4 * struct.unpack_from("<Q", idx, 18)[0]


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b"NOTANIDX!" + b[9:],
        lambda b: b[:9] + struct.pack("<Q", 7) + b[17:],
        lambda b: b[:20],
        lambda b: b[:17] + b"\x63" + b[18:],
        lambda b: b[: len(b) - 12],
        lambda b: b[:18] + struct.pack("<Q", 1 << 40) + b[26:],
        lambda b: b[:34] + struct.pack("<i", -1) + b[38:],
        lambda b: b[:_pointers_at(b) + 8] + struct.pack("<q", 3) + b[_pointers_at(b) + 16:],
    ],
    ids=["bad-header", "bad-version", "truncated-header", "bad-dtype", "truncated-body", "bad-count",
         "negative-length", "bad-pointer"],
)
def test_open_corrupt_idx(tmp_path, damage):
    prefix = write_stream(tmp_path / "c", synthetic_docs(100))
    idx = Path(prefix + ".idx")
    idx.write_bytes(damage(idx.read_bytes()))
    with pytest.raises(ValueError, match=r"index file .*c\.idx is corrupt"):
        open_indexed_dataset(prefix)


def test_open_empty_corpus(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(tmp_path / "e.bin"), dtype=np.uint16)
    builder.finalize(str(tmp_path / "e.idx"))
    with pytest.raises(ValueError, match=r"is empty \(0 tokens"):
        open_indexed_dataset(str(tmp_path / "e"))


def test_open_rejects_stale_metadata(tmp_path):
    prefix = write_stream(tmp_path / "c", synthetic_docs(100))
    meta = json.loads(Path(prefix + ".meta.json").read_text())
    Path(prefix + ".meta.json").write_text(json.dumps(dict(meta, num_tokens=99)))
    with pytest.raises(ValueError, match=r"c\.meta\.json records num_tokens=99"):
        open_indexed_dataset(prefix)


# ---------------------------------------------------------------- GPT windows


@pytest.fixture
def two_streams(tmp_path):
    a, b = synthetic_docs(3001, seed=1), synthetic_docs(2000, seed=2)
    pa = write_stream(tmp_path / "a", a, tokenizer_fingerprint="f00d")
    pb = write_stream(tmp_path / "b", b, tokenizer_fingerprint="f00d")
    return [pa, pb], np.concatenate(a + b)


def test_windows_are_slices_of_the_concatenated_stream(two_streams):
    prefixes, stream = two_streams
    S = 64
    ds = GPTWindowDataset(prefixes, S, split=(0.9, 0.1), seed=3)
    assert ds.num_windows == (5001 - 1) // S
    assert (ds.num_train_windows, ds.num_valid_windows) == (70, 7)
    for w in range(ds.num_windows):
        np.testing.assert_array_equal(ds.window(w), stream[w * S : w * S + S + 1])
    sample = ds.train_sample(0)
    assert sample.dtype == np.int64 and sample.shape == (S + 1,)


def test_window_spanning_several_short_corpora(tmp_path):
    parts = [np.arange(i * 10, i * 10 + n) for i, n in enumerate([5, 3, 7, 2, 9])]
    prefixes = [write_stream(tmp_path / f"p{i}", [p]) for i, p in enumerate(parts)]
    stream = np.concatenate(parts)
    ds = GPTWindowDataset(prefixes, 8, split=(1.0, 0.0))
    assert ds.num_windows == 3
    for w in range(3):
        np.testing.assert_array_equal(ds.window(w), stream[w * 8 : w * 8 + 9])


def test_train_order_is_deterministic_per_seed_and_reshuffled_per_epoch(two_streams):
    prefixes, _ = two_streams
    a = GPTWindowDataset(prefixes, 32, seed=11)
    b = GPTWindowDataset(prefixes, 32, seed=11)
    c = GPTWindowDataset(prefixes, 32, seed=12)
    n = a.num_train_windows
    order = [a.train_window_index(g) for g in range(n)]
    assert order == [b.train_window_index(g) for g in range(n)]
    assert order != [c.train_window_index(g) for g in range(n)]
    assert sorted(order) == list(range(n))
    assert order != sorted(order)
    epoch2 = [a.train_window_index(n + g) for g in range(n)]
    assert sorted(epoch2) == list(range(n)) and epoch2 != order
    for g in (0, 5, n + 3):
        np.testing.assert_array_equal(a.train_sample(g), b.train_sample(g))
        np.testing.assert_array_equal(a.train_sample(g), a.window(a.train_window_index(g)))


def test_reading_across_an_epoch_boundary_shuffles_each_epoch_once(two_streams, monkeypatch):
    prefixes, _ = two_streams
    ds = GPTWindowDataset(prefixes, 32, seed=4)
    n = ds.num_train_windows
    real_rng = np.random.default_rng
    built = []

    def counted_rng(seed=None):
        built.append(tuple(int(x) for x in seed))
        return real_rng(seed)

    monkeypatch.setattr(np.random, "default_rng", counted_rng)
    # A step that straddles the end of epoch 0, its micro-batches read in interleaved order.
    samples = [g for k in range(8) for g in (n - 8 + k, n + k)]
    order = [ds.train_window_index(g) for g in samples]
    assert built == [(4, 0), (4, 1)]
    expected = {e: real_rng([4, e]).permutation(n) for e in (0, 1)}
    assert order == [expected[g // n][g % n] for g in samples]
    # Two epochs are kept, the least recently used one dropped.
    for g in (2 * n, n, 0):
        ds.train_window_index(g)
    assert built[2:] == [(4, 2), (4, 0)]


def test_train_samples_are_resumable(two_streams):
    prefixes, _ = two_streams
    full = GPTWindowDataset(prefixes, 32, seed=5)
    n = full.num_train_windows
    consumed = [full.train_sample(g) for g in range(2 * n + 10)]
    resumed = GPTWindowDataset(prefixes, 32, seed=5)
    for g in (2 * n + 9, n + 1, 7):
        np.testing.assert_array_equal(resumed.train_sample(g), consumed[g])


def test_train_and_valid_are_disjoint(two_streams):
    prefixes, stream = two_streams
    S = 32
    ds = GPTWindowDataset(prefixes, S, split=(0.8, 0.15), seed=1)
    n_train, n_valid = ds.num_train_windows, ds.num_valid_windows
    assert (n_train, n_valid) == (124, 23)
    train_positions = {ds.train_window_index(g) for g in range(3 * n_train)}
    assert train_positions == set(range(n_train))
    for j in range(n_valid):
        start = (n_train + j) * S
        np.testing.assert_array_equal(ds.valid_sample(j), stream[start : start + S + 1])
    # The last train window and the first held-out window share exactly one boundary token.
    assert ds.window(n_train - 1)[-1] == ds.valid_sample(0)[0] == stream[n_train * S]
    np.testing.assert_array_equal(ds.window(n_train - 1), stream[(n_train - 1) * S : n_train * S + 1])
    with pytest.raises(IndexError):
        ds.valid_sample(n_valid)


def test_pickled_dataset_reopens_files(two_streams):
    import pickle

    prefixes, _ = two_streams
    ds = GPTWindowDataset(prefixes, 32, seed=9)
    blob = pickle.dumps(ds)
    assert len(blob) < 10_000
    np.testing.assert_array_equal(pickle.loads(blob).train_sample(17), ds.train_sample(17))


def test_dataset_errors(tmp_path, two_streams):
    prefixes, _ = two_streams
    short = write_stream(tmp_path / "short", [np.arange(40)])
    with pytest.raises(ValueError, match=r"short has 40 tokens, fewer than one window of seq_length\+1=65"):
        GPTWindowDataset([short], 64)
    with pytest.raises(ValueError, match=r"held-out split 0.02 requested.*short"):
        GPTWindowDataset([short], 8)
    assert GPTWindowDataset([short], 8, split=(1.0, 0.0)).num_valid_windows == 0
    with pytest.raises(ValueError, match="tokenizer fingerprint f00d .* has fingerprint beef"):
        GPTWindowDataset(prefixes, 32, tokenizer_fingerprint="beef")
    assert GPTWindowDataset(prefixes, 32, tokenizer_fingerprint="f00d").num_train_windows > 0
    big_ids = write_stream(tmp_path / "big_ids", [np.array([1, 2, 900] * 50)])
    with pytest.raises(ValueError, match=r"big_ids contains token id 900 >= vocab_size=512.*tokenizer/vocab"):
        GPTWindowDataset([big_ids], 8, split=(1.0, 0.0), vocab_size=512)
    assert GPTWindowDataset([big_ids], 8, split=(1.0, 0.0), vocab_size=901).num_train_windows > 0
    with pytest.raises(ValueError, match=r"missing\.bin does not exist"):
        GPTWindowDataset([str(tmp_path / "missing")], 8)


def test_vocab_check_reads_the_recorded_largest_id_not_the_data(tmp_path, monkeypatch):
    prefix = write_stream(tmp_path / "c", [np.array([1, 2, 900] * 50)])
    meta_file = Path(prefix + ".meta.json")
    meta = json.loads(meta_file.read_text())
    assert meta["max_token_id"] == 900
    scans = []
    real_max = np.memmap.max

    def no_scan(self, *args, **kwargs):
        raise AssertionError("the vocabulary check read the whole corpus")

    def counted_scan(self, *args, **kwargs):
        scans.append(self.filename)
        return real_max(self, *args, **kwargs)

    monkeypatch.setattr(np.memmap, "max", no_scan)
    assert GPTWindowDataset([prefix], 8, split=(1.0, 0.0), vocab_size=901).num_train_windows > 0
    with pytest.raises(ValueError, match=r"corpus .*c contains token id 900 >= vocab_size=512.*tokenizer/vocab"):
        GPTWindowDataset([prefix], 8, split=(1.0, 0.0), vocab_size=512)
    meta_file.write_text(json.dumps(dict(meta, max_token_id=1500)))
    with pytest.raises(ValueError, match=r"corpus .*c contains token id 1500 >= vocab_size=1000"):
        GPTWindowDataset([prefix], 8, split=(1.0, 0.0), vocab_size=1000)
    for bad in ("900", -1, 65536, 9.5, True):
        meta_file.write_text(json.dumps(dict(meta, max_token_id=bad)))
        with pytest.raises(ValueError, match=r"c\.meta\.json records max_token_id=.*, not a uint16 token id"):
            open_indexed_dataset(prefix)

    # A corpus without the recorded value (an older writer, another tool) is scanned.
    monkeypatch.setattr(np.memmap, "max", counted_scan)
    meta_file.write_text(json.dumps({k: v for k, v in meta.items() if k != "max_token_id"}))
    with pytest.raises(ValueError, match=r"corpus .*c contains token id 900 >= vocab_size=512"):
        GPTWindowDataset([prefix], 8, split=(1.0, 0.0), vocab_size=512)
    meta_file.unlink()
    assert GPTWindowDataset([prefix], 8, split=(1.0, 0.0), vocab_size=901).num_train_windows > 0
    assert scans == [prefix + ".bin"] * 2
    # Past SCAN_AT_OPEN_BYTES (a corpus of terabytes, opened by every rank) it is not read at open:
    # each window's ids are checked as it is read, the first bad one named.
    import kdtrain.data.gpt_dataset as gpt_dataset

    other = write_stream(tmp_path / "d", [np.array([1, 2, 3] * 40 + [700, 4, 900] + [4] * 8)])
    Path(other + ".meta.json").unlink()
    monkeypatch.setattr(gpt_dataset, "SCAN_AT_OPEN_BYTES", 16)
    monkeypatch.setattr(np.memmap, "max", no_scan)
    # A sample of slices is read at open all the same: a corpus of another tokenizer (bad ids
    # everywhere) is still refused at start.
    monkeypatch.setattr(gpt_dataset, "SAMPLE_AT_OPEN", (4, 8))
    with pytest.raises(ValueError, match=r"corpus .*c contains token id 900 >= vocab_size=512"):
        GPTWindowDataset([prefix], 8, split=(1.0, 0.0), vocab_size=512)
    monkeypatch.setattr(gpt_dataset, "SAMPLE_AT_OPEN", (0, 0))  # the one bad id below is not sampled
    ds = GPTWindowDataset([other], 8, split=(1.0, 0.0), vocab_size=512)
    assert list(ds.window(0)) == [1, 2, 3, 1, 2, 3, 1, 2, 3]
    with pytest.raises(ValueError, match=r"corpus .*d contains token id 700 >= vocab_size=512 \(token 120\).*checked "
                                         r"as they are read"):
        ds.window(120 // 8)
    assert GPTWindowDataset([other], 8, split=(1.0, 0.0), vocab_size=901).window(120 // 8).max() == 900


def test_mock_data_follows_the_split_and_names_what_it_ignores():
    from kdtrain.config.run import DataConfig
    from kdtrain.config.model import load_model_config
    from kdtrain.training.pretrain import describe_dataset, open_dataset

    model = load_model_config("tiny")
    data = DataConfig(path=["data/tiny/text"], mock=True, seq_length=16, split=(1.0, 0.0))
    ds = open_dataset(data, model)
    assert ds.num_valid_windows == 0  # no held-out share asked for, none evaluated
    line = describe_dataset(ds, data)
    assert "0 held-out windows" in line and "data.path not used" in line, line
    data = DataConfig(mock=True, seq_length=16)
    ds = open_dataset(data, model)
    assert ds.num_valid_windows > 0 and "not used" not in describe_dataset(ds, data)
    assert ds.train_sample(3).shape == (17,) and ds.train_sample(3).max() < model.vocab_size


def test_corpora_of_different_tokenizers_are_not_read_together(tmp_path):
    """Concatenated or blended, corpora whose metadata record different tokenizers are refused,
    naming both (they opened, their ids mixed, when no data.tokenizer was configured)."""
    from kdtrain.config.run import DataConfig
    from kdtrain.config.model import load_model_config
    from kdtrain.training.pretrain import open_dataset

    rng = np.random.default_rng(0)
    for name, fp in (("a", "aaaa"), ("b", "bbbb"), ("a2", "aaaa")):
        write_indexed_dataset(str(tmp_path / name), [rng.integers(1, 50, 40) for _ in range(20)], 64,
                              {"tokenizer_fingerprint": fp, "eos_id": 0})
    with pytest.raises(ValueError, match=r"corpus .*/a was tokenized with tokenizer aaaa and corpus .*/b with bbbb"):
        GPTWindowDataset([str(tmp_path / "a"), str(tmp_path / "b")], 16)
    model = load_model_config("tiny")
    with pytest.raises(ValueError, match="tokenized with tokenizer aaaa"):
        open_dataset(DataConfig(path=[str(tmp_path / "a"), str(tmp_path / "b")], weights=[1.0, 1.0],
                                seq_length=16), model)
    assert open_dataset(DataConfig(path=[str(tmp_path / "a"), str(tmp_path / "a2")], weights=[1.0, 1.0],
                                   seq_length=16, split=(1.0, 0.0)), model).num_train_windows > 0


def test_a_corpus_without_an_end_token_pads_with_id_0(tmp_path):
    """Packed windows of a corpus written by a tokenizer without EOS (recorded as -1 by older
    releases, null now) are padded with id 0, not -1 (an index error in the embedding)."""
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 50, n) for n in (5, 9, 3, 12)]
    for name, eos in (("old", -1), ("new", None)):
        write_indexed_dataset(str(tmp_path / name), docs, 64, {"eos_id": eos})
        ds = GPTWindowDataset([str(tmp_path / name)], 15, split=(1.0, 0.0), packing="documents")
        assert ds.eos_id is None
        windows = np.stack([ds.window(w) for w in range(ds.num_windows)])
        assert windows.min() == 0 and (windows >= 0).all()
