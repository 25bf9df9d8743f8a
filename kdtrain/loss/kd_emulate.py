"""Pure-torch emulation of the fused KD-loss kernels (``csrc/kd_loss_kernel.cu``), same interface.

The CUDA kernels run only on a GPU; this backend lets the CPU test-suite drive the fused path's
``autograd.Function`` (cross-rank reduction between the passes, gradient computed in the forward,
row weights, grad_output scaling) and check the closed-form gradient below against autograd
through the reference. It mirrors the kernels step by step, vectorised over rows instead of one
CUDA block per row, and materialises full-vocab tensors (it is a test vehicle, not a fast path).

Kernel interface (units: ``m2`` is in base 2, ``m2 = max_j z_j * log2(e) / tau``):

``pass1(logits [N, Vl], ids [N, k] int32, labels [N] int64 | None, start, real, tau, dense, ce)
-> (m2 [N, 2], stats [N, 4 + k])``, over the shard's real columns ``[0, real)``; ``m2[:, 0]`` is
the row maximum ``m2`` above, ``m2[:, 1]`` the same maximum over the columns outside K, ``mt2``
(-inf when there is none):

    stats[:, 0] = Z  = sum_j 2^(z_j log2e / tau - m2)             (student sum-exp, KD temperature)
    stats[:, 1] = T  = sum_{j not in K} 2^(z_j log2e / tau - mt2)  (student tail, summed directly,
                                                                    relative to its own maximum)
    stats[:, 2] = z_y  if the label falls in this shard else 0      (CE target logit)
    stats[:, 3] = Z1 = sum_j 2^(z_j log2e - tau m2)                 (CE sum-exp at temperature 1)
    stats[:, 4+i] = z_{K_i} if K_i falls in this shard else 0       (raw student logits at K)

With ``dense=False`` (renorm without CE) the sums are skipped (0) and ``m2 = 0``. Between the
passes the caller makes the statistics global: MAX all-reduce of ``m2``, rescale of each sum to
its global maximum, one SUM all-reduce of ``stats``.

``pass2(logits, ids, values [N, k], teacher_tail_lse [N] | None, labels | None, m2, stats,
row_weight [N], start, real, tau, divergence, beta, tail, has_tail, values_mode, kd_scale,
alpha, log_floor, write_grad) -> (grad [N, Vl] in the logits dtype | None, terms [N, 2])``:
per-token ``terms = (kd_scale * D, CE)`` (0 where ``row_weight == 0``) and
``grad = row_weight * d loss_t / d z`` with ``loss_t = (1 - alpha) * terms[0] + alpha * terms[1]``.
``divergence``: 0 forward KL, 1 reverse KL, 2 JSD with ``0 < beta < 1``; ``values_mode``:
0 log-probs, 1 logits with ``teacher_tail_lse``, 2 logits normalised over K (teacher tail 0);
``tail``: tail bucket (else renormalisation over K); ``has_tail``: ``k < vocab_size``.

``fused_single(logits, ids, values, teacher_tail_lse, labels, row_weight, start, real, tau, divergence,
beta, tail, has_tail, values_mode, kd_scale, alpha, log_floor, write_grad) -> (grad | None, terms)``:
the single-read path for one vocab shard (``csrc/kd_loss_single.cu``), the same result as pass 2
after pass 1 with no reduction between them; ``single_supported(logits, k)`` says whether it runs.
Here it is literally pass 1 + pass 2.

``scale_grad_(grad, factor [1])``: ``grad *= factor`` (the kernel skips the pass when factor == 1).
"""

from __future__ import annotations

import math

import torch

from .kd_reference import log_ratio_to_mix

LOG2E = 1.0 / math.log(2.0)
LN2 = math.log(2.0)


def divergence_terms(P, logP, Q, logQ, divergence: int, beta: float):
    """Per-outcome divergence ``d_i`` and ``w_i = dD/dlog Q_i`` (up to ``c * Q_i`` for a constant c,
    which cancels because sum_i Q_i = 1 stays fixed; see csrc/kd_loss_kernel.cu)."""
    zero = torch.zeros((), dtype=P.dtype, device=P.device)
    if divergence == 0:  # KL(P||Q): d = P (log P - log Q), dD/dlogQ = -P
        d = torch.where(P > 0, P * (logP - logQ), zero)
        return d, -P
    if divergence == 1:  # KL(Q||P): dD/dlogQ = Q (log Q - log P) + Q; the "+ Q" is a constant shift
        d = torch.where(Q > 0, Q * (logQ - logP), zero)
        return d, d
    # JSD: M = beta P + (1 - beta) Q; dD/dQ_i = (1 - beta) log(Q_i / M_i) exactly. The log ratios
    # to M in the form that keeps a small beta exact (kd_reference.log_ratio_to_mix).
    log_beta, log_1m_beta = math.log(beta), math.log1p(-beta)
    kl_q = torch.where(Q > 0, Q * log_ratio_to_mix(logP - logQ, log_beta, log_1m_beta), zero)
    d = beta * torch.where(P > 0, P * log_ratio_to_mix(logQ - logP, log_1m_beta, log_beta), zero) + (1.0 - beta) * kl_q
    return d, (1.0 - beta) * kl_q


