"""Reading a model slice once for all of its data-parallel replicas.

The replicas of one tensor/pipeline position hold the same weights and, without the distributed
optimizer, the same master weights and Adam moments. When each read all of them from the
checkpoint, the file system served every byte ``dp`` times: resuming a 70B model at TP=8 PP=8
DP=16 without the distributed optimizer read 4.5 TB instead of 0.3 TB, and an 8B start from an
imported checkpoint at DP=128 sent each file to 128 nodes. Now each parameter is read by one
replica (``assign_owners``: largest first, balanced by size, as saves share the writing) and
broadcast from it to the others over the data-parallel group.

The reads and the broadcasts are two phases: the reads come first and may fail on any replica (a
damaged file), so the ranks agree on their outcome (the caller's ``raise_together``) before any
of them enters a broadcast; ``SharedReads.send`` is the second phase. The read values wait on the
host in between (this replica's share of its slice: ``1/dp`` of it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.distributed as dist

from .optimizer import assign_owners

if TYPE_CHECKING:
    from ..parallel import RoleGroups


@dataclass(frozen=True)
class Replicas:
    """The data-parallel replicas of this rank's model slice: their group, this rank's index among
    them and their number."""

    group: Optional[dist.ProcessGroup]
    index: int
    size: int

    @classmethod
    def of(cls, groups: "RoleGroups") -> "Replicas":
        return cls(groups.pgc.dp, groups.dp_rank, groups.layout.dp)

    def owners(self, sizes: list[int]) -> list[int]:
        """Which replica reads each of the items of ``sizes`` (elements)."""
        return assign_owners(sizes, self.size)


# One value sent: (name, shape, dtype); its tensor on the owner.
Spec = tuple[str, tuple[int, ...], torch.dtype]


@dataclass
class SharedReads:
    """What this replica read for the others and how each replica takes the values: one entry
    per item, ``(owner, specs, values or None, take)``, in the same order on every replica."""

    replicas: Optional[Replicas]
    device: torch.device
    items: list = field(default_factory=list)

    @torch.no_grad()
    def add(self, owner: int, specs: list[Spec], values: Optional[dict], take: Callable[[dict], None]) -> None:
        """An item read by replica ``owner`` (``values`` here when this is it). Without other
        replicas it is taken at once (nothing waits on the host)."""
        if self.replicas is None or self.replicas.size == 1:
            take({name: values[name].to(self.device, dtype) for name, _, dtype in specs})
            return
        self.items.append((owner, specs, values, take))

    @property
    def me(self) -> int:
        return 0 if self.replicas is None else self.replicas.index

    def owners(self, sizes: list[int]) -> list[int]:
        """Which replica reads each item of ``sizes`` (elements): all of them here without replicas."""
        return [0] * len(sizes) if self.replicas is None else self.replicas.owners(sizes)

    @torch.no_grad()
    def send(self) -> None:
        """Collective over the replicas (after they agreed that every read succeeded): each item
        from its owner to the others, then taken by every replica (the owner too)."""
        for owner, specs, values, take in self.items:
            got = {}
            for name, shape, dtype in specs:
                if values is not None:
                    t = values[name].to(self.device, dtype)
                else:
                    t = torch.empty(shape, dtype=dtype, device=self.device)
                if self.replicas is not None and self.replicas.size > 1:
                    dist.broadcast(t, src=dist.get_global_rank(self.replicas.group, owner),
                                   group=self.replicas.group)
                got[name] = t
            take(got)
        self.items.clear()
