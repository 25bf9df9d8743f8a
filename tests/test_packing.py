"""Whole documents per window (data.packing: documents, kdtrain/data/packing.py): every document
token lands in exactly one window, in corpus order; a document that fits a window is never split;
padding fills the rest and is never a target; runs and caches tell the two packings apart."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from kdtrain.data import GPTWindowDataset, write_indexed_dataset
from kdtrain.data.packing import pack_documents


def _labels(p) -> np.ndarray:
    """Stream positions of the pieces' tokens in piece order, without each continuation's first
    token (it ends the piece before): every document token once when the cuts share one token."""
    return np.concatenate([np.arange(s + c, s + n) for s, n, c in zip(p.piece_start, p.piece_length,
                                                                    p.piece_continues)])


@pytest.mark.parametrize("window", [2, 7, 16, 64])
def test_next_fit_covers_every_token_once_and_splits_only_long_documents(window):
    lengths = np.random.default_rng(window).integers(0, 40, size=300)
    p = pack_documents(lengths, window)
    # The pieces, in order, are the documents laid end to end (empty ones have none); a long
    # document's consecutive pieces share one token, like consecutive stream windows.
    assert np.array_equal(_labels(p), np.arange(lengths.sum()))
    fills = [sum(n for _, n, _ in p.pieces(w)) for w in range(p.num_windows)]
    assert max(fills) <= window and min(fills) > 0
    # Next fit: each window's first piece did not fit in what the previous window had left.
    for w in range(1, p.num_windows):
        assert fills[w - 1] + p.pieces(w)[0][1] > window
    # A document no longer than a window lies in one window; a longer one in full pieces, each
    # starting where the one before ends (S = window - 1 tokens further on).
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    window_of = np.repeat(np.arange(p.num_windows), np.diff(p.first_piece))
    stride = window - 1
    for d in np.flatnonzero(lengths):
        pieces = np.flatnonzero((p.piece_start >= bounds[d]) & (p.piece_start < bounds[d + 1]))
        assert not p.piece_continues[pieces[0]] and p.piece_continues[pieces[1:]].all()
        if lengths[d] <= window:
            assert len(pieces) == 1
        else:
            assert np.all(p.piece_length[pieces[:-1]] == window)
            assert np.array_equal(np.diff(p.piece_start[pieces]), np.full(len(pieces) - 1, stride))
            assert p.piece_start[pieces[-1]] + p.piece_length[pieces[-1]] == bounds[d + 1]
            assert len(set(window_of[pieces])) == len(pieces)
    assert p.padding_share == pytest.approx(1 - p.piece_length.sum() / (p.num_windows * window))


@pytest.mark.parametrize("strategy", ["next_fit", "best_fit"])
def test_the_held_out_part_is_the_end_of_the_corpus(strategy, monkeypatch):
    """The split is made on whole documents in corpus order before packing: the held-out windows
    hold the last documents, long and short alike (best fit once held only the short ones: the
    windows it opened last)."""
    from kdtrain.data import packing

    monkeypatch.setattr(packing, "BEST_FIT_BLOCK", 64)
    lengths = np.random.default_rng(7).integers(2, 60, size=500)
    p = pack_documents(lengths, 33, strategy, split=(0.9, 0.05))
    n_train, n_valid = p.group_windows
    assert n_train + n_valid == p.num_windows
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    doc_of = lambda w: {int(np.searchsorted(bounds, s, side="right")) - 1 for s, _, _ in p.pieces(w)}
    train = set().union(*(doc_of(w) for w in range(n_train)))
    held = set().union(*(doc_of(w) for w in range(n_train, p.num_windows)))
    # Consecutive runs: train first, then held out, then (the last 5% of the tokens) unused.
    assert train == set(range(len(train))) and held == set(range(len(train), len(train) + len(held)))
    assert bounds[len(train)] <= 0.9 * bounds[-1] < bounds[len(train) + 1]
    assert bounds[len(train) + len(held)] <= 0.95 * bounds[-1] < bounds[len(train) + len(held) + 1]
    held_lengths = lengths[sorted(held)]
    assert held_lengths.max() > 45 and held_lengths.min() < 10  # long and short documents alike


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


@pytest.mark.parametrize("window", [2, 7, 16, 64])
def test_best_fit_covers_every_token_once_per_block(window, monkeypatch):
    from kdtrain.data import packing

    monkeypatch.setattr(packing, "BEST_FIT_BLOCK", 50)
    lengths = np.random.default_rng(window + 1).integers(0, 40, size=300)
    p = pack_documents(lengths, window, "best_fit")
    nf = pack_documents(lengths, window)
    # The same pieces as next fit (documents cut alike), each in exactly one window.
    order = np.argsort(p.piece_start, kind="stable")
    for field in ("piece_start", "piece_length", "piece_continues"):
        assert np.array_equal(getattr(p, field)[order], getattr(nf, field)), field
    fills = np.array([sum(n for _, n, _ in p.pieces(w)) for w in range(p.num_windows)])
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
        starts = [s for s, _, _ in p.pieces(w)]
        assert starts == sorted(starts)
    assert p.num_windows <= nf.num_windows
    if window >= 16:
        assert p.padding_share < nf.padding_share


def _reference_pack(lengths: list[int], window: int, strategy: str, split: tuple[float, ...],
                    block: int) -> dict[str, list]:
    """pack_documents written plainly, one document, piece and window at a time: the definition
    the fast packing must match exactly (resumed runs and the golden loss curves read its windows)."""
    # The split: part i ends at the last document that ends within the first
    # split[0] + ... + split[i] of the tokens (at least where the part before ended).
    total, ends = sum(lengths), list(itertools.accumulate(lengths))
    bounds = [0]
    for f in np.cumsum(split):
        cut = np.floor(round(total * float(f), 9))
        bounds.append(max(bounds[-1], sum(1 for e in ends if e <= cut)))
    out = {"piece_start": [], "piece_length": [], "piece_continues": [], "first_piece": [], "groups": []}
    for a, b in zip(bounds[:-1], bounds[1:]):
        pieces = []  # (stream position, length, continues): piece k of a document holds [k S, k S + L)
        for d in range(a, b):
            k = 0
            while lengths[d]:
                at = k * (window - 1)
                pieces.append((ends[d] - lengths[d] + at, min(window, lengths[d] - at), k > 0))
                if at + window >= lengths[d]:
                    break
                k += 1
        windows: list[list[int]] = []  # the pieces of each window
        if strategy == "next_fit":  # a piece that does not fit in what the window has left starts the next
            fill = window
            for i, (_, n, _) in enumerate(pieces):
                if fill + n > window:
                    windows.append([])
                    fill = 0
                windows[-1].append(i)
                fill += n
        else:
            for lo in range(0, len(pieces), block):  # best fit decreasing per block
                room, given = [], []  # the block's windows: room left, and when they were given it
                by_length = sorted(range(lo, min(lo + block, len(pieces))), key=lambda i: -pieces[i][1])
                for t, i in enumerate(by_length):
                    n = pieces[i][1]
                    fits = [w for w in range(len(room)) if room[w] >= n]
                    if fits:  # the least room that holds it; among equals, the room given last
                        w = min(fits, key=lambda w: (room[w], -given[w]))
                    else:
                        w = len(room)
                        room.append(window)
                        given.append(t)
                        windows.append([])
                    room[w] -= n
                    given[w] = t
                    windows[len(windows) - len(room) + w].append(i)
        offset = len(out["piece_start"])
        for w in windows:
            out["first_piece"].append(offset)
            for i in sorted(w):  # a window's pieces in corpus order
                for key, value in zip(("piece_start", "piece_length", "piece_continues"), pieces[i]):
                    out[key].append(value)
                offset += 1
        out["groups"].append(len(windows))
    out["first_piece"].append(len(out["piece_start"]))
    return out


def _reference_cases():
    """Document lengths that reach the edges: empty corpora and parts, documents of 0, 1 and 2
    tokens, of exactly a window and one more, very long ones, equal lengths (chains of windows
    that never merge), window 2."""
    rng = np.random.default_rng(11)
    cases = [([], 2), ([0, 0], 5), ([1], 2), ([2], 2), ([3], 2), ([5, 0, 5, 1], 5), ([6, 6, 6], 5),
             ([40], 2), ([1] * 9, 2), ([2] * 9, 3), ([1, 0, 1, 2, 0], 2)]
    for window in (2, 3, 5, 8, 17, 64):
        edge = [0, 1, 2, window - 1, window, window + 1, 2 * window, 7 * window + 3]
        for size in (1, 3, 30, 150):
            cases.append((rng.choice(edge, size).tolist(), window))
            cases.append((rng.integers(0, 2 * window, size).tolist(), window))
            cases.append(([int(rng.integers(1, window + 1))] * size, window))
    return cases


@pytest.mark.parametrize("strategy", ["next_fit", "best_fit"])
def test_packing_is_exactly_the_plain_definition(strategy, monkeypatch):
    """The fast packers (next fit by merging walks, best fit by a stack of open windows) give the
    very arrays of the plain one-window-at-a-time definition, for small and one-piece blocks,
    walkers that start close or far apart, and splits with empty parts."""
    from kdtrain.data import packing

    splits = [(1.0,), (0.9, 0.1), (0.5, 0.0), (0.0, 0.3), (0.3, 0.3), (0.6, 0.4)]
    checked = 0
    for c, (lengths, window) in enumerate(_reference_cases()):
        split = splits[c % len(splits)]
        block = (4096, 5, 1)[c % 3]
        monkeypatch.setattr(packing, "BEST_FIT_BLOCK", block)
        monkeypatch.setattr(packing, "WALK_WINDOWS", (64, 1, 3)[c % 3])
        got = pack_documents(np.array(lengths, dtype=np.int64), window, strategy, split)
        want = _reference_pack(lengths, window, strategy, split, block)
        for field in ("piece_start", "piece_length", "piece_continues", "first_piece"):
            value = getattr(got, field)
            assert value.dtype == (bool if field == "piece_continues" else np.int64), field
            assert value.tolist() == want[field], (field, lengths, window, split, block)
        assert got.group_windows == tuple(want["groups"]) and got.window == window
        checked += sum(want["groups"])
    assert checked > 2000
    # Larger corpora with the default block: a window filling up on top of best fit's stack, and
    # next fit's walkers in numbers (their vectorised search), merging, and windows of many tiny
    # pieces that reach past the search's usual span.
    monkeypatch.setattr(packing, "BEST_FIT_BLOCK", 4096)
    rng = np.random.default_rng(3)
    for lengths, window, walk in [(np.maximum(1, rng.lognormal(np.log(20), 0.9, 2500)).astype(int), 33, 64),
                                  (np.maximum(1, rng.lognormal(np.log(20), 0.9, 2500)).astype(int), 129, 1),
                                  (rng.choice([1, 1, 1, 2, 3, 100, 300], 3000), 64, 1),
                                  (rng.choice([1, 1, 1, 2, 3, 100, 300], 3000), 64, 4)]:
        monkeypatch.setattr(packing, "WALK_WINDOWS", walk)
        got = pack_documents(lengths, window, strategy, (0.97, 0.03))
        want = _reference_pack(lengths.tolist(), window, strategy, (0.97, 0.03), 4096)
        for field in ("piece_start", "piece_length", "piece_continues", "first_piece"):
            assert getattr(got, field).tolist() == want[field], (field, window, walk)


@pytest.mark.parametrize("strategy", ["next_fit", "best_fit"])
def test_packing_reads_a_corpus_lengths_as_they_are(strategy, tmp_path):
    """A corpus' lengths (the .idx's int32 array, memory-mapped and misaligned by its header) and
    other integer dtypes pack exactly as int64 lengths do, without an int64 copy of the input;
    sums past 2**31 tokens stay exact."""
    rng = np.random.default_rng(11)
    lengths = np.concatenate([[0, 70], rng.integers(0, 90, size=3000), [0, 0]])
    path = tmp_path / "lengths"
    path.write_bytes(b"\0" * 34 + lengths.astype(np.int32).tobytes())
    mapped = np.memmap(path, dtype=np.int32, mode="r", offset=34, shape=lengths.shape)
    assert not mapped.flags.aligned
    want = pack_documents(lengths, 33, strategy, (0.9, 0.05))
    for given in (mapped, lengths.astype(np.uint16), lengths.tolist()):
        got = pack_documents(given, 33, strategy, (0.9, 0.05))
        for field in ("piece_start", "piece_length", "piece_continues", "first_piece"):
            assert getattr(got, field).dtype == getattr(want, field).dtype, field
            assert np.array_equal(getattr(got, field), getattr(want, field)), field
        assert got.group_windows == want.group_windows
    big = np.full(3, 2**31 - 1, dtype=np.int32)
    got = pack_documents(big, 2**30, strategy)
    assert got.piece_start[-1] + got.piece_length[-1] == 3 * (2**31 - 1)


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
    tokens, token_flags = [], []  # per piece, in window order (= corpus order: next fit)
    for w in range(ds.num_windows):
        window, flags_w = ds.window(w), np.concatenate([[False], ds.window_loss_mask(w)])
        at = 0
        for _, n, continues in ds.packed.pieces(w):
            # A continuation repeats the last token of the piece before, never as a target.
            tokens.append(window[at + continues: at + n])
            token_flags.append(flags_w[at + continues: at + n])
            assert not (continues and flags_w[at])
            at += n
        assert np.all(window[at:] == eos) and not flags_w[at:].any()  # padding: EOS, never a target
    assert np.array_equal(np.concatenate(tokens), np.concatenate(docs))
    # The flags are the documents' own, except at a window's first token (it has no label).
    got, want = np.concatenate(token_flags), np.concatenate(flags)
    first = ds.packed.first_piece[:-1]
    first = first[~ds.packed.piece_continues[first]]  # (a continuation's first kept token is a label)
    window_starts = np.cumsum([0] + [len(t) for t in tokens[:-1]])[first]
    keep = np.ones(len(want), bool)
    keep[window_starts] = False
    assert np.array_equal(got[keep], want[keep]) and not got[window_starts].any()
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
    assert dataset_identity(packed.data)["packing_rule"] == 2  # caches of the windows before the split-first rule
    assert dataset_identity(best.data)["packing"] == "best_fit"
    packed_ds = open_dataset(packed.data, packed.model)
    line = describe_dataset(packed_ds, packed.data)
    assert "whole documents per window, in corpus order" in line and "% padding" in line
    cut = sum(c for w in range(packed_ds.num_windows) for _, _, c in packed_ds.packed.pieces(w))
    assert packed_ds.cut_documents == cut and (f"{cut} pieces continue a document cut" in line) == (cut > 0)
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
        for packed in (nf, bf):  # window tokens that are not padding: the documents', plus one per cut
            assert packed["continuations"] == nf["continuations"] > 0
            assert ((r["seq_length"] + 1) * packed["windows"] * (1 - packed["padding_share"])
                    == pytest.approx(r["tokens"] + packed["continuations"], rel=1e-3))
    assert "lognormal-2000" in capsys.readouterr().out


def test_an_evaluation_counts_each_held_out_window_once(tmp_path):
    """Fewer held-out windows than eval_batches x global_batch samples: the evaluation runs the
    batches the windows fill, and the samples padding the last batch weigh nothing (they once
    counted the first windows twice)."""
    from kdtrain.config.run import TrainingConfig
    from kdtrain.training.pretrain import held_out

    rng = np.random.default_rng(1)
    docs = [(rng.integers(1, 50, n), rng.random(n) < 0.6) for n in rng.integers(5, 30, size=40)]
    write_indexed_dataset(str(tmp_path / "c"), docs, 50, {"eos_id": 0})
    ds = GPTWindowDataset([str(tmp_path / "c")], 16, split=(0.88, 0.12), packing="best_fit")
    n = ds.num_valid_windows
    assert 4 < n < 8
    batches, sample, targets, _ = held_out(ds, TrainingConfig(global_batch_size=4, micro_batch_size=2,
                                                              eval_batches=5))
    assert batches == 2  # not 5: two batches of 4 hold the n windows
    for j in range(n):
        assert np.array_equal(sample(j), ds.valid_sample(j)) and np.array_equal(targets(j), ds.valid_loss_mask(j))
    for j in range(n, 2 * 4):
        assert np.array_equal(sample(j), ds.valid_sample(j - n)) and not targets(j).any()
    # Enough windows: the flags are the dataset's own.
    batches, _, targets, _ = held_out(ds, TrainingConfig(global_batch_size=2, micro_batch_size=2, eval_batches=2))
    assert batches == 2 and all(targets(j) is ds.valid_loss_mask(j) or np.array_equal(targets(j), ds.valid_loss_mask(j))
                                for j in range(4))


def test_a_packed_piece_that_carries_a_reply_on_is_not_a_new_reply(tmp_path):
    """Best fit can put the continuation of a conversation cut inside its reply after another
    conversation: its targets start one token into the piece, which looks like a reply starting
    there. On-policy steps must not sample a "reply" to a one-token prompt taken from the middle
    of the old one: the window's reply spans leave it out, and keep the real reply before it."""
    from kdtrain.config.distill import OnPolicyConfig
    from kdtrain.data.chat import reply_spans
    from kdtrain.training.onpolicy import onpolicy_spans

    S = 32
    docs = [(np.r_[np.arange(50, 60), np.arange(60, 69), 0], np.r_[[False] * 10, [True] * 10]),  # 20 tokens
            (np.r_[np.arange(1, 7), np.arange(10, 39), 0], np.r_[[False] * 6, [True] * 30])]  # 36 > the window
    prefix = str(tmp_path / "spans")
    write_indexed_dataset(prefix, docs, 97, {"eos_id": 0})
    ds = GPTWindowDataset([prefix], S, split=(1.0, 0.0), packing="best_fit", document_positions=True)
    carrier = [w for w in range(ds.num_windows) if any(c for _, _, c in ds.packed.pieces(w)[1:])]
    assert carrier, [ds.packed.pieces(w) for w in range(ds.num_windows)]
    assert ds.cut_documents == 1  # the long conversation's second piece
    for w in carrier:
        (_, first, _), (_, _, continues) = ds.packed.pieces(w)[:2]
        assert continues
        naive = reply_spans(ds.window_loss_mask(w))
        assert any(a == first + 1 for a, _ in naive)  # what the flags alone suggest
        assert all(a != first + 1 for a, _ in ds.window_reply_spans(w)), ds.window_reply_spans(w)
        assert ds.window_reply_spans(w) == [(10, 20)]  # the short conversation's reply stays
    for g in range(ds.num_train_windows):
        row = onpolicy_spans(ds, [g], OnPolicyConfig(fraction=1.0, replies="all"), S + 1)[0]
        assert row == ds.train_reply_spans(g)