class TorchKernels:
    """The kernel interface in pure torch (any device, fp32 compute; fp64 for fp64 logits)."""

    name = "emulated"

    @staticmethod
    def compute_dtype(logits: torch.Tensor) -> torch.dtype:
        return torch.float64 if logits.dtype == torch.float64 else torch.float32

    def pass1(self, logits, ids, labels, start: int, real: int, tau: float, dense: bool, ce: bool):
        cd = self.compute_dtype(logits)
        N, Vl = logits.shape
        k = ids.shape[1]
        z = logits[:, :real].to(cd)
        stats = torch.zeros(N, 4 + k, dtype=cd, device=logits.device)
        m2 = torch.zeros(N, 2, dtype=cd, device=logits.device)
        ids = ids.long()
        in_shard = (ids >= start) & (ids < start + real)
        local = (ids - start).clamp(0, max(real - 1, 0))
        if dense:
            if real == 0:
                m2.fill_(float("-inf"))
            else:
                s2 = z * (LOG2E / tau)
                spare = torch.where(in_shard, local, torch.full_like(local, real))
                outside = torch.ones(N, real + 1, dtype=torch.bool, device=z.device).scatter(1, spare, False)[:, :real]
                s2_tail = torch.where(outside, s2, float("-inf"))
                m2 = torch.stack([s2.amax(dim=1), s2_tail.amax(dim=1)], dim=1)
                safe = torch.where(m2 == float("-inf"), torch.zeros_like(m2), m2)
                e = torch.exp2(s2 - safe[:, :1])
                stats[:, 0] = e.sum(1)
                stats[:, 1] = torch.exp2(s2_tail - safe[:, 1:]).sum(1)
                if ce:
                    stats[:, 3] = stats[:, 0] if tau == 1.0 else torch.exp2(tau * (s2 - safe[:, :1])).sum(1)
        if real > 0:
            stats[:, 4:] = torch.where(in_shard, z.gather(1, local), torch.zeros((), dtype=cd, device=z.device))
            if ce and labels is not None:
                lab = labels.long()
                lab_in = (lab >= start) & (lab < start + real)
                zy = z.gather(1, (lab - start).clamp(0, real - 1)[:, None])[:, 0]
                stats[:, 2] = torch.where(lab_in, zy, torch.zeros((), dtype=cd, device=z.device))
        return m2, stats

    def pass2(self, logits, ids, values, teacher_tail_lse, labels, m2, stats, row_weight, start: int, real: int,
              tau: float, divergence: int, beta: float, tail: bool, has_tail: bool, values_mode: int,
              kd_scale: float, alpha: float, log_floor: float, write_grad: bool):
        cd = stats.dtype
        N, Vl = logits.shape
        zero = torch.zeros((), dtype=cd, device=stats.device)
        Z, T, zy, Z1, zK = stats[:, 0], stats[:, 1], stats[:, 2], stats[:, 3], stats[:, 4:]
        m2, mt2 = m2[:, 0], m2[:, 1]
        live = row_weight != 0
        rw = row_weight.to(cd)
        sK = zK / tau
        v = values.to(cd)
        logP_t1 = None  # values_mode 1: the teacher's own tail, log P_t
        if values_mode == 0:
            lp = v
        elif values_mode == 1 and tail:  # softmax over K and the tail bucket (logit teacher_tail_lse)
            s, tl = v / tau, teacher_tail_lse.to(cd)[:, None]
            shift = torch.maximum(s.amax(1, keepdim=True), tl)
            lsum = (torch.exp(s - shift).sum(1, keepdim=True) + torch.exp(tl - shift)).log()
            lp, logP_t1 = (s - shift) - lsum, ((tl - shift) - lsum)[:, 0]
        elif values_mode == 1:
            lp = v / tau
        else:
            lp = torch.log_softmax(v / tau, dim=1)
        if tail:
            logP, logQ = lp, (sK - (m2 * LN2)[:, None]) - torch.where(Z > 0, Z, 1.0).log()[:, None]
        else:
            logP, logQ = torch.log_softmax(lp, dim=1), torch.log_softmax(sK, dim=1)
        P, Q = logP.exp(), logQ.exp()
        d, w = divergence_terms(P, logP, Q, logQ, divergence, beta)
        D, W = d.sum(1), w.sum(1)
        A = torch.zeros_like(D)  # gradient coefficient of the columns outside K (tail mode)
        if tail and has_tail:
            if logP_t1 is not None:  # floored only when the tail is empty (-inf)
                logP_t = torch.where(torch.isfinite(logP_t1), logP_t1, torch.full_like(logP_t1, log_floor))
                P_t = logP_t.exp()
            else:
                P_t = torch.zeros_like(D) if values_mode == 2 else (1.0 - P.sum(1)).clamp(min=0.0)
                logP_t = torch.where(P_t > 0, torch.where(P_t > 0, P_t, 1.0).log(), torch.full_like(P_t, log_floor))
            tpos = T > 0
            # T is relative to the tail's own maximum: log Q_t = (mt2 - m2) ln 2 + log T - log Z.
            gap = torch.where(tpos, mt2 - m2, zero) * LN2
            logQ_t = torch.where(tpos, gap + torch.where(tpos, T, 1.0).log() - torch.where(Z > 0, Z, 1.0).log(),
                                 torch.full_like(T, log_floor))
            Q_t = logQ_t.exp()
            d_t, w_t = divergence_terms(P_t, logP_t, Q_t, logQ_t, divergence, beta)
            w_t = torch.where(tpos, w_t, zero)  # a floored (empty) tail is a constant: no gradient path
            D, W = D + d_t, W + w_t
            A = torch.where(tpos, (w_t - Q_t * W) / torch.where(tpos, T, 1.0), zero)
        kd = torch.where(live, kd_scale * D, zero)
        ce = torch.zeros_like(kd)
        if alpha > 0:
            ce = torch.where(live, tau * m2 * LN2 + torch.where(Z1 > 0, Z1, 1.0).log() - zy, zero)
        terms = torch.stack([kd, ce], dim=1)
        if not write_grad:
            return None, terms

        # d loss_t / dz = a * dD/ds + alpha * (softmax_1(z) - onehot(y)), a = (1 - alpha) kd_scale / tau.
        a = (1.0 - alpha) * kd_scale / tau
        A2 = torch.where(live, rw * a * A, zero)
        B2 = torch.where(live, rw * alpha / torch.where(Z1 > 0, Z1, 1.0), zero) if alpha > 0 else None
        L2 = torch.where(live, rw * alpha, zero)
        fix = torch.where(live[:, None], rw[:, None] * a * (w - Q * W[:, None]), zero)
        g = torch.zeros(N, Vl + 1, dtype=cd, device=logits.device)  # spare last column for off-shard ids
        y_local = torch.full((N,), -1, dtype=torch.long, device=logits.device)
        if real > 0:
            z = logits[:, :real].to(cd)
            acc = torch.zeros_like(z)
            if tail and has_tail:  # A is relative to the tail's maximum (0 for a row without a tail)
                mk = torch.where(mt2 == float("-inf"), m2, mt2)
                acc += A2[:, None] * torch.exp2(z * (LOG2E / tau) - mk[:, None])
            if alpha > 0:
                acc += B2[:, None] * torch.exp2(z * LOG2E - (tau * m2)[:, None])
            g[:, :real] = acc
            if alpha > 0 and labels is not None:
                lab = labels.long()
                lab_in = (lab >= start) & (lab < start + real)
                y_local = torch.where(lab_in, lab - start, y_local)
                rows = torch.nonzero(lab_in).flatten()
                g[rows, y_local[rows]] -= L2[rows]
            ids = ids.long()
            in_shard = (ids >= start) & (ids < start + real)
            local = torch.where(in_shard, ids - start, torch.full_like(ids, Vl))
            vals = fix
            if alpha > 0:
                e1 = torch.exp2(z.gather(1, local.clamp(max=real - 1)) * LOG2E - (tau * m2)[:, None])
                vals = vals + B2[:, None] * e1 - L2[:, None] * (local == y_local[:, None])
            g.scatter_(1, local, vals)
        # A masked row is all zeros, as the kernel writes it (whatever its logits hold, NaN included).
        g = torch.where(live[:, None], g, zero)
        return g[:, :Vl].to(logits.dtype), terms

    def single_supported(self, logits, k: int) -> bool:
        return True

    def fused_single(self, logits, ids, values, teacher_tail_lse, labels, row_weight, start: int, real: int, tau: float,
                     divergence: int, beta: float, tail: bool, has_tail: bool, values_mode: int, kd_scale: float,
                     alpha: float, log_floor: float, write_grad: bool):
        ce = alpha > 0
        m2, stats = self.pass1(logits, ids, labels if ce else None, start, real, tau, tail or ce, ce)
        return self.pass2(logits, ids, values, teacher_tail_lse, labels, m2, stats, row_weight, start, real, tau,
                          divergence, beta, tail, has_tail, values_mode, kd_scale, alpha, log_floor, write_grad)

    @staticmethod
    def scale_grad_(grad: torch.Tensor, factor: torch.Tensor) -> None:
        if factor.device.type != "cpu" or float(factor) != 1.0:
            grad.mul_(factor)
