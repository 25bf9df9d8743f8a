"""Losses over vocab-parallel logits."""

from .cross_entropy import vocab_parallel_cross_entropy, vocab_shard

__all__ = ["vocab_parallel_cross_entropy", "vocab_shard"]
