"""One optimisation step of a role, and the reduction of its loss reports.

Shared by pretraining and distillation: only the forward step (and so the loss) differs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from ..parallel import RoleGroups
from .grads import GradBuffer
from .optimizer import AdamWOptimizer
from .pipeline import ForwardStep, PipelineSchedule


@dataclass
class StepResult:
    sums: dict[str, float]  # report values summed over micro-batches and replicas
    grad_norm: float
    skipped: bool  # non-finite gradient: the update was not applied


class SkippedSteps:
    """Steps skipped for a non-finite gradient norm: their total, and the run stopped once
    ``limit`` come in a row (``training.max_skipped_steps``; 0 never stops). The same on every rank:
    the norm is reduced over the whole model before the decision."""

    def __init__(self, limit: int):
        self.limit, self.total, self.streak = limit, 0, 0

    def update(self, step: int, result: StepResult) -> None:
        """After ``step`` (1-based): count it; ValueError when the streak reaches the limit."""
        if not result.skipped:
            self.streak = 0
            return
        self.total += 1
        self.streak += 1
        if self.limit and self.streak >= self.limit:
            raise ValueError(
                f"training.max_skipped_steps: {self.streak} steps in a row (steps {step - self.streak + 1}-{step}) "
                f"had a non-finite gradient norm ({result.grad_norm}) and were skipped: the run diverged. Resume "
                "from the last checkpoint (skipped steps leave the weights as they were) with a lower "
                "optimizer.lr or more warmup, or raise the limit (0: never stop)")


def global_token_count(microbatches: Sequence, groups: RoleGroups, device: torch.device) -> torch.Tensor:
    """Valid tokens in the whole global batch (summed over data-parallel replicas)."""
    # A fill kernel, not a host-to-device copy (which would wait for the work already queued).
    n = torch.full((), float(sum(mb.num_tokens for mb in microbatches)), dtype=torch.float32, device=device)
    if groups.layout.dp > 1:
        dist.all_reduce(n, group=groups.pgc.dp)
    # A batch without a target token (conversation windows that hold only prompts) has a zero
    # loss and zero gradients, not 0/0.
    return n.clamp_(min=1.0)


def reduce_reports(reports: list[dict], keys: Sequence[str], groups: RoleGroups, device: torch.device) -> dict[str, float]:
    """Sum report values over micro-batches and replicas; every rank of the role gets the result.

    Reports exist on the last pipeline stage only, identically on each of its tensor ranks, so
    only tensor rank 0 of the last stage contributes."""
    vec = torch.zeros(len(keys), dtype=torch.float64, device=device)
    if groups.is_last_stage and groups.tp_rank == 0:
        for r in reports:
            vec += torch.stack([torch.as_tensor(r[k], dtype=torch.float64, device=device) for k in keys])
    if groups.layout.num_ranks > 1:
        dist.all_reduce(vec, group=groups.role_group)
    return dict(zip(keys, vec.tolist()))


def train_step(schedule: PipelineSchedule, forward_step: ForwardStep, microbatches: Sequence,
               grads: GradBuffer, optimizer: AdamWOptimizer, groups: RoleGroups, lr: float, clip_grad: float,
               tie_embeddings: bool, report_keys: Sequence[str]) -> StepResult:
    device = grads.data.device
    total_tokens = global_token_count(microbatches, groups, device)
    grads.zero()
    reports = schedule.forward_backward(forward_step, microbatches, total_tokens)
    for report in reports:  # input checks a loss deferred to here (see kd_forward_step): before the update
        check = report.pop("check", None)
        if check is not None:
            check()
    # The tensor-parallel and tied-embedding sums commute with the data-parallel one; a sharded
    # buffer must take them before it (afterwards a rank holds the sums of its chunk only).
    grads.reduce_tp_partial(groups.pgc.tp)
    if grads.sharded:
        grads.sync_tied_embeddings(groups.pgc.embd, tie_embeddings)
    grads.reduce(groups.pgc.dp)
    if not grads.sharded:
        grads.sync_tied_embeddings(groups.pgc.embd, tie_embeddings)
    norm = grads.global_norm(groups.pgc.mp)
    skipped = not math.isfinite(norm)
    if not skipped:
        grads.clip(clip_grad, norm)
        optimizer.step(lr)
    return StepResult(reduce_reports(reports, report_keys, groups, device), norm, skipped)


@torch.no_grad()
def eval_step(schedule: PipelineSchedule, forward_step: ForwardStep, microbatches: Sequence,
              groups: RoleGroups, report_keys: Sequence[str]) -> dict[str, float]:
    device = schedule.link.device
    total_tokens = global_token_count(microbatches, groups, device)
    reports = schedule.forward_only(forward_step, microbatches, total_tokens)
    for report in reports:  # input checks the loss deferred (see train_step)
        check = report.pop("check", None)
        if check is not None:
            check()
    return reduce_reports(reports, report_keys, groups, device)
