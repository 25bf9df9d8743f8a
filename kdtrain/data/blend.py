"""Train samples drawn from several corpora in fixed proportions (``data.weights``).

Each corpus is its own ``GPTWindowDataset`` (own train/held-out split and own shuffle), and global
train sample ``g`` is taken from corpus ``c(g)`` by a fixed schedule: in every block of ``BLOCK``
consecutive samples, position ``i`` goes to the corpus with the largest deficit
``w_c * (i + 1) - picked_c(i)`` (weights normalised to sum 1; ties to the lower index), the greedy
interleaving megatron-core's blended datasets use. Over a block each corpus gets within one sample
of ``w_c * BLOCK``, and the block repeats, so after ``n`` samples the share of every corpus is
within ``1 / BLOCK`` of its weight (plus the partial block), and the corpora are interleaved
evenly rather than in runs.

Corpus ``c`` serves its own train samples ``0, 1, 2, ...`` in order (``block * n_c + rank of i
among the block's positions of c``), so it walks its own shuffled epochs and a small corpus
repeats (reshuffled) while a large one is still in its first epoch. As for one corpus, sample
``g`` depends only on ``g``, the weights and the seed: the same under any parallel layout and on
resume.

Held-out samples follow the same interleaving over the corpora that have held-out windows (each
cycling through its own), so any prefix of them, which is what an evaluation of ``n`` batches
reads, is a sample of the mixture the student trains on, not of the first corpus alone.
"""

from __future__ import annotations

import numpy as np

from kdtrain.data.gpt_dataset import GPTWindowDataset

BLOCK = 4096


def blend_schedule(weights: list[float], block: int = BLOCK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(corpus of each block position, its rank among that corpus' positions, samples per corpus
    per block) of the greedy interleaving (see the module docstring)."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    choice = np.empty(block, dtype=np.int64)
    rank = np.empty(block, dtype=np.int64)
    counts = np.zeros(len(w), dtype=np.int64)
    for i in range(block):
        c = int(np.argmax(w * (i + 1) - counts))
        choice[i], rank[i] = c, counts[c]
        counts[c] += 1
    return choice, rank, counts


class BlendedWindowDataset:
    """The GPTWindowDataset interface (train/valid samples, their loss masks and positions, the
    split sizes) over several corpora mixed by weight."""

    def __init__(self, components: list[GPTWindowDataset], weights: list[float]):
        assert len(components) == len(weights) >= 1 and all(w > 0 for w in weights), weights
        self.components = components
        self.weights = [float(w) for w in weights]
        self._choice, self._rank, self._per_block = blend_schedule(self.weights)
        if np.any(self._per_block == 0):
            starved = [i for i, n in enumerate(self._per_block) if n == 0]
            raise ValueError(f"data.weights: corpora {starved} would get no sample in {BLOCK} (weights {weights}); "
                             f"raise their weights above 1/{BLOCK} of the total")
        # Held-out: the same greedy schedule over the corpora with held-out windows.
        self._valid_ids = [i for i, c in enumerate(components) if c.num_valid_windows > 0]
        self._num_valid = sum(c.num_valid_windows for c in components)
        if self._valid_ids:
            choice, self._valid_rank, self._valid_per_block = blend_schedule([self.weights[i] for i in self._valid_ids])
            self._valid_choice = np.asarray(self._valid_ids)[choice]

    @property
    def num_train_windows(self) -> int:
        return sum(c.num_train_windows for c in self.components)

    @property
    def num_valid_windows(self) -> int:
        return self._num_valid

    def source_of(self, g: int) -> tuple[int, int]:
        """(corpus, that corpus' own train sample index) of global train sample ``g``."""
        if g < 0:
            raise IndexError(f"train sample index must be >= 0, got {g}")
        block, i = divmod(int(g), BLOCK)
        c = int(self._choice[i])
        return c, block * int(self._per_block[c]) + int(self._rank[i])

    def train_sample(self, g: int) -> np.ndarray:
        c, local = self.source_of(g)
        return self.components[c].train_sample(local)

    def train_loss_mask(self, g: int) -> np.ndarray | None:
        if not self.has_loss_mask:
            return None
        c, local = self.source_of(g)
        return self._mask_or_ones(self.components[c].train_loss_mask(local))

    def train_positions(self, g: int) -> np.ndarray | None:
        c, local = self.source_of(g)
        return self.components[c].train_positions(local)

    def train_is_conversation(self, g: int) -> bool:
        c, local = self.source_of(g)
        return self.components[c].train_is_conversation(local)

    def train_reply_spans(self, g: int) -> list[tuple[int, int]]:
        c, local = self.source_of(g)
        return self.components[c].train_reply_spans(local)

    def valid_source_of(self, j: int) -> tuple[int, int]:
        """(corpus, that corpus' own held-out window) of held-out sample ``j``: the blend's schedule
        over the corpora with held-out windows, each corpus' windows cycled (a weighted sample: a
        corpus whose weight asks for more samples than it has windows repeats some)."""
        if not 0 <= j < self.num_valid_windows:
            raise IndexError(f"held-out sample index {j} out of range [0, {self.num_valid_windows})")
        block, i = divmod(int(j), BLOCK)
        c = int(self._valid_choice[i])
        local = block * int(self._valid_per_block[self._valid_ids.index(c)]) + int(self._valid_rank[i])
        return c, local % self.components[c].num_valid_windows

    def valid_sample(self, j: int) -> np.ndarray:
        c, local = self.valid_source_of(j)
        return self.components[c].valid_sample(local)

    def valid_loss_mask(self, j: int) -> np.ndarray | None:
        if not self.has_loss_mask:
            return None
        c, local = self.valid_source_of(j)
        return self._mask_or_ones(self.components[c].valid_loss_mask(local))

    def valid_positions(self, j: int) -> np.ndarray | None:
        c, local = self.valid_source_of(j)
        return self.components[c].valid_positions(local)

    @property
    def eos_id(self) -> int | None:
        ids = {c.eos_id for c in self.components}
        return ids.pop() if len(ids) == 1 else None

    @property
    def has_loss_mask(self) -> bool:
        return any(c.has_loss_mask for c in self.components)

    @property
    def conversations(self) -> bool:
        return any(c.conversations for c in self.components)

    @property
    def padding_share(self) -> float:
        windows = [c.num_train_windows + c.num_valid_windows for c in self.components]
        return sum(c.padding_share * n for c, n in zip(self.components, windows)) / sum(windows)

    @property
    def cut_documents(self) -> int:
        return sum(c.cut_documents for c in self.components)

    def _mask_or_ones(self, mask: np.ndarray | None) -> np.ndarray:
        # A corpus without a mask, blended with one that has it: all its tokens are targets.
        return np.ones(self.components[0].seq_length, dtype=bool) if mask is None else mask
