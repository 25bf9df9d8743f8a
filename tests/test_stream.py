"""Teacher -> student streaming: pairing, payload format, vocab-parallel top-k, the p2p channel."""

import math
import os
import time

import pytest
import torch

from conftest import run_spawn
from kdtrain.stream import Pairing, PayloadSpec, token_checksum, vocab_parallel_topk


@pytest.mark.parametrize("n,dt,ds", [(8, 2, 2), (8, 1, 4), (8, 4, 2), (6, 3, 2), (12, 4, 3), (4, 1, 1)])
def test_pairing_serves_every_microbatch_once_in_order(n, dt, ds):
    p = Pairing(n, dt, ds)
    served = sorted(o for t in range(dt) for o in p.teacher_work(t))
    consumed = sorted(o for r in range(ds) for o in p.student_work(r))
    assert served == consumed == list(range(n))
    for t in range(dt):
        work = p.teacher_work(t)
        assert work == sorted(work) and len(work) == n // dt
        assert all(p.teacher_of(o) == t for o in work)
    for r in range(ds):
        work = p.student_work(r)
        assert work == sorted(work)
        assert [p.student_of(o) for o in work] == [(r, j) for j in range(n // ds)]
    if dt == ds:  # colocated replicas pair one-to-one
        assert all(p.teacher_of(o) == p.student_of(o)[0] for o in range(n))


def test_pairing_rejects_uneven_splits():
    with pytest.raises(ValueError, match="teacher replicas"):
        Pairing(6, 4, 2)
    with pytest.raises(ValueError, match="student replicas"):
        Pairing(6, 1, 4)


def test_payload_views_share_one_buffer():
    for dtype in (torch.float32, torch.bfloat16):
        spec = PayloadSpec(seq_length=5, micro_batch=3, k=7, values_dtype=dtype)
        p = spec.empty(torch.device("cpu"))
        p.ids.copy_(torch.arange(105, dtype=torch.int32).view(5, 3, 7))
        p.values.fill_(1.5)
        p.tail_lse.fill_(-2.0)
        p.checksum.fill_(-(2**62))
        assert p.ids.shape == p.values.shape == (5, 3, 7) and p.tail_lse.shape == (5, 3)
        assert p.values.dtype == dtype and p.buffer.numel() == spec.nbytes
        assert int(p.checksum) == -(2**62) and int(p.ids[4, 2, 6]) == 104
        assert float(p.values[0, 0, 0]) == 1.5 and float(p.tail_lse[4, 2]) == -2.0


def test_token_checksum_sees_order_and_content():
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, 150000, (4, 512), generator=g)
    base = int(token_checksum(tok))
    swapped = tok.clone()
    swapped[0, [3, 4]] = swapped[0, [4, 3]]
    shifted = torch.roll(tok, 1, dims=1)
    changed = tok.clone()
    changed[3, 511] += 1
    assert len({base, int(token_checksum(swapped)), int(token_checksum(shifted)), int(token_checksum(changed))}) == 4
    assert int(token_checksum(tok.clone())) == base


def _dense_topk(logits, k, vocab, tau):
    """(ids, values, logsumexp of logits / tau outside the top-k) in fp64."""
    real = logits[..., :vocab].double()
    v, i = torch.topk(real, k, dim=-1)
    return i, v, torch.logsumexp((real / tau).scatter(-1, i, float("-inf")), dim=-1)


def test_topk_single_rank_excludes_padding():
    g = torch.Generator().manual_seed(1)
    vocab, padded = 101, 128
    logits = torch.randn(6, 2, padded, generator=g)
    logits[..., vocab:] = 100.0  # padding columns must never win
    ids, vals, tail = vocab_parallel_topk(logits, 9, vocab, None, tau=2.0)
    ref_i, ref_v, ref_tail = _dense_topk(logits, 9, vocab, 2.0)
    assert ids.dtype == torch.int32 and torch.equal(ids.long(), ref_i)
    torch.testing.assert_close(vals.double(), ref_v)
    torch.testing.assert_close(tail.double(), ref_tail, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="exceeds the vocabulary"):
        vocab_parallel_topk(logits, 102, vocab, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_tail_is_the_plain_formula_bitwise(dtype):
    """The tail's in-place chunks compute, bit for bit, the plain ``m = max(x / tau) outside K;
    m + log(sum over the ids outside K of exp(x / tau - m))`` on the upcast logits, and leave the
    logits unchanged (fp32 ones too)."""
    g = torch.Generator().manual_seed(3)
    vocab = 1000
    logits = (4 * torch.randn(37, 3, 1024, generator=g)).to(dtype)
    before = logits.clone()
    for tau in (1.0, 0.25, 0.7, 2.0):
        ids, _, tail = vocab_parallel_topk(logits, 8, vocab, None, tau=tau, chunk_bytes=5000)  # ~4 rows per chunk
        x = (logits[..., :vocab].float() / tau).scatter(-1, ids.long(), float("-inf"))
        m = x.amax(dim=-1)
        assert torch.equal(tail, m + (x - m[..., None]).exp().sum(dim=-1).log()), (dtype, tau)
    assert torch.equal(logits, before)
    _, _, tail = vocab_parallel_topk(logits, vocab, vocab, None)  # the top-k are the whole vocabulary
    assert torch.equal(tail, torch.full_like(tail, float("-inf")))
    masked = torch.full((2, 1, 16), float("-inf"))
    masked[..., :10] = torch.randn(2, 1, 10)  # no finite logit outside the top-10: an empty tail, not NaN
    _, _, tail = vocab_parallel_topk(masked, 10, 16, None)
    assert torch.equal(tail, torch.full_like(tail, float("-inf")))


def test_a_confident_teacher_s_tail_is_exact():
    """One logit 30 above 999 others: the tail holds about 1e-10 of the mass, far below fp32's
    resolution of 1 - sum_K p, and the teacher's own sum gets it to fp32 rounding (the loss then
    charges reverse KL for that tail, not for the floor of an empty one)."""
    from kdtrain.loss import KDLossConfig, kd_loss_reference

    logits = torch.zeros(2, 1, 1000)
    logits[..., 7] = 30.0
    ids, vals, tail = vocab_parallel_topk(logits, 8, 1000, None)
    _, _, want = _dense_topk(logits, 8, 1000, 1.0)
    torch.testing.assert_close(tail.double(), want, rtol=1e-6, atol=0)  # log(992) - 30, about -23.1
    student = torch.zeros(2, 1, 1000)  # uniform: most of its mass is in the tail
    cfg = KDLossConfig(divergence="reverse_kl")
    loss, _ = kd_loss_reference(student, ids, vals, vocab_size=1000, config=cfg, teacher_tail_lse_SB=tail)
    p = torch.softmax(logits[0, 0].double(), 0)
    q_t, p_t = 992 / 1000, float(p.sum() - p[ids[0, 0].long()].sum())
    exact = (torch.full((8,), 1e-3, dtype=torch.float64) * (torch.log(torch.tensor(1e-3)) - p[ids[0, 0].long()].log())
             ).sum() + q_t * (math.log(q_t) - math.log(p_t))
    assert abs(float(loss) - float(exact)) < 1e-4 * float(exact)  # 23.06 (a floored tail gave 86.8)


def _topk_tp(rank, world, logits, k, vocab, tau):
    import torch.distributed as dist

    shard = logits.shape[-1] // world
    local = logits[..., rank * shard:(rank + 1) * shard].contiguous()
    ids, vals, tail = vocab_parallel_topk(local, k, vocab, dist.group.WORLD, tau=tau, chunk_bytes=512)
    ref_i, ref_v, ref_tail = _dense_topk(logits, k, vocab, tau)
    assert torch.equal(ids.long(), ref_i), (rank, ids, ref_i)
    torch.testing.assert_close(vals.double(), ref_v)
    torch.testing.assert_close(tail.double(), ref_tail, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k", [5, 40])  # 40 > real ids of the last shard (vocab 70 over 2 x 64)
def test_topk_across_two_tensor_ranks_equals_dense(tmp_path, k):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(7, 3, 128, generator=g)
    logits[..., 70:] = 50.0
    run_spawn(2, _topk_tp, logits, k, 70, 0.7, tmp_path=tmp_path)


# -- channel: teacher TP=2 on ranks 0-1, student DP=2 on ranks 2-3 (disaggregated) -------------

def _channel_setup(world, timeout_s=20.0):
    import torch.distributed as dist

    from kdtrain.parallel import RoleLayout
    from kdtrain.stream.channel import PayloadChannel

    teacher = RoleLayout("teacher", 0, 2, 1, 1)
    student = RoleLayout("student", 2, 1, 1, 2)
    spec = PayloadSpec(seq_length=4, micro_batch=2, k=3, values_dtype=torch.float32)
    pairing = Pairing(4, 1, 2)
    ch = PayloadChannel(pairing, teacher, student, spec, student_tp_group=None, device=torch.device("cpu"),
                        timeout_s=timeout_s, send_depth=1, recv_depth=1)
    return dist.get_rank(), ch, pairing, spec


def _tokens(o):
    return torch.arange(8).view(2, 4) + 100 * o


def _make_payload(spec, o):
    p = spec.empty(torch.device("cpu"))
    p.ids.fill_(o)
    p.values.fill_(float(o) + 0.5)
    p.tail_lse.fill_(-float(o))
    p.checksum.copy_(token_checksum(_tokens(o)))
    return p


def _wait_for(folder, names, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while not all(os.path.exists(os.path.join(folder, n)) for n in names) and time.monotonic() < deadline:
        time.sleep(0.05)


def _channel_roundtrip(rank, world, corrupt, deferred=False, done_dir=None):
    from kdtrain.stream.channel import StreamError

    rank, ch, pairing, spec = _channel_setup(world)
    if rank < 2:
        try:
            for o in pairing.teacher_work(0):
                ch.put(o, _make_payload(spec, o + (1 if corrupt and o == 1 else 0)))
            if not (corrupt and rank == 0):
                ch.flush()
            else:
                # The corrupt payload's receiver stops at it, so no flush here. It stays alive until
                # every payload is sent (its posted receives take them), and this rank until every
                # other receiver has taken its own: an exit would close their connections (files as
                # the signals: bounded waits, not fixed sleeps).
                open(os.path.join(done_dir, "sent"), "w").close()
                _wait_for(done_dir, [f"done{r}" for r in range(2) if 1 not in pairing.student_work(r)])
        except StreamError:
            # The receiver of the corrupt payload stops at it and exits; a later send to that
            # rank may then fail (connection closed), which is the sender's correct reaction.
            if not (corrupt and rank == 0):
                raise
        return
    r = rank - 2
    work = pairing.student_work(r)
    for i, o in enumerate(work):
        ch.post(work[i:])
        if corrupt and o == 1:
            if deferred:  # the training loop's way: compared on the device, read at the step's end
                ch.get(o, _tokens(o), verify=False)
                with pytest.raises(StreamError, match="different tokens"):
                    ch.verify_pending()
            else:
                with pytest.raises(StreamError, match="different tokens"):
                    ch.get(o, _tokens(o))
            _wait_for(done_dir, ["sent"])
            return
        p = ch.get(o, _tokens(o))
        assert int(p.ids[0, 0, 0]) == o and float(p.values[1, 1, 2]) == o + 0.5 and float(p.tail_lse[3, 1]) == -o
    assert ch.bytes_received == len(work) * spec.nbytes
    if done_dir is not None:
        open(os.path.join(done_dir, f"done{r}"), "w").close()


def test_channel_delivers_in_order_across_roles(tmp_path):
    run_spawn(4, _channel_roundtrip, False, tmp_path=tmp_path)


@pytest.mark.parametrize("deferred", [False, True])
def test_channel_checksum_mismatch_is_an_error(tmp_path, deferred):
    run_spawn(4, _channel_roundtrip, True, deferred, str(tmp_path), tmp_path=tmp_path)


def _dead_teacher(rank, world):
    from kdtrain.stream.channel import StreamError

    rank, ch, pairing, spec = _channel_setup(world, timeout_s=10.0)
    if rank == 0:
        os._exit(0)  # the teacher's sending rank dies before sending anything
    if rank == 1:
        return
    r = rank - 2
    t0 = time.monotonic()
    with pytest.raises(StreamError, match="died or stalled"):
        ch.get(pairing.student_work(r)[0], _tokens(0))
    assert time.monotonic() - t0 < 15.0


def test_dead_teacher_rank_gives_a_clear_error_within_the_timeout(tmp_path):
    run_spawn(4, _dead_teacher, tmp_path=tmp_path)


# -- channel: teacher dp2 on ranks 0-1, student dp3 on ranks 1-3 (shared sender groups) ----------

def _shared_groups(rank, world):
    """Teacher replica t on rank t sends to the student replicas on ranks 1-3 (replica r on rank
    1 + r) over one group per sending rank: rank 0's holds ranks 0-3, rank 1's ranks 1-3. Rank 1
    is teacher and student (it sends to ranks 2 and 3, receives from rank 0 and keeps o = 3,
    zero-copy), like a colocated rank: its micro-batches are served before its student's."""
    import torch.distributed as dist

    from kdtrain.parallel import RoleLayout
    from kdtrain.stream.channel import PayloadChannel

    spec = PayloadSpec(seq_length=4, micro_batch=2, k=3, values_dtype=torch.float32)
    pairing = Pairing(12, 2, 3)
    ch = PayloadChannel(pairing, RoleLayout("teacher", 0, 1, 1, 2), RoleLayout("student", 1, 1, 1, 3), spec,
                        student_tp_group=None, device=torch.device("cpu"), timeout_s=20.0, send_depth=None,
                        recv_depth=2)
    assert ch.pairs() == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
    members = {0: (0, 1, 2, 3), 1: (1, 2, 3)}  # sending rank -> its group
    assert {src: dist.get_world_size(g) for src, g in ch._groups.items() if rank in members[src]} == \
        {src: len(m) for src, m in members.items() if rank in m}
    if rank < 2:
        for o in pairing.teacher_work(rank):
            ch.put(o, _make_payload(spec, o))
    if rank >= 1:
        work = pairing.student_work(rank - 1)
        for i, o in enumerate(work):
            ch.post(work[i:])
            assert torch.equal(ch.get(o, _tokens(o)).buffer, _make_payload(spec, o).buffer), (rank, o)
        moved = sum(ch.route(o)[1] != rank for o in work)  # all but rank 1's own (zero-copy) ones
        assert ch.bytes_received == moved * spec.nbytes and moved == (4 if rank > 1 else 2), (rank, moved)
    ch.flush()
    assert ch.bytes_sent == {0: 6, 1: 4}.get(rank, 0) * spec.nbytes and ch.pending() == 0


def test_channel_moves_payloads_bitwise_over_one_group_per_sending_rank(tmp_path):
    run_spawn(4, _shared_groups, tmp_path=tmp_path)


# -- channel: colocated teacher tp2 x dp1 and student tp1 x dp2 on ranks 0-1 (zero-copy) ----------

def _colocated_zero_copy(rank, world):
    from kdtrain.parallel import RoleLayout
    from kdtrain.stream.channel import PayloadChannel

    spec = PayloadSpec(seq_length=4, micro_batch=2, k=3, values_dtype=torch.float32)
    pairing = Pairing(4, 1, 2)
    ch = PayloadChannel(pairing, RoleLayout("teacher", 0, 2, 1, 1), RoleLayout("student", 0, 1, 1, 2), spec,
                        student_tp_group=None, device=torch.device("cpu"), timeout_s=20.0,
                        send_depth=None, recv_depth=None)
    work = pairing.student_work(rank)  # student replica r is rank r
    assert all(ch.route(o) == (True, 0, rank) for o in work)
    for o in pairing.teacher_work(0):  # both ranks are the teacher's last stage
        ch.put(o, _make_payload(spec, o))
    # Each rank keeps only its own student replica's payloads: the others' are never taken.
    assert ch.pending() == len(work) == 2, (rank, ch.pending())
    for o in work:
        assert int(ch.get(o, _tokens(o)).ids[0, 0, 0]) == o
    assert ch.pending() == 0 and ch.bytes_sent == ch.bytes_received == 0


def test_colocated_zero_copy_keeps_only_the_rank_s_own_payloads(tmp_path):
    run_spawn(2, _colocated_zero_copy, tmp_path=tmp_path)


def _stream_order_deadlocks(ops: dict, key) -> bool:
    """NCCL's rule, simulated: each communicator (``key(src, dst)``) runs a rank's operations on
    it in the order posted, and a send completes only with the matching receive, both at the
    head of their ranks' queues. ``ops``: rank -> [(o, src, dst)] in posting order."""
    from collections import defaultdict, deque

    queues = defaultdict(deque)  # (rank, communicator) -> posted operations
    for rank, posted in ops.items():
        for o, src, dst in posted:
            queues[rank, key(src, dst)].append((o, src, dst))
    progress = True
    while progress:
        progress = False
        for (rank, comm), q in list(queues.items()):
            if not q:
                continue
            o, src, dst = q[0]
            peer = dst if rank == src else src
            other = queues.get((peer, comm))
            if other and other[0] == (o, src, dst):
                q.popleft(), other.popleft()
                progress = True
    return any(queues.values())


def _stream_ops(ch, world: int) -> dict:
    """rank -> [(o, src, dst)] in the channel's posting order: a rank's sends, then its receives
    (a colocated rank serves its teacher micro-batches before its student needs the payloads)."""
    sends, recvs = {r: [] for r in range(world)}, {r: [] for r in range(world)}
    for o in range(ch.pairing.num_microbatches):
        zero_copy, src, dst = ch.route(o)
        if not zero_copy and src != dst:
            sends[src].append((o, src, dst))
            recvs[dst].append((o, src, dst))
    assert {(src, dst) for r in sends for _, src, dst in sends[r]} == set(ch.pairs())
    return {r: sends[r] + recvs[r] for r in range(world)}


def _sender_group(ch):
    """The channel's communicator of payloads src -> dst: its sender's group (payload_groups)."""
    from kdtrain.stream.channel import payload_groups

    owner = {(src, d): src for src, ranks in payload_groups(ch.pairing, ch.teacher, ch.student) for d in ranks}
    return lambda src, dst: owner[src, dst]


def test_colocated_streams_cannot_deadlock_on_nccls_per_communicator_order(world_of_one):
    """A colocated rank posts its teacher's sends, then its student's receives (channel.py).
    NCCL runs a communicator's operations in posting order; gloo does not serialize them, so the
    CPU runs cannot show a deadlock. Simulated here: one communicator for the world, or per
    direction (lower to higher rank and back), deadlocks some colocated layouts (the heads of the
    ranks' queues wait for each other in a cycle); one per ordered pair, or the channel's one per
    sending rank (payload_groups: only that rank's sends, and its receivers' receives from it,
    all in increasing o), deadlocks none of up to 12 ranks."""
    from conftest import routing_channels

    keyings = {"world": lambda a, b: 0, "direction": lambda a, b: a < b, "ordered pair": lambda a, b: (a, b)}
    deadlocked, checked = {name: [] for name in [*keyings, "channel"]}, 0
    for world, t, s, ch in routing_channels(12):
        ops = _stream_ops(ch, world)
        for name, key in [*keyings.items(), ("channel", _sender_group(ch))]:
            if _stream_order_deadlocks(ops, key):
                deadlocked[name].append((t, s))
        checked += 1
    assert deadlocked["world"] and deadlocked["direction"], deadlocked
    assert not deadlocked["ordered pair"] and not deadlocked["channel"] and checked > 400, (deadlocked, checked)


def test_disaggregated_streams_cannot_deadlock_on_the_channel_s_communicators():
    """The same simulation for a teacher and a student on separate ranks (up to 6 + 6): one
    sender per communicator, however many students a teacher rank serves."""
    import math

    from kdtrain.parallel import RoleLayout
    from kdtrain.stream.channel import PayloadChannel

    spec = PayloadSpec(seq_length=4, micro_batch=1, k=2, values_dtype=torch.float32)
    checked = 0
    for wt in range(1, 7):
        for ws in range(1, 7):
            layouts = [[(tp, pp, w // (tp * pp)) for tp in range(1, w + 1) for pp in range(1, w + 1)
                        if w % (tp * pp) == 0] for w in (wt, ws)]
            for t in layouts[0]:
                for s in layouts[1]:
                    ch = PayloadChannel(Pairing(2 * math.lcm(t[2], s[2]), t[2], s[2]), RoleLayout("teacher", 0, *t),
                                        RoleLayout("student", wt, *s), spec, None, torch.device("cpu"), 1.0, None,
                                        None, connect=False, rank=0)
                    assert not _stream_order_deadlocks(_stream_ops(ch, wt + ws), _sender_group(ch)), (t, s)
                    checked += 1
    assert checked > 400, checked


# -- errors name where they happened -------------------------------------------------------------

@pytest.mark.parametrize("bad", ["values", "checksum"])
def test_a_bad_teacher_payload_names_the_step_micro_batch_and_sender(bad):
    """A teacher's NaN logit (a diverged teacher) or a payload of other tokens is found after the
    step's last backward; the error says which step, micro-batch and teacher rank."""
    from collections import deque
    from types import SimpleNamespace

    import numpy as np

    from kdtrain.loss import KDLossConfig
    from kdtrain.parallel import RoleLayout
    from kdtrain.stream.channel import PayloadChannel, StreamError
    from kdtrain.training.batches import make_microbatch
    from kdtrain.training.distill import SeqMicroBatch, kd_forward_step

    vocab, o = 16, 1
    spec = PayloadSpec(seq_length=4, micro_batch=1, k=2, values_dtype=torch.float32)
    # Teacher and student on rank 0 (tp1 pp1 dp1): the payload is handed over on the rank.
    ch = PayloadChannel(Pairing(2, 1, 1), RoleLayout("teacher", 0, 1, 1, 1), RoleLayout("student", 0, 1, 1, 1),
                        spec, None, torch.device("cpu"), 5.0, None, None, connect=False, rank=0)
    mb = SeqMicroBatch(**vars(make_microbatch(np.arange(5).reshape(1, 5), torch.device("cpu"))), seq=o)
    payload = spec.empty(torch.device("cpu"))
    payload.ids.copy_(torch.tensor([3, 5], dtype=torch.int32).expand(4, 1, 2))
    payload.values.copy_(torch.tensor([2.0, 1.0]).expand(4, 1, 2))
    payload.tail_lse.fill_(0.0)
    payload.checksum.copy_(token_checksum(mb.tokens if bad == "values" else mb.tokens + 1))
    if bad == "values":
        payload.values[2, 0, 1] = float("nan")
    ch.put(o, payload)
    ch.where = " at step 7"  # as the training loop sets it
    cfg = SimpleNamespace(student=SimpleNamespace(model=SimpleNamespace(vocab_size=vocab)), loss=KDLossConfig())
    _, loss_func = kd_forward_step(ch, deque([o]), cfg, None, {"teacher_wait_s": 0.0})(lambda *a, **k: None, mb)
    _, _, report = loss_func(torch.randn(4, 1, vocab), 4)
    expected = ((ValueError, r"micro-batch 1 at step 7, payload from teacher rank 0: teacher top-k values contain 1 "
                 "NaN") if bad == "values" else
                (StreamError, r"rank 0 at step 7: teacher payload for micro-batch 1 \(from rank 0\) was computed on "
                 "different tokens"))
    with pytest.raises(expected[0], match=expected[1]):
        report["check"]()
