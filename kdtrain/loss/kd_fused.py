"""The fused top-k KD loss: an ``autograd.Function`` over the kernels, and the dispatcher.

Two paths compute the same loss terms and gradient (same formulas, fp32 arithmetic):

* two-pass (any TP size): ``pass1`` -> cross-rank reduction -> ``pass2``, below. The logits are
  read twice and the gradient written once.
* single-read (one vocab shard: ``tp_group`` is None or of size 1, sm_90+): ``fused_single``
  (``csrc/kd_loss_single.cu``) reads each row once and writes its gradient once. One
  thread-block cluster per row: each CTA stages a contiguous slice of the row in shared memory
  (16-byte ``cp.async`` copies), computes pass 1's statistics of the slice from shared memory, and
  the CTAs exchange them through distributed shared memory: after a cluster barrier every CTA
  reads every rank's partial (max, sum-exp, tail max, tail sum, CE sum-exp) and merges them in rank order,
  so all CTAs hold bit-identical global statistics with no atomics; the student logits at the
  teacher's top-k ids and the CE label are read from the owning CTA's slice. Each CTA then
  evaluates pass 2's per-row terms (the same device functions) and writes its slice's gradient
  from shared memory; a second, split cluster barrier keeps every CTA resident until the others
  have finished reading its shared memory. Cluster size = the smallest power of two (<= 16) for
  which a slice fits 100 KiB of shared memory per CTA (two or three CTAs per SM; bf16 x 128256
  columns -> 4 CTAs of 67.5 KiB). Rows that do not fit, older GPUs and kernels built without
  sm_90 code fall back to the two-pass kernels. The path is opt-in (``KDTRAIN_KD_SINGLE_PASS=1``)
  until tests/test_kd_loss_gpu.py and bench_kd_loss.py have confirmed it on a Hopper GPU; by
  default every call takes the two-pass kernels.
  :func:`last_path` says which path the latest forward took.

Forward of the two-pass path (per token = one row of the ``[S*B, Vl]`` local logits):

1. ``pass1`` streams the shard once: row max and sum-exp of ``z / tau`` (online), the max and
   sum-exp of the columns outside the teacher's top-k K (the student tail, summed directly
   relative to its own maximum, so it cannot underflow below a far larger top-k), the student
   logits at the ids of K that fall in this shard, and for the hard-label CE the target logit
   and the temperature-1 sum-exp.
2. Between the passes the statistics become global over the TP group: one MAX all-reduce of the
   (row, tail) maxima, a rescale of each sum to its global maximum, one SUM all-reduce of the packed
   ``[S*B, 4 + k]`` statistics (every rank then holds all k student logits of K).
3. ``pass2`` computes the per-token loss terms from the statistics and the teacher payload, then
   streams the shard again writing ``row_weight * d loss_t / d z`` into a buffer in the logits'
   dtype (the gradient is computed in the forward, Liger-style). No full-vocab fp32 tensor exists.

Backward scales that buffer in place by ``grad_output`` (a kernel that exits at once when the
factor is 1) and returns it, so backward can run only once (no ``retain_graph``). For fp16 logits
the ``1 / num_tokens`` factor is applied in backward instead of the forward, so the per-token
gradients the forward stores are at full scale. The gradient returned is fp16 like the logits,
and ``grad_output / num_tokens`` of it underflows fp16 when a step holds many tokens (most entries
are 0 at 4M tokens): fp16 callers scale the loss (a ``grad_output`` of 2^k, as fp16 training
does). kdtrain's training computes in fp32 or bf16 (``precision.dtype``), which do not underflow.

Backends: the CUDA kernels (``csrc/``, see ``_ext.py``) or ``kd_emulate.TorchKernels``, a pure
torch emulation with the same interface that the CPU tests use (its ``fused_single`` is pass 1 +
pass 2, so the CPU tests exercise the dispatch). ``kd_loss`` picks the kernels on
CUDA when they load and the inputs suit them, else the reference (one warning per process).
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist

from ..parallel.groups import mark_agreed
from . import _ext
from .cross_entropy import vocab_shard
from .kd_checks import (KERNEL_MAX_TOPK, LOG_FLOOR, KDLossConfig, check_kd_inputs, check_teacher_tail, kd_input_stats,
                        raise_for_kd_input_stats)
from .kd_emulate import TorchKernels
from .kd_reference import kd_loss_reference, token_weights

IMPLS = ("auto", "fused", "emulated", "reference")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SINGLE_PASS_ENV = "KDTRAIN_KD_SINGLE_PASS"
_fallback_warned = False
_last_path: Optional[str] = None


def single_pass_enabled() -> bool:
    """The single-read path is allowed when ``KDTRAIN_KD_SINGLE_PASS=1`` (off by default)."""
    return os.environ.get(SINGLE_PASS_ENV, "0") == "1"


def last_path() -> Optional[str]:
    """``"single"`` or ``"two_pass"``: the path of the latest fused forward in this process."""
    return _last_path


@dataclass(frozen=True)
class KernelParams:
    """Scalars of one call, in the kernels' terms (see ``kd_emulate`` for their meaning)."""

    start: int
    real: int
    tau: float
    divergence: int  # 0 forward KL, 1 reverse KL, 2 JSD with 0 < beta < 1
    beta: float
    tail: bool
    has_tail: bool
    values_mode: int  # 0 log-probs, 1 logits + teacher tail lse, 2 logits normalised over K
    kd_scale: float
    alpha: float
    log_floor: float

    @property
    def dense(self) -> bool:
        """Whether the full-vocab statistics are needed (renorm without CE needs only K)."""
        return self.tail or self.alpha > 0

    @staticmethod
    def build(cfg: KDLossConfig, start: int, real: int, k: int, vocab_size: int, has_tail_lse: bool) -> "KernelParams":
        div = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}[cfg.divergence]
        if div == 2 and cfg.beta == 0.0:
            div = 0
        elif div == 2 and cfg.beta == 1.0:
            div = 1
        mode = 0 if cfg.values_are_logprobs else (1 if has_tail_lse else 2)
        return KernelParams(start, real, float(cfg.tau), div, float(cfg.beta), cfg.tail == "tail", k < vocab_size,
                            mode, (cfg.tau ** 2 if cfg.scale_by_tau_sq else 1.0), float(cfg.alpha), LOG_FLOOR)


