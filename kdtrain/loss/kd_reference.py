"""Top-k distillation loss over vocab-parallel student logits: the pure-torch reference (the spec).

Per token, the teacher sends its top-k ids ``K`` (distinct global ids) with values ``v``: its
logits, or its log-probs at temperature ``tau`` (``values_are_logprobs``), and optionally the
log-mass of its tail ``tail_T = logsumexp over the ids outside K of z_T / tau`` (what a top-k
leaves out, summed over those ids by the teacher itself: exact however confident the teacher is).
The student holds one vocabulary shard of its logits ``z_S`` (columns ``>= vocab_size`` of a
padded table are excluded).

    q_i = exp(z_S,i / tau - lse_S)        lse_S exact over the full vocabulary (all TP shards)
    p_i = exp(v_i / tau - lse_T)          logits with tail_T: lse_T = logaddexp(logsumexp_K(v / tau), tail_T)
        = exp(v_i)                        log-probs, taken as given
        = softmax_K(v / tau)_i            logits without tail_T: the top-k hold all teacher mass

Tail handling over the support:

* ``tail`` (default): when ``k < vocab_size`` a (k+1)-th bucket holds the teacher's ``P_t =
  exp(tail_T - lse_T)`` (log-probs: ``max(0, 1 - sum_K p)``) and the student's ``Q_t = 1 - sum_K
  q``, so both are distributions over k+1 outcomes. ``Q_t`` is summed directly over the ids outside
  K, as ``tail_T`` is: no ``1 - sum`` cancellation, which would lose a confident teacher's tail
  (about 1e-10 next to a top-1 probability of 1) in rounding and charge reverse KL for a tail of 0;
  and it is summed relative to its own maximum, so a student tail far below its top-k (a collapsed
  student at a low temperature) keeps its value and its gradient. When ``k == vocab_size`` there is
  no bucket (both tails are 0 exactly). An empty tail bucket has its log floored at ``LOG_FLOOR =
  log(2^-126)`` (about -87.3, in every dtype; a teacher tail sent as ``tail_T`` is floored only when
  it is empty, -inf) and contributes ``0 * log 0 = 0`` as the first argument of a KL, so no NaN/inf
  enters values or gradients. A floored student tail (no finite logit outside K) is a constant: no
  gradient flows through it. With logits and no ``tail_T`` the teacher tail is 0; reverse KL (and
  JSD with beta = 1) then refuses to run in ``tail`` mode, since KL(Q||P) would be infinite: pass
  ``tail_T``, log-probs, or use ``renorm``.
* ``renorm``: both renormalised over K: ``P = softmax_K(log p)``, ``Q = softmax_K(z_S / tau)``.

Divergences over that support, TRL's generalized JSD convention (``GKDTrainer.generalized_jsd_loss``):
``forward_kl`` = KL(P||Q), ``reverse_kl`` = KL(Q||P), ``jsd`` with ``beta``:
``M = beta P + (1 - beta) Q``, ``JSD = beta KL(P||M) + (1 - beta) KL(Q||M)``, where ``beta = 0``
is special-cased to KL(P||Q) and ``beta = 1`` to KL(Q||P) (the mixture formula itself tends to 0
at both ends). Terms with zero mass in the first argument of a KL contribute 0.

Per token: ``loss_t = (1 - alpha) * c * D_t + alpha * CE_t`` with ``c = tau^2`` if
``scale_by_tau_sq`` else 1, and ``CE_t = logsumexp(z_S) - z_S[label]`` at temperature 1. The
loss is ``sum_t valid_t * loss_t / num_tokens`` where ``valid_t = loss_mask_t * (label_t !=
ignore_index)`` and ``num_tokens`` defaults to the local number of valid tokens (at least 1);
pass the global count so that gradient accumulation and data parallelism are exact.

Tensor parallelism: every TP rank computes the same per-token loss. The shard-local pieces (row max
and the maximum outside K; sum-exp; sum-exp outside K, relative to its own maximum; the student
logits at the ids of K that fall in this shard; the CE target logit and temperature-1 sum-exp) are
combined by one MAX and one SUM all-reduce. The SUM's backward is the identity (each rank holds a
replica of everything downstream), so autograd gives each rank the exact gradient of its own shard.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .cross_entropy import vocab_shard
from .kd_checks import LOG_FLOOR, KDLossConfig, check_kd_inputs, check_teacher_tail

__all__ = ["KDLossConfig", "check_kd_inputs", "kd_loss_reference", "kd_dense_reference", "token_weights"]


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


def _tp(group) -> tuple[int, int]:
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _kl_terms(a: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """a * (log a - log b) elementwise, 0 where a == 0 (with a finite gradient there)."""
    return a * torch.where(a > 0, log_a - log_b, torch.zeros_like(log_a))


def log_ratio_to_mix(d: torch.Tensor, log_a: float, log_b: float) -> torch.Tensor:
    """log(X / M) for the mixture M = a Y + b X (a + b = 1), from d = log Y - log X:
    -logaddexp(log a + d, log b). Written as ``log X - log M`` it is the difference of two O(1)
    logs whose value is O(a) for a small weight a, lost to rounding (at beta = 1e-6 the JSD
    gradient was 1% off in fp32); from d, with log a and log b exact, it keeps full precision."""
    return -torch.logaddexp(d + log_a, torch.full_like(d, log_b))


def divergence(logP: torch.Tensor, logQ: torch.Tensor, config: KDLossConfig) -> torch.Tensor:
    """Chosen divergence between teacher P and student Q (log-probabilities), summed over the last dim."""
    P, Q = logP.exp(), logQ.exp()
    beta = config.beta
    if config.divergence == "forward_kl" or (config.divergence == "jsd" and beta == 0.0):
        return _kl_terms(P, logP, logQ).sum(-1)
    if config.divergence == "reverse_kl" or (config.divergence == "jsd" and beta == 1.0):
        return _kl_terms(Q, logQ, logP).sum(-1)
    zero = torch.zeros((), dtype=P.dtype, device=P.device)
    log_beta, log_1m_beta = math.log(beta), math.log1p(-beta)
    log_q_m = log_ratio_to_mix(logP - logQ, log_beta, log_1m_beta)  # log(Q / M)
    log_p_m = log_ratio_to_mix(logQ - logP, log_1m_beta, log_beta)  # log(P / M)
    return (beta * (P * torch.where(P > 0, log_p_m, zero)).sum(-1)
            + (1.0 - beta) * (Q * torch.where(Q > 0, log_q_m, zero)).sum(-1))


def token_weights(loss_mask_SB, labels_SB, ignore_index: int, like: torch.Tensor) -> torch.Tensor:
    """valid_t = loss_mask_t * (label_t != ignore_index), in ``like``'s dtype and shape [S, B]."""
    valid = torch.ones(like.shape[:2], dtype=like.dtype, device=like.device) if loss_mask_SB is None \
        else loss_mask_SB.to(like.dtype)
    if labels_SB is not None:
        valid = valid * (labels_SB != ignore_index).to(like.dtype)
    return valid


