"""Point-to-point payload channel from the teacher's last pipeline stage to the student's.

Routing of sequence number ``o`` (see pairing.py) served by teacher replica ``t`` for student
replica ``r``:

* **zero-copy**: every last-stage rank of student replica ``r`` is also a last-stage rank of
  teacher replica ``t`` (colocated roles: the same layout, or e.g. a teacher tp2 x dp1 serving a
  student tp1 x dp2 on the same two ranks). The top-k payload is identical on all of a teacher's
  tensor ranks, so each of the student's ranks keeps the one it computed: nothing moves.
* otherwise the teacher's last-stage tensor-rank 0 sends the payload (one message) to the
  student's last-stage tensor-rank 0 (a local hand-over when that is the same rank), which
  broadcasts it inside the student's tensor-parallel group.

The decision is a function of the two layouts only, so every rank makes the same one; the rule
(kdtrain/planner/routing.py) is the one the planner prices.

Flow control. The sender keeps at most ``depth`` payloads in flight and waits for the oldest
before posting more; the receiver posts its receives up to ``depth`` sequence numbers ahead. Both
go in increasing ``o`` so the pairing's deadlock-freedom argument holds. A colocated rank is both
teacher and student and runs the teacher's micro-batches of a step before the student's, so its
sends drain at the end of the step (``send_depth=None``) and it posts each receive when its
student needs the payload (``recv_depth=1``): NCCL times a wait from the posting, so a receive
posted before the teacher's micro-batches would count them against ``timeout_s``.

Communicators. NCCL runs the point-to-point operations of one communicator in the order they
were posted: a receive at the head waits for its send, and everything behind it waits too (with
eagerly initialised groups, torch's default here, a group's sends and receives to any peer share
its one communicator). A colocated rank posts its sends, then its receives; with both directions,
or several senders, on one communicator, the operations at the heads of the ranks' queues can
wait for each other in a cycle, forever (teacher tp1 x dp6 serving student tp2 x dp3 on 6 ranks,
with one communicator per direction, for one; gloo does not serialize them, so CPU runs cannot
show it). Each rank that sends payloads therefore gets one group (:func:`payload_groups`): it
and the ranks it sends to. Its communicator carries that rank's sends and nothing else, so it
has one sender, and the argument needs nothing more:

* on it the sender posts in increasing ``o``, and each receiver posts its receives from that
  sender in increasing ``o`` too (a subsequence of the sender's order, the receiver's own work);
* the head of the sender's queue is the smallest ``o`` it has not sent, say for receiver ``d``;
  every earlier ``o`` for ``d`` was before it in the sender's queue, hence matched, so once ``d``
  posts ``o`` it is at the head of ``d``'s queue too: the two heads match, never a cycle inside
  one communicator;
* a rank's communicators are separate queues, and the pairing's argument (pairing.py: the
  smallest ``o`` not yet received) shows that the receive of that ``o`` gets posted (a receiver
  posts in increasing ``o`` and has taken every earlier one of its own) and its send too.

A colocated rank that both sends and receives is the root of its own group (its sends) and a
member of its senders' groups (its receives): never both directions on one communicator, so it
needs a group per peer nowhere. A rank belongs to at most ``1 + Dt`` payload groups (its own,
and one per teacher replica sending to it; a group per (src, dst) pair would put up to ``Ds``
communicators on a teacher's sending rank). The groups are created on every rank in one order
(world-collective); where a backend creates a communicator at its first message between two ranks
(blocking both until both arrive) each (src, dst) pair sends one token at construction, in one
global order (the smallest pair not yet open has both its ranks waiting on it).

Failure. Every payload transfer's wait is bounded by ``timeout_s`` (``split.timeout_s``; the
connection at construction and the student's tensor-parallel broadcast by their groups' timeout,
``distributed.timeout_s``); a peer that died (connection closed) or stalled
(timeout) raises ``StreamError`` naming both ranks and the micro-batch. The student checks the
payload's token checksum against its own micro-batch: a mismatch means the two sides disagree on
the data and is an error, never a silently wrong loss.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections import deque
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from ..parallel import RoleLayout
from ..planner.routing import last_stage_ranks, payload_route
from .pairing import Pairing
from .payload import Payload, PayloadSpec, token_checksum


class StreamError(RuntimeError):
    """The teacher -> student stream broke: dead or stalled peer, or mismatched data."""


def _last_stage_ranks(layout: RoleLayout, replica: int) -> range:
    return last_stage_ranks(layout.rank_offset, layout.tp, layout.pp, layout.dp, replica)


# -- routes and groups: pure functions of the pairing and the two layouts -----------------------
def route_of(pairing: Pairing, teacher: RoleLayout, student: RoleLayout, o: int) -> tuple[bool, int, int]:
    """(zero_copy, src rank, dst rank) of sequence number ``o`` (module docstring)."""
    r, _ = pairing.student_of(o)
    return payload_route(_last_stage_ranks(teacher, pairing.teacher_of(o)), _last_stage_ranks(student, r))


def payload_pairs(pairing: Pairing, teacher: RoleLayout, student: RoleLayout) -> list[tuple[int, int]]:
    """The (src, dst) ranks that payloads move between, in the order their tokens are exchanged."""
    pairs = set()
    # route(o) depends on o % Dt and o % Ds only, and N is a multiple of both: one cycle of
    # lcm(Dt, Ds) sequence numbers routes like every step.
    for o in range(math.lcm(pairing.dp_teacher, pairing.dp_student)):
        zero_copy, src, dst = route_of(pairing, teacher, student, o)
        if not zero_copy and src != dst:
            pairs.add((src, dst))
    return sorted(pairs, key=lambda p: (min(p), max(p), p[0]))


def payload_groups(pairing: Pairing, teacher: RoleLayout, student: RoleLayout) -> list[tuple[int, tuple[int, ...]]]:
    """``(src, ranks)`` of each payload group, in the order they are created: one per rank that
    sends payloads, holding it and the ranks it sends to (module docstring)."""
    dests: dict[int, set] = {}
    for src, dst in payload_pairs(pairing, teacher, student):
        dests.setdefault(src, {src}).add(dst)
    return [(src, tuple(sorted(ranks))) for src, ranks in sorted(dests.items())]


def payload_receives(pairing: Pairing, teacher: RoleLayout, student: RoleLayout, rank: int) -> list[int]:
    """Sequence numbers of a step that ``rank`` receives point-to-point, increasing: none unless it
    is the tensor-rank 0 of a student replica's last stage."""
    if not student.contains(rank):
        return []
    tp_rank, r, pp_rank = student.coords(rank)
    if tp_rank != 0 or pp_rank != student.pp - 1:
        return []
    received: dict[int, bool] = {}  # teacher replica -> whether its payloads for replica r arrive by message
    out = []
    for o in pairing.student_work(r):
        t = pairing.teacher_of(o)
        if t not in received:
            zero_copy, src, dst = route_of(pairing, teacher, student, o)
            received[t] = not zero_copy and src != dst
        if received[t]:
            out.append(o)
    return out