class CudaKernels:
    """The compiled kernels behind the same interface as ``TorchKernels``."""

    name = "fused"

    def __init__(self, module):
        self.m = module

    def pass1(self, logits, ids, labels, start, real, tau, dense, ce):
        return self.m.kd_pass1(logits, ids, labels, start, real, tau, dense, ce)

    def pass2(self, logits, ids, values, teacher_tail_lse, labels, m2, stats, row_weight, start, real, tau,
              divergence, beta, tail, has_tail, values_mode, kd_scale, alpha, log_floor, write_grad):
        grad, terms = self.m.kd_pass2(logits, ids, values, teacher_tail_lse, labels, m2, stats, row_weight, start,
                                      real, tau, divergence, beta, tail, has_tail, values_mode, kd_scale, alpha,
                                      log_floor, write_grad)
        return (grad if write_grad else None), terms

    def single_supported(self, logits, k: int) -> bool:
        """Whether ``fused_single`` can run (the module has it, sm_90+, the row fits a cluster)."""
        return hasattr(self.m, "kd_fused_single") and bool(self.m.kd_single_supported(logits, k))

    def single_info(self, logits, k: int) -> tuple:
        """(cluster size, shared memory bytes per CTA, "ok" or why not) of the single-read path."""
        if not hasattr(self.m, "kd_single_info"):
            return 0, 0, "the kernel module has no single-read path (rebuild)"
        return tuple(self.m.kd_single_info(logits, k))

    def fused_single(self, logits, ids, values, teacher_tail_lse, labels, row_weight, start, real, tau, divergence,
                     beta, tail, has_tail, values_mode, kd_scale, alpha, log_floor, write_grad):
        grad, terms = self.m.kd_fused_single(logits, ids, values, teacher_tail_lse, labels, row_weight, start, real,
                                             tau, divergence, beta, tail, has_tail, values_mode, kd_scale, alpha,
                                             log_floor, write_grad)
        return (grad if write_grad else None), terms

    def scale_grad_(self, grad, factor):
        self.m.kd_scale_grad_(grad, factor)


def _reduce_between_passes(m2, stats, tau: float, group, dense: bool):
    """Make pass-1 statistics global: one MAX of the (row, tail) maxima [N, 2], each sum rescaled
    to its global maximum (Z and Z1 to the row's, T to the tail's), one SUM of the packed stats."""
    if dense:
        m_glob = m2.clone()
        dist.all_reduce(m_glob, op=dist.ReduceOp.MAX, group=group)
        live = m2 > float("-inf")
        zero = torch.zeros((), dtype=m2.dtype, device=m2.device)
        f = torch.where(live, torch.exp2(m2 - m_glob), zero)  # [N, 2]: (row, tail) factors
        stats[:, 0:2] *= f
        stats[:, 3] *= torch.where(live[:, 0], torch.exp2(tau * (m2[:, 0] - m_glob[:, 0])), zero)
        m2 = m_glob
    dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
    return m2, stats


