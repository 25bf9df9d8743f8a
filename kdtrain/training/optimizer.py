"""AdamW with fp32 master weights, optional distributed (ZeRO-1) sharding, and the learning-rate schedule.

Master weights: fp32 models update in place; bf16 models keep an fp32 master copy per parameter
and copy back after each step. With ``distributed: true`` and more than one data-parallel replica
the optimizer is sharded like megatron-core's distributed optimizer: each replica owns one equal
chunk of the flat parameter order of the gradient buffer (grads.py), cut wherever it falls, also
inside a parameter. A replica holds fp32 master weights and Adam moments for its chunk only
(12 bytes per parameter divided by ``dp``, whatever the sizes of the parameters: a 128k-row
embedding weighs on no replica more than any other), updates it from the reduce-scattered
gradient, and the replicas all-gather the updated chunks in the model dtype. Communication per
step: a reduce-scatter of fp32 gradients and an all-gather of parameters, instead of an
all-reduce.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..config import OptimizerConfig
from ..models.params import ParamSpec
from .grads import GradBuffer


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
    """Deterministic balanced assignment of items to ``num_owners`` ranks (largest first): which
    replica writes which parameter of an unsharded optimizer's checkpoint."""
    load = [0] * num_owners
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        o = min(range(num_owners), key=lambda r: (load[r], r))
        owners[i] = o
        load[o] += sizes[i]
    return owners


@dataclass
class Share:
    """The part of one parameter that this rank updates: flat elements [start, stop) of its local
    tensor (all of it unless sharded), their fp32 master (the parameter itself for an unsharded
    fp32 model; 1-D when sharded) and, when sharded, their slice of the reduced gradient (else
    the parameter's ``main_grad``)."""

    spec: ParamSpec
    param: torch.nn.Parameter
    master: torch.Tensor
    grad: Optional[torch.Tensor]
    start: int
    stop: int

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop == self.param.numel()