class PayloadChannel:
    """Both ends of the stream as seen from one rank (a rank may be teacher, student or both)."""

    def __init__(self, pairing: Pairing, teacher: RoleLayout, student: RoleLayout, spec: PayloadSpec,
                 student_tp_group, device: torch.device, timeout_s: float,
                 send_depth: Optional[int], recv_depth: Optional[int], connect: bool = True,
                 group_timeout_s: Optional[float] = None, rank: Optional[int] = None):
        self.pairing, self.teacher, self.student, self.spec = pairing, teacher, student, spec
        self.student_tp_group = student_tp_group
        self.device = device
        self.timeout = timedelta(seconds=timeout_s)
        self.send_depth, self.recv_depth = send_depth, recv_depth
        self.rank = dist.get_rank() if rank is None else rank  # rank: routing only, without a process group
        self._local: dict[int, Payload] = {}  # zero-copy or same-rank hand-over, keyed by o
        self._sends: deque = deque()  # (o, dest, work)
        self._recvs: dict[int, tuple[Payload, object]] = {}  # o -> (payload, work) posted on tp-rank 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self._unverified: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []  # (o, src, got, expected)
        self._receives = payload_receives(pairing, teacher, student, self.rank)  # what post() posts, in order
        self._pairs: set[tuple[int, int]] = set()  # (src, dst) moving payloads, once connected
        self._groups: dict[int, object] = {}  # src -> its group (module docstring)
        self.where = ""  # the pass in progress, e.g. " at step 12": set by the loop, named in errors
        if connect:  # False: routing only (no messages; the planner's tests)
            self._connect(group_timeout_s)

    # -- routing ------------------------------------------------------------------------------
    def _last_ranks(self, o: int) -> tuple[range, range]:
        """Last-stage ranks of the teacher replica serving ``o`` and of the student replica taking it."""
        r, _ = self.pairing.student_of(o)
        t = self.pairing.teacher_of(o)
        return _last_stage_ranks(self.teacher, t), _last_stage_ranks(self.student, r)

    def route(self, o: int) -> tuple[bool, int, int]:
        """(zero_copy, src rank, dst rank) of sequence number ``o``."""
        return route_of(self.pairing, self.teacher, self.student, o)

    def origin(self, o: int) -> str:
        """Where the payload of ``o`` comes from, for error messages."""
        return f"teacher rank {self.route(o)[1]}"

    # -- communicators (module docstring) ------------------------------------------------------
    def pairs(self) -> list[tuple[int, int]]:
        """The (src, dst) ranks that payloads move between, in the order their tokens are exchanged."""
        return payload_pairs(self.pairing, self.teacher, self.student)

    def _connect(self, timeout_s: Optional[float]) -> None:
        """World-collective (every rank constructs the channel): a group per sending rank, then one
        token per (src, dst) pair, in one global order (module docstring). ``timeout_s``: the
        groups' timeout (the run's distributed.timeout_s; None: torch's default)."""
        pairs = self.pairs()  # the same on every rank: a function of the layouts
        kw = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
        self._groups = {src: dist.new_group(list(ranks), **kw)
                        for src, ranks in payload_groups(self.pairing, self.teacher, self.student)}
        self._pairs = set(pairs)
        token = torch.zeros(1, dtype=torch.int32, device=self.device)
        for src, dst in pairs:
            if self.rank in (src, dst):
                peer = dst if self.rank == src else src
                # The peer may still be opening its corpus: the group's timeout bounds this wait.
                op = dist.isend if self.rank == src else dist.irecv
                self._guard(lambda: op(token, peer, group=self._group(src, dst)).wait(),
                            f"connecting to rank {peer}")

    def _group(self, src: int, dst: int):
        assert (src, dst) in self._pairs, (f"rank {self.rank}: no group for payloads {src} -> {dst} "
                                           "(a channel built with connect=False moves none)")
        return self._groups[src]

    # -- teacher side -------------------------------------------------------------------------
    def put(self, o: int, payload: Payload) -> None:
        """Called on every last-stage rank of the serving teacher replica, in increasing ``o``."""
        t_last, s_last = self._last_ranks(o)
        zero_copy, src, dst = payload_route(t_last, s_last)
        if zero_copy:
            if self.rank in s_last:  # the teacher's other tensor ranks serve another student replica
                self._local[o] = payload
            return
        if self.rank != src:
            return
        if dst == self.rank:
            self._local[o] = payload
            return
        work = self._guard(lambda: dist.isend(payload.buffer, dst, group=self._group(src, dst)),
                           f"sending micro-batch {o} to student rank {dst}")
        self._sends.append((o, dst, work))
        self.bytes_sent += self.spec.nbytes
        while self.send_depth is not None and len(self._sends) > self.send_depth:
            self._wait_send()

    def _wait_send(self) -> None:
        o, dst, work = self._sends.popleft()
        self._wait(work, f"sending micro-batch {o} to student rank {dst}")

    def flush(self) -> None:
        while self._sends:
            self._wait_send()

    # -- student side -------------------------------------------------------------------------
    def post(self, sequence: list[int]) -> None:
        """Post receives (tensor-rank 0 of the student's last stage) for the next sequence numbers.

        ``sequence`` is this student replica's remaining work in order (what is left of its
        ``pairing.student_work``); receives are posted up to ``recv_depth`` ahead (all of them
        when ``recv_depth`` is None). Only ``sequence[0]`` is read: the receives come from the
        precomputed ``_receives``, so a call costs O(log N + receives posted)."""
        todo, depth = self._receives, self.recv_depth
        if not todo or not sequence or (depth is not None and len(self._recvs) >= depth):
            return
        # Receives are posted in increasing o, with none skipped after sequence[0]: the ones in
        # flight are those of ``todo`` from sequence[0] through the last posted (the last key of
        # _recvs, which keeps insertion order), and the next to post is the one after both.
        i = bisect_left(todo, sequence[0])
        if self._recvs:
            i = max(i, bisect_right(todo, next(reversed(self._recvs))))
        while i < len(todo) and (depth is None or len(self._recvs) < depth):
            self._post_recv(todo[i])
            i += 1

    def _post_recv(self, o: int) -> None:
        _, src, dst = self.route(o)
        payload = self.spec.empty(self.device)
        work = self._guard(lambda: dist.irecv(payload.buffer, src, group=self._group(src, dst)),
                           f"receiving micro-batch {o} from teacher rank {src}")
        self._recvs[o] = (payload, work)

    def get(self, o: int, tokens: torch.Tensor, verify: bool = True) -> Payload:
        """The payload of ``o`` on every last-stage rank of the student replica, checksum-verified
        (one host sync); ``verify=False``: the comparison is queued on the device and
        :meth:`verify_pending` reads it later."""
        zero_copy, src, dst = self.route(o)
        if zero_copy:
            payload = self._take_local(o, src)
        else:
            if self.rank == dst:
                if src == self.rank:
                    payload = self._take_local(o, src)
                else:
                    if o not in self._recvs:
                        self._post_recv(o)
                    payload, work = self._recvs.pop(o)
                    self._wait(work, f"receiving micro-batch {o} from teacher rank {src}")
                    self.bytes_received += self.spec.nbytes
            else:
                payload = self.spec.empty(self.device)
            if self.student.tp > 1:
                dist.broadcast(payload.buffer, src=dst, group=self.student_tp_group)
        self._unverified.append((o, src, payload.checksum.clone(), token_checksum(tokens)))
        if verify:
            self.verify_pending()
        return payload

    def verify_pending(self) -> None:
        """Raise ``StreamError`` if a payload taken with ``get`` was computed on other tokens than
        the student's."""
        pending, self._unverified = self._unverified, []
        for o, src, got, expected in pending:
            if int(got) != int(expected):
                raise StreamError(f"rank {self.rank}{self.where}: teacher payload for micro-batch {o} (from rank "
                                  f"{src}) was computed on different tokens than the student's (checksum {int(got)} != "
                                  f"{int(expected)}): teacher and student disagree on the data order")

    def _take_local(self, o: int, src: int) -> Payload:
        assert o in self._local, f"rank {self.rank}: local payload {o} from rank {src} missing (schedule order bug)"
        return self._local.pop(o)

    # -- common -------------------------------------------------------------------------------
    def _guard(self, fn, what: str):
        try:
            return fn()
        except RuntimeError as e:  # gloo: connection closed by a dead peer, or its own timeout
            raise StreamError(f"rank {self.rank}{self.where}: {what} failed ({str(e).splitlines()[0][:200]}); "
                              f"the peer rank died or stalled") from None

    def _wait(self, work, what: str) -> None:
        ok = self._guard(lambda: work.wait(self.timeout), what)
        if ok is False:
            raise StreamError(f"rank {self.rank}{self.where}: {what} timed out after "
                              f"{self.timeout.total_seconds():.0f}s (split.timeout_s); the peer rank died or stalled "
                              f"(if it is only slow, e.g. a pipeline stage far behind, raise split.timeout_s)")

    def pending(self) -> int:
        return len(self._sends) + len(self._recvs) + len(self._local)
