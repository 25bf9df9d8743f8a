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

from bisect import insort
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
WALK_WINDOWS = 64  # next fit: windows between two walkers' starting pieces


def _cut(starts: np.ndarray, lengths: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, length, continues) of the pieces of non-empty documents: a document of n tokens
    gives max(1, ceil((n - 1) / S)) pieces ``[k S, min(k S + L, n))``, S = L - 1 (one token shared
    between consecutive pieces)."""
    stride = window - 1
    n_pieces = np.maximum(1, -(-(lengths - 1) // stride))
    doc = np.repeat(np.arange(len(lengths)), n_pieces)
    # piece index in its document (int64, so that the products below are too, whatever the lengths' dtype)
    k = np.arange(len(doc)) - np.repeat(np.cumsum(n_pieces, dtype=np.int64) - n_pieces, n_pieces)
    return starts[doc] + k * stride, np.minimum(window, lengths[doc] - k * stride), k > 0


def _next_fit(piece_length: np.ndarray, window: int) -> np.ndarray:
    """first_piece of next-fit windows. The window that starts at piece i ends before piece
    ``jump(i)``, the first piece whose end passes ``start(i) + window``; the windows start at 0,
    jump(0), jump(jump(0)), ... up to the end.

    Walking that chain one window at a time costs a numpy call per window. Instead walkers start
    every ``WALK_WINDOWS`` windows' worth of pieces and all step at once. A walker stops when it
    lands on a piece some walker has already stepped from: the rest of its chain is known. Chains
    from different pieces soon meet (and then stay together), so a walk takes about
    ``WALK_WINDOWS`` steps plus the few windows it needs to meet the next walker's chain, and
    nearly only the pieces that start windows are stepped from. Chains that never meet (pieces of
    a few repeated lengths) only make walks longer: no piece is stepped from twice.

    The chain from piece 0 is then walker 0's path up to where it stopped, on the path of the
    walker that owns that piece from there to where that one stopped, and so on: a chain of
    walkers (followed by pointer doubling), each contributing its path from where the chain
    enters it."""
    n = len(piece_length)
    if n == 0:
        return np.zeros(1, dtype=np.int64)
    per_window = max(1, round(n * window / int(piece_length.sum())))  # pieces per window, roughly
    span = (2 * per_window).bit_length()  # a window usually ends within 2^span pieces of its start
    # Piece i holds stream tokens [bounds[i], bounds[i + 1]); past the end, beyond every window.
    bounds = np.full(n + 1 + (1 << span), np.iinfo(np.int64).max)
    bounds[0] = 0
    np.cumsum(piece_length, out=bounds[1:n + 1])
    # Walkers start a multiple of per_window pieces apart: pieces of one length put them on one chain.
    pos = np.arange(0, n, WALK_WINDOWS * per_window)
    walkers = len(pos)
    # owner[i]: 1 + the walker that stepped from piece i, 0 for none; the end (owner[n]) stops a
    # walk as a walked piece does.
    owner = np.zeros(n + 1, dtype=np.int32 if walkers < 2**31 - 1 else np.int64)
    owner[n] = walkers + 1
    who = np.arange(walkers)
    stop = np.empty(walkers, dtype=np.int64)  # the piece each walker stopped at
    while len(pos):
        owner[pos] = who + 1
        # jump: the last piece boundary at or before the window's end x (the first piece that
        # does not fit starts there). Many walkers: a binary search over the next 2^span
        # boundaries (nearby reads, independent across walkers: cheap at any corpus size) or, for
        # the few windows that reach further, over all of them; a few: one numpy search.
        x = bounds[pos] + window
        if len(pos) <= 256:
            lo = np.searchsorted(bounds[:n + 1], x, side="right") - 1
        else:
            lo = pos + 1  # bounds[lo] <= x: piece pos fits
            far = bounds[pos + (1 << span)] <= x
            for k in reversed(range(span)):
                np.add(lo, 1 << k, out=lo, where=bounds[lo + (1 << k)] <= x)
            if far.any():
                lo[far] = np.searchsorted(bounds[:n + 1], x[far], side="right") - 1
        fresh = owner[lo] == 0
        # Walkers stay in order (jump is monotone): two that land on one piece are neighbours,
        # and the first goes on for both.
        fresh[1:] &= lo[1:] != lo[:-1]
        stop[who[~fresh]] = lo[~fresh]
        pos, who = lo[fresh], who[fresh]
    # The chain of walkers from walker 0 (walkers: the end), by pointer doubling: chain holds the
    # first 2^k and nxt skips 2^k walkers.
    nxt = np.append(owner[stop] - 1, walkers)
    chain = np.zeros(1, dtype=np.int64)
    while chain[-1] < walkers:
        chain = np.concatenate([chain, nxt[chain]])
        nxt = nxt[nxt]
    chain = chain[chain < walkers]
    entry = np.full(walkers, n + 1, dtype=np.int64)  # where the chain enters each walker's path
    entry[chain] = np.concatenate([[0], stop[chain[:-1]]])
    walked = np.flatnonzero(owner[:n])
    return np.append(walked[walked >= entry[owner[walked] - 1]], n)


def _split_documents(ends: np.ndarray, split: tuple[float, ...]) -> list[tuple[int, int]]:
    """The documents [a, b) of each part, given each document's end in the stream: consecutive runs
    in corpus order, part i ending at the last document that ends within the first
    ``split[0] + ... + split[i]`` of the tokens."""
    total = int(ends[-1]) if len(ends) else 0
    bounds = [0]
    for f in np.cumsum(split):
        cut = np.floor(round(total * float(f), 9))  # round first: 100 * 0.29 counts as 29 tokens
        bounds.append(max(bounds[-1], int(np.searchsorted(ends, int(cut), side="right"))))
    return list(zip(bounds[:-1], bounds[1:]))


def pack_documents(document_lengths: np.ndarray, window: int, strategy: str = "next_fit",
                   split: tuple[float, ...] = (1.0,)) -> PackedWindows:
    """Pack consecutive documents (of the given lengths, laid end to end from stream position 0)
    into windows of ``window`` tokens, long documents cut into overlapping pieces; ``strategy``:
    ``next_fit`` or ``best_fit``; ``split``: the token fractions of the parts packed apart (the
    documents past their sum are left out). See the module docstring."""
    # int32 lengths (a corpus' memory-mapped ones) are read as they are, not copied to int64: the
    # sums and products below that could pass 2**31 are made in int64.
    lengths = np.asarray(document_lengths)
    if lengths.dtype != np.int32 and lengths.dtype != np.int64:
        lengths = lengths.astype(np.int64)
    assert window >= 2 and lengths.ndim == 1 and np.all(lengths >= 0), (window, lengths.shape)
    assert strategy in ("next_fit", "best_fit"), strategy
    ends = np.cumsum(lengths, dtype=np.int64)
    parts, groups, offset = [], [], 0
    for a, b in _split_documents(ends, split):
        length = lengths[a:b]
        start = ends[a:b] - length
        nonempty = length > 0
        if not nonempty.all():
            start, length = start[nonempty], length[nonempty]
        start, length, cont = _cut(start, length, window)
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
    consecutive pieces: a block's pieces, longest first (stable among equal lengths), each go to
    the open window of the block with the least room that holds them, the one most recently given
    that room among equals, or to a new window when none does. Windows are numbered in the order
    they open; a window lists its pieces in corpus order."""
    n = len(piece_length)
    order = np.empty(n, dtype=np.int64)
    counts, n_windows = [], 0
    # Blocks go through in groups of about 2^20 pieces, as the rows of one array (the last block,
    # maybe shorter, as a row of its own): the sorts run once per group, the temporaries stay small.
    group = BEST_FIT_BLOCK * max(1, (1 << 20) // BEST_FIT_BLOCK)
    for lo in range(0, n, group):
        hi = min(n, lo + group)
        full = lo + (hi - lo) // BEST_FIT_BLOCK * BEST_FIT_BLOCK
        for a, b in ((lo, full), (full, hi)):
            if a == b:
                continue
            lengths = piece_length[a:b].reshape(-1, min(BEST_FIT_BLOCK, b - a))
            local = _best_fit_rows(lengths, window)  # each piece's window, numbered per block
            per_block = local.max(axis=1) + 1
            first = n_windows + np.cumsum(per_block) - per_block
            counts.append(np.bincount((local + (first - n_windows)[:, None]).ravel()))  # pieces per window
            # Each block's pieces by window, in corpus order within a window (a stable sort).
            by_window = np.argsort(_narrow(local, lengths.shape[1]), axis=1, kind="stable")
            order[a:b] = (by_window + (a + lengths.shape[1] * np.arange(len(lengths)))[:, None]).ravel()
            n_windows += int(per_block.sum())
    return order, np.concatenate([[0], np.cumsum(np.concatenate(counts or [[]]))]).astype(np.int64)


def _narrow(values: np.ndarray, bound: int) -> np.ndarray:
    """``values`` (all in [0, bound)) as uint16 when they fit: numpy's stable sort of 16-bit
    integers is a radix sort, an order of magnitude faster than its merge sort of int64."""
    return values.astype(np.uint16) if bound <= 1 << 16 else values


def _best_fit_rows(lengths: np.ndarray, window: int) -> np.ndarray:
    """Best fit decreasing on each row of ``lengths`` [blocks, pieces]: the window (0, 1, ... in
    the order they open) of each piece, in the row's order."""
    by_length = np.argsort(_narrow(window - lengths, window + 1), axis=1, kind="stable")  # longest first
    ordered = np.take_along_axis(lengths, by_length, axis=1)
    # A piece longer than half a window never fits beside another: the window it could join
    # already holds a piece at least as long. Those pieces lead the order and open a window each.
    alone = np.count_nonzero(2 * ordered > window, axis=1).tolist()
    placed = np.array([_best_fit_block(row[k:].tolist(), (window - row[:k]).tolist(), window, lengths.shape[1])
                       for row, k in zip(ordered, alone)], dtype=np.int64).reshape(lengths.shape)
    local = np.empty_like(placed)
    np.put_along_axis(local, by_length, placed, axis=1)
    return local


def _best_fit_block(lengths: list[int], alone_rooms: list[int], window: int, size: int) -> list[int]:
    """The windows of one block's pieces in best-fit order: ``alone_rooms`` is the room left in the
    windows that the leading pieces open alone, ``lengths`` the other pieces, longest first.

    The open windows that can take the current piece (room >= its length n) form a stack whose top
    is the one best fit picks, so no search is needed per piece. As n only decreases, a window
    whose room r is smaller than n waits ("pending") until the first piece with n <= r: then it
    holds every piece from there on, and its room is below every window already open for longer
    pieces (those have room >= the longer pieces), so it goes on top; windows that become open for
    the same piece go on in decreasing room, and among equal rooms the one given that room last
    goes on last. A window that takes a piece and keeps room r >= n is still the least room that
    holds the next piece: it stays on top, which is the common case (a window filling up with
    pieces of similar length). Otherwise it waits or is full, and the next one down is the top.

    A window is an int, room << 2b | stamp << b | window, on the stack and in the sorted
    ``pending`` list; the stamp decreases with every window put there, so the pending window with
    the most room, and among equals the one given that room first, is last. The top is kept
    apart, as its room and window."""
    b = size.bit_length()  # window numbers and stamps are below 2^b
    s = 2 * b
    mask = (1 << b) - 1
    stamp = mask
    alone = len(alone_rooms)
    placed = list(range(alone))
    pending = sorted((r << s) | ((stamp - w) << b) | w for w, r in enumerate(alone_rooms) if r)
    stamp -= alone
    most = pending[-1] >> s if pending else 0  # the most room of a pending window (0: none)
    stack: list[int] = []
    room = top = 0  # the top's room and window (room 0: no window can take the piece)
    opened = alone
    for n in lengths:
        if n <= most:  # pending windows that hold this piece go on top of the stack
            if room:
                stack.append((room << s) | top)
            least = n << s
            while pending and pending[-1] >= least:
                stack.append(pending.pop())
            most = pending[-1] >> s if pending else 0
            key = stack.pop()
            room, top = key >> s, key & mask
        if room:  # the top takes the piece
            r = room - n
            placed.append(top)
            if r >= n:
                room = r
                continue
            w = top
        else:  # no open window holds the piece: a new one
            w = opened
            opened += 1
            r = window - n
            placed.append(w)
            if r >= n:
                room, top = r, w
                continue
        if r:  # the window waits for a piece of at most r
            insort(pending, (r << s) | (stamp << b) | w)
            stamp -= 1
            if r > most:
                most = r
        if stack:  # the next one down is the top
            key = stack.pop()
            room, top = key >> s, key & mask
        else:
            room = 0
    return placed
