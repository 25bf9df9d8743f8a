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
resume. Held-out samples are the corpora's held-out windows, one corpus after another.
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
    """The GPTWindowDataset interface (train_sample, valid_sample and the split sizes) over
    several corpora mixed by weight."""

    def __init__(self, components: list[GPTWindowDataset], weights: list[float]):
        assert len(components) == len(weights) >= 1 and all(w > 0 for w in weights), weights
        self.components = components
        self.weights = [float(w) for w in weights]
        self._choice, self._rank, self._per_block = blend_schedule(self.weights)
        if np.any(self._per_block == 0):
            starved = [i for i, n in enumerate(self._per_block) if n == 0]
            raise ValueError(f"data.weights: corpora {starved} would get no sample in {BLOCK} (weights {weights}); "
                             f"raise their weights above 1/{BLOCK} of the total")
        self._valid_starts = np.cumsum([0] + [c.num_valid_windows for c in components])

    @property
    def num_train_windows(self) -> int:
        return sum(c.num_train_windows for c in self.components)

    @property
    def num_valid_windows(self) -> int:
        return int(self._valid_starts[-1])

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

    def valid_sample(self, j: int) -> np.ndarray:
        if not 0 <= j < self.num_valid_windows:
            raise IndexError(f"held-out sample index {j} out of range [0, {self.num_valid_windows})")
        c = int(np.searchsorted(self._valid_starts, j, side="right")) - 1
        return self.components[c].valid_sample(int(j - self._valid_starts[c]))
