"""Seeded random token windows with the GPTWindowDataset interface, for benchmarks and smoke runs
that need no corpus (the equivalent of Megatron-LM's ``--mock-data``)."""

from __future__ import annotations

import numpy as np


class MockWindowDataset:
    def __init__(self, seq_length: int, vocab_size: int, seed: int = 1234, num_train: int = 1 << 20,
                 num_valid: int = 1024):
        self.seq_length = seq_length
        self.vocab_size = vocab_size
        self.seed = seed
        self.num_train_windows = num_train
        self.num_valid_windows = num_valid
        self.has_loss_mask = self.conversations = False
        self.padding_share = 0.0
        self.eos_id = None

    def _window(self, split: int, i: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, split, i])
        return rng.integers(0, self.vocab_size, size=self.seq_length + 1, dtype=np.int64)

    def train_sample(self, g: int) -> np.ndarray:
        return self._window(0, g % self.num_train_windows)

    def valid_sample(self, j: int) -> np.ndarray:
        return self._window(1, j % self.num_valid_windows)

    def train_loss_mask(self, g: int) -> None:
        return None

    def valid_loss_mask(self, j: int) -> None:
        return None

    def train_positions(self, g: int) -> None:
        return None

    def train_is_conversation(self, g: int) -> bool:
        return False

    def valid_positions(self, j: int) -> None:
        return None
