"""Top-k KD loss with the student vocab split over TP=2 gloo ranks equals TP=1, for the reference
and for the fused path's algorithm (emulated kernels: pass 1, MAX + one SUM all-reduce, pass 2).

One spawn runs every case, to pay the process start-up once; it also checks that the ranks agree on
the implementation (agree_impl)."""

import os
import time
from datetime import timedelta

import torch

from kdtrain.loss import KDLossConfig, kd_loss

CASES = [
    # name, config, vocab, local vocab, k, teacher values
    ("fkl-tail", KDLossConfig(), 1271, 640, 401, "tail_lse"),
    ("jsd-alpha-tau2", KDLossConfig(divergence="jsd", beta=0.5, tau=2.0, alpha=0.3, scale_by_tau_sq=True),
     1271, 640, 401, "tail_lse"),
    ("rkl-renorm", KDLossConfig(divergence="reverse_kl", tail="renorm"), 1271, 640, 401, "logits"),
    ("jsd1-tail", KDLossConfig(divergence="jsd", beta=1.0, tau=0.7), 1271, 640, 33, "tail_lse"),
    ("renorm-alpha", KDLossConfig(divergence="jsd", beta=0.2, tail="renorm", alpha=0.5, tau=1.5), 1271, 640, 64,
     "logits"),
    ("fkl-logprobs", KDLossConfig(values_are_logprobs=True, tau=1.3), 1271, 640, 17, "logprobs"),
    # Shard 1 holds only padding (vocab 300 < 320 = its first id).
    ("empty-shard", KDLossConfig(divergence="jsd", beta=0.7, alpha=0.2), 300, 320, 50, "tail_lse"),
]


def _entry(rank, world, init_file, fn, args):
    import torch.distributed as dist

    from kdtrain.parallel import shutdown_distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        fn(rank, world, *args)
    finally:
        shutdown_distributed()  # gloo's threads end before the interpreter does