def teacher_logprobs(values: torch.Tensor, teacher_tail_lse: Optional[torch.Tensor], config: KDLossConfig
                     ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(log p over the top-k ids, log P_t of the tail or None when not known from the inputs),
    in ``values``' dtype (see the module docstring)."""
    if config.values_are_logprobs:
        return values, None
    s = values / config.tau
    if teacher_tail_lse is not None:
        # Softmax over k + 1 outcomes, the tail one with logit tail_T: shifted by their maximum.
        tail = teacher_tail_lse.unsqueeze(-1)
        shift = torch.maximum(s.amax(dim=-1, keepdim=True), tail).detach()
        lse = shift + torch.logaddexp(torch.logsumexp(s - shift, dim=-1, keepdim=True), tail - shift)
        return s - lse, (tail - lse).squeeze(-1)
    return torch.log_softmax(s, dim=-1), None


def kd_loss_reference(logits_SBVl: torch.Tensor, topk_ids_SBK: torch.Tensor, topk_values_SBK: torch.Tensor, *,
                      vocab_size: int, config: KDLossConfig, tp_group=None,
                      labels_SB: Optional[torch.Tensor] = None, loss_mask_SB: Optional[torch.Tensor] = None,
                      num_tokens=None, teacher_tail_lse_SB: Optional[torch.Tensor] = None,
                      validate: bool = True) -> tuple[torch.Tensor, dict]:
    """Returns ``(loss, report)``: loss = sum over valid tokens / num_tokens (a scalar with autograd
    to ``logits_SBVl``, fp32, or fp64 for fp64 logits); report holds ``kd_sum``, ``ce_sum`` (sums over
    valid tokens of the unweighted per-token terms), ``tokens`` (valid count) and the per-token
    ``loss_SB`` (0 on masked tokens), all detached."""
    cfg = config
    cfg.check()
    tp, tp_rank = _tp(tp_group)
    if cfg.alpha > 0 and labels_SB is None:
        raise ValueError("loss.alpha > 0 needs labels for the hard-label cross entropy")
    if validate:
        check_kd_inputs(logits_SBVl, topk_ids_SBK, topk_values_SBK, vocab_size, teacher_tail_lse_SB, labels_SB,
                        loss_mask_SB, config=cfg, tp_size=tp)
    Vl, k = logits_SBVl.shape[-1], topk_ids_SBK.shape[-1]
    start, real = vocab_shard(Vl, tp_rank, vocab_size)
    check_teacher_tail(cfg, teacher_tail_lse_SB is not None, k, vocab_size)
    dtype = torch.float64 if logits_SBVl.dtype == torch.float64 else torch.float32

    # Masked tokens do not enter the loss: their inputs are replaced by zeros before any math, so a
    # non-finite logit there (0 * NaN is NaN) reaches neither the loss nor the gradient, as in the
    # fused path, which skips rows of weight 0.
    valid = token_weights(loss_mask_SB, labels_SB, cfg.ignore_index,
                          torch.empty(logits_SBVl.shape[:2] + (0,), dtype=dtype, device=logits_SBVl.device))
    live = valid > 0
    z = torch.where(live.unsqueeze(-1), logits_SBVl.to(dtype), torch.zeros((), dtype=dtype, device=valid.device))
    if real < Vl:  # padding columns of the vocab table are not part of any distribution
        z = torch.cat([z[..., :real], torch.full_like(z[..., real:], float("-inf"))], dim=-1)
    s = z / cfg.tau

    ids = topk_ids_SBK.long()
    in_shard = (ids >= start) & (ids < start + real)
    local_ids = (ids - start).clamp(0, Vl - 1)
    s_K = torch.where(in_shard, s.gather(-1, local_ids), torch.zeros((), dtype=dtype, device=s.device))
    # Columns of this shard outside K (ids of other shards go to a spare column that is dropped).
    spare = torch.where(in_shard, ids - start, torch.full_like(ids, Vl))
    outside_K = torch.ones(s.shape[:-1] + (Vl + 1,), dtype=torch.bool, device=s.device).scatter(
        -1, spare, False)[..., :Vl]
    s_tail = torch.where(outside_K, s, float("-inf"))
    # Shard-local statistics, shifted by global maxima (constants: no gradient through them): the
    # row's, and the tail's own, so that a tail far below the top-k cannot underflow to 0.
    maxima = torch.stack([s.detach().amax(dim=-1), s_tail.detach().amax(dim=-1)], dim=-1)
    if tp > 1:
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=tp_group)
    safe = torch.where(maxima == float("-inf"), torch.zeros_like(maxima), maxima)
    row_max, tail_max = safe[..., 0], safe[..., 1]
    ex = (s - row_max.unsqueeze(-1)).exp()
    packed = [ex.sum(-1, keepdim=True), (s_tail - tail_max.unsqueeze(-1)).exp().sum(-1, keepdim=True), s_K]
    if cfg.alpha > 0:
        lab = labels_SB.long()
        lab_in = (lab >= start) & (lab < start + real)
        target = torch.where(lab_in, z.gather(-1, (lab - start).clamp(0, Vl - 1).unsqueeze(-1)).squeeze(-1),
                             torch.zeros((), dtype=dtype, device=z.device))
        # CE is at temperature 1; max(z) = tau * max(z / tau), so it shares the row max.
        packed += [target.unsqueeze(-1), (z - (cfg.tau * row_max).unsqueeze(-1)).exp().sum(-1, keepdim=True)]
    stats = torch.cat(packed, dim=-1)
    if tp > 1:
        stats = _SumOverTP.apply(stats, tp_group)
    sum_exp, tail_exp, s_K = stats[..., 0], stats[..., 1], stats[..., 2:2 + k]

    v = torch.where(live.unsqueeze(-1), topk_values_SBK.to(dtype), torch.zeros((), dtype=dtype, device=z.device))
    tail_lse = None if teacher_tail_lse_SB is None else \
        torch.where(live, teacher_tail_lse_SB.to(dtype), torch.zeros((), dtype=dtype, device=z.device))
    logp, logp_tail = teacher_logprobs(v, tail_lse, cfg)
    if cfg.tail == "renorm":
        logP = torch.log_softmax(logp, dim=-1)
        logQ = torch.log_softmax(s_K, dim=-1)
    else:
        logq = (s_K - row_max.unsqueeze(-1)) - sum_exp.log().unsqueeze(-1)
        logP, logQ = logp, logq
        if k < vocab_size:
            if logp_tail is not None:  # the teacher's own tail sum: floored only when empty
                logp_tail = torch.where(torch.isfinite(logp_tail), logp_tail, torch.full_like(logp_tail, LOG_FLOOR))
            else:
                if cfg.values_are_logprobs:
                    p_tail = (1.0 - logp.exp().sum(-1)).clamp(min=0.0)
                else:  # normalised over K: no tail
                    p_tail = torch.zeros_like(sum_exp)
                logp_tail = torch.where(p_tail > 0, torch.where(p_tail > 0, p_tail, 1.0).log(),
                                        torch.full_like(p_tail, LOG_FLOOR))
            has_q = tail_exp > 0
            logq_tail = torch.where(has_q, (tail_max - row_max) + torch.where(has_q, tail_exp, 1.0).log()
                                    - sum_exp.log(), torch.full_like(tail_exp, LOG_FLOOR))
            logP = torch.cat([logp, logp_tail.unsqueeze(-1)], dim=-1)
            logQ = torch.cat([logq, logq_tail.unsqueeze(-1)], dim=-1)
    kd_SB = divergence(logP, logQ, cfg)
    if cfg.scale_by_tau_sq:
        kd_SB = kd_SB * cfg.tau ** 2

    ce_SB = torch.zeros_like(kd_SB)
    if cfg.alpha > 0:
        target, sum_exp1 = stats[..., 2 + k], stats[..., 3 + k]
        ce_SB = torch.where(valid > 0, cfg.tau * row_max + sum_exp1.log() - target, ce_SB)
    loss_SB = (1.0 - cfg.alpha) * kd_SB + cfg.alpha * ce_SB
    n = valid.sum().clamp(min=1.0) if num_tokens is None else num_tokens
    loss = (loss_SB * valid).sum() / n
    report = {"kd_sum": (kd_SB * valid).sum().detach(), "ce_sum": (ce_SB * valid).sum().detach(),
              "tokens": valid.sum().detach(), "loss_SB": (loss_SB * valid).detach()}
    return loss, report


def kd_dense_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor, config: KDLossConfig,
                       labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-token loss over the full vocabulary (no top-k, no TP): the dense baseline the
    benchmark compares against; ``[..., V]`` logits -> ``[...]`` fp32 (fp64 for fp64 logits).
    Materialises several full-vocab fp32 tensors: that is the point of the comparison."""
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    logQ = F.log_softmax(student_logits.to(dtype) / config.tau, dim=-1)
    logP = F.log_softmax(teacher_logits.to(dtype) / config.tau, dim=-1)
    out = divergence(logP, logQ, config) * (config.tau ** 2 if config.scale_by_tau_sq else 1.0)
    if config.alpha > 0 and labels is not None:
        ce = F.cross_entropy(student_logits.to(dtype).flatten(0, -2), labels.flatten().long(),
                             ignore_index=config.ignore_index, reduction="none").view(out.shape)
        out = (1.0 - config.alpha) * out + config.alpha * ce
    return out