def test_concatenated_conversations_and_documents_are_told_apart_per_window(tmp_path):
    """``data.path`` may list a conversation corpus and a document corpus together: each window is
    sampled on-policy as the corpus it reads is (before, every window counted as a conversation,
    and a document window, all targets, offered no reply: nothing was sampled there)."""
    from kdtrain.config.distill import OnPolicyConfig
    from kdtrain.training.onpolicy import onpolicy_spans

    S = 16
    chat = [(np.r_[np.arange(1, 9), np.arange(9, 15), 0], np.r_[[False] * 8, [True] * 7]) for _ in range(6)]
    text = [np.arange(20, 60) for _ in range(3)]
    write_indexed_dataset(str(tmp_path / "chat"), chat, 97, {"eos_id": 0})
    write_indexed_dataset(str(tmp_path / "text"), text, 97, {"eos_id": 0})
    ds = GPTWindowDataset([str(tmp_path / "chat"), str(tmp_path / "text")], S, split=(1.0, 0.0))
    kinds = [ds.window_is_conversation(w) for w in range(ds.num_windows)]
    assert kinds[0] and not kinds[-1], kinds
    op = OnPolicyConfig(fraction=1.0, prompt_length=4, replies="all")
    for g in range(ds.num_train_windows):
        row = onpolicy_spans(ds, [g], op, S + 1)[0]
        w = ds.train_window_index(g)
        assert row == (ds.window_reply_spans(w) if kinds[w] else [(4, S + 1)]), (w, row)
