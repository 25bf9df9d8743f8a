"""Global batch -> this data-parallel replica's micro-batches.

Step ``t`` consumes global samples ``[t * G, (t + 1) * G)``; replica ``d`` of ``D`` takes the
contiguous slice ``[d * G / D, (d + 1) * G / D)`` and cuts it into micro-batches. The global batch,
and so the loss of a step, is the same for every TP/PP/DP layout, and resuming from a checkpoint
only needs the step number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # [b, s] int64 model input
    labels: torch.Tensor  # [b, s] int64 next tokens
    loss_mask: torch.Tensor  # [b, s] float32, 1 = counted
    position_ids: torch.Tensor  # [b, s] int64
    num_tokens: int  # loss_mask.sum(), known on the host (no device sync to count it)


def make_microbatch(windows: np.ndarray, device: torch.device, targets: Optional[np.ndarray] = None) -> MicroBatch:
    """``windows`` [b, s + 1] token ids -> inputs/labels shifted by one; labels whose ``targets``
    [b, s] flag is False are not counted (conversations: the prompts; on-policy windows: all but
    the student's samples)."""
    w = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.int64))
    tokens, labels = w[:, :-1], w[:, 1:]
    b, s = tokens.shape
    assert targets is None or targets.shape == (b, s), (None if targets is None else targets.shape, b, s)
    pos = torch.arange(s, dtype=torch.int64).unsqueeze(0).expand(b, s)
    mask = torch.ones(b, s, dtype=torch.float32) if targets is None else torch.from_numpy(targets.astype(np.float32))
    num_tokens = b * s if targets is None else int(mask.sum())
    return MicroBatch(tokens.contiguous().to(device), labels.contiguous().to(device), mask.to(device),
                      pos.contiguous().to(device), num_tokens)


def replica_sample_ids(first: int, global_batch: int, dp_rank: int, dp_size: int) -> range:
    per_replica = global_batch // dp_size
    start = first + dp_rank * per_replica
    return range(start, start + per_replica)


def microbatches(sample: Callable[[int], np.ndarray], first: int, global_batch: int, micro_batch: int,
                 dp_rank: int, dp_size: int, device: torch.device,
                 targets: Optional[Callable[[int], Optional[np.ndarray]]] = None) -> list[MicroBatch]:
    """This replica's micro-batches of the global batch that starts at sample ``first``;
    ``targets(j)``: sample j's label flags (a dataset's ``*_loss_mask``), None for all."""
    ids = replica_sample_ids(first, global_batch, dp_rank, dp_size)
    out = []
    for i in range(0, len(ids), micro_batch):
        chunk = ids[i: i + micro_batch]
        flags = None if targets is None else [targets(j) for j in chunk]
        flags = None if flags is None or flags[0] is None else np.stack(flags)
        out.append(make_microbatch(np.stack([sample(j) for j in chunk]), device, flags))
    return out