class FusedKDLoss(torch.autograd.Function):
    """(logits [N, Vl], ids [N, k], values [N, k], teacher tail lse [N] | None, labels [N] | None,
    row_weight [N], post_scale, params, tp_group, backend) -> (loss, terms [N, 2]).

    ``loss = post_scale * sum_t row_weight_t * ((1 - alpha) * terms[t, 0] + alpha * terms[t, 1])``;
    ``terms`` (per-token KD and CE) carry no gradient."""

    @staticmethod
    def forward(ctx, logits, ids, values, teacher_tail_lse, labels, row_weight, post_scale, params: KernelParams,
                tp_group, backend):
        global _last_path
        ce = params.alpha > 0
        write_grad = bool(ctx.needs_input_grad[0])
        single_shard = tp_group is None or dist.get_world_size(tp_group) == 1
        if (single_shard and single_pass_enabled() and hasattr(backend, "fused_single")
                and backend.single_supported(logits, ids.shape[1])):
            _last_path = "single"
            grad, terms = backend.fused_single(logits, ids, values, teacher_tail_lse, labels if ce else None,
                                               row_weight, params.start, params.real, params.tau, params.divergence,
                                               params.beta, params.tail, params.has_tail, params.values_mode,
                                               params.kd_scale, params.alpha, params.log_floor, write_grad)
        else:
            _last_path = "two_pass"
            m2, stats = backend.pass1(logits, ids, labels if ce else None, params.start, params.real, params.tau,
                                      params.dense, ce)
            if not single_shard:
                m2, stats = _reduce_between_passes(m2, stats, params.tau, tp_group, params.dense)
            grad, terms = backend.pass2(logits, ids, values, teacher_tail_lse, labels if ce else None, m2, stats,
                                        row_weight, params.start, params.real, params.tau, params.divergence,
                                        params.beta, params.tail, params.has_tail, params.values_mode,
                                        params.kd_scale, params.alpha, params.log_floor, write_grad)
        loss_t = (1.0 - params.alpha) * terms[:, 0] + params.alpha * terms[:, 1]
        loss = (loss_t * row_weight.to(terms.dtype)).sum() * post_scale
        ctx.grad_buf, ctx.post_scale, ctx.backend = grad, post_scale, backend
        ctx.mark_non_differentiable(terms)
        return loss, terms

    @staticmethod
    def backward(ctx, grad_loss, grad_terms):
        grad = ctx.grad_buf
        if grad is None:
            raise RuntimeError("the fused KD loss computes its gradient in the forward and hands the buffer out "
                               "once: backward twice through it (retain_graph) is not supported")
        ctx.grad_buf = None
        fdt = torch.float64 if grad.dtype == torch.float64 else torch.float32
        factor = (grad_loss.to(fdt) * ctx.post_scale).to(fdt).reshape(1)  # post_scale may be a float64 count
        ctx.backend.scale_grad_(grad, factor)
        return grad, None, None, None, None, None, None, None, None, None


def _warn_fallback(reason: str) -> None:
    global _fallback_warned
    if not _fallback_warned:
        _fallback_warned = True
        warnings.warn(f"kdtrain: fused KD loss unavailable ({reason}); using the pure-torch reference "
                      f"(exact, but slower and it materialises fp32 full-vocab tensors)", RuntimeWarning,
                      stacklevel=3)


