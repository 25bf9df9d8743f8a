"""Preprocessing: tokenizing JSONL / text / compressed / Parquet inputs into indexed datasets
(kdtrain/data/preprocess.py, sources.py) and the scripts that do it."""

from __future__ import annotations

import os
import runpy
import signal
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from kdtrain.data import GPTWindowDataset, Tokenizer, encode_files, iter_documents, open_indexed_dataset


def test_encode_files_matches_tokenizer_and_is_worker_independent(corpus, tmp_path):
    tok = Tokenizer(corpus["model"])
    one = encode_files([str(corpus["jsonl"])], corpus["model"], str(tmp_path / "one"))
    two = encode_files([str(corpus["jsonl"])], corpus["model"], str(tmp_path / "two"), workers=2)
    assert (tmp_path / "one.bin").read_bytes() == (tmp_path / "two.bin").read_bytes()
    assert one["num_tokens"] == two["num_tokens"] and one["tokenizer_fingerprint"] == tok.fingerprint
    ds = open_indexed_dataset(str(tmp_path / "one"))
    texts = list(iter_documents(str(corpus["jsonl"])))
    assert ds.num_documents == len(texts) == corpus["stats"]["documents"]
    ends = np.cumsum(ds.document_lengths)
    np.testing.assert_array_equal(ds.tokens[ends - 1], tok.eos_id)
    first = ds.tokens[: ds.document_lengths[0] - 1]
    assert tok.decode(first) == texts[0]
    assert ds.meta["eos_id"] == tok.eos_id and ds.meta["tokenizer_path"] == os.path.abspath(corpus["model"])
    # Where the files cannot go is found before the corpus is tokenized (a FileExistsError from
    # deep inside the writer after the work), and a directory is no input file.
    (tmp_path / "afile").write_text("")
    for prefix, says in ((tmp_path / "afile" / "x", "afile: exists and is not a directory"),
                         (tmp_path, "name the files' prefix, not a directory"),
                         (f"{tmp_path}/new/", "name the files' prefix, not a directory")):
        with pytest.raises(ValueError, match=f"output prefix .*{says}"):
            encode_files([str(corpus["jsonl"])], corpus["model"], str(prefix))
    with pytest.raises(ValueError, match="is a directory: name the files"):
        encode_files([str(tmp_path)], corpus["model"], str(tmp_path / "three"))


def test_encode_txt_documents(corpus, tmp_path):
    txt = tmp_path / "lines.txt"
    txt.write_text("first document\n\nsecond one\nthird\n")
    per_line = encode_files([str(txt)], corpus["model"], str(tmp_path / "l"), append_eos=False)
    assert per_line["num_documents"] == 3
    per_file = encode_files([str(txt)], corpus["model"], str(tmp_path / "f"), txt_document_per_file=True)
    assert per_file["num_documents"] == 1
    tok = Tokenizer(corpus["model"])
    np.testing.assert_array_equal(
        open_indexed_dataset(str(tmp_path / "f")).tokens, tok.encode(txt.read_text()) + [tok.eos_id]
    )


def test_scripts_end_to_end(corpus, tmp_path, capsys):
    train_main = runpy.run_path(str(REPO / "scripts" / "train_tokenizer.py"))["main"]
    prep_main = runpy.run_path(str(REPO / "scripts" / "preprocess_data.py"))["main"]
    jsonl = str(corpus["jsonl"])
    assert train_main(["--input", jsonl, "--output-prefix", str(tmp_path / "tok"), "--vocab-size", "320"]) == 0
    assert (tmp_path / "tok.model").read_bytes() == Path(corpus["model"]).read_bytes()
    args = ["--input", jsonl, "--tokenizer", str(tmp_path / "tok.model"), "--output-prefix", str(tmp_path / "ds")]
    assert prep_main(args) == 0
    assert "documents" in capsys.readouterr().out
    ds = GPTWindowDataset([str(tmp_path / "ds")], 64, tokenizer_fingerprint=Tokenizer(corpus["model"]).fingerprint)
    assert ds.num_train_windows > 0
    assert prep_main(["--input", str(tmp_path / "nope.jsonl"), "--tokenizer", corpus["model"],
                      "--output-prefix", str(tmp_path / "x")]) == 2
    assert "nope.jsonl does not exist" in capsys.readouterr().err


def _same_stream_as_plain(corpus, tmp_path, inp: Path, json_key: str = "text") -> None:
    """Preprocessing ``inp`` writes the plain corpus' token stream."""
    if not (tmp_path / "plain.bin").exists():
        encode_files([str(corpus["jsonl"])], corpus["model"], str(tmp_path / "plain"))
    encode_files([str(inp)], corpus["model"], str(tmp_path / inp.stem), json_key=json_key)
    assert (tmp_path / f"{inp.stem}.bin").read_bytes() == (tmp_path / "plain.bin").read_bytes()


