"""The payload channel's communicators and receive posting, computed from the layouts alone (no
process group, no messages)."""

import math
from collections import Counter

import pytest
import torch

from kdtrain.parallel import RoleLayout
from kdtrain.stream import Pairing, PayloadSpec
from kdtrain.stream import channel as channel_module
from kdtrain.stream.channel import PayloadChannel, payload_groups, payload_pairs

SPEC = PayloadSpec(seq_length=4, micro_batch=1, k=2, values_dtype=torch.float32)


def _layouts(world: int) -> list[tuple[int, int, int]]:
    return [(tp, pp, world // (tp * pp)) for tp in range(1, world + 1) for pp in range(1, world + 1)
            if world % (tp * pp) == 0]


def _roles(t, s, colocated: bool, n=None):
    """(pairing, teacher, student): colocated on ranks [0, W), else the student after the teacher."""
    teacher = RoleLayout("teacher", 0, *t)
    student = RoleLayout("student", 0 if colocated else teacher.num_ranks, *s)
    return Pairing(n or 2 * math.lcm(t[2], s[2]), t[2], s[2]), teacher, student


def _check_groups(pairing, teacher, student):
    groups = payload_groups(pairing, teacher, student)
    pairs = payload_pairs(pairing, teacher, student)
    # One group per sending rank, holding it and exactly the ranks it sends to.
    assert [src for src, _ in groups] == sorted({src for src, _ in pairs})
    assert {(src, d) for src, ranks in groups for d in ranks if d != src} == set(pairs)
    assert all(src in ranks for src, ranks in groups)
    per_rank = Counter(x for _, ranks in groups for x in ranks)
    return max(per_rank.values(), default=0)


@pytest.mark.parametrize("t,s", [((8, 4, 1), (1, 1, 128)), ((8, 4, 2), (1, 1, 64)), ((8, 4, 2), (1, 1, 128)),
                                 ((8, 4, 3), (1, 1, 64)), ((8, 4, 3), (1, 1, 96)), ((8, 1, 4), (2, 2, 16))])
def test_a_rank_is_in_at_most_one_plus_dt_payload_groups_at_scale(t, s):
    """Disaggregated: a teacher's sending rank serving Ds student replicas sat in Ds pair groups
    (each a world-collective new_group and an NCCL communicator); now in one."""
    pairing, teacher, student = _roles(t, s, colocated=False)
    most = _check_groups(pairing, teacher, student)
    assert most <= 1 + teacher.dp, (t, s, most)
    assert len(payload_groups(pairing, teacher, student)) == teacher.dp


def _small_layout_pairs():
    """(teacher layout, student layout, colocated): every colocated pair up to 12 ranks and every
    disaggregated pair up to 6 + 6."""
    for world in range(1, 13):
        yield from ((t, s, True) for t in _layouts(world) for s in _layouts(world))
    for wt in range(1, 7):
        for ws in range(1, 7):
            yield from ((t, s, False) for t in _layouts(wt) for s in _layouts(ws))


def test_payload_groups_of_every_small_layout():
    """Every colocated pair of layouts up to 12 ranks and every disaggregated pair up to 6 + 6."""
    checked = 0
    for t, s, colocated in _small_layout_pairs():
        pairing, teacher, student = _roles(t, s, colocated=colocated)
        assert _check_groups(pairing, teacher, student) <= 1 + teacher.dp, (t, s, colocated)
        checked += 1
    assert checked > 1000


# -- posting receives ---------------------------------------------------------------------------

class _Done:
    def wait(self, timeout=None):
        return True


def _routing_channel(monkeypatch, pairing, teacher, student, rank, depth, log):
    """A channel for ``rank`` whose receives complete at once (their postings logged) and whose
    local payloads and tensor-parallel broadcasts are stand-ins."""
    ch = PayloadChannel(pairing, teacher, student, SPEC, None, torch.device("cpu"), 1.0, None, depth,
                        connect=False, rank=rank)
    post_recv = ch._post_recv
    monkeypatch.setattr(ch, "_group", lambda src, dst: None)
    monkeypatch.setattr(ch, "_post_recv", lambda o: (log.append(("post", o)), post_recv(o)))
    monkeypatch.setattr(ch, "_take_local", lambda o, src: SPEC.empty(torch.device("cpu")))
    monkeypatch.setattr(channel_module.dist, "irecv", lambda buffer, src, group=None: _Done())
    monkeypatch.setattr(channel_module.dist, "broadcast", lambda *a, **k: None)
    return ch


def _student_steps(ch, work, initial_post: bool, steps: int, log):
    """distill.py's calls: ``post(upcoming)`` at the step's start (disaggregated), then for each
    micro-batch ``get``, ``upcoming.remove``, ``post(upcoming)``."""
    tokens = torch.zeros(1, 4, dtype=torch.long)
    for _ in range(steps):
        upcoming = list(work)
        if initial_post:
            ch.post(upcoming)
        for o in work:
            ch.get(o, tokens, verify=False)
            log.append(("take", o))
            upcoming.remove(o)
            ch.post(upcoming)
        ch._unverified.clear()


def _scanning_post_events(route, rank, work, depth, initial_post: bool, steps: int):
    """The same calls against a post() that scans the whole remaining sequence on every call."""
    recvs, log = {}, []

    def post(sequence):
        for o in sequence:
            if depth is not None and len(recvs) >= depth:
                break
            if o in recvs:
                continue
            zero_copy, src, dst = route(o)
            if zero_copy or dst != rank or src == rank:
                continue
            recvs[o] = src
            log.append(("post", o))

    for _ in range(steps):
        upcoming = list(work)
        if initial_post:
            post(upcoming)
        for o in work:
            zero_copy, src, dst = route(o)
            if not zero_copy and dst == rank and src != rank:
                if o not in recvs:
                    post([o])
                recvs.pop(o)
            log.append(("take", o))
            upcoming.remove(o)
            post(upcoming)
    return log


def _cases():
    for world in range(1, 9):
        for t in _layouts(world):
            for s in _layouts(world):
                yield t, s, True
    for t, s in [((1, 1, 2), (1, 1, 4)), ((2, 1, 1), (1, 1, 2)), ((1, 2, 3), (2, 1, 2)), ((1, 1, 4), (2, 2, 2)),
                 ((2, 1, 2), (1, 1, 3))]:
        yield t, s, False


def test_post_posts_what_the_full_scan_posted_in_the_same_order(monkeypatch):
    """The receives posted, and when (between which takes), are those of a post() that rescans
    the step on every call, for every colocated layout pair up to 8 ranks and some
    disaggregated ones, at depths 1, 2 and unbounded, with and without the step's first post,
    over two steps."""
    checked = 0
    for t, s, colocated in _cases():
        pairing, teacher, student = _roles(t, s, colocated, n=4 * math.lcm(t[2], s[2]))
        for r in range(student.dp):
            work = pairing.student_work(r)
            for rank in (student.rank_of(0, r, student.pp - 1), student.rank_of(student.tp - 1, r, student.pp - 1)):
                for depth in (1, 2, None):
                    for initial_post in (False, True):
                        log = []
                        with monkeypatch.context() as m:
                            ch = _routing_channel(m, pairing, teacher, student, rank, depth, log)
                            _student_steps(ch, work, initial_post, 2, log)
                            want = _scanning_post_events(ch.route, rank, work, depth, initial_post, 2)
                        assert log == want, (t, s, colocated, rank, depth, initial_post)
                        assert not ch._recvs
                        checked += 1
    assert checked > 2000


@pytest.mark.parametrize("rank", [0, 3])
def test_a_step_routes_each_microbatch_a_bounded_number_of_times(monkeypatch, rank):
    """Teacher and student both tp8 on the same 8 ranks (zero-copy: no rank receives), 1024
    micro-batches: the teacher puts them all, then the student takes each and posts ahead. Every
    post() rescanned the rest of the step (N^2 / 2 routes, seconds of host time per step at this
    size); now a step, channel construction included, routes each micro-batch a few times."""
    n = 1024
    pairing, teacher, student = _roles((8, 1, 1), (8, 1, 1), colocated=True, n=n)
    calls = Counter()
    route = channel_module.payload_route

    def counted(*args):
        calls["route"] += 1
        return route(*args)

    monkeypatch.setattr(channel_module, "payload_route", counted)
    ch = PayloadChannel(pairing, teacher, student, SPEC, None, torch.device("cpu"), 1.0, None, 1, connect=False,
                        rank=rank)
    assert not ch._receives
    payload = SPEC.empty(torch.device("cpu"))
    for o in pairing.teacher_work(0):
        ch.put(o, payload)
    _student_steps(ch, pairing.student_work(0), initial_post=False, steps=1, log=[])
    assert ch.pending() == 0
    assert calls["route"] <= 4 * n, calls
