"""Reading a model slice once for all of its data-parallel replicas.

The replicas of one tensor/pipeline position hold the same weights and, without the distributed
optimizer, the same master weights and Adam moments. When each read all of them from the
checkpoint, the file system served every byte ``dp`` times: resuming a 70B model at TP=8 PP=8
DP=16 without the distributed optimizer read 4.5 TB instead of 0.3 TB, and an 8B start from an
imported checkpoint at DP=128 sent each file to 128 nodes. Now each parameter is read by one
replica (``assign_owners``: largest first, balanced by size, as saves share the writing) and
broadcast from it to the others over the data-parallel group, one parameter at a time (host and
device memory hold one parameter's values, as when each replica read everything).

The broadcasts come after the role's ranks agreed that everything before them succeeded (the
checkpoint's files are there and match the model: the caller's ``raise_together``). A read that
still fails on its owner (a damaged value, non-finite weights) cannot leave the other replicas
waiting: the owner sends on (the values are then not taken) and, once every parameter went
round, the role's ranks agree again and every one raises the owner's error.
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


# One value of an item: (name, shape, dtype), the same on every replica.
Spec = tuple[str, tuple[int, ...], torch.dtype]


@dataclass
class SharedReads:
    """The items (parameters) a load shares among the replicas: one entry per item, ``(owner,
    specs, read, take)`` in the same order on every replica; ``read()`` (on the owner) gives the
    item's values on the host, ``take(values)`` puts them in place on every replica."""

    replicas: Optional[Replicas]
    device: torch.device
    items: list = field(default_factory=list)

    @property
    def me(self) -> int:
        return 0 if self.replicas is None else self.replicas.index

    def owners(self, sizes: list[int]) -> list[int]:
        """Which replica reads each item of ``sizes`` (elements): all of them here without replicas."""
        return [0] * len(sizes) if self.replicas is None else assign_owners(sizes, self.replicas.size)

    @torch.no_grad()
    def add(self, owner: int, specs: list[Spec], read: Callable[[], dict], take: Callable[[dict], None]) -> None:
        """An item read by replica ``owner``. Without other replicas it is read and taken here."""
        if self.replicas is None or self.replicas.size == 1:
            take(read())
            return
        self.items.append((owner, specs, read, take))

    @torch.no_grad()
    def send(self, agree: Callable[[Optional[BaseException]], None]) -> None:
        """Every rank of the role calls it (after the role agreed on the load so far): each item
        read by its owner, broadcast to the other replicas and taken by each, one at a time; then
        ``agree(error)`` (the role's ``raise_together``: every rank raises when a read failed)."""
        error = None
        for owner, specs, read, take in self.items:
            values = None
            if owner == self.me and error is None:
                try:
                    values = read()
                except Exception as e:  # noqa: BLE001 - the peers are waiting in this broadcast
                    error = e
            got = {}
            for name, shape, dtype in specs:
                t = (values[name].to(self.device, dtype) if values is not None
                     else torch.empty(shape, dtype=dtype, device=self.device))
                dist.broadcast(t, src=dist.get_global_rank(self.replicas.group, owner), group=self.replicas.group)
                got[name] = t
            if error is None:  # (a replica whose owner failed takes garbage: it raises below)
                take(got)
        self.items.clear()
        agree(error)