def test_compressed_inputs_read_like_jsonl(corpus, tmp_path):
    """.jsonl/.txt compressed with gzip (or zstd, when zstandard is installed) yield exactly the
    documents of the plain file, so preprocessing writes the same token stream."""
    import gzip

    docs = list(iter_documents(str(corpus["jsonl"])))
    gz = tmp_path / "corpus.jsonl.gz"
    gz.write_bytes(gzip.compress(corpus["jsonl"].read_bytes()))
    assert list(iter_documents(str(gz))) == docs
    _same_stream_as_plain(corpus, tmp_path, gz)
    txt = tmp_path / "lines.txt.gz"
    txt.write_bytes(gzip.compress(b"first line\n\nsecond line\n"))
    assert list(iter_documents(str(txt))) == ["first line", "second line"]
    assert list(iter_documents(str(txt), txt_document_per_file=True)) == ["first line\n\nsecond line\n"]


def test_zstd_inputs_read_like_jsonl(corpus, tmp_path):
    zstandard = pytest.importorskip("zstandard")  # the [data] extra
    zst = tmp_path / "corpus.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(corpus["jsonl"].read_bytes()))
    assert list(iter_documents(str(zst))) == list(iter_documents(str(corpus["jsonl"])))


def test_zstd_input_without_the_package_names_it(tmp_path, monkeypatch):
    """Optional packages (kdtrain/optional.py): missing, an error naming the package and the extra
    that installs it; a package that is there but broken (a dependency of it missing) raises as it
    is, not as 'not installed'."""
    import sys

    monkeypatch.setitem(sys.modules, "zstandard", None)  # import zstandard: ModuleNotFoundError
    zst = tmp_path / "corpus.jsonl.zst"
    zst.write_bytes(b"\x28\xb5\x2f\xfd")  # a zstd frame's magic number
    with pytest.raises(ValueError, match=r"corpus\.jsonl\.zst: reading \.zst \(or decompress it first\) needs the "
                                         r"`zstandard` package, which is not installed \(.*\[data\]"):
        list(iter_documents(str(zst)))
    from kdtrain.optional import need

    (tmp_path / "kd_broken_pkg").mkdir()
    (tmp_path / "kd_broken_pkg" / "__init__.py").write_text("import kd_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="kd_missing_dependency"):
        need("kd_broken_pkg", "x")


def test_parquet_inputs_read_like_jsonl(corpus, tmp_path):
    """A Hugging Face style .parquet (text column named by --json-key, null rows skipped) yields the
    documents of the plain .jsonl; a missing or non-string column names the file."""
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    docs = list(iter_documents(str(corpus["jsonl"])))
    table = pa.table({"id": list(range(len(docs) + 1)), "content": docs + [None]})
    parquet = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(table, parquet, row_group_size=7)  # several row groups and batches
    assert list(iter_documents(str(parquet), json_key="content")) == docs
    _same_stream_as_plain(corpus, tmp_path, parquet, json_key="content")
    with pytest.raises(ValueError, match=r"no column 'text' \(columns: \['id', 'content'\]\)"):
        list(iter_documents(str(parquet)))
    with pytest.raises(ValueError, match=r"row 0 of column 'id' is int"):
        list(iter_documents(str(parquet), json_key="id"))


def test_broken_compressed_and_parquet_inputs_are_clear_errors(tmp_path):
    import gzip

    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(b'{"text": "a"}\n' * 1000)[:50])
    with pytest.raises(ValueError, match=r"cut.jsonl.gz is truncated or not .gz data"):
        list(iter_documents(str(cut)))
    fake = tmp_path / "fake.txt.gz"
    fake.write_text("plain text, not gzip")
    with pytest.raises(ValueError, match=r"fake.txt.gz is truncated or not .gz data"):
        list(iter_documents(str(fake)))
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not really")
    pytest.importorskip("pyarrow")
    with pytest.raises(ValueError, match=r"bad.parquet is not a readable parquet file"):
        list(iter_documents(str(bad)))
    with pytest.raises(ValueError, match=r"x.parquet.gz has unsupported suffix '.parquet.gz'"):
        (tmp_path / "x.parquet.gz").write_bytes(b"x")
        list(iter_documents(str(tmp_path / "x.parquet.gz")))


def _dies_on_batch_three(batch: list) -> list:
    if batch == [3]:
        os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer would
    return batch


def _initializer_fails() -> None:
    raise OSError("the tokenizer file is gone")


@pytest.mark.parametrize("case", ["worker killed", "initializer fails"])
def test_a_dead_or_unstartable_worker_ends_tokenizing_with_an_error_not_a_hang(case):
    """multiprocessing.Pool replaced a killed worker and waited for its batch forever (and
    restarted workers whose initializer failed without end)."""
    from concurrent.futures import ProcessPoolExecutor

    from kdtrain.data.preprocess import _ordered_map

    def hung(signum, frame):
        raise TimeoutError("_ordered_map hung")

    before = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    try:
        init = _initializer_fails if case == "initializer fails" else None
        got = []
        with ProcessPoolExecutor(2, initializer=init) as pool:
            with pytest.raises(RuntimeError, match="a tokenizing worker process died or failed to start"):
                for out in _ordered_map(pool, _dies_on_batch_three, ([i] for i in range(10)), ahead=2):
                    got.append(out)
        assert got == [[0], [1], [2]][:len(got)] and (case == "worker killed" or not got)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)
