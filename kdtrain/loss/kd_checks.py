"""Configuration and input validation of the top-k distillation loss.

Every user error is a ``ValueError`` with a message that says what is wrong; config errors start
with the dotted field name (``loss.beta: ...``). :func:`check_kd_inputs` checks shapes, dtypes and
devices on the host and the payload's values with one fused reduction (one device-to-host copy),
so it is cheap enough to run every step.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from ..config.loader import field_error

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
TAIL_MODES = ("tail", "renorm")
KERNEL_MAX_TOPK = 1024  # one CUDA block per token keeps the k-sized arrays in shared memory
LOGPROB_SLACK = 1e-3  # teacher log-probs above this are taken for logits passed by mistake
LOG_FLOOR = math.log(2.0 ** -126)  # log of an empty tail bucket (smallest normal fp32), in every dtype


@dataclass
class KDLossConfig:
    """Options of the KD loss (see ``kdtrain/loss/kd_reference.py`` for the exact definitions)."""

    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = 0.5  # jsd only: weight of the teacher in the mixture; 0 -> forward KL, 1 -> reverse KL
    tau: float = 1.0  # temperature on both sides
    scale_by_tau_sq: bool = False  # multiply the KD term by tau^2 (Hinton)
    # tail: the mass outside the teacher's top-k is one more outcome on both sides (exact); renorm:
    # both distributions renormalised over the top-k ids (kd_reference.py)
    tail: Literal["tail", "renorm"] = "tail"
    alpha: float = 0.0  # loss = (1 - alpha) * KD + alpha * hard-label CE
    # For callers of the loss; a distillation run sends logits and its own labels (others refused):
    values_are_logprobs: bool = False  # teacher values are log-probs at temperature tau (not logits)
    ignore_index: int = -100  # labels equal to this are not counted

    def __post_init__(self):
        self.check()

    def check(self, where: str = "loss") -> None:
        if self.divergence not in DIVERGENCES:
            raise field_error(where, "divergence", f"{self.divergence!r} is not one of {list(DIVERGENCES)}")
        if self.tail not in TAIL_MODES:
            raise field_error(where, "tail", f"{self.tail!r} is not one of {list(TAIL_MODES)}")
        for name, lo, hi in (("beta", 0.0, 1.0), ("alpha", 0.0, 1.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not lo <= v <= hi:
                raise field_error(where, name, f"must be a number in [{lo:g}, {hi:g}], got {v!r}")
        if isinstance(self.tau, bool) or not isinstance(self.tau, numbers.Real) or not (
                math.isfinite(self.tau) and self.tau > 0):
            raise field_error(where, "tau", f"must be a finite positive number, got {self.tau!r}")
        for name in ("scale_by_tau_sq", "values_are_logprobs"):
            if not isinstance(getattr(self, name), bool):
                raise field_error(where, name, f"expected true/false, got {getattr(self, name)!r}")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, numbers.Integral):
            raise field_error(where, "ignore_index", f"expected an integer, got {self.ignore_index!r}")

    @property
    def kd_scale(self) -> float:
        """Factor of the divergence in the per-token loss: (1 - alpha) * (tau^2 if scaled)."""
        return (1.0 - self.alpha) * (self.tau ** 2 if self.scale_by_tau_sq else 1.0)


def check_teacher_tail(config: KDLossConfig, has_tail_lse: bool, k: int, vocab_size: int) -> None:
    """Reverse KL in tail mode needs the teacher's tail mass (else KL(Q||P) is infinite)."""
    reverse = config.divergence == "reverse_kl" or (config.divergence == "jsd" and config.beta == 1.0)
    if reverse and config.tail == "tail" and not has_tail_lse and not config.values_are_logprobs and k < vocab_size:
        raise ValueError("reverse KL with tail='tail' needs the teacher's tail mass: pass teacher_tail_lse_SB (or "
                         "log-prob values), or use tail='renorm'; without it the teacher tail is 0 and "
                         "KL(student||teacher) is infinite")


def _shape(t) -> tuple:
    return tuple(t.shape)


