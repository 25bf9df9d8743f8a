"""Losses over vocab-parallel logits."""

from ._ext import extension_status, load_kernels
from .cross_entropy import vocab_parallel_cross_entropy, vocab_shard
from .kd_checks import KERNEL_MAX_TOPK, KDLossConfig, check_kd_inputs
from .kd_fused import FusedKDLoss, agree_impl, kd_loss, select_impl
from .kd_reference import kd_dense_reference, kd_loss_reference

__all__ = ["vocab_parallel_cross_entropy", "vocab_shard", "KDLossConfig", "check_kd_inputs", "kd_loss",
           "kd_loss_reference", "kd_dense_reference", "FusedKDLoss", "select_impl", "agree_impl", "load_kernels",
           "extension_status", "KERNEL_MAX_TOPK"]