def select_impl(logits: torch.Tensor, k: int, impl: str = "auto") -> tuple[str, str]:
    """(implementation, reason) for these inputs: ``fused``, ``emulated`` or ``reference``."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {list(IMPLS)}, got {impl!r}")
    if impl == "auto":
        impl = os.environ.get("KDTRAIN_KD_IMPL", "auto")
        if impl not in IMPLS:
            raise ValueError(f"KDTRAIN_KD_IMPL must be one of {list(IMPLS)}, got {impl!r}")
    if impl in ("emulated", "reference"):
        return impl, "requested"
    why = None
    if logits.device.type != "cuda":
        why = f"logits on {logits.device.type}"
    elif logits.dtype not in KERNEL_DTYPES:
        why = f"logits dtype {logits.dtype} (the kernels take fp32/bf16/fp16)"
    elif k > KERNEL_MAX_TOPK:
        why = f"k={k} > {KERNEL_MAX_TOPK}"
    elif _ext.load_kernels() is None:
        why = _ext.extension_status()
    if why is None:
        return "fused", "kernels loaded"
    if impl == "fused":
        raise ValueError(f"impl='fused' cannot run: {why}")
    return "reference", why


def agree_impl(dtype: torch.dtype, device: torch.device, k: int, group=None) -> tuple[str, str]:
    """The (implementation, reason) that ``kd_loss(impl="auto")`` takes for ``dtype`` logits on
    ``device`` with top-``k`` payloads, resolved now (a kernel build happens at start-up, not in
    the first step) and checked to be the same on every rank of ``group``. Collective over
    ``group``. The fused and reference paths issue different collectives over the tensor group,
    so ranks on different implementations (a kernel build that failed on one node) would hang
    or mix their statistics at the first loss: that is an error on every rank here instead."""
    try:
        choice, why = select_impl(torch.empty(0, dtype=dtype, device=device), k)
        code, error = IMPLS.index(choice), None
    except (ValueError, RuntimeError) as e:  # impl='fused' that cannot run, a stale build lock
        code, error = len(IMPLS), e  # past every implementation's code: the others learn of it
    if group is not None and dist.get_world_size(group) > 1:
        # Every rank reaches this reduction, a failing one too: none is left waiting in it.
        bounds = torch.tensor([code, -code], dtype=torch.int64, device=device)
        dist.all_reduce(bounds, op=dist.ReduceOp.MAX, group=group)  # [max, -min] of the codes
        high, low = int(bounds[0]), -int(bounds[1])
        if error is None and high == len(IMPLS):
            error = RuntimeError("the KD loss's implementation could not be resolved on another rank of this "
                                 "model (its error is in that rank's output)")
        if error is None and high != low:
            other = IMPLS[high if high != code else low]
            error = RuntimeError(
                f"the KD loss would take different implementations on the ranks of one model: rank "
                f"{dist.get_rank()} takes {choice} ({why}), another rank {other}. Make the kernels load on every "
                "node (pip install --no-build-isolation -e .) or set KDTRAIN_KD_IMPL=reference on all ranks")
    if error is not None:
        raise error if group is None else mark_agreed(error, group)  # every rank of the group raises here
    return choice, why


def kd_loss(logits_SBVl: torch.Tensor, topk_ids_SBK: torch.Tensor, topk_values_SBK: torch.Tensor, *,
            vocab_size: int, config: KDLossConfig, tp_group=None, labels_SB: Optional[torch.Tensor] = None,
            loss_mask_SB: Optional[torch.Tensor] = None, num_tokens=None,
            teacher_tail_lse_SB: Optional[torch.Tensor] = None, validate: Union[bool, str] = True,
            impl: str = "auto") -> tuple[torch.Tensor, dict]:
    """Top-k KD loss (+ optional hard-label CE) over vocab-parallel student logits.

    Same arguments, semantics and ``(loss, report)`` result as
    :func:`~kdtrain.loss.kd_reference.kd_loss_reference`. ``impl``: ``auto`` (the CUDA kernels when
    they can run, else the reference with one warning per process; the environment variable
    ``KDTRAIN_KD_IMPL`` overrides ``auto``), ``fused`` (the kernels or a ``ValueError``),
    ``emulated`` (the kernels' algorithm in pure torch) or ``reference``. ``validate``: ``True``
    checks the teacher payload (:func:`check_kd_inputs`, one host sync); ``"deferred"`` runs the
    host-side checks and leaves the value checks' reduction on the device, with
    ``report["check"]``, a callable that raises the same ``ValueError`` when called (a training
    step calls it once its micro-batches are queued, instead of stalling on each); ``False``
    skips them.
    """
    cfg = config
    cfg.check()
    k = topk_ids_SBK.shape[-1] if isinstance(topk_ids_SBK, torch.Tensor) and topk_ids_SBK.dim() == 3 else 0
    choice, why = select_impl(logits_SBVl, k, impl)
    if isinstance(validate, str) and validate != "deferred":
        raise ValueError(f"kd_loss validate: True, False or 'deferred', got {validate!r}")
    deferred = validate == "deferred"
    if deferred:  # host-side checks now; the value checks' reduction is read by report["check"]()
        tp = dist.get_world_size(tp_group) if tp_group is not None else 1
        check_kd_inputs(logits_SBVl, topk_ids_SBK, topk_values_SBK, vocab_size, teacher_tail_lse_SB, labels_SB,
                        loss_mask_SB, config=cfg, tp_size=tp, check_values=False,
                        max_k=KERNEL_MAX_TOPK if choice == "fused" else None)
        stats = kd_input_stats(topk_ids_SBK, topk_values_SBK, vocab_size, teacher_tail_lse_SB, labels_SB, cfg)
    kwargs = dict(vocab_size=vocab_size, config=cfg, tp_group=tp_group, labels_SB=labels_SB,
                  loss_mask_SB=loss_mask_SB, num_tokens=num_tokens, teacher_tail_lse_SB=teacher_tail_lse_SB,
                  validate=bool(validate) and not deferred)
    if choice == "reference":
        if why != "requested" and logits_SBVl.is_cuda:  # on the host the reference is the only path: no news
            _warn_fallback(why)
        loss, report = kd_loss_reference(logits_SBVl, topk_ids_SBK, topk_values_SBK, **kwargs)
    else:
        loss, report = _kd_loss_two_pass(
            logits_SBVl, topk_ids_SBK, topk_values_SBK,
            backend=TorchKernels() if choice == "emulated" else CudaKernels(_ext.load_kernels()), **kwargs)
    if deferred:
        report["check"] = functools.partial(raise_for_kd_input_stats, stats, vocab_size, cfg)
    return loss, report


def _kd_loss_two_pass(logits_SBVl, topk_ids_SBK, topk_values_SBK, *, backend, vocab_size, config, tp_group,
                      labels_SB, loss_mask_SB, num_tokens, teacher_tail_lse_SB, validate):
    cfg = config
    tp = dist.get_world_size(tp_group) if tp_group is not None else 1
    tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
    if cfg.alpha > 0 and labels_SB is None:
        raise ValueError("loss.alpha > 0 needs labels for the hard-label cross entropy")
    if validate:
        check_kd_inputs(logits_SBVl, topk_ids_SBK, topk_values_SBK, vocab_size, teacher_tail_lse_SB, labels_SB,
                        loss_mask_SB, config=cfg, tp_size=tp,
                        max_k=KERNEL_MAX_TOPK if isinstance(backend, CudaKernels) else None)
    if isinstance(num_tokens, (int, float)) and not num_tokens > 0:
        raise ValueError(f"num_tokens must be positive, got {num_tokens}")
    S, B, Vl = logits_SBVl.shape
    k = topk_ids_SBK.shape[-1]
    N = S * B
    check_teacher_tail(cfg, teacher_tail_lse_SB is not None, k, vocab_size)
    start, real = vocab_shard(Vl, tp_rank, vocab_size)
    params = KernelParams.build(cfg, start, real, k, vocab_size, teacher_tail_lse_SB is not None)
    cd = backend.compute_dtype(logits_SBVl) if isinstance(backend, TorchKernels) else torch.float32

    logits = logits_SBVl.reshape(N, Vl)
    if not logits.is_contiguous():
        logits = logits.contiguous()
    ids = topk_ids_SBK.reshape(N, k).to(torch.int32).contiguous()
    values = topk_values_SBK.detach().reshape(N, k).to(cd).contiguous()
    tail_lse = teacher_tail_lse_SB.detach().reshape(N).to(cd).contiguous() if teacher_tail_lse_SB is not None else None
    labels = labels_SB.reshape(N).to(torch.int64).contiguous() if cfg.alpha > 0 else None
    valid = token_weights(loss_mask_SB, labels_SB, cfg.ignore_index,
                          torch.empty((S, B, 0), dtype=cd, device=logits.device)).reshape(N)
    n = valid.sum().clamp(min=1.0) if num_tokens is None else num_tokens
    if logits.dtype == torch.float16:  # keep fp16 per-token gradients at full scale; 1/n in backward
        row_weight, post_scale = valid.contiguous(), 1.0 / n
    else:
        row_weight, post_scale = (valid / n).to(cd).contiguous(), 1.0
    loss, terms = FusedKDLoss.apply(logits, ids, values, tail_lse, labels, row_weight, post_scale, params, tp_group,
                                    backend)
    kd_t, ce_t = terms[:, 0], terms[:, 1]
    loss_t = (1.0 - cfg.alpha) * kd_t + cfg.alpha * ce_t
    report = {"kd_sum": (kd_t * valid).sum(), "ce_sum": (ce_t * valid).sum(), "tokens": valid.sum(),
              "loss_SB": (loss_t * valid).view(S, B)}
    return loss, report
