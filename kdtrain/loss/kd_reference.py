"""Top-k distillation loss over vocab-parallel student logits: the pure-torch reference (the spec).

Per token, the teacher sends its top-k ids ``K`` with their logits ``z_T`` (or log-probs) and,
optionally, its log-normaliser ``lse_T = logsumexp(z_T / tau)`` over the full vocabulary. The
student holds a vocabulary shard of its logits ``z_S``. With temperature ``tau`` on both sides:

    q_i     = exp(z_S,i / tau - lse_S)          lse_S exact over the full vocabulary (all shards)
    p_i     = exp(z_T,i / tau - lse_T)          (log-probs are taken as given)

Tail handling over the support:
* ``tail``: a (k+1)-th bucket holds ``p_tail = 1 - sum_K p`` and ``q_tail = 1 - sum_K q``, so both
  are proper distributions over k+1 outcomes. ``q_tail`` is summed directly over the ids outside
  K (no cancellation). Without ``lse_T`` the teacher's tail mass is unknown and taken as 0.
* ``renorm``: both renormalised over K.

Divergences over that support (TRL's generalized JSD convention): ``forward_kl`` KL(p||q),
``reverse_kl`` KL(q||p), ``jsd`` with ``beta``: M = beta p + (1-beta) q,
JSD = beta KL(p||M) + (1-beta) KL(q||M), where beta = 0 is KL(p||q) and beta = 1 is KL(q||p).
Optional ``tau^2`` scaling of the KD term; optional hard-label cross entropy (at temperature 1)
mixed as ``(1 - alpha) KD + alpha CE``. The loss is the sum over valid tokens divided by
``num_tokens`` (the global valid-token count, so gradient accumulation is exact).

Tensor parallelism: every TP rank computes the same per-token loss. The shard-local pieces (row
max; sum-exp; sum-exp outside K; the student logits at the ids of K that fall in this shard; the
CE target logit) are combined by one MAX and one SUM all-reduce. The SUM's backward is the
identity (each rank holds a replica of everything downstream), so autograd gives each rank the
exact gradient of its own shard.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.distributed as dist

from ..config.loader import field_error
from .cross_entropy import vocab_shard


@dataclass
class KDLossConfig:
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = 0.5  # jsd only: weight of the teacher in the mixture
    tau: float = 1.0  # temperature on both sides
    scale_by_tau_sq: bool = False  # multiply the KD term by tau^2 (Hinton)
    tail: Literal["tail", "renorm"] = "tail"
    alpha: float = 0.0  # weight of the hard-label cross entropy
    values_are_logprobs: bool = False  # teacher values are log-probs at temperature tau
    ignore_index: int = -100  # labels equal to this are not counted

    def check(self, where: str = "loss") -> None:
        if not 0.0 <= self.beta <= 1.0:
            raise field_error(where, "beta", f"must be in [0, 1], got {self.beta}")
        if not self.tau > 0:
            raise field_error(where, "tau", f"must be positive, got {self.tau}")
        if not 0.0 <= self.alpha <= 1.0:
            raise field_error(where, "alpha", f"must be in [0, 1], got {self.alpha}")


class _SumOverTP(torch.autograd.Function):
    """All-reduce SUM forward, identity backward (the consumers are replicated on every rank)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def check_kd_inputs(logits_SBVl, ids_SBk, values_SBk, vocab_size, lse_SB=None, labels_SB=None) -> None:
    """Clear errors for payloads that do not fit the logits (one host sync)."""
    if logits_SBVl.dim() != 3:
        raise ValueError(f"student logits must be [S, B, V/tp], got shape {tuple(logits_SBVl.shape)}")
    SB = tuple(logits_SBVl.shape[:2])
    if ids_SBk.dim() != 3 or tuple(ids_SBk.shape[:2]) != SB or values_SBk.shape != ids_SBk.shape:
        raise ValueError(f"teacher payload ids {tuple(ids_SBk.shape)} / values {tuple(values_SBk.shape)} do not "
                         f"match student logits {tuple(logits_SBVl.shape)} (expected [S, B, k] with S, B = {SB})")
    if lse_SB is not None and tuple(lse_SB.shape) != SB:
        raise ValueError(f"teacher log-normaliser shape {tuple(lse_SB.shape)} != {SB}")
    if labels_SB is not None and tuple(labels_SB.shape) != SB:
        raise ValueError(f"labels shape {tuple(labels_SB.shape)} != {SB}")
    k = ids_SBk.shape[-1]
    if k > vocab_size:
        raise ValueError(f"top-k k={k} exceeds the vocabulary size {vocab_size}")
    if ids_SBk.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"teacher ids must be int32 or int64, got {ids_SBk.dtype}")
    if ids_SBk.numel():
        stats = torch.stack([ids_SBk.min().double(), ids_SBk.max().double(),
                             (~torch.isfinite(values_SBk)).sum().double()]).tolist()
        if stats[0] < 0 or stats[1] >= vocab_size:
            raise ValueError(f"teacher ids out of range [0, {vocab_size}): min {int(stats[0])}, max {int(stats[1])}")
        if stats[2]:
            raise ValueError(f"teacher values contain {int(stats[2])} NaN/inf entries")


