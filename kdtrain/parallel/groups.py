"""One role's process groups, built from ``(rank_offset, tp, pp, dp)`` with HyperCommGrid.

A *role* (student, teacher, or the single model of a pretraining run) owns the contiguous rank
span ``[rank_offset, rank_offset + tp*pp*dp)``. Inside the span ranks are ordered tp-fastest, then
dp, then pp (megatron-core's default ``tp-cp-ep-dp-pp`` order with cp = ep = 1):

    local = rank - rank_offset
    tp_rank = local % tp;  dp_rank = (local // tp) % dp;  pp_rank = local // (tp * dp)

Group creation is collective over the whole world: every rank must build every role's groups, in
the same order, whether or not it belongs to the role. Ranks outside the span get ``None`` groups.
Nothing here touches megatron-core's global ``parallel_state``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Callable, Optional

import torch.distributed as dist

if TYPE_CHECKING:  # imported where groups are built: importing megatron.core takes seconds
    from megatron.core.hyper_comm_grid import HyperCommGrid
    from megatron.core.process_groups_config import ProcessGroupCollection

# megatron-core's default rank order, innermost first.
GRID_DIMS = ["tp", "cp", "dp", "pp"]


@dataclass(frozen=True)
class RoleLayout:
    """Where a role lives and how it is partitioned (pure arithmetic, no torch.distributed)."""

    name: str
    rank_offset: int
    tp: int
    pp: int
    dp: int

    @property
    def num_ranks(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def ranks(self) -> range:
        return range(self.rank_offset, self.rank_offset + self.num_ranks)

    def contains(self, rank: int) -> bool:
        return rank in self.ranks

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(tp_rank, dp_rank, pp_rank) of a global rank inside this role."""
        if not self.contains(rank):
            raise ValueError(f"rank {rank} is not in role {self.name!r} (ranks {self.ranks.start}..{self.ranks.stop - 1})")
        local = rank - self.rank_offset
        return local % self.tp, (local // self.tp) % self.dp, local // (self.tp * self.dp)

    def rank_of(self, tp_rank: int, dp_rank: int, pp_rank: int) -> int:
        return self.rank_offset + tp_rank + self.tp * (dp_rank + self.dp * pp_rank)


@dataclass
class RoleGroups:
    """A role's layout, its grid and process groups, and this rank's place in it."""

    layout: RoleLayout
    grid: HyperCommGrid
    pgc: ProcessGroupCollection
    role_group: Optional[dist.ProcessGroup]  # all ranks of the role (barriers, step statistics)
    rank: int  # this process's global rank

    @property
    def is_member(self) -> bool:
        return self.layout.contains(self.rank)

    @property
    def share(self) -> tuple[int, int]:
        """(this rank's index in the role, the role's size): which part of a job split evenly over
        the role's ranks (``files[i::n]``) is this rank's."""
        assert self.is_member, f"rank {self.rank} is not in role {self.layout.name}"
        return self.rank - self.layout.rank_offset, self.layout.num_ranks

    def _coord(self, i: int) -> int:
        assert self.is_member, f"rank {self.rank} is not in role {self.layout.name}"
        return self.layout.coords(self.rank)[i]

    tp_rank = property(lambda self: self._coord(0))
    dp_rank = property(lambda self: self._coord(1))
    pp_rank = property(lambda self: self._coord(2))

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.layout.pp - 1

    def stage_rank(self, pp_rank: int) -> int:
        """Global rank of this rank's counterpart (same tp/dp coordinates) on pipeline stage pp_rank."""
        return self.layout.rank_of(self.tp_rank, self.dp_rank, pp_rank)

    def raise_together(self, error: Optional[BaseException],
                       what: str = "could not load its part of the weights") -> None:
        """Collective over the role: every rank raises when any had ``error`` (loading weights or a
        checkpoint: a rank reads only its own pieces, so a damaged file can fail one rank alone,
        which would leave the others waiting in the role's next collective until the job's
        timeout). The failing rank raises its own error, the others a ``PeerFailed``: "rank R of
        <role> ``what``: <its error>"."""
        if self.role_group is None:  # not a member of the role: nothing to agree on
            if error is not None:
                raise error
            return
        raise_together(error, self.role_group,
                       lambda rank, shown: f"rank {rank} of {self.layout.name} {what}: {shown}")


class PeerFailed(ValueError):
    """Raised by ``raise_together`` on a rank that did not fail itself: another rank's error."""


def raise_together(error: Optional[BaseException], group: Optional[dist.ProcessGroup],
                   describe: Callable[[int, str], str]) -> None:
    """Collective over ``group`` (None: the world): every rank raises when any had ``error``. The
    failing rank raises its own error; the others a ``PeerFailed`` with ``describe(global rank,
    error text)`` of the first rank whose error is its own (not itself a ``PeerFailed``: a role
    that already agreed reports the rank that failed, not the ones it stopped). What is raised is
    marked (``mark_agreed``), so an outer agreement can tell a rank whose group peers stopped with
    it from one that failed alone (``agreed``)."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        errors: list = [None] * dist.get_world_size(group)
        shown = None if error is None else (dist.get_rank(), str(error) if isinstance(error, ValueError)
                                            else repr(error), isinstance(error, PeerFailed))
        dist.all_gather_object(errors, shown, group=group)
        failed = sorted((e for e in errors if e is not None), key=lambda e: (e[2], e[0]))
        if error is None and failed:
            error = PeerFailed(describe(failed[0][0], failed[0][1]))
    if error is not None:
        raise mark_agreed(error, group)


def _ranks(group: Optional[dist.ProcessGroup]) -> frozenset:
    return frozenset(range(dist.get_world_size()) if group is None else dist.get_process_group_ranks(group))


def mark_agreed(error: BaseException, group: Optional[dist.ProcessGroup]) -> BaseException:
    """Mark ``error`` as raised on every rank of ``group`` (None: the world) alike (``agreed``);
    returns it. The mark is the group's global ranks: the error stays picklable."""
    if dist.is_initialized():
        error.agreed_by = _ranks(group)
    return error


def agreed(error: BaseException, group: Optional[dist.ProcessGroup]) -> bool:
    """Whether every rank of ``group`` raised along with ``error`` (``mark_agreed``)."""
    return dist.is_initialized() and getattr(error, "agreed_by", None) == _ranks(group)


def build_role_groups(layout: RoleLayout, backend: Optional[str] = None,
                      timeout_s: Optional[float] = None) -> RoleGroups:
    """Create all process groups of one role. Collective: every rank calls it for every role."""
    from ..te_guard import guard_transformer_engine

    guard_transformer_engine()
    from megatron.core.hyper_comm_grid import HyperCommGrid
    from megatron.core.process_groups_config import ProcessGroupCollection

    world = dist.get_world_size()
    if layout.rank_offset < 0 or layout.rank_offset + layout.num_ranks > world:
        raise ValueError(f"role {layout.name!r}: ranks {layout.rank_offset}..{layout.rank_offset + layout.num_ranks - 1} "
                         f"do not fit in world size {world}")
    kwargs = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
    grid = HyperCommGrid([layout.tp, 1, layout.dp, layout.pp], GRID_DIMS, rank_offset=layout.rank_offset,
                         backend=backend)
    pgc = ProcessGroupCollection()
    pgc.tp = grid.create_pg("tp", **kwargs)
    pgc.cp = grid.create_pg("cp", **kwargs)
    pgc.dp = grid.create_pg("dp", **kwargs)
    pgc.pp = grid.create_pg("pp", **kwargs)
    pgc.mp = grid.create_pg(["tp", "pp"], **kwargs)
    pgc.tp_cp = grid.create_pg(["tp", "cp"], **kwargs)
    pgc.dp_cp = grid.create_pg(["cp", "dp"], **kwargs)
    pgc.tp_dp_cp = grid.create_pg(["tp", "cp", "dp"], **kwargs)
    role_group = grid.create_pg(GRID_DIMS, **kwargs)
    # Embedding groups: first + last stage of each pipeline (tied input/output embeddings) and
    # first stage alone (position embeddings). Derived from the pp enumeration, as in megatron-core.
    pp_enum = grid.get_rank_enum("pp")
    pgc.embd, _ = dist.new_subgroups_by_enumeration([sorted({g[0], g[-1]}) for g in pp_enum], backend=backend, **kwargs)
    pgc.pos_embd, _ = dist.new_subgroups_by_enumeration([[g[0]] for g in pp_enum], backend=backend, **kwargs)
    # Dense models only: no expert or hierarchical-CP groups.
    for name in ("hcp", "ep", "expt_tp", "tp_ep", "tp_ep_pp", "expt_dp", "intra_dp_cp", "intra_expt_dp",
                 "inter_dist_opt", "intra_dist_opt"):
        setattr(pgc, name, None)
    return RoleGroups(layout=layout, grid=grid, pgc=pgc, role_group=role_group, rank=dist.get_rank())