def check_kd_inputs(logits_SBVl: torch.Tensor, topk_ids_SBK: torch.Tensor, topk_values_SBK: torch.Tensor,
                    vocab_size: int, teacher_tail_lse_SB: Optional[torch.Tensor] = None,
                    labels_SB: Optional[torch.Tensor] = None, loss_mask_SB: Optional[torch.Tensor] = None, *,
                    config: Optional[KDLossConfig] = None, tp_size: int = 1, max_k: Optional[int] = None,
                    check_values: bool = True) -> None:
    """Raise ``ValueError`` when the teacher payload does not fit the student logits.

    Host-side checks: ranks, shapes, dtypes, devices, ``1 <= k <= vocab_size`` (and ``<= max_k``),
    the vocab table covering ``vocab_size`` over ``tp_size`` shards. With ``check_values``, one
    fused reduction (one host sync) checks: ids in ``[0, vocab_size)``, no repeated id within a
    token's top-k, finite teacher values, a tail log-mass that is not NaN or +inf (-inf: no mass
    outside K), log-probs ``<= 0`` when
    ``config.values_are_logprobs``, and labels in ``[0, vocab_size)`` or ``ignore_index`` when
    the hard-label CE is on (``config.alpha > 0``).
    """
    if not isinstance(logits_SBVl, torch.Tensor) or logits_SBVl.dim() != 3:
        raise ValueError(f"student logits must be a tensor [S, B, V/tp], got shape "
                         f"{_shape(logits_SBVl) if isinstance(logits_SBVl, torch.Tensor) else type(logits_SBVl)}")
    if not logits_SBVl.is_floating_point():
        raise ValueError(f"student logits must be floating point, got {logits_SBVl.dtype}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    S, B, Vl = logits_SBVl.shape
    if Vl < 1:
        raise ValueError("student logits have an empty vocab dimension")
    if Vl * tp_size < vocab_size:
        raise ValueError(f"student logits hold {Vl} vocab columns per rank x {tp_size} ranks = {Vl * tp_size} < "
                         f"vocab_size {vocab_size}: ids beyond the table would be lost")
    for name, t in (("teacher top-k ids", topk_ids_SBK), ("teacher top-k values", topk_values_SBK)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or _shape(t)[:2] != (S, B):
            raise ValueError(f"{name} shape {_shape(t) if isinstance(t, torch.Tensor) else type(t)} does not match "
                             f"student logits {_shape(logits_SBVl)}: expected [S, B, k] with S, B = {S}, {B}")
    if topk_values_SBK.shape != topk_ids_SBK.shape:
        raise ValueError(f"teacher top-k values {_shape(topk_values_SBK)} and ids {_shape(topk_ids_SBK)} do not match")
    k = topk_ids_SBK.shape[-1]
    if k < 1:
        raise ValueError("teacher top-k is empty (k = 0)")
    if k > vocab_size:
        raise ValueError(f"top-k k={k} exceeds the vocabulary size {vocab_size}")
    if max_k is not None and k > max_k:
        raise ValueError(f"top-k k={k} exceeds the fused kernel's limit of {max_k}")
    if topk_ids_SBK.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"teacher top-k ids must be int32 or int64, got {topk_ids_SBK.dtype}")
    if not topk_values_SBK.is_floating_point():
        raise ValueError(f"teacher top-k values must be floating point, got {topk_values_SBK.dtype}")
    optional = {"teacher tail log-mass": teacher_tail_lse_SB, "labels": labels_SB, "loss mask": loss_mask_SB}
    for name, t in optional.items():
        if t is not None and (not isinstance(t, torch.Tensor) or _shape(t) != (S, B)):
            raise ValueError(f"{name} shape {_shape(t) if isinstance(t, torch.Tensor) else type(t)} does not match "
                             f"[S, B] = {(S, B)}")
    if teacher_tail_lse_SB is not None and not teacher_tail_lse_SB.is_floating_point():
        raise ValueError(f"teacher tail log-mass must be floating point, got {teacher_tail_lse_SB.dtype}")
    if labels_SB is not None and (labels_SB.is_floating_point() or labels_SB.is_complex()):
        raise ValueError(f"labels must be integer token ids, got {labels_SB.dtype}")
    dev = logits_SBVl.device
    for name, t in {"teacher top-k ids": topk_ids_SBK, "teacher top-k values": topk_values_SBK, **optional}.items():
        if t is not None and t.device != dev:
            raise ValueError(f"{name} are on {t.device} but the student logits are on {dev}")
    if config is not None:
        check_teacher_tail(config, teacher_tail_lse_SB is not None, k, vocab_size)
    if not check_values or topk_ids_SBK.numel() == 0:
        return
    raise_for_kd_input_stats(kd_input_stats(topk_ids_SBK, topk_values_SBK, vocab_size, teacher_tail_lse_SB, labels_SB,
                                            config), vocab_size, config)


def kd_input_stats(topk_ids_SBK: torch.Tensor, topk_values_SBK: torch.Tensor, vocab_size: int,
                   teacher_tail_lse_SB: Optional[torch.Tensor] = None, labels_SB: Optional[torch.Tensor] = None,
                   config: Optional[KDLossConfig] = None) -> torch.Tensor:
    """The value checks of :func:`check_kd_inputs` as one float64 device tensor, without a host
    sync: [min id, max id, non-finite values, repeated ids, NaN/+inf tail log-masses, max value
    (log-probs only), bad labels (CE only)]. :func:`raise_for_kd_input_stats` reads it."""
    dev = topk_ids_SBK.device
    k = topk_ids_SBK.shape[-1]
    zero = torch.zeros((), dtype=torch.float64, device=dev)
    if topk_ids_SBK.numel() == 0:
        return torch.stack([zero] * 7)
    ids = topk_ids_SBK.reshape(-1, k)
    vals = topk_values_SBK.detach()
    stats = [ids.min().double(), ids.max().double(), (~torch.isfinite(vals)).sum().double()]
    if k > 1:
        srt = ids.sort(dim=-1).values
        stats.append((srt[:, 1:] == srt[:, :-1]).sum().double())
    else:
        stats.append(zero)
    if teacher_tail_lse_SB is not None:  # -inf is a tail of no mass; NaN and +inf are not masses
        tail = teacher_tail_lse_SB.detach()
        stats.append((torch.isnan(tail) | torch.isposinf(tail)).sum().double())
    else:
        stats.append(zero)
    logprobs = config is not None and config.values_are_logprobs
    stats.append(vals.max().double() if logprobs else zero)
    if labels_SB is not None and config is not None and config.alpha > 0:
        bad = ((labels_SB < 0) | (labels_SB >= vocab_size)) & (labels_SB != config.ignore_index)
        stats.append(bad.sum().double())
    else:
        stats.append(zero)
    return torch.stack(stats)


def raise_for_kd_input_stats(stats: torch.Tensor, vocab_size: int, config: Optional[KDLossConfig] = None) -> None:
    """Raise ``ValueError`` for what :func:`kd_input_stats` found (one host sync)."""
    lo, hi, nonfinite, dups, tail_bad, vmax, bad_labels = stats.tolist()
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"teacher top-k ids out of range [0, {vocab_size}): min {int(lo)}, max {int(hi)}")
    if nonfinite:
        raise ValueError(f"teacher top-k values contain {int(nonfinite)} NaN/inf entries")
    if dups:
        raise ValueError(f"teacher top-k ids repeat an id within a token's top-k ({int(dups)} repeats)")
    if tail_bad:
        raise ValueError(f"teacher tail log-mass contains {int(tail_bad)} NaN/+inf entries")
    if config is not None and config.values_are_logprobs and vmax > LOGPROB_SLACK:
        raise ValueError(f"values_are_logprobs is set but a teacher value is {vmax:.4g} > 0: these look like logits")
    if bad_labels:
        raise ValueError(f"{int(bad_labels)} labels are outside [0, {vocab_size}) and not ignore_index "
                         f"{config.ignore_index}")
