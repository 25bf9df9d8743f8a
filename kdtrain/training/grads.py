"""Gradients: fp32 accumulation buffer, data-parallel reduction, tied-embedding sync, clipping.

A device-agnostic stand-in for megatron-core's DDP grad buffers (which need CUDA streams). Each
parameter gets a ``main_grad`` view into one flat fp32 buffer; a post-accumulate hook moves every
fresh ``.grad`` into it, so bf16 models accumulate micro-batch gradients in fp32 and fp32 models
take the same path. The data-parallel reduction is a SUM: losses are already divided by the
global token count (see pipeline.py).

Sharded (the distributed optimizer, ``optimizer.distributed``): the buffer is padded to ``dp``
equal chunks of the flat parameter order, one per data-parallel rank, whatever the parameter
boundaries. The reduction is then a reduce-scatter: each rank receives the summed gradient of its
own chunk only (``shard``, in place; the rest of its buffer is left unreduced), which is all its
optimizer updates; the norm is summed over the chunks and clipping scales the chunk. Every replica holds the same flat order (the same model
partition), so chunk r means the same parameters' elements on each of them.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..models.params import ParamSpec


def _group_size(group) -> int:
    return dist.get_world_size(group) if group is not None else 1


class GradBuffer:
    """``shard_group``: the data-parallel group whose ranks each own one chunk of the buffer (the
    distributed optimizer), or None (every replica reduces and updates the whole buffer)."""

    def __init__(self, model: torch.nn.Module, specs: dict[str, ParamSpec],
                 shard_group: Optional[dist.ProcessGroup] = None,
                 bucket_numel: int = 64 * 1024 * 1024, norm_chunk_numel: int = 16 * 1024 * 1024):
        self.params = [(specs[n], p) for n, p in model.named_parameters() if p.requires_grad]
        self.total = total = sum(p.numel() for _, p in self.params)
        device = self.params[0][1].device if self.params else torch.device("cpu")
        self.shard_group = shard_group if _group_size(shard_group) > 1 else None
        ways = _group_size(self.shard_group)
        # Chunk r of the buffer is [r * chunk, (r + 1) * chunk): equal chunks for the collectives,
        # the last one padded with zeros that no parameter views.
        self.chunk = -(-total // ways) if total else 0
        rank = dist.get_rank(self.shard_group) if self.shard_group is not None else 0
        self.shard_range = (min(rank * self.chunk, total), min((rank + 1) * self.chunk, total)) \
            if self.sharded else (0, total)
        self.data = torch.zeros(self.chunk * ways if self.sharded else total, dtype=torch.float32, device=device)
        # The reduced gradient of this rank's chunk: reduce-scattered in place (NCCL and gloo take
        # an output at the input's rank-th chunk), the whole buffer unsharded.
        self.shard = self.data[rank * self.chunk: (rank + 1) * self.chunk] if self.sharded else self.data
        self.bucket_numel = bucket_numel
        self.offsets: list[int] = []  # of each parameter in the flat order
        offset, counted = 0, []
        for spec, p in self.params:
            self.offsets.append(offset)
            p.main_grad = self.data[offset: offset + p.numel()].view_as(p)
            if not (spec.tp_duplicate or spec.tied_copy):
                if counted and counted[-1][1] == offset:
                    counted[-1][1] += p.numel()
                else:
                    counted.append([offset, offset + p.numel()])
            offset += p.numel()
            p.register_post_accumulate_grad_hook(self._accumulate)
        # What the gradient norm counts, as few contiguous slices of the reduced gradient as
        # possible (one with a single tensor rank and stage), cut into chunks that bound the
        # transient squares: a few kernels per step, not three per parameter.
        lo, hi = self.shard_range
        counted = [(max(a, lo) - lo, min(b, hi) - lo) for a, b in counted if max(a, lo) < min(b, hi)]
        self._norm_chunks = [c for a, b in counted for c in self.shard[a:b].split(norm_chunk_numel)]
        self._tp_partial = [p.main_grad for spec, p in self.params if spec.tp_partial_grad]

    @staticmethod
    def _accumulate(p: torch.Tensor) -> None:
        p.main_grad.add_(p.grad)
        p.grad = None

    def zero(self) -> None:
        self.data.zero_()

    @property
    def sharded(self) -> bool:
        return self.shard_group is not None

    def reduce(self, group: Optional[dist.ProcessGroup]) -> None:
        """Sum gradients over the data-parallel ``group``: sharded, one in-place reduce-scatter into
        ``shard`` (this rank's chunk; NCCL needs no transient memory for it); else an all-reduce
        of the whole buffer in place, in buckets to bound transient memory."""
        if self.sharded:
            assert group is self.shard_group
            dist.reduce_scatter_tensor(self.shard, self.data, group=group)
            return
        if _group_size(group) == 1:
            return
        for chunk in self.data.split(self.bucket_numel):
            dist.all_reduce(chunk, group=group)

    def reduce_tp_partial(self, tp_group: Optional[dist.ProcessGroup]) -> None:
        """Sum the gradients that each tensor rank holds only a part of (per-head query/key norm
        weights, ``ParamSpec.tp_partial_grad``) over the tensor-parallel group, in one
        all-reduce: afterwards every rank holds the full gradient, like any replicated parameter."""
        if not self._tp_partial or _group_size(tp_group) == 1:
            return
        flat = _flatten_dense_tensors(self._tp_partial)
        dist.all_reduce(flat, group=tp_group)
        for g, reduced in zip(self._tp_partial, _unflatten_dense_tensors(flat, self._tp_partial)):
            g.copy_(reduced)

    def sync_tied_embeddings(self, embd_group: Optional[dist.ProcessGroup], tie_embeddings: bool) -> None:
        """With pp > 1 and tied embeddings, the first stage's word embedding and the last stage's
        output weight are two copies of one parameter: their gradients are summed so both
        copies receive the same update."""
        if not tie_embeddings or _group_size(embd_group) == 1:
            return
        for spec, p in self.params:
            if spec.global_name == "embedding.word_embeddings.weight":
                dist.all_reduce(p.main_grad, group=embd_group)

    def global_norm(self, mp_group: Optional[dist.ProcessGroup]) -> float:
        """L2 norm of the full model's gradient: tensor-parallel replicas and the tied output
        copy are counted once; shards are summed over the model-parallel (tp x pp) group, and
        the data-parallel chunks over their group when sharded."""
        # square().sum(), not torch._foreach_norm / vector_norm: on CPU those accumulate a long
        # vector sequentially in fp32 (relative error ~1e-4 at 5M elements), sum() pairwise.
        if self._norm_chunks:
            sq = torch.stack([c.square().sum() for c in self._norm_chunks]).sum()
        else:
            sq = torch.zeros((), dtype=torch.float32, device=self.data.device)
        if self.sharded:
            dist.all_reduce(sq, group=self.shard_group)
        if _group_size(mp_group) > 1:
            dist.all_reduce(sq, group=mp_group)
        return math.sqrt(sq.item())

    def clip(self, max_norm: float, norm: float) -> None:
        if max_norm > 0 and norm > max_norm:
            self.shard.mul_(max_norm / (norm + 1e-6))

    def named_main_grads(self) -> Iterable[tuple[ParamSpec, torch.Tensor]]:
        """Each parameter's accumulated gradient (after ``reduce``, summed over the replicas unless
        sharded: then only the elements in ``shard`` are)."""
        for spec, p in self.params:
            yield spec, p.main_grad
