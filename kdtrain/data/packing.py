"""Whole documents per training window (``data.packing: documents | best_fit``).

The default windows cut the corpus as one token stream, so a document (a conversation) that
crosses a window boundary is split: its second half trains without its beginning, a reply
without its question. Packing by documents fills each window of ``L = seq_length + 1`` tokens
with whole documents instead and pads the rest; a document longer than a window is cut into
``L``-token pieces first, each packed like a document. Padding is never a target (the window's
label flags are False there) and, at the end of the window, never attended to by a real token.
The price is the padding: ``padding_share`` reports it.

- ``documents``: next fit in corpus order: a document that does not fit in what is left of the
  window starts the next one. Windows keep the corpus order exactly.
- ``best_fit``: best fit decreasing within consecutive blocks of ``BEST_FIT_BLOCK`` pieces: each
  block's pieces, longest first, go to the open window of that block with the least room that
  still holds them (a new window when none does). Much less padding when lengths vary; the
  windows of a block mix its documents, but blocks keep the corpus order, so the held-out split
  (the last windows) is still the end of the corpus.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PackedWindows:
    piece_start: np.ndarray  # [P] int64 position of each piece in the concatenated token stream
    piece_length: np.ndarray  # [P] int64 tokens of each piece (<= window)
    first_piece: np.ndarray  # [W + 1] int64 window w holds pieces [first_piece[w], first_piece[w + 1])
    window: int  # tokens per window (seq_length + 1)

    @property
    def num_windows(self) -> int:
        return len(self.first_piece) - 1

    @property
    def padding_share(self) -> float:
        return 1.0 - float(self.piece_length.sum()) / (self.num_windows * self.window)

    def pieces(self, w: int) -> list[tuple[int, int]]:
        """(stream position, length) of the pieces of window ``w``, in order."""
        lo, hi = int(self.first_piece[w]), int(self.first_piece[w + 1])
        return list(zip(self.piece_start[lo:hi].tolist(), self.piece_length[lo:hi].tolist()))


BEST_FIT_BLOCK = 4096  # pieces per best-fit block


def pack_documents(document_lengths: np.ndarray, window: int, strategy: str = "next_fit") -> PackedWindows:
    """Pack consecutive documents (of the given lengths, laid end to end from stream position 0)
    into windows of ``window`` tokens, long documents cut into ``window``-token pieces;
    ``strategy``: ``next_fit`` or ``best_fit`` (the module docstring)."""
    lengths = np.asarray(document_lengths, dtype=np.int64)
    assert window >= 1 and lengths.ndim == 1 and np.all(lengths >= 0), (window, lengths.shape)
    lengths_nz = lengths[lengths > 0]
    starts_nz = (np.cumsum(lengths) - lengths)[lengths > 0]
    # Pieces: document d gives ceil(len / window) of them, all full but the last.
    n_pieces = -(-lengths_nz // window)
    doc = np.repeat(np.arange(len(lengths_nz)), n_pieces)
    k = np.arange(len(doc)) - np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)  # piece index in its document
    piece_start = starts_nz[doc] + k * window
    piece_length = np.minimum(window, lengths_nz[doc] - k * window)
    if strategy == "best_fit":
        return _best_fit(piece_start, piece_length, window)
    assert strategy == "next_fit", strategy
    # Next fit, one window at a time: the window that starts at piece i takes the pieces whose
    # running total stays within ``window`` (a binary search in the cumulative lengths), so the
    # loop runs once per window, not per document.
    ends = np.cumsum(piece_length)
    first = [0]
    while first[-1] < len(piece_length):
        i = first[-1]
        base = int(ends[i - 1]) if i else 0
        first.append(int(np.searchsorted(ends, base + window, side="right")))
    return PackedWindows(piece_start, piece_length, np.asarray(first, dtype=np.int64), window)


def _best_fit(piece_start: np.ndarray, piece_length: np.ndarray, window: int) -> PackedWindows:
    """Best fit decreasing per block of ``BEST_FIT_BLOCK`` consecutive pieces (stable order among
    equal lengths). Open windows are kept by free room: ``open_at[c]`` lists the windows with
    ``c`` tokens free and ``has[c]`` says it is not empty, so the best window for a piece of
    length n is the first ``c >= n`` with ``has[c]`` (one vectorised scan of ``has``)."""
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
    first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return PackedWindows(piece_start[order], piece_length[order], first, window)
