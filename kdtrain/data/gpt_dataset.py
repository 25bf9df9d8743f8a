"""Fixed-length GPT training windows over one or more tokenized corpora.

The token streams of all prefixes, in order, form one logical stream (nothing is copied). Window
i covers stream tokens [i*S, i*S + S + 1): S inputs plus the shifted labels, so consecutive
windows share one boundary token. The first windows form the train split and the next ones the
held-out split, as contiguous ranges. Training samples are drawn by a per-epoch permutation
seeded by (seed, epoch): sample g depends only on g and the seed, never on the parallel layout,
and resuming after N consumed samples is just continuing at g = N.

With ``packing="documents"`` or ``"best_fit"`` (kdtrain/data/packing.py) window i holds whole
documents instead, padded at the end, and the windows no longer overlap; the split is then made
on whole documents in corpus order (token fractions), before packing.

A corpus written from conversations carries a loss mask (kdtrain/data/indexed.py); the
``*_loss_mask`` methods return the target flags of a window's S labels (its tokens 1..S), with
every token of an unmasked corpus a target and padding never one, or None when every label of
every window is a target.

With ``document_positions`` (``data.attention: documents``) the ``*_positions`` methods return each
window token's position in its document (0 where a document, a packed piece or the padding
starts, and at the window's first token), from which the model masks attention between documents
(kdtrain/models/documents.py); without, they return None.
"""

from __future__ import annotations

import math

import numpy as np

from kdtrain.data.chat import reply_spans
from kdtrain.data.indexed import IndexedTokens, meta_path, open_indexed_dataset
from kdtrain.data.packing import pack_documents

PACKINGS = ("stream", "documents", "best_fit")
# A corpus whose metadata records no largest token id (written by another tool) is read whole at
# open to check its ids against the vocabulary up to this size (about a second); a larger one (a
# 1e12-token corpus is 4 TB, and every rank opens it) has each window's ids checked as it is read.
SCAN_AT_OPEN_BYTES = 1 << 30
SAMPLE_AT_OPEN = (16, 1 << 20)  # (slices, bytes each) of a larger one read at open all the same


def positions_from_starts(length: int, starts: np.ndarray) -> np.ndarray:
    """int64 [length]: each token's offset from the last document start at or before it, given the
    offsets ``starts`` (any order, repeats allowed) where documents start; offset 0 always starts one."""
    marks = np.zeros(length, dtype=bool)
    marks[0] = True
    marks[np.asarray(starts, dtype=np.int64)] = True
    index = np.arange(length, dtype=np.int64)
    return index - np.maximum.accumulate(np.where(marks, index, 0))


def _floor_fraction(n: int, fraction: float) -> int:
    # round() first so that e.g. 100 * 0.29 = 28.999999999999996 counts as 29.
    return math.floor(round(n * fraction, 9))


def check_same_tokenizer(streams: list[IndexedTokens]) -> None:
    """Corpora read together must have been tokenized alike (their metadata's fingerprints): ids of
    two tokenizers mixed in one run would train on nonsense without a word."""
    seen: dict[str, str] = {}
    for stream in streams:
        fp = (stream.meta or {}).get("tokenizer_fingerprint")
        if fp is not None:
            seen.setdefault(fp, stream.prefix)
    if len(seen) > 1:
        (fa, a), (fb, b) = list(seen.items())[:2]
        raise ValueError(f"data.path: corpus {a} was tokenized with tokenizer {fa} and corpus {b} with {fb} "
                         f"({meta_path(a)}, {meta_path(b)}): tokenize every corpus with the model's tokenizer")


def _foreign_id(prefix: str, top: int, vocab_size: int, at: str = "", why: str = "") -> ValueError:
    return ValueError(f"corpus {prefix} contains token id {top} >= vocab_size={vocab_size}{at}: it was tokenized "
                      f"with a different tokenizer/vocab than the model expects{why}")


