"""Whole documents per window (data.packing: documents, kdtrain/data/packing.py): every document
token lands in exactly one window, in corpus order; a document that fits a window is never split;
padding fills the rest and is never a target; runs and caches tell the two packings apart."""

from __future__ import annotations

import numpy as np
import pytest

from kdtrain.data import GPTWindowDataset, write_indexed_dataset
from kdtrain.data.packing import pack_documents


@pytest.mark.parametrize("window", [1, 7, 16, 64])
def test_next_fit_covers_every_token_once_and_splits_only_long_documents(window):
    lengths = np.random.default_rng(window).integers(0, 40, size=300)
    p = pack_documents(lengths, window)
    # The pieces, in order, are the documents laid end to end (empty ones have none).
    assert np.array_equal(np.concatenate([np.arange(s, s + n) for s, n in zip(p.piece_start, p.piece_length)]),
                          np.arange(lengths.sum()))
    fills = [sum(n for _, n in p.pieces(w)) for w in range(p.num_windows)]
    assert max(fills) <= window and min(fills) > 0
    # Next fit: each window's first piece did not fit in what the previous window had left.
    for w in range(1, p.num_windows):
        assert fills[w - 1] + p.pieces(w)[0][1] > window
    # A document no longer than a window lies in one window; a longer one in full pieces.
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    window_of = np.repeat(np.arange(p.num_windows), np.diff(p.first_piece))
    for d in np.flatnonzero(lengths):
        pieces = np.flatnonzero((p.piece_start >= bounds[d]) & (p.piece_start < bounds[d + 1]))
        if lengths[d] <= window:
            assert len(pieces) == 1
        else:
            assert len(pieces) == -(-lengths[d] // window) and np.all(p.piece_length[pieces[:-1]] == window)
            assert len(set(window_of[pieces])) == len(pieces)
    assert p.padding_share == pytest.approx(1 - lengths.sum() / (p.num_windows * window))


def _reference_best_fit_fills(lengths: list[int], window: int) -> list[int]:
    """Best fit decreasing, naively: each piece (longest first) into the fullest window it fits."""
    fills: list[int] = []
    for n in sorted(lengths, reverse=True):
        fits = [i for i, f in enumerate(fills) if f + n <= window]
        if fits:
            fills[max(fits, key=lambda i: fills[i])] += n
        else:
            fills.append(n)
    return sorted(fills)


@pytest.mark.parametrize("window", [1, 7, 16, 64])
def test_best_fit_covers_every_token_once_per_block(window, monkeypatch):
    from kdtrain.data import packing

    monkeypatch.setattr(packing, "BEST_FIT_BLOCK", 50)
    lengths = np.random.default_rng(window + 1).integers(0, 40, size=300)
    p = pack_documents(lengths, window, "best_fit")
    nf = pack_documents(lengths, window)
    # The same pieces as next fit (documents cut alike), each in exactly one window.
    order = np.argsort(p.piece_start)
    assert np.array_equal(p.piece_start[order], nf.piece_start) and np.array_equal(p.piece_length[order],
                                                                                   nf.piece_length)
    fills = np.array([sum(n for _, n in p.pieces(w)) for w in range(p.num_windows)])
    assert fills.max() <= window and fills.min() > 0
    # Blocks of 50 pieces keep the corpus order: a block's windows come after the previous block's,
    # and each block's window fills are those of best fit decreasing on its pieces.
    window_of = np.repeat(np.arange(p.num_windows), np.diff(p.first_piece))
    block = np.empty(len(window_of), dtype=np.int64)
    block[order] = np.arange(len(order)) // 50
    assert np.all(np.diff(block[np.argsort(window_of, kind="stable")]) >= 0)
    for b in range(block.max() + 1):
        mine = sorted(fills[np.unique(window_of[block == b])].tolist())
        assert mine == _reference_best_fit_fills(p.piece_length[block == b].tolist(), window), b
    # Within a window the pieces keep the corpus order.
    for w in range(p.num_windows):
        starts = [s for s, _ in p.pieces(w)]
        assert starts == sorted(starts)
    assert p.num_windows <= nf.num_windows
    if window >= 16:
        assert p.padding_share < nf.padding_share


def test_packed_windows_hold_whole_documents_padded_with_eos(tmp_path):
    rng = np.random.default_rng(0)
    S, eos = 16, 3
    masked = [(np.append(rng.integers(4, 100, n - 1), eos), rng.random(n) < 0.5) for n in (5, 12, 9, 30, 2, 17, 8)]
    write_indexed_dataset(str(tmp_path / "c"), masked, 100, {"eos_id": eos})
    write_indexed_dataset(str(tmp_path / "t"), [np.append(rng.integers(4, 100, n - 1), eos) for n in (10, 6)], 100,
                          {"eos_id": eos})
    ds = GPTWindowDataset([str(tmp_path / "c"), str(tmp_path / "t")], S, split=(1.0, 0.0), packing="documents")
    docs = [d for d, _ in masked] + [np.asarray(ds.streams[1].tokens[:10]), np.asarray(ds.streams[1].tokens[10:])]
    flags = [m for _, m in masked] + [np.ones(10, bool), np.ones(6, bool)]
    assert ds.conversations and ds.has_loss_mask
    seen = []
    for w in range(ds.num_windows):
        tokens, labels = ds.window(w), ds.window_loss_mask(w)
        token_flags = np.concatenate([[False], labels])
        n = sum(k for _, k in ds.packed.pieces(w))
        assert np.all(tokens[n:] == eos) and not token_flags[n:].any()  # padding: EOS, never a target
        seen.append((tokens[:n], token_flags[:n]))
    got_tokens = np.concatenate([t for t, _ in seen])
    assert np.array_equal(got_tokens, np.concatenate(docs))
    # The flags are the documents' own (the first token of a window has no label, so no flag).
    starts = np.cumsum([0] + [len(t) for t, _ in seen[:-1]])
    want = np.concatenate(flags)
    for (t, f), at in zip(seen, starts):
        assert np.array_equal(f[1:], want[at + 1: at + len(t)])
    # A text corpus packed by documents has flags too: only the padding is not a target.
    text = GPTWindowDataset([str(tmp_path / "t")], S, split=(1.0, 0.0), packing="documents")
    assert not text.conversations and text.has_loss_mask and text.num_windows == 1
    assert text.window_loss_mask(0).tolist() == [True] * 15 + [False] * 1
    with pytest.raises(ValueError, match="packing must be one of"):
        GPTWindowDataset([str(tmp_path / "t")], S, packing="greedy")


def test_runs_and_caches_tell_the_packings_apart(tiny_chat_corpus):
    from kdtrain.cache.manifest import dataset_identity
    from kdtrain.config import load_pretrain_config
    from kdtrain.training.pretrain import describe_dataset, open_dataset

    base = [f"data.path=[{tiny_chat_corpus['prefix']}]", "data.seq_length=64"]
    stream, packed, best = (load_pretrain_config("tiny", base + [f"data.packing={p}"])
                            for p in ("stream", "documents", "best_fit"))
    assert "packing" not in dataset_identity(stream.data)  # caches written before the option stay valid
    assert dataset_identity(packed.data)["packing"] == "documents"
    assert dataset_identity(best.data)["packing"] == "best_fit"
    line = describe_dataset(open_dataset(packed.data, packed.model), packed.data)
    assert "whole documents per window, in corpus order" in line and "% padding" in line
    assert "replies are the targets" in line
    best_ds = open_dataset(best.data, best.model)
    assert "best fit" in describe_dataset(best_ds, best.data)
    assert best_ds.padding_share < open_dataset(packed.data, packed.model).padding_share
    with pytest.raises(ValueError, match="data.packing"):
        load_pretrain_config("tiny", base + ["data.packing=greedy"])


def test_packing_benchmark_reports_both_strategies(tmp_path, capsys):
    """benchmarks/bench_packing.py (the committed packing_cpu figures) on synthetic lengths."""
    import json
    import runpy
    from pathlib import Path

    bench = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "bench_packing.py"))
    assert bench["main"](["--synthetic", "2000", "--seq-length", "256", "1024", "--out", str(tmp_path / "p.json")]) == 0
    rows = json.loads((tmp_path / "p.json").read_text())
    assert [r["seq_length"] for r in rows] == [256, 1024] and all(r["documents"] == 2000 for r in rows)
    for r in rows:
        nf, bf = r["next_fit"], r["best_fit"]
        assert bf["windows"] < nf["windows"] and bf["padding_share"] < nf["padding_share"]
        assert (r["seq_length"] + 1) * nf["windows"] * (1 - nf["padding_share"]) == pytest.approx(r["tokens"], rel=1e-3)
    assert "lognormal-2000" in capsys.readouterr().out