def _xlogy_diff(p: torch.Tensor, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """p * (log p - log q), 0 where p == 0 (with a finite gradient there)."""
    safe = torch.where(p > 0, logp - logq, torch.zeros_like(logp))
    return p * safe


def _divergence(logP: torch.Tensor, logQ: torch.Tensor, cfg: KDLossConfig) -> torch.Tensor:
    """Sum over the last dim of the chosen divergence between P (teacher) and Q (student)."""
    P, Q = logP.exp(), logQ.exp()
    beta = cfg.beta
    if cfg.divergence == "forward_kl" or (cfg.divergence == "jsd" and beta == 0.0):
        return _xlogy_diff(P, logP, logQ).sum(-1)
    if cfg.divergence == "reverse_kl" or (cfg.divergence == "jsd" and beta == 1.0):
        return _xlogy_diff(Q, logQ, logP).sum(-1)
    logM = torch.logaddexp(logP + math.log(beta), logQ + math.log(1.0 - beta))
    return beta * _xlogy_diff(P, logP, logM).sum(-1) + (1.0 - beta) * _xlogy_diff(Q, logQ, logM).sum(-1)



def kd_loss_reference(logits_SBVl: torch.Tensor, ids_SBk: torch.Tensor, values_SBk: torch.Tensor, *,
                      vocab_size: int, config: KDLossConfig, tp_group=None,
                      labels_SB: Optional[torch.Tensor] = None, loss_mask_SB: Optional[torch.Tensor] = None,
                      num_tokens=None, teacher_lse_SB: Optional[torch.Tensor] = None,
                      validate: bool = True) -> tuple[torch.Tensor, dict]:
    """Returns ``(loss, report)``: loss = sum over valid tokens / num_tokens (a scalar with autograd
    to ``logits_SBVl``); report holds ``kd_sum``, ``ce_sum`` (sums over valid tokens, detached),
    ``tokens`` and the per-token ``loss_SB`` (detached)."""
    cfg = config
    if validate:
        check_kd_inputs(logits_SBVl, ids_SBk, values_SBk, vocab_size, teacher_lse_SB,
                        labels_SB if cfg.alpha > 0 else None)
    if cfg.alpha > 0 and labels_SB is None:
        raise ValueError("loss.alpha > 0 needs labels for the hard-label cross entropy")
    tp = dist.get_world_size(tp_group) if tp_group is not None else 1
    tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
    Vl, k = logits_SBVl.shape[-1], ids_SBk.shape[-1]
    start, real = vocab_shard(Vl, tp_rank, vocab_size)
    dtype = torch.float64 if logits_SBVl.dtype == torch.float64 else torch.float32

    z = logits_SBVl.to(dtype)
    if real < Vl:  # padding columns of the vocab table are not part of any distribution
        z = torch.cat([z[..., :real], torch.full_like(z[..., real:], float("-inf"))], dim=-1)
    zt = z / cfg.tau

    # Shard-local statistics, shifted by the global row max (constant, so no gradient).
    row_max = zt.detach().amax(dim=-1)
    if tp > 1:
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)
    ex = (zt - row_max.unsqueeze(-1)).exp()
    ids = ids_SBk.long()
    in_shard = (ids >= start) & (ids < start + real)
    local_ids = (ids - start).clamp(0, max(real - 1, 0))
    zk = zt.gather(-1, local_ids) * in_shard  # student logits / tau at K, 0 off-shard
    # Mass outside K, summed directly (no 1 - sum cancellation): count K's hits per column.
    hits = torch.zeros_like(ex).scatter_add_(-1, local_ids, in_shard.to(dtype))
    packed = [ex.sum(-1, keepdim=True), (ex * (hits == 0)).sum(-1, keepdim=True), zk]
    if cfg.alpha > 0:
        lab = labels_SB.long()
        lab_in = (lab >= start) & (lab < start + real)
        target = z.gather(-1, (lab - start).clamp(0, max(real - 1, 0)).unsqueeze(-1)) * lab_in.unsqueeze(-1)
        # CE is at temperature 1: sum exp(z - tau * row_max) shares the same row max.
        packed += [target, (z - (cfg.tau * row_max).unsqueeze(-1)).exp().sum(-1, keepdim=True)]
    stats = torch.cat(packed, dim=-1)
    if tp > 1:
        stats = _SumOverTP.apply(stats, tp_group)
    sum_exp, tail_exp, zk = stats[..., 0], stats[..., 1], stats[..., 2:2 + k]

    lse_s = row_max + sum_exp.log()
    logq = zk - lse_s.unsqueeze(-1)  # [S, B, k]

    v = values_SBk.to(dtype)
    if cfg.values_are_logprobs:
        logp = v
    elif teacher_lse_SB is not None:
        logp = v / cfg.tau - teacher_lse_SB.to(dtype).unsqueeze(-1)
    else:
        logp = torch.log_softmax(v / cfg.tau, dim=-1)  # unknown tail: the top-k carry all the mass

    if cfg.tail == "renorm":
        logP = torch.log_softmax(logp, dim=-1)
        logQ = torch.log_softmax(logq, dim=-1)
    else:
        # log(0) is floored at log(smallest normal) so no -inf enters a product or a gradient.
        # When K covers the whole vocabulary (no student mass outside it) the teacher's tail,
        # which is then only rounding error, is zero too.
        floor = math.log(torch.finfo(dtype).tiny)
        has_tail = tail_exp > 0
        p_tail = torch.where(has_tail, (1.0 - logp.exp().sum(-1)).clamp(min=0.0), torch.zeros_like(tail_exp))
        logq_tail = torch.where(has_tail, torch.where(has_tail, tail_exp, 1.0).log() - sum_exp.log(),
                                torch.full_like(tail_exp, floor))
        logp_tail = torch.where(p_tail > 0, torch.where(p_tail > 0, p_tail, 1.0).log(), torch.full_like(p_tail, floor))
        logP = torch.cat([logp, logp_tail.unsqueeze(-1)], dim=-1)
        logQ = torch.cat([logq, logq_tail.unsqueeze(-1)], dim=-1)
    kd_SB = _divergence(logP, logQ, cfg)
    if cfg.scale_by_tau_sq:
        kd_SB = kd_SB * cfg.tau ** 2

    valid = torch.ones_like(kd_SB) if loss_mask_SB is None else loss_mask_SB.to(dtype)
    if labels_SB is not None:
        valid = valid * (labels_SB != cfg.ignore_index)
    ce_SB = torch.zeros_like(kd_SB)
    if cfg.alpha > 0:
        target, sum_exp1 = stats[..., 2 + k], stats[..., 3 + k]
        ce_SB = cfg.tau * row_max + sum_exp1.log() - target
        ce_SB = torch.where(valid > 0, ce_SB, torch.zeros_like(ce_SB))
    loss_SB = (1.0 - cfg.alpha) * kd_SB + cfg.alpha * ce_SB
    n = valid.sum() if num_tokens is None else num_tokens
    loss = (loss_SB * valid).sum() / n
    report = {"kd_sum": (kd_SB * valid).sum().detach(), "ce_sum": (ce_SB * valid).sum().detach(),
              "tokens": valid.sum().detach(), "loss_SB": loss_SB.detach()}
    return loss, report
