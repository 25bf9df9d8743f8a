"""Losses over vocab-parallel logits."""

from .cross_entropy import vocab_parallel_cross_entropy, vocab_shard
from .kd_reference import KDLossConfig, check_kd_inputs, kd_loss_reference

# The distillation loss used by training. The fused CUDA path dispatches here once it is built.
kd_loss = kd_loss_reference

__all__ = ["vocab_parallel_cross_entropy", "vocab_shard", "KDLossConfig", "check_kd_inputs", "kd_loss",
           "kd_loss_reference"]
