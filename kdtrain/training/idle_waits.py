"""Waits of ranks that idle while others work alone, with their own bound.

A distillation run's ranks sometimes wait for work only some of them do: on an on-policy step every
rank waits for the students' samples (a disaggregated teacher for all of the sampling, colocated
replicas that finish first for the slowest), and disaggregated teacher ranks wait while the students
save a checkpoint, run the held-out pass or train on cached steps (a mixed teacher source); at
start-up the students wait for a disaggregated teacher's load in the world agreement on the run's
outcome (``raise_together`` over this module's group); a mixed run's ranks wait while rank 0 hashes
the live teacher's weight files, and a cache job's while rank 0 hashes them, the others verify their
share of a resumed cache's shards or write their last shard. Those waits last as long as that work,
so they are bounded by ``distributed.idle_timeout_s``, not by ``distributed.timeout_s``, which is
kept short to catch hung collectives.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..stream.channel import StreamError


class IdleWaitTimeout(StreamError):
    """A rank gave up waiting for ranks that worked alone (IdleWaits): they are slower than
    ``distributed.idle_timeout_s``, or one of them died."""


@dataclass(frozen=True)
class IdleWaits:
    """The waits of ranks that idle while others work alone (an on-policy step's sampling, the
    students' checkpoint saves, held-out passes and cached steps), bounded by ``distributed.idle_timeout_s``
    instead of ``distributed.timeout_s``, which is kept short to catch hung collectives.

    Each wait is a one-element all-reduce over a gloo world group whose timeout is that bound,
    created once at start-up; the work that follows it (the on-policy hand-off) runs on the run's
    own groups with every rank already there. gloo applies a group's timeout to each of its
    operations, and times out in the waiting process, so a wait that runs out raises here on any
    backend and is reported by name. (NCCL also honours a group's timeout, from the enqueue, but in
    its watchdog thread, which tears the process down; and an NCCL group would hold another
    communicator's buffers on every GPU for a wait that carries no data.)"""

    group: object
    timeout_s: float
    rank: int

    @classmethod
    def create(cls, timeout_s: float) -> "IdleWaits":
        """World-collective: every rank, at the same point of the start-up."""
        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s), group_desc="idle_waits")
        return cls(group, timeout_s, dist.get_rank())

    def wait(self, what: str) -> None:
        """Return when every rank has called ``wait`` (collective, in the same order on every rank);
        IdleWaitTimeout naming ``what`` and the config key when that takes longer than the bound
        here or on another rank (which then exits: its peers see the connection close)."""
        try:
            dist.all_reduce(torch.zeros(1, dtype=torch.int32), group=self.group)
        except RuntimeError as e:  # gloo: its timeout here, or a peer that timed out or died
            cause = re.sub(r"^\[[^]]*\]\s*", "", str(e).splitlines()[0])[:240]  # less gloo's source location
            if "Timed out" not in cause and "timeout" not in cause.lower():  # a peer gone, not the bound
                raise IdleWaitTimeout(
                    f"rank {self.rank}: {what}: another rank left the run while this one waited ({cause}): it "
                    f"gave up waiting itself (distributed.idle_timeout_s = {self.timeout_s:g} s: raise "
                    "distributed.idle_timeout_s if the ranks being waited for are only slow), or it failed or was "
                    "killed (training, saving, evaluating); its own output says which") from None
            raise IdleWaitTimeout(
                f"rank {self.rank}: {what}: the ranks did not all arrive within distributed.idle_timeout_s = "
                f"{self.timeout_s:g} s ({cause}); if the ranks being waited for are only slow "
                "(sampling, saving or evaluating a large student, hashing a large teacher's weights, writing cache "
                "shards), raise distributed.idle_timeout_s, else one of "
                "them died or stalled") from None
