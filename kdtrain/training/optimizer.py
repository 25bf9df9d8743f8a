"""AdamW with fp32 master weights, optional ZeRO-1 sharding, and the learning-rate schedule.

Master weights: fp32 models update in place; bf16 models keep an fp32 master copy per parameter
and copy back after each step. With ``distributed: true`` (ZeRO-1) each data-parallel rank owns a
balanced subset of parameters and holds master weights and Adam moments only for those; after the
update every owner broadcasts its parameters to the other replicas.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..config import OptimizerConfig
from ..models.params import ParamSpec


def lr_at(step: int, cfg: OptimizerConfig, train_steps: int) -> float:
    """Learning rate for (0-based) ``step``: linear warm-up, then cosine/linear/constant decay to
    ``min_lr`` at ``decay_steps`` (default: the end of training)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.decay_style == "constant":
        return cfg.lr
    decay_steps = cfg.decay_steps or train_steps
    span = max(1, decay_steps - cfg.warmup_steps)
    progress = min(1.0, max(0.0, (step - cfg.warmup_steps) / span))
    if cfg.decay_style == "linear":
        coeff = 1.0 - progress
    else:
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * coeff


def assign_owners(sizes: list[int], num_owners: int) -> list[int]:
    """Deterministic balanced assignment of parameters to data-parallel ranks (largest first)."""
    load = [0] * num_owners
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        o = min(range(num_owners), key=lambda r: (load[r], r))
        owners[i] = o
        load[o] += sizes[i]
    return owners


class AdamWOptimizer:
    def __init__(self, params: list[tuple[ParamSpec, torch.nn.Parameter]], cfg: OptimizerConfig,
                 dp_group: Optional[dist.ProcessGroup]):
        self.cfg = cfg
        self.params = params
        self.dp_group = dp_group
        dp_size = dist.get_world_size(dp_group) if dp_group is not None else 1
        dp_rank = dist.get_rank(dp_group) if dp_group is not None else 0
        self.sharded = cfg.distributed and dp_size > 1
        self.owners = assign_owners([p.numel() for _, p in params], dp_size) if self.sharded else [dp_rank] * len(params)
        self.dp_ranks = dist.get_process_group_ranks(dp_group) if self.sharded else None
        self.owned: list[tuple[ParamSpec, torch.nn.Parameter, torch.Tensor]] = []
        for (spec, p), owner in zip(params, self.owners):
            if owner == dp_rank:
                master = p if p.dtype == torch.float32 else p.detach().float().clone().requires_grad_()
                self.owned.append((spec, p, master))
        # No weight decay on biases and norm weights (1-D), as in megatron-core.
        decay = [m for _, _, m in self.owned if m.ndim >= 2]
        no_decay = [m for _, _, m in self.owned if m.ndim < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]] or [{"params": [torch.zeros(1, requires_grad=True)]}]
        # fused: one kernel per group of tensors for the whole update instead of a dozen multi-
        # tensor launches (a small model's step is bound by host time); CPU and CUDA alike.
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)
        # Parameters with a separate fp32 master: copied back after each update in one launch.
        self._copy_back = ([p for _, p, m in self.owned if m is not p], [m for _, p, m in self.owned if m is not p])

    @torch.no_grad()
    def step(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr
        for _, p, master in self.owned:
            master.grad = p.main_grad
        self.opt.step()
        for _, p, master in self.owned:
            master.grad = None
        if self._copy_back[0]:
            torch._foreach_copy_(*self._copy_back)
        if self.sharded:
            self._broadcast_from_owners()

    def _broadcast_from_owners(self) -> None:
        for owner, src in enumerate(self.dp_ranks):
            tensors = [p.data for (_, p), o in zip(self.params, self.owners) if o == owner]
            if not tensors:
                continue
            flat = _flatten_dense_tensors(tensors)
            dist.broadcast(flat, src=src, group=self.dp_group)
            for t, new in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
                t.copy_(new)

    def separate_masters(self) -> dict[int, torch.Tensor]:
        """The fp32 master weights kept apart from their (bf16) parameters, by ``id`` of the
        parameter: whatever writes weights into the parameters (a ``load``) must write these too."""
        return {id(p): master for _, p, master in self.owned if master is not p}

    # ---- checkpointing: per global parameter, layout-independent --------------------------------
    def state_for(self, spec: ParamSpec) -> dict[str, torch.Tensor]:
        """Adam moments (and the fp32 master weight, when it is not the parameter itself) of an
        owned parameter's local shard."""
        for s, p, master in self.owned:
            if s is spec:
                st = self.opt.state.get(master, {})
                out = {} if master is p else {"master": master.detach()}
                if st:
                    out.update(exp_avg=st["exp_avg"], exp_avg_sq=st["exp_avg_sq"], step=st["step"])
                else:  # no update yet (every step so far skipped): Adam's initial state, so the
                    # checkpoint still resumes as a run's
                    zeros = torch.zeros_like(master, dtype=torch.float32)
                    out.update(exp_avg=zeros, exp_avg_sq=zeros, step=torch.zeros((), dtype=torch.float32))
                return out
        raise KeyError(spec.global_name)

    @torch.no_grad()
    def load_state_for(self, spec: ParamSpec, state: dict[str, torch.Tensor]) -> None:
        for s, p, master in self.owned:
            if s is spec:
                master.copy_(state["master"])
                if master is not p:
                    p.copy_(master)
                if "exp_avg" in state:
                    self.opt.state[master] = {
                        # the fused update keeps its step count on the parameter's device
                        "step": state["step"].clone().float().to(master.device),
                        "exp_avg": state["exp_avg"].to(master.device).clone(),
                        "exp_avg_sq": state["exp_avg_sq"].to(master.device).clone(),
                    }
                return
        raise KeyError(spec.global_name)
