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

from ..models.documents import DocumentMask


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # [b, s] int64 model input
    labels: torch.Tensor  # [b, s] int64 next tokens
    loss_mask: torch.Tensor  # [b, s] float32, 1 = counted
    position_ids: torch.Tensor  # [b, s] int64
    num_tokens: int  # loss_mask.sum(), known on the host (no device sync to count it)
    attention_mask: Optional[DocumentMask] = None  # None: causal over the window
    # [n] int64 rows of the [s * b] token order whose logits are needed (the targets), None: all.
    logit_rows: Optional[torch.Tensor] = None

    def forward(self, model):
        """The model's output on this micro-batch's inputs: on the last stage the logits of
        ``logit_rows`` only, [n, 1, V/tp] (all: [s, b, V/tp])."""
        return model(self.tokens, self.position_ids, self.attention_mask, logit_rows=self.logit_rows)

    def at_logit_rows(self, t_SB: torch.Tensor) -> torch.Tensor:
        """A per-token tensor [s, b, ...] at the rows the logits have: [n, 1, ...] (unchanged
        when the logits cover every row)."""
        if self.logit_rows is None:
            return t_SB
        return t_SB.reshape(-1, *t_SB.shape[2:]).index_select(0, self.logit_rows).unsqueeze(1)


def make_microbatch(windows: np.ndarray, device: torch.device, targets: Optional[np.ndarray] = None,
                    positions: Optional[np.ndarray] = None) -> MicroBatch:
    """``windows`` [b, s + 1] token ids -> inputs/labels shifted by one; labels whose ``targets``
    [b, s] flag is False are not counted (conversations: the prompts; on-policy windows: all but
    the student's samples). ``positions`` [b, s + 1]: each window token's position in its
    document (attention within documents, models/documents.py); None: attention over the window."""
    w = _to_device(torch.from_numpy(np.ascontiguousarray(windows, dtype=np.int64)), device)
    tokens, labels = w[:, :-1].contiguous(), w[:, 1:].contiguous()
    b, s = tokens.shape
    assert targets is None or targets.shape == (b, s), (None if targets is None else targets.shape, b, s)
    assert positions is None or positions.shape == (b, s + 1), (None if positions is None else positions.shape, b, s)
    if positions is None:
        pos = torch.arange(s, dtype=torch.int64, device=device).unsqueeze(0).expand(b, s).contiguous()
    else:
        pos = _to_device(torch.from_numpy(np.ascontiguousarray(positions[:, :-1], dtype=np.int64)), device)
    if targets is None:
        mask, num_tokens, rows = torch.ones(b, s, dtype=torch.float32, device=device), b * s, None
    else:
        mask, num_tokens = _to_device(torch.from_numpy(targets.astype(np.float32)), device), int(targets.sum())
        # The targets' rows in the [s, b] token order the logits have (at least one row, so that
        # a micro-batch without targets still runs; its loss mask there is 0).
        rows = _to_device(torch.from_numpy(np.flatnonzero(targets.T) if targets.any() else np.zeros(1, dtype=np.int64)),
                          device)
    return MicroBatch(tokens, labels, mask, pos, num_tokens, None if positions is None else DocumentMask(pos), rows)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``. To a GPU through pinned memory without blocking the host: a
    copy from pageable memory waits for it, and with it for the work queued before (the pinned
    block is not reused before the copy is done: the caching host allocator records it)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def replica_sample_ids(first: int, global_batch: int, dp_rank: int, dp_size: int) -> range:
    per_replica = global_batch // dp_size
    start = first + dp_rank * per_replica
    return range(start, start + per_replica)


def stack_rows(rows: Optional[Callable[[int], Optional[np.ndarray]]], ids) -> Optional[np.ndarray]:
    """``rows(j)`` of every sample id stacked, or None when there is no callable or it gives None."""
    if rows is None:
        return None
    out = [rows(j) for j in ids]
    return None if out[0] is None else np.stack(out)


def microbatches(sample: Callable[[int], np.ndarray], first: int, global_batch: int, micro_batch: int,
                 dp_rank: int, dp_size: int, device: torch.device,
                 targets: Optional[Callable[[int], Optional[np.ndarray]]] = None,
                 positions: Optional[Callable[[int], Optional[np.ndarray]]] = None) -> list[MicroBatch]:
    """This replica's micro-batches of the global batch that starts at sample ``first``;
    ``targets(j)``: sample j's label flags (a dataset's ``*_loss_mask``), None for all;
    ``positions(j)``: its tokens' positions in their documents (a dataset's ``*_positions``)."""
    ids = replica_sample_ids(first, global_batch, dp_rank, dp_size)
    out = []
    for i in range(0, len(ids), micro_batch):
        chunk = ids[i: i + micro_batch]
        out.append(make_microbatch(np.stack([sample(j) for j in chunk]), device, stack_rows(targets, chunk),
                                   stack_rows(positions, chunk)))
    return out