def spawn(world: int, fn, *args, tmp_path, timeout: float = 180.0) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` gloo processes; fail after ``timeout`` seconds."""
    import torch.multiprocessing as mp

    init_file = tmp_path / f"pg_init_{os.getpid()}"
    ctx = mp.start_processes(_entry, args=(world, str(init_file), fn, args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise AssertionError(f"TP={world} run did not finish in {timeout:.0f} s")


def _payload(teacher, k, vocab, tau, mode):
    vals, ids = torch.topk(teacher[..., :vocab], k, dim=-1)
    tail = torch.logsumexp((teacher[..., :vocab] / tau).scatter(-1, ids, float("-inf")), -1)
    if mode == "logprobs":
        vals = vals / tau - torch.logsumexp(teacher[..., :vocab] / tau, -1)[..., None]
    return ids.to(torch.int32), vals, (tail if mode == "tail_lse" else None)


def _run(x, ids, vals, lse, labels, mask, cfg, vocab, impl, group=None):
    x = x.clone().requires_grad_()
    loss, rep = kd_loss(x, ids, vals, vocab_size=vocab, config=cfg, tp_group=group, teacher_tail_lse_SB=lse,
                        labels_SB=labels, loss_mask_SB=mask, impl=impl)
    (2.0 * loss).backward()
    return loss.detach(), x.grad, rep


def _tp_cases(rank, world):
    import torch.distributed as dist

    group = dist.group.WORLD
    for i, (name, cfg, vocab, local, k, mode) in enumerate(CASES):
        g = torch.Generator().manual_seed(100 + i)
        S, B = 41, 1
        student = 3 * torch.randn(S, B, local * world, generator=g, dtype=torch.float64)
        teacher = 3 * torch.randn(S, B, vocab, generator=g, dtype=torch.float64)
        labels = torch.randint(0, vocab, (S, B), generator=g)
        labels[3, 0] = -100
        mask = (torch.rand(S, B, generator=g) > 0.1).double()
        ids, vals, lse = _payload(teacher, k, vocab, cfg.tau, mode)
        shard = slice(rank * local, (rank + 1) * local)
        ref_loss, ref_grad, ref_rep = _run(student, ids, vals, lse, labels, mask, cfg, vocab, "reference")
        for impl in ("reference", "emulated"):
            loss, grad, rep = _run(student[..., shard], ids, vals, lse, labels, mask, cfg, vocab, impl, group)
            where = f"{name} {impl} rank {rank}"
            torch.testing.assert_close(loss, ref_loss, rtol=1e-11, atol=1e-12, msg=lambda m: f"{where}: {m}")
            torch.testing.assert_close(grad, ref_grad[..., shard], rtol=1e-9, atol=1e-13,
                                       msg=lambda m: f"{where}: {m}")
            for key in ("kd_sum", "ce_sum", "tokens"):
                torch.testing.assert_close(rep[key], ref_rep[key], rtol=1e-11, atol=1e-12)
            # Gathering the shards gives the TP=1 gradient of the whole table.
            parts = [torch.empty_like(grad) for _ in range(world)]
            dist.all_gather(parts, grad.contiguous(), group=group)
            torch.testing.assert_close(torch.cat(parts, -1), ref_grad, rtol=1e-9, atol=1e-13)

    # bf16 logits through the emulated kernels: TP=2 against TP=1 of the same algorithm.
    g = torch.Generator().manual_seed(7)
    cfg = KDLossConfig(divergence="jsd", beta=0.5, alpha=0.1)
    student = (3 * torch.randn(41, 1, 1280, generator=g)).to(torch.bfloat16)
    teacher = 3 * torch.randn(41, 1, 1271, generator=g)
    labels = torch.randint(0, 1271, (41, 1), generator=g)
    ids, vals, lse = _payload(teacher, 64, 1271, 1.0, "tail_lse")
    shard = slice(rank * 640, (rank + 1) * 640)
    l1, g1, _ = _run(student, ids, vals, lse, labels, None, cfg, 1271, "emulated")
    l2, g2, _ = _run(student[..., shard], ids, vals, lse, labels, None, cfg, 1271, "emulated", group)
    torch.testing.assert_close(l2, l1, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g2.float(), g1[..., shard].float(), rtol=8e-3, atol=1e-7)

    # A run resolves the implementation at start-up: the same on every rank, or an error on every
    # rank (the paths' collectives differ: mixed ranks would hang in the first loss).
    from kdtrain.loss import agree_impl
    from kdtrain.parallel import agreed

    assert agree_impl(torch.float32, torch.device("cpu"), 64, group) == ("reference", "logits on cpu")
    if rank == 1:
        os.environ["KDTRAIN_KD_IMPL"] = "emulated"
    try:
        agree_impl(torch.float32, torch.device("cpu"), 64, group)
    except RuntimeError as e:
        mine, other = ("reference", "emulated") if rank == 0 else ("emulated", "reference")
        assert f"rank {rank} takes {mine} (" in str(e) and f"another rank {other}" in str(e), str(e)
        assert agreed(e, group)  # raised on every rank of the group: an outer agreement may count on it
    else:
        raise AssertionError("ranks on different KD-loss implementations were not refused")
    finally:
        os.environ.pop("KDTRAIN_KD_IMPL", None)
    # A rank that cannot resolve it at all (the kernels requested where they cannot run) still
    # joins the agreement: it raises its own error, the others say another rank failed.
    if rank == 1:
        os.environ["KDTRAIN_KD_IMPL"] = "fused"
    try:
        agree_impl(torch.float32, torch.device("cpu"), 64, group)
    except (ValueError, RuntimeError) as e:
        expected = "impl='fused' cannot run: logits on cpu" if rank == 1 else "could not be resolved on another rank"
        assert expected in str(e) and agreed(e, group), str(e)
    else:
        raise AssertionError("a rank that could not resolve the implementation went unnoticed")
    finally:
        os.environ.pop("KDTRAIN_KD_IMPL", None)


def test_tp2_equals_tp1(tmp_path):
    spawn(2, _tp_cases, tmp_path=tmp_path)
