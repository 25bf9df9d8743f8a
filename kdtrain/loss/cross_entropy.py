"""Cross entropy over vocab-parallel logits ``[S, B, Vl]`` (each tensor rank holds a vocab shard).

Computed in fp32 (fp64 for fp64 logits). The log-normaliser is exact over the real vocabulary: padding columns (ids >= vocab_size, added so
the table splits evenly across tensor ranks) are excluded. Two reductions over the TP group:
MAX of the row maxima, then SUM of (sum-exp, target logit) in one call. The softmax kept for
backward is the only logits-sized fp32 buffer; the gradient is ``softmax - onehot``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def vocab_shard(local_vocab: int, tp_rank: int, vocab_size: int) -> tuple[int, int]:
    """(first global id, number of real ids) of this rank's shard of a padded vocab table."""
    start = tp_rank * local_vocab
    return start, max(0, min(local_vocab, vocab_size - start))


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_SBVl, labels_SB, vocab_size, tp_group):
        tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
        local_vocab = logits_SBVl.shape[-1]
        start, real = vocab_shard(local_vocab, tp_rank, vocab_size)
        compute_dtype = torch.float64 if logits_SBVl.dtype == torch.float64 else torch.float32
        x = logits_SBVl.to(compute_dtype, copy=True)
        if real < local_vocab:
            x[..., real:] = float("-inf")
        row_max = x.max(dim=-1).values if real > 0 else torch.full(x.shape[:-1], float("-inf"), dtype=x.dtype,
                                                                    device=x.device)
        _all_reduce(row_max, dist.ReduceOp.MAX, tp_group)
        x.sub_(row_max.unsqueeze(-1))
        in_shard = (labels_SB >= start) & (labels_SB < start + real)
        local_ids = (labels_SB - start).clamp(0, local_vocab - 1)
        # where, not a product: on a rank whose shard is all padding the gathered value is -inf
        # and -inf * 0 is NaN (the sum over ranks then spreads it to every rank).
        target = torch.where(in_shard, x.gather(-1, local_ids.unsqueeze(-1)).squeeze(-1), 0.0)
        x.exp_()
        stats = torch.stack([x.sum(dim=-1), target])
        _all_reduce(stats, dist.ReduceOp.SUM, tp_group)
        sum_exp, target = stats[0], stats[1]
        loss = torch.log(sum_exp) - target
        x.div_(sum_exp.unsqueeze(-1))  # softmax, kept for backward
        ctx.save_for_backward(x, local_ids, in_shard)
        ctx.out_dtype = logits_SBVl.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss_SB):
        # Reuses the saved softmax buffer in place: like megatron-core's, backward runs once.
        softmax, local_ids, in_shard = ctx.saved_tensors
        grad = softmax
        grad.scatter_add_(-1, local_ids.unsqueeze(-1), -in_shard.unsqueeze(-1).to(grad.dtype))
        grad.mul_(grad_loss_SB.unsqueeze(-1))
        return grad.to(ctx.out_dtype), None, None, None


def vocab_parallel_cross_entropy(logits_SBVl: torch.Tensor, labels_SB: torch.Tensor, vocab_size: int,
                                 tp_group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Per-token cross entropy ``[S, B]`` (fp32) of vocab-parallel logits against global labels."""
    if labels_SB.shape != logits_SBVl.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels_SB.shape)} does not match logits {tuple(logits_SBVl.shape[:-1])}")
    return _VocabParallelCrossEntropy.apply(logits_SBVl, labels_SB, vocab_size, tp_group)
