"""Cross entropy over vocab-parallel logits ``[S, B, Vl]`` (each tensor rank holds a vocab shard).

Computed in fp32 (fp64 for fp64 logits). The log-normaliser is exact over the real vocabulary:
padding columns (ids >= vocab_size, added so the table splits evenly across tensor ranks) are
excluded. Two reductions over the TP group: MAX of the row maxima, then SUM of (sum-exp, target
logit) in one call.

The gradient ``softmax - onehot`` is computed in the forward, in the logits' dtype, and scaled
by the loss's gradient in backward (which therefore runs once, as megatron-core's). The fp32
upcast is done in chunks of rows of at most ``chunk_bytes``: nothing logits-sized in fp32 exists
(a bf16 [S*B, V] gradient, not an fp32 softmax beside the bf16 logits: at V = 262144, S = 32768,
one sequence, 16 GiB instead of 32). Three reads of the logits: the row maxima, the sums, the
gradient.
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


def _row_chunks(rows: int, cols: int, itemsize: int, chunk_bytes: int):
    step = max(1, chunk_bytes // max(1, cols * itemsize))
    for lo in range(0, rows, step):
        yield slice(lo, min(rows, lo + step))


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_SBVl, labels_SB, vocab_size, tp_group, chunk_bytes):
        tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
        *lead, local_vocab = logits_SBVl.shape
        start, real = vocab_shard(local_vocab, tp_rank, vocab_size)
        cd = torch.float64 if logits_SBVl.dtype == torch.float64 else torch.float32
        x = logits_SBVl.reshape(-1, local_vocab)  # [N, Vl]; a view for contiguous logits
        n = x.shape[0]
        labels = labels_SB.reshape(n)
        in_shard = (labels >= start) & (labels < start + real)
        local_ids = (labels - start).clamp(0, local_vocab - 1)
        chunks = list(_row_chunks(n, real, torch.finfo(cd).bits // 8, chunk_bytes))
        # Row maxima over the real ids; -inf on a rank whose shard is all padding.
        row_max = torch.full((n,), float("-inf"), dtype=cd, device=x.device)
        if real > 0:
            for r in chunks:
                row_max[r] = x[r, :real].max(dim=-1).values.to(cd)
        _all_reduce(row_max, dist.ReduceOp.MAX, tp_group)
        # where, not a product: the gathered value of a label outside the shard is any column's
        # (padding's may hold anything, even NaN), and on a rank whose shard is all padding
        # row_max is -inf: x - (-inf) = inf, and inf * 0 is NaN (which the sum over ranks spreads).
        target = torch.where(in_shard, x.gather(-1, local_ids.unsqueeze(-1)).squeeze(-1).to(cd) - row_max, 0.0)
        sum_exp = torch.zeros(n, dtype=cd, device=x.device)
        if real > 0:
            for r in chunks:
                sum_exp[r] = x[r, :real].to(cd, copy=True).sub_(row_max[r, None]).exp_().sum(dim=-1)
        stats = torch.stack([sum_exp, target])
        _all_reduce(stats, dist.ReduceOp.SUM, tp_group)
        sum_exp, target = stats[0], stats[1]
        loss = torch.log(sum_exp) - target
        if not ctx.needs_input_grad[0]:  # evaluation: no gradient to make
            return loss.view(*lead)
        grad = torch.empty_like(x)
        grad[:, real:] = 0  # padding columns
        if real > 0:
            at = local_ids.clamp(max=real - 1).unsqueeze(-1)  # the target's column where in_shard
            minus_one = -in_shard.unsqueeze(-1).to(cd)
            lse = row_max + torch.log(sum_exp)  # softmax = exp(x - lse): no division pass
            for r in chunks:  # softmax - onehot in fp32, rounded once to the gradient's dtype
                p = x[r, :real].to(cd, copy=True).sub_(lse[r, None]).exp_()
                grad[r, :real] = p.scatter_add_(-1, at[r], minus_one[r])
        ctx.save_for_backward(grad)
        ctx.shape, ctx.cd, ctx.chunk_bytes = logits_SBVl.shape, cd, chunk_bytes
        return loss.view(*lead)

    @staticmethod
    def backward(ctx, grad_loss_SB):
        # Scales the gradient made in the forward in place (like megatron-core's, backward runs
        # once), in fp32 chunks: the scale is not rounded to the gradient's dtype first.
        (grad,) = ctx.saved_tensors
        scale = grad_loss_SB.reshape(-1, 1).to(ctx.cd)
        if grad.dtype == ctx.cd:
            grad.mul_(scale)
        else:
            for r in _row_chunks(grad.shape[0], grad.shape[1], torch.finfo(ctx.cd).bits // 8, ctx.chunk_bytes):
                grad[r] = grad[r].to(ctx.cd).mul_(scale[r])
        return grad.view(ctx.shape), None, None, None, None


def vocab_parallel_cross_entropy(logits_SBVl: torch.Tensor, labels_SB: torch.Tensor, vocab_size: int,
                                 tp_group: Optional[dist.ProcessGroup] = None,
                                 chunk_bytes: int = 256 << 20) -> torch.Tensor:
    """Per-token cross entropy ``[S, B]`` (fp32) of vocab-parallel logits against global labels."""
    if labels_SB.shape != logits_SBVl.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels_SB.shape)} does not match logits {tuple(logits_SBVl.shape[:-1])}")
    return _VocabParallelCrossEntropy.apply(logits_SBVl, labels_SB, vocab_size, tp_group, chunk_bytes)
