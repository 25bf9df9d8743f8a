"""Pipeline-parallel schedule (1F1B) with explicit process groups, on any device.

megatron-core 0.16.1's schedules and p2p layer allocate on ``torch.cuda.current_device()``, so
they cannot run in CPU CI; this is a small device-agnostic equivalent used on CPU and GPU alike.

Contract (Megatron-LM's, with the normalisation moved into the loss): ``forward_step(model,
microbatch) -> (output, loss_func)``. On the last stage ``loss_func(output, total_tokens) ->
(loss, num_tokens, report)`` where ``total_tokens`` is the global number of valid tokens in the
step and ``loss`` is this micro-batch's share of the per-token mean (its loss sum divided by
``total_tokens``), so gradients are those of the mean over the whole global batch however it is
split into micro-batches and data-parallel replicas. The schedule back-propagates ``loss`` with
gradient 1: a loss that computes its gradient in the forward (the fused KD loss) then needs no
rescaling pass in backward. A report may carry ``"check"``, a callable that ``train_step`` calls
once every micro-batch's backward is queued and before the update (input checks read without a
host sync per micro-batch).

1F1B on stage r of P with M micro-batches: ``min(P - r - 1, M)`` warm-up forwards, then
alternating one-forward-one-backward, then the remaining backwards. At most P - r activations are
alive per stage. Activations ``[s, b, h]`` move between neighbouring stages with batched
isend/irecv on the role's pipeline group.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from ..parallel import RoleGroups

LossFunc = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict]]
ForwardStep = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, LossFunc]]


@dataclass
class StageLink:
    """Point-to-point links of one pipeline stage to its neighbours."""

    groups: RoleGroups
    shape: tuple[int, ...]  # activation shape [s, b, h]
    dtype: torch.dtype
    device: torch.device

    def __post_init__(self):
        g = self.groups
        self.pp_group = g.pgc.pp
        self.prev = None if g.is_first_stage else g.stage_rank(g.pp_rank - 1)
        self.next = None if g.is_last_stage else g.stage_rank(g.pp_rank + 1)

    def exchange(self, send_next: Optional[torch.Tensor] = None, send_prev: Optional[torch.Tensor] = None,
                 recv_prev: bool = False, recv_next: bool = False):
        """Post all requested sends/receives at once and wait; returns (from_prev, from_next)."""
        ops, from_prev, from_next = [], None, None
        if recv_prev and self.prev is not None:
            from_prev = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            ops.append(dist.P2POp(dist.irecv, from_prev, self.prev, self.pp_group))
        if send_next is not None and self.next is not None:
            ops.append(dist.P2POp(dist.isend, send_next.detach().contiguous(), self.next, self.pp_group))
        if send_prev is not None and self.prev is not None:
            ops.append(dist.P2POp(dist.isend, send_prev.detach().contiguous(), self.prev, self.pp_group))
        if recv_next and self.next is not None:
            from_next = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            ops.append(dist.P2POp(dist.irecv, from_next, self.next, self.pp_group))
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        if from_prev is not None:
            from_prev.requires_grad_()
        return from_prev, from_next


class PipelineSchedule:
    """Runs the micro-batches of one step through this rank's stage."""

    def __init__(self, model: torch.nn.Module, groups: RoleGroups, activation_shape: tuple[int, ...],
                 dtype: torch.dtype, device: torch.device):
        self.model = model
        self.groups = groups
        self.link = StageLink(groups, activation_shape, dtype, device)
        self.num_stages = groups.layout.pp

    def _forward(self, forward_step: ForwardStep, microbatch, input_tensor, total_tokens, reports):
        if self.num_stages > 1:
            self.model.set_input_tensor(input_tensor)
        output, loss_func = forward_step(self.model, microbatch)
        if not self.groups.is_last_stage:
            return output
        loss, num_tokens, report = loss_func(output, total_tokens)
        reports.append(report)
        return loss

    @staticmethod
    def _backward(input_tensor, output, output_grad):
        torch.autograd.backward(output, grad_tensors=output_grad)
        return None if input_tensor is None else input_tensor.grad

    def forward_only(self, forward_step: ForwardStep, microbatches: Sequence, total_tokens) -> list[dict]:
        reports: list[dict] = []
        with torch.no_grad():
            for mb in microbatches:
                x, _ = self.link.exchange(recv_prev=True)
                y = self._forward(forward_step, mb, x, total_tokens, reports)
                self.link.exchange(send_next=y)
        return reports

    def forward_backward(self, forward_step: ForwardStep, microbatches: Sequence, total_tokens) -> list[dict]:
        """One step's forwards and backwards (gradients accumulate in the parameters' hooks)."""
        link, reports = self.link, []
        num_mb = len(microbatches)
        warmup = min(self.num_stages - self.groups.pp_rank - 1, num_mb)
        inputs, outputs = deque(), deque()

        for i in range(warmup):
            x, _ = link.exchange(recv_prev=True)
            y = self._forward(forward_step, microbatches[i], x, total_tokens, reports)
            link.exchange(send_next=y)
            inputs.append(x)
            outputs.append(y)

        steady = num_mb - warmup
        x = link.exchange(recv_prev=True)[0] if steady > 0 else None
        for i in range(steady):
            y = self._forward(forward_step, microbatches[warmup + i], x, total_tokens, reports)
            inputs.append(x)
            outputs.append(y)
            _, gy = link.exchange(send_next=y, recv_next=True)
            gx = self._backward(inputs.popleft(), outputs.popleft(), gy)
            last = i == steady - 1
            x, _ = link.exchange(send_prev=gx, recv_prev=not last)

        for _ in range(warmup):
            _, gy = link.exchange(recv_next=True)
            gx = self._backward(inputs.popleft(), outputs.popleft(), gy)
            link.exchange(send_prev=gx)
        return reports
