"""Whole documents per training window (``data.packing: documents``).

The default windows cut the corpus as one token stream, so a document (a conversation) that
crosses a window boundary is split: its second half trains without its beginning, a reply
without its question. Packing by documents fills each window of ``L = seq_length + 1`` tokens
with whole documents instead, in corpus order (next fit: a document that does not fit in what is
left of the window starts the next one), and pads the rest; a document longer than a window is
cut into ``L``-token pieces first, each packed like a document. Padding is never a target (the
window's label flags are False there) and, at the end of the window, never attended to by a real
token. The price is the padding: ``padding_share`` reports it.
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


def pack_documents(document_lengths: np.ndarray, window: int) -> PackedWindows:
    """Next-fit packing of consecutive documents (of the given lengths, laid end to end from stream
    position 0) into windows of ``window`` tokens, long documents cut into ``window``-token pieces."""
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
