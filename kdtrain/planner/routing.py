"""Where each teacher payload goes: the rule the payload channel routes by (kdtrain/stream/channel.py
calls :func:`payload_route`), and what it costs a colocated step.

Pure arithmetic. Ranks are placed as ``kdtrain.parallel.RoleLayout.rank_of`` places them: tensor
rank fastest, then data-parallel replica, then pipeline stage, from the role's rank offset. The
pairing is kdtrain/stream/pairing.py's: sequence number ``o`` of ``N`` per step is served by
teacher replica ``o % Dt`` for student replica ``o % Ds``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence


def last_stage_ranks(offset: int, tp: int, pp: int, dp: int, replica: int) -> range:
    """Global ranks of a role replica's last pipeline stage, tensor rank 0 first."""
    first = offset + tp * (replica + dp * (pp - 1))
    return range(first, first + tp)


def payload_route(teacher_last: Sequence[int], student_last: Sequence[int]) -> tuple[bool, int, int]:
    """``(zero_copy, src, dst)`` of a payload the teacher replica with last-stage ranks
    ``teacher_last`` computes for the student replica with ``student_last``.

    Zero-copy when every student rank is also one of the teacher's: the top-k payload is the same
    on all of a teacher's tensor ranks, so each uses the copy it computed. Otherwise the teacher's
    tensor-rank 0 (``src``) sends it to the student's tensor-rank 0 (``dst``; a hand-over on the
    rank when they are one), which broadcasts it inside the student's tensor-parallel group."""
    return set(student_last) <= set(teacher_last), teacher_last[0], student_last[0]


@dataclass(frozen=True)
class ColocatedRoutes:
    """One colocated step's payload traffic (both roles on ranks ``[0, W)``)."""

    sends: int  # most payloads one rank sends point-to-point (hand-overs and zero-copy excluded)
    receives: int  # most payloads one rank receives point-to-point
    broadcast: bool  # a student replica with tp > 1 takes a payload that is not zero-copy (a TP broadcast)
    # (teacher stage, student stage) -> most payloads a rank on that pair of stages holds once
    # the teacher phase is done, for every pair some rank is on (see colocated_held).
    held: dict


def colocated_held(teacher: tuple[int, int, int], student: tuple[int, int, int],
                   num_microbatches: int) -> tuple[dict, dict, dict, bool]:
    """``(held, sends, receives, broadcast)`` of a colocated step (see :func:`colocated_routes`)
    per rank (ranks absent: none). A colocated rank runs all its teacher micro-batches first, so
    what it holds after them is every payload it keeps: zero-copy ones on each rank of the
    student replica, hand-overs and posted receives on its tensor-rank 0, unfinished sends on
    the teacher's tensor-rank 0 (sends drain at the end of the step)."""
    (t_tp, t_pp, t_dp), (s_tp, s_pp, s_dp), n = teacher, student, num_microbatches
    # Teacher replica t serves student replica r on the o with o % Dt == t and o % Ds == r: none
    # unless t == r mod gcd(Dt, Ds), else N / lcm(Dt, Ds) of them (Chinese remainder theorem).
    g = math.gcd(t_dp, s_dp)
    per_pair = n // (t_dp * s_dp // g)
    m_t, m_s = n // t_dp, n // s_dp
    t_last_start = t_tp * t_dp * (t_pp - 1)  # first rank of the teacher's last stage
    held: dict[int, int] = {}
    recv: dict[int, int] = {}
    kept = [0] * t_dp  # per teacher replica: payloads it sends to no other rank
    broadcast = False
    for r in range(s_dp):
        s_last = last_stage_ranks(0, s_tp, s_pp, s_dp, r)
        zero = local = 0
        # Only the teacher replica whose last stage holds the student's tensor-rank 0 can serve
        # it without a transfer (zero-copy needs that rank; a hand-over is that rank).
        if s_last[0] >= t_last_start:
            c = (s_last[0] - t_last_start) // t_tp
            if c % g == r % g:
                zero_copy, src, dst = payload_route(last_stage_ranks(0, t_tp, t_pp, t_dp, c), s_last)
                if zero_copy:
                    zero = per_pair
                elif src == dst:
                    local = per_pair
                kept[c] += zero + local
        if zero:
            for x in s_last[1:]:
                held[x] = zero
        held[s_last[0]] = m_s  # zero-copy, hand-overs and posted receives
        recv[s_last[0]] = m_s - zero - local
        broadcast = broadcast or (s_tp > 1 and m_s > zero)
    sends = {}
    for t in range(t_dp):
        src = t_last_start + t * t_tp
        sends[src] = m_t - kept[t]
        held[src] = held.get(src, 0) + sends[src]
    return {x: h for x, h in held.items() if h}, sends, recv, broadcast


def colocated_routes(teacher: tuple[int, int, int], student: tuple[int, int, int],
                     num_microbatches: int) -> ColocatedRoutes:
    """Routes of ``num_microbatches`` micro-batches per step between a teacher and a student
    ``(tp, pp, dp)`` that both span ranks ``[0, W)``, by :func:`payload_route`."""
    # Each count is num_microbatches / lcm(Dt, Ds) times that of a step of lcm(Dt, Ds).
    unit = math.lcm(teacher[2], student[2])
    routes, scale = _routes_per_cycle(teacher, student), num_microbatches // unit
    return ColocatedRoutes(scale * routes.sends, scale * routes.receives, routes.broadcast,
                           {k: scale * h for k, h in routes.held.items()})


@lru_cache(maxsize=1 << 14)
def _routes_per_cycle(teacher: tuple[int, int, int], student: tuple[int, int, int]) -> ColocatedRoutes:
    held, sends, recv, broadcast = colocated_held(teacher, student, math.lcm(teacher[2], student[2]))
    t_rows, s_rows = teacher[0] * teacher[2], student[0] * student[2]  # ranks per stage
    # Stage indices only step up at stage boundaries: those and the ranks holding payloads
    # enumerate every pair of stages a rank is on, and its worst rank.
    by_stages: dict[tuple[int, int], int] = {}
    for x in ({i * t_rows for i in range(teacher[1])} | {j * s_rows for j in range(student[1])} | held.keys()):
        key = (x // t_rows, x // s_rows)
        by_stages[key] = max(by_stages.get(key, 0), held.get(x, 0))
    return ColocatedRoutes(max(sends.values()), max(recv.values()), broadcast, by_stages)