class GPTWindowDataset:
    def __init__(
        self,
        prefixes: list[str],
        seq_length: int,
        split: tuple[float, float] = (0.98, 0.02),
        seed: int = 1234,
        vocab_size: int | None = None,
        tokenizer_fingerprint: str | None = None,
        tokenizer_name: str | None = None,
        loss_mask: bool = True,
        packing: str = "stream",
        document_positions: bool = False,
        require_held_out: bool = True,
    ):
        if isinstance(prefixes, str):
            prefixes = [prefixes]
        if not prefixes:
            raise ValueError("GPTWindowDataset needs at least one dataset prefix")
        if not isinstance(seq_length, int) or seq_length < 1:
            raise ValueError(f"seq_length must be a positive integer, got {seq_length!r}")
        if len(split) != 2 or any(f < 0 for f in split) or split[0] <= 0 or sum(split) > 1.0 + 1e-9:
            raise ValueError(f"split must be (train, held_out) fractions >= 0 with train > 0 and sum <= 1, got {split}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if packing not in PACKINGS:
            raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}")

        self.prefixes = [str(p) for p in prefixes]
        self.seq_length = seq_length
        self.split = (float(split[0]), float(split[1]))
        self.seed = seed
        self.streams: list[IndexedTokens] = [open_indexed_dataset(p) for p in self.prefixes]
        self._vocab_size = vocab_size
        # Streams whose ids are checked as read (SCAN_AT_OPEN_BYTES).
        self._check_as_read = {i for i, stream in enumerate(self.streams)
                               if not self._check_stream(stream, vocab_size, tokenizer_fingerprint, tokenizer_name)}
        check_same_tokenizer(self.streams)

        lengths = np.array([s.num_tokens for s in self.streams], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(lengths)])
        self.total_tokens = int(self._starts[-1])
        window = seq_length + 1
        self.packed = None
        if packing != "stream":
            lengths = [s.document_lengths for s in self.streams]
            self.packed = pack_documents(lengths[0] if len(lengths) == 1 else np.concatenate(lengths), window,
                                         "best_fit" if packing == "best_fit" else "next_fit", self.split)
            self.num_windows = self.packed.num_windows
            self._n_train, self._n_valid = self.packed.group_windows
        elif self.total_tokens < window:
            raise ValueError(
                f"corpus {', '.join(self.prefixes)} has {self.total_tokens} tokens, fewer than one window "
                f"of seq_length+1={window}"
            )
        else:
            self.num_windows = (self.total_tokens - 1) // seq_length
            self._n_train = _floor_fraction(self.num_windows, self.split[0])
            self._n_valid = _floor_fraction(self.num_windows, self.split[1])
        if self._n_train < 1:
            raise ValueError(
                f"train split {self.split[0]} of the {self.num_windows} windows of corpus "
                f"{', '.join(self.prefixes)} is empty"
            )
        if self.split[1] > 0 and self._n_valid < 1 and require_held_out:
            raise ValueError(
                f"held-out split {self.split[1]} requested, but corpus {', '.join(self.prefixes)} has only "
                f"{self.num_windows} windows of seq_length+1={window} tokens, so it gets none; use a larger "
                f"corpus, a larger held-out fraction or split[1]=0"
            )
        self._perms: dict[int, np.ndarray] = {}  # epoch -> permutation, the last two used
        # Conversations: a corpus' mask marks the replies (loss_mask=False ignores the masks, every
        # token is a target). Packed windows have target flags in any case: padding is none.
        self.conversations = loss_mask and any(stream.has_loss_mask for stream in self.streams)
        self.has_loss_mask = self.conversations or self.packed is not None
        self._pad_id = self.eos_id if self.eos_id is not None else 0
        self.document_positions = document_positions

    @staticmethod
    def _check_stream(stream: IndexedTokens, vocab_size: int | None, fingerprint: str | None,
                      name: str | None = None) -> bool:
        """Check the corpus' tokenizer and ids against the run's (``fingerprint``, ``name``: how the
        run names that tokenizer, for the error); False: its ids are left to be checked as read
        (SCAN_AT_OPEN_BYTES)."""
        if fingerprint is not None and stream.meta is not None:
            recorded = stream.meta.get("tokenizer_fingerprint")
            if recorded is not None and recorded != fingerprint:
                raise ValueError(
                    f"tokenizer mismatch for {stream.prefix}: {meta_path(stream.prefix)} records tokenizer "
                    f"fingerprint {recorded} (from {stream.meta.get('tokenizer_path')}), but "
                    f"{name or 'the configured tokenizer'} has fingerprint {fingerprint}: tokenize the corpus with "
                    "the run's tokenizer, or name the corpus' own"
                )
        if vocab_size is None or np.iinfo(stream.dtype).max < vocab_size:
            return True
        if not stream.records_max_token_id and stream.tokens.nbytes > SCAN_AT_OPEN_BYTES:
            # A sample at open still finds the usual mistake (a corpus of another tokenizer has
            # out-of-range ids everywhere): SAMPLE_AT_OPEN evenly spaced slices.
            slices, nbytes = SAMPLE_AT_OPEN
            n, step = stream.tokens.shape[0], max(1, nbytes // stream.tokens.itemsize)
            for start in np.linspace(0, max(0, n - step), slices if n else 0).astype(np.int64):
                top = int(np.asarray(stream.tokens[start: start + step]).max())
                if top >= vocab_size:
                    raise _foreign_id(stream.prefix, top, vocab_size)
            return False
        top = stream.max_token_id()
        if top >= vocab_size:
            raise _foreign_id(stream.prefix, top, vocab_size)
        return True

    @property
    def eos_id(self) -> int | None:
        """The EOS id the corpora were written with (their metadata), None when unknown or not shared."""
        ids = {None if s.meta is None else s.meta.get("eos_id") for s in self.streams}
        eos = ids.pop() if len(ids) == 1 else None
        return eos if eos is not None and eos >= 0 else None  # -1: written by a tokenizer without one

    @property
    def padding_share(self) -> float:
        """Share of the windows' tokens that are padding (packing by documents; 0 otherwise)."""
        return 0.0 if self.packed is None else self.packed.padding_share

    @property
    def cut_documents(self) -> int:
        """Packed pieces that continue a document cut at a window's end (0 without packing)."""
        return 0 if self.packed is None else self.packed.cut_documents

    @property
    def num_train_windows(self) -> int:
        return self._n_train

    @property
    def num_valid_windows(self) -> int:
        return self._n_valid

    def _read(self, pos: int, n: int, flags: bool = False) -> np.ndarray:
        """Tokens (or their target flags) [pos, pos + n) of the concatenated stream."""
        out = np.empty(n, dtype=bool if flags else np.int64)
        filled = 0
        i = int(np.searchsorted(self._starts, pos, side="right")) - 1
        while filled < n:
            local = pos - int(self._starts[i])
            take = min(n - filled, self.streams[i].num_tokens - local)
            if not flags:
                out[filled: filled + take] = self.streams[i].tokens[local: local + take]
                if i in self._check_as_read:
                    self._check_ids(i, local, out[filled: filled + take])
            elif self.conversations:
                out[filled: filled + take] = self.streams[i].loss_mask(local, local + take)
            else:
                out[filled: filled + take] = True
            filled += take
            pos += take
            i += 1
        return out

    def _check_ids(self, i: int, local: int, ids: np.ndarray) -> None:
        if ids.size and int(ids.max()) >= self._vocab_size:
            j = int(np.argmax(ids >= self._vocab_size))
            prefix = self.streams[i].prefix
            raise _foreign_id(prefix, int(ids[j]), self._vocab_size, f" (token {local + j})",
                              f" (its {meta_path(prefix)} records no max_token_id, so a corpus this large has its "
                              f"ids checked as they are read, not at start; scripts/preprocess_data.py records it)")

    def _document_starts(self, start: int, stop: int) -> np.ndarray:
        """Positions in [start, stop) of the concatenated stream where documents start (int64),
        from the corpora's indexes: no per-document array is built. Each corpus' first document
        starts where the corpus does."""
        found = [np.zeros(0, dtype=np.int64)]
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        while i < len(self.streams) and self._starts[i] < stop:
            offset, stream = int(self._starts[i]), self.streams[i]
            found.append(offset + stream.document_starts(max(start - offset, 0), min(stop - offset, stream.num_tokens)))
            i += 1
        return np.concatenate(found)

    def _check_window(self, w: int) -> None:
        if not 0 <= w < self.num_windows:
            raise IndexError(f"window index {w} out of range [0, {self.num_windows})")

    def window(self, w: int) -> np.ndarray:
        """Window w's S + 1 tokens, as int64: stream tokens [w*S, w*S + S + 1), or its packed
        documents followed by padding."""
        self._check_window(w)
        if self.packed is None:
            return self._read(w * self.seq_length, self.seq_length + 1)
        out = np.full(self.seq_length + 1, self._pad_id, dtype=np.int64)
        at = 0
        for pos, n, _ in self.packed.pieces(w):
            out[at: at + n] = self._read(pos, n)
            at += n
        return out

    def window_loss_mask(self, w: int) -> np.ndarray | None:
        """Target flags (bool) of window w's S labels, or None when every label is a target."""
        if not self.has_loss_mask:
            return None
        self._check_window(w)
        if self.packed is None:
            return self._read(w * self.seq_length + 1, self.seq_length, flags=True)
        out = np.zeros(self.seq_length + 1, dtype=bool)
        at = 0
        for pos, n, continues in self.packed.pieces(w):
            out[at: at + n] = self._read(pos, n, flags=True)
            # A continuation's first token was a label in the piece before; here it would be the
            # label of another document's last token.
            out[at] &= not continues
            at += n
        return out[1:]

    def window_content(self, w: int) -> int:
        """How many of window w's S + 1 tokens are data (the rest, of packed windows, padding)."""
        self._check_window(w)
        if self.packed is None:
            return self.seq_length + 1
        return sum(n for _, n, _ in self.packed.pieces(w))

    def window_positions(self, w: int) -> np.ndarray | None:
        """Each of window w's S + 1 tokens' position in its document (int64), or None without
        ``document_positions``."""
        if not self.document_positions:
            return None
        self._check_window(w)
        length = self.seq_length + 1
        if self.packed is None:
            a = w * self.seq_length
            return positions_from_starts(length, self._document_starts(a + 1, a + length) - a)
        ends = np.cumsum([n for _, n, _ in self.packed.pieces(w)])  # each piece starts a document; so does padding
        return positions_from_starts(length, ends[ends < length])

    def _permutation(self, epoch: int) -> np.ndarray:
        # Two epochs are kept: micro-batches of a step that straddles an epoch boundary are read
        # in interleaved order (a teacher replica serves several students), and each switch would
        # otherwise shuffle all the windows again.
        perm = self._perms.pop(epoch, None)
        if perm is None:
            # The order of permutation(n_train), which shuffles an int64 arange, at half the memory.
            perm = np.arange(self._n_train, dtype=np.uint32 if self._n_train <= 2**32 else np.int64)
            np.random.default_rng([self.seed, epoch]).shuffle(perm)
            if len(self._perms) == 2:
                del self._perms[next(iter(self._perms))]
        self._perms[epoch] = perm  # last in the dict: the most recently used
        return perm

    def train_window_index(self, g: int) -> int:
        """The window that global train sample g reads (any g >= 0; epochs repeat reshuffled)."""
        if g < 0:
            raise IndexError(f"train sample index must be >= 0, got {g}")
        epoch, position = divmod(int(g), self._n_train)
        return int(self._permutation(epoch)[position])

    def train_sample(self, g: int) -> np.ndarray:
        """Global train sample g: int64 array of seq_length + 1 tokens."""
        return self.window(self.train_window_index(g))

    def train_loss_mask(self, g: int) -> np.ndarray | None:
        return self.window_loss_mask(self.train_window_index(g))

    def train_positions(self, g: int) -> np.ndarray | None:
        return self.window_positions(self.train_window_index(g))

    def train_content(self, g: int) -> int:
        return self.window_content(self.train_window_index(g))

    def window_is_conversation(self, w: int) -> bool:
        """Whether window w reads a corpus whose mask marks replies (else every token is a target,
        or padding only): decided by the corpora the window reads, since ``data.path`` may list
        conversations and documents together."""
        if not self.conversations:
            return False
        if all(stream.has_loss_mask for stream in self.streams):
            return True
        self._check_window(w)
        if self.packed is None:
            spans = [(w * self.seq_length, self.seq_length + 1)]
        else:
            spans = [(pos, n) for pos, n, _ in self.packed.pieces(w)]
        for pos, n in spans:
            lo = int(np.searchsorted(self._starts, pos, side="right")) - 1
            hi = int(np.searchsorted(self._starts, pos + n - 1, side="right")) - 1
            if any(self.streams[i].has_loss_mask for i in range(lo, hi + 1)):
                return True
        return False

    def window_reply_spans(self, w: int) -> list[tuple[int, int]]:
        """The replies that start in window w (``chat.reply_spans`` of its target flags), less the
        rest of a reply that a packed piece carries on: a piece that continues a conversation cut
        inside a reply (its first token a target in the corpus) starts with that reply under way,
        though in the window its targets begin after the piece's first token."""
        spans = reply_spans(self.window_loss_mask(w))
        if self.packed is None:
            return spans
        carried, at = set(), 0
        for pos, n, continues in self.packed.pieces(w):
            if continues and self._read(pos, 1, flags=True)[0]:
                carried.add(at + 1)
            at += n
        return [span for span in spans if span[0] not in carried]

    def train_is_conversation(self, g: int) -> bool:
        """Whether train sample ``g``'s mask marks replies (``window_is_conversation``)."""
        return self.window_is_conversation(self.train_window_index(g))

    def train_reply_spans(self, g: int) -> list[tuple[int, int]]:
        return self.window_reply_spans(self.train_window_index(g))

    def valid_sample(self, j: int) -> np.ndarray:
        """Held-out sample j in [0, num_valid_windows), in corpus order."""
        if not 0 <= j < self._n_valid:
            raise IndexError(f"held-out sample index {j} out of range [0, {self._n_valid})")
        return self.window(self._n_train + int(j))

    def valid_loss_mask(self, j: int) -> np.ndarray | None:
        if not 0 <= j < self._n_valid:
            raise IndexError(f"held-out sample index {j} out of range [0, {self._n_valid})")
        return self.window_loss_mask(self._n_train + int(j))

    def valid_positions(self, j: int) -> np.ndarray | None:
        if not 0 <= j < self._n_valid:
            raise IndexError(f"held-out sample index {j} out of range [0, {self._n_valid})")
        return self.window_positions(self._n_train + int(j))
