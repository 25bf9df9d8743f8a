"""Whole documents per training window (``data.packing: documents | best_fit``).

The default windows cut the corpus as one token stream, so a document (a conversation) that
crosses a window boundary is split: its second half trains without its beginning, a reply
without its question. Packing by documents fills each window of ``L = seq_length + 1`` tokens
with whole documents instead and pads the rest. Padding is never a target (the window's label
flags are False there) and, at the end of the window, never attended to by a real token. The
price is the padding: ``padding_share`` reports it.

A document longer than a window is cut into pieces as the stream cuts windows: piece k holds
tokens ``[k S, k S + L)``, so consecutive pieces share one token (the last of one is the first
of the next, as consecutive stream windows do) and every next-token transition of the document
is a label in exactly one piece. Each piece is packed like a document; the first token of a
continuation piece is never a target (``piece_continues``): it was one in the piece before, and
in a packed window the token before it belongs to another document.

The split into train and held-out data is made before packing, on whole documents in corpus
order: the first documents holding ``split[0]`` of the tokens train, the next ``split[1]`` are
held out, each part packed on its own (``group_windows``), so the held-out windows are the end of
the corpus whatever the strategy.

- ``documents``: next fit in corpus order: a piece that does not fit in what is left of the
  window starts the next one. Windows keep the corpus order exactly.
- ``best_fit``: best fit decreasing within consecutive blocks of ``BEST_FIT_BLOCK`` pieces: each
  block's pieces, longest first, go to the open window of that block with the least room that
  still holds them (a new window when none does). Much less padding when lengths vary; the
  windows of a block mix its documents, but blocks keep the corpus order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PackedWindows:
    piece_start: np.ndarray  # [P] int64 position of each piece in the concatenated token stream
    piece_length: np.ndarray  # [P] int64 tokens of each piece (<= window)
    piece_continues: np.ndarray  # [P] bool: the piece continues a document (its first token is no target)
    first_piece: np.ndarray  # [W + 1] int64 window w holds pieces [first_piece[w], first_piece[w + 1])
    window: int  # tokens per window (seq_length + 1)
    group_windows: tuple[int, ...] = ()  # windows of each split part (train, held-out), in that order

    @property
    def num_windows(self) -> int:
        return len(self.first_piece) - 1

    @property
    def padding_share(self) -> float:
        return 1.0 - float(self.piece_length.sum()) / max(1, self.num_windows * self.window)

    @property
    def cut_documents(self) -> int:
        """Pieces that continue a document cut at a window's end (a document longer than a window,
        or than what the window had left, in ``stream`` fill)."""
        return int(self.piece_continues.sum())

    def pieces(self, w: int) -> list[tuple[int, int, bool]]:
        """(stream position, length, continues a document) of the pieces of window ``w``, in order."""
        lo, hi = int(self.first_piece[w]), int(self.first_piece[w + 1])
        return list(zip(self.piece_start[lo:hi].tolist(), self.piece_length[lo:hi].tolist(),
                        self.piece_continues[lo:hi].tolist()))


BEST_FIT_BLOCK = 4096  # pieces per best-fit block


def _cut(starts: np.ndarray, lengths: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, length, continues) of the pieces of non-empty documents: a document of n tokens
    gives max(1, ceil((n - 1) / S)) pieces ``[k S, min(k S + L, n))``, S = L - 1 (one token shared
    between consecutive pieces)."""
    stride = window - 1
    n_pieces = np.maximum(1, -(-(lengths - 1) // stride))
    doc = np.repeat(np.arange(len(lengths)), n_pieces)
    k = np.arange(len(doc)) - np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)  # piece index in its document
    return starts[doc] + k * stride, np.minimum(window, lengths[doc] - k * stride), k > 0


def _next_fit(piece_length: np.ndarray, window: int) -> np.ndarray:
    """first_piece of next-fit windows, one window at a time: the window that starts at piece i
    takes the pieces whose running total stays within ``window`` (a binary search in the
    cumulative lengths), so the loop runs once per window, not per document."""
    ends = np.cumsum(piece_length)
    first = [0]
    while first[-1] < len(piece_length):
        i = first[-1]
        base = int(ends[i - 1]) if i else 0
        first.append(int(np.searchsorted(ends, base + window, side="right")))
    return np.asarray(first, dtype=np.int64)


def _split_documents(lengths: np.ndarray, split: tuple[float, ...]) -> list[np.ndarray]:
    """Indices of the documents of each part: consecutive runs in corpus order, part i ending at
    the last document that ends within the first ``split[0] + ... + split[i]`` of the tokens."""
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    bounds = [0]
    for f in np.cumsum(split):
        cut = np.floor(round(total * float(f), 9))  # round first: 100 * 0.29 counts as 29 tokens
        bounds.append(max(bounds[-1], int(np.searchsorted(ends, cut, side="right"))))
    return [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def pack_documents(document_lengths: np.ndarray, window: int, strategy: str = "next_fit",
                   split: tuple[float, ...] = (1.0,)) -> PackedWindows:
    """Pack consecutive documents (of the given lengths, laid end to end from stream position 0)
    into windows of ``window`` tokens, long documents cut into overlapping pieces; ``strategy``:
    ``next_fit`` or ``best_fit``; ``split``: the token fractions of the parts packed apart (the
    documents past their sum are left out). See the module docstring."""
    lengths = np.asarray(document_lengths, dtype=np.int64)
    assert window >= 2 and lengths.ndim == 1 and np.all(lengths >= 0), (window, lengths.shape)
    assert strategy in ("next_fit", "best_fit"), strategy
    doc_starts = np.cumsum(lengths) - lengths
    parts, groups, offset = [], [], 0
    for docs in _split_documents(lengths, split):
        docs = docs[lengths[docs] > 0]
        start, length, cont = _cut(doc_starts[docs], lengths[docs], window)
        if strategy == "best_fit":
            order, first = _best_fit(length, window)
            start, length, cont = start[order], length[order], cont[order]
        else:
            first = _next_fit(length, window)
        parts.append((start, length, cont, first[:-1] + offset))
        groups.append(len(first) - 1)
        offset += len(length)
    start, length, cont, first = (np.concatenate([p[i] for p in parts]) for i in range(4))
    first = np.concatenate([first, [offset]]).astype(np.int64)
    return PackedWindows(start.astype(np.int64), length.astype(np.int64), cont.astype(bool), first, window,
                         tuple(groups))


def _best_fit(piece_length: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """(the pieces' order, first_piece) of best fit decreasing per block of ``BEST_FIT_BLOCK``
    consecutive pieces (stable order among equal lengths). Open windows are kept by free room:
    ``open_at[c]`` lists the windows with ``c`` tokens free and ``has[c]`` says it is not empty,
    so the best window for a piece of length n is the first ``c >= n`` with ``has[c]`` (one
    vectorised scan of ``has``)."""
    window_of = np.empty(len(piece_length), dtype=np.int64)
    has = np.zeros(window + 1, dtype=bool)
    n_windows = 0
    for lo in range(0, len(piece_length), BEST_FIT_BLOCK):
        block = piece_length[lo:lo + BEST_FIT_BLOCK]
        open_at: list[list[int]] = [[] for _ in range(window + 1)]
        has[:] = False
        for i in np.argsort(-block, kind="stable").tolist():
            n = int(block[i])
            c = n + int(has[n:].argmax())
            if has[c]:
                w = open_at[c].pop()
                if not open_at[c]:
                    has[c] = False
            else:  # no open window has room: a new one
                w, c = n_windows, window
                n_windows += 1
            window_of[lo + i] = w
            if c > n:
                open_at[c - n].append(w)
                has[c - n] = True
    # Pieces in window order, and within a window in corpus order.
    order = np.lexsort((np.arange(len(window_of)), window_of))
    counts = np.bincount(window_of, minlength=n_windows)
    return order, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