class AdamWOptimizer:
    """``params``: every (spec, parameter) of the role; ``grads``: its gradient buffer, whose
    sharding (``GradBuffer.shard_group``) decides this optimizer's."""

    def __init__(self, params: list[tuple[ParamSpec, torch.nn.Parameter]], cfg: OptimizerConfig,
                 dp_group: Optional[dist.ProcessGroup], grads: GradBuffer, gather_numel: int = 64 * 1024 * 1024):
        self.cfg = cfg
        self.params = params
        self.dp_group = dp_group
        self.grads = grads
        self.sharded = grads.sharded
        self.owned: list[Share] = []
        if self.sharded:
            self._shard_masters()
        else:
            for spec, p in grads.params:
                master = p if p.dtype == torch.float32 else p.detach().float().clone()
                self.owned.append(Share(spec, p, master, None, 0, p.numel()))
        # No weight decay on biases and norm weights (1-D), as in megatron-core.
        decay = [s.master for s in self.owned if s.param.ndim >= 2]
        no_decay = [s.master for s in self.owned if s.param.ndim < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]] or [{"params": [torch.zeros(1)]}]
        # fused: one kernel per group of tensors for the whole update instead of a dozen multi-
        # tensor launches (a small model's step is bound by host time); CPU and CUDA alike.
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)
        # Unsharded parameters with a separate fp32 master: copied back after each update in one
        # launch (sharded ones are gathered from the owners instead).
        separate = [s for s in self.owned if s.master is not s.param and not self.sharded]
        self._copy_back = ([s.param for s in separate], [s.master for s in separate])
        self._share_of = {id(s.spec): s for s in self.owned}
        if self.sharded:
            self._plan_gather(gather_numel)

    def _shard_masters(self) -> None:
        """fp32 masters of this rank's chunk: one flat tensor, a 1-D view of it per parameter part."""
        g = self.grads
        lo, hi = g.shard_range
        device = g.data.device
        self._master_flat = torch.empty(hi - lo, dtype=torch.float32, device=device)
        for (spec, p), off in zip(g.params, g.offsets):
            a, b = max(off, lo), min(off + p.numel(), hi)
            if a >= b:
                continue
            master = self._master_flat[a - lo: b - lo]
            master.copy_(p.detach().reshape(-1)[a - off: b - off])
            self.owned.append(Share(spec, p, master, g.shard[a - lo: b - lo], a - off, b - off))

    def _plan_gather(self, gather_numel: int) -> None:
        """The all-gather of updated parameters, in buckets of ``per`` elements of every chunk (a
        receive buffer of ``dp * per`` elements in the model dtype, at most ``gather_numel``):
        for each bucket, which slice of the receive buffer lands in which parameter elements."""
        g = self.grads
        dtypes = {p.dtype for _, p in g.params}
        assert len(dtypes) == 1, dtypes  # one model dtype (norm weights included: models/gpt.py)
        ways = dist.get_world_size(g.shard_group)
        per = max(1, min(g.chunk, gather_numel // ways))
        self._send = torch.zeros(per, dtype=dtypes.pop(), device=g.data.device)
        self._recv = torch.empty(ways * per, dtype=self._send.dtype, device=g.data.device)
        flat = [(off, p.detach().reshape(-1)) for (_, p), off in zip(g.params, g.offsets)]
        self._buckets = []
        for b0 in range(0, g.chunk, per):
            n = min(per, g.chunk - b0)
            dsts, srcs = [], []
            for r in range(ways):
                r0, r1 = r * g.chunk + b0, r * g.chunk + b0 + n  # flat range of rank r's slice
                for off, pf in flat:
                    a, b = max(off, r0), min(off + pf.numel(), r1)
                    if a < b:
                        dsts.append(pf[a - off: b - off])
                        srcs.append(self._recv[r * n + a - r0: r * n + b - r0])
            self._buckets.append((b0, n, dsts, srcs))

    @torch.no_grad()
    def step(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr
        for s in self.owned:
            s.master.grad = s.param.main_grad if s.grad is None else s.grad
        self.opt.step()
        for s in self.owned:
            s.master.grad = None
        if self.sharded:
            self.gather_params()
        elif self._copy_back[0]:
            torch._foreach_copy_(*self._copy_back)

    @torch.no_grad()
    def gather_params(self) -> None:
        """Every replica's parameters from the owners' masters (rounded to the model dtype by the
        owner, so all replicas hold the same values). Collective over the data-parallel group;
        sharded only."""
        assert self.sharded
        mine, ways = self._master_flat.numel(), self._recv.numel() // self._send.numel()
        for b0, n, dsts, srcs in self._buckets:
            send = self._send[:n]
            if b0 < mine:  # the last rank's chunk may end early: its padding is never read
                send[:min(n, mine - b0)].copy_(self._master_flat[b0: b0 + n])
            dist.all_gather_into_tensor(self._recv[:n * ways], send, group=self.grads.shard_group)
            if dsts:
                torch._foreach_copy_(dsts, srcs)

    def separate_masters(self) -> dict[int, tuple[torch.Tensor, int, int]]:
        """The fp32 master weights kept apart from their parameters, by ``id`` of the parameter:
        ``(master, start, stop)``, the master of flat elements [start, stop) of the parameter.
        Whatever writes weights into the parameters (a ``load``) must write these too."""
        return {id(s.param): (s.master, s.start, s.stop) for s in self.owned if s.master is not s.param}

    # ---- checkpointing: per global parameter, layout-independent --------------------------------
    def share_of(self, spec: ParamSpec) -> Share:
        share = self._share_of.get(id(spec))
        if share is None:
            raise KeyError(spec.global_name)
        return share

    def state_for(self, spec: ParamSpec) -> dict[str, torch.Tensor]:
        """Adam moments (and the fp32 master weight, when it is not the parameter itself) of this
        rank's share of a parameter: shaped like the parameter when the share is all of it, else
        the share's flat elements (``Share.start``, ``Share.stop``)."""
        s = self.share_of(spec)
        shape = s.param.shape if s.whole else (s.stop - s.start,)
        st = self.opt.state.get(s.master, {})
        out = {} if s.master is s.param else {"master": s.master.detach().view(shape)}
        if st:
            out.update(exp_avg=st["exp_avg"].view(shape), exp_avg_sq=st["exp_avg_sq"].view(shape), step=st["step"])
        else:  # no update yet (every step so far skipped): Adam's initial state, so the
            # checkpoint still resumes as a run's
            zeros = torch.zeros(shape, dtype=torch.float32, device=s.master.device)
            out.update(exp_avg=zeros, exp_avg_sq=zeros, step=torch.zeros((), dtype=torch.float32))
        return out

    @torch.no_grad()
    def load_state_for(self, spec: ParamSpec, state: dict[str, torch.Tensor]) -> None:
        """``state``: ``master`` and optionally ``exp_avg``, ``exp_avg_sq`` (fp32) of this rank's
        share of the parameter (its elements, any shape) and ``step``. An unsharded parameter takes
        its weights from the master; sharded ones wait for ``gather_params`` once every share of
        every replica is loaded."""
        s = self.share_of(spec)
        s.master.view(-1).copy_(state["master"].reshape(-1))
        if not self.sharded and s.master is not s.param:
            s.param.copy_(s.master)
        if "exp_avg" in state:
            dev = s.master.device
            self.opt.state[s.master] = {
                # the fused update keeps its step count on the parameter's device
                "step": state["step"].clone().float().to(dev),
                # one copy into the optimizer's own tensors, from the host or the device
                "exp_avg": torch.empty_like(s.master).copy_(state["exp_avg"].reshape(s.master.shape)),
                "exp_avg_sq": torch.empty_like(s.master).copy_(state["exp_avg_sq"].reshape(s.master.shape)),
            }
