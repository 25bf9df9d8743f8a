"""Top-k KD loss reference: dense identities at k = V, TRL's JSD convention, gradients, TP=2."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import run_spawn
from kdtrain.loss import KDLossConfig, kd_loss_reference

DIVS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.5), ("jsd", 1.0), ("jsd", 0.1)]


def _dense(student, teacher, cfg: KDLossConfig) -> torch.Tensor:
    """Per-token divergence over the full vocabulary, written from TRL's generalized JSD formula."""
    s = F.log_softmax(student / cfg.tau, -1)
    t = F.log_softmax(teacher / cfg.tau, -1)
    kl = lambda a, b: (a.exp() * (a - b)).sum(-1)  # KL(exp a || exp b)
    if cfg.divergence == "forward_kl" or (cfg.divergence == "jsd" and cfg.beta == 0):
        out = kl(t, s)
    elif cfg.divergence == "reverse_kl" or (cfg.divergence == "jsd" and cfg.beta == 1):
        out = kl(s, t)
    else:
        b = cfg.beta
        m = torch.logsumexp(torch.stack([s + math.log(1 - b), t + math.log(b)]), 0)
        out = b * kl(t, m) + (1 - b) * kl(s, m)
    return out * (cfg.tau ** 2 if cfg.scale_by_tau_sq else 1.0)


def _data(S=5, B=3, V=37, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    student = (2 * torch.randn(S, B, V, generator=g)).to(dtype)
    teacher = (2 * torch.randn(S, B, V, generator=g)).to(dtype)
    labels = torch.randint(0, V, (S, B), generator=g)
    return student, teacher, labels


def _topk(teacher, k, tau):
    vals, ids = torch.topk(teacher, k, dim=-1)
    return ids.to(torch.int32), vals, torch.logsumexp(teacher / tau, -1)


@pytest.mark.parametrize("div,beta", DIVS)
@pytest.mark.parametrize("tail,tau,sq", [("tail", 1.0, False), ("renorm", 2.0, True), ("tail", 0.5, True)])
def test_k_equal_v_matches_dense_fp64(div, beta, tail, tau, sq):
    cfg = KDLossConfig(divergence=div, beta=beta, tau=tau, scale_by_tau_sq=sq, tail=tail)
    student, teacher, _ = _data()
    ids, vals, lse = _topk(teacher, teacher.shape[-1], tau)
    x = student.clone().requires_grad_()
    loss, rep = kd_loss_reference(x, ids, vals, vocab_size=37, config=cfg, teacher_lse_SB=lse)
    loss.backward()
    y = student.clone().requires_grad_()
    ref = _dense(y, teacher, cfg).mean()
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-8, atol=1e-12)


def test_tail_bucket_equals_dense_over_k_plus_one_outcomes():
    """k < V, tail mode: the (k+1)-bucket distributions built by hand from the dense softmaxes."""
    cfg = KDLossConfig(divergence="jsd", beta=0.3, tau=1.5)
    student, teacher, _ = _data(V=50)
    ids, vals, lse = _topk(teacher, 7, cfg.tau)
    loss, _ = kd_loss_reference(student, ids, vals, vocab_size=50, config=cfg, teacher_lse_SB=lse)
    p, q = F.softmax(teacher / cfg.tau, -1), F.softmax(student / cfg.tau, -1)
    pk, qk = p.gather(-1, ids.long()), q.gather(-1, ids.long())
    P = torch.cat([pk, 1 - pk.sum(-1, keepdim=True)], -1)
    Q = torch.cat([qk, 1 - qk.sum(-1, keepdim=True)], -1)
    M = 0.3 * P + 0.7 * Q
    ref = (0.3 * (P * (P / M).log()).sum(-1) + 0.7 * (Q * (Q / M).log()).sum(-1)).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("div,beta", DIVS[:3] + [("jsd", 0.5)])
@pytest.mark.parametrize("tail", ["tail", "renorm"])
def test_gradcheck_fp64(div, beta, tail):
    cfg = KDLossConfig(divergence=div, beta=beta, tau=1.3, tail=tail, alpha=0.25)
    student, teacher, labels = _data(S=3, B=2, V=11, seed=3)
    ids, vals, lse = _topk(teacher, 4, cfg.tau)
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    x = student.clone().requires_grad_()
    f = lambda x: kd_loss_reference(x, ids, vals, vocab_size=11, config=cfg, teacher_lse_SB=lse, labels_SB=labels,
                                    loss_mask_SB=mask, num_tokens=7.0)[0]
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7)


def test_alpha_mixes_hard_label_cross_entropy():
    cfg = KDLossConfig(alpha=0.4, tau=2.0)
    student, teacher, labels = _data()
    labels[0, 0] = -100
    ids, vals, lse = _topk(teacher, 37, 2.0)
    loss, rep = kd_loss_reference(student, ids, vals, vocab_size=37, config=cfg, teacher_lse_SB=lse, labels_SB=labels)
    valid = labels != -100
    ce = F.cross_entropy(student.reshape(-1, 37), labels.reshape(-1), ignore_index=-100, reduction="sum")
    kd = (_dense(student, teacher, cfg) * valid).sum()
    torch.testing.assert_close(rep["ce_sum"], ce)
    torch.testing.assert_close(loss, (0.6 * kd + 0.4 * ce) / valid.sum())


def test_padding_columns_and_grad_output():
    cfg = KDLossConfig(divergence="reverse_kl", tau=0.7)
    student, teacher, _ = _data(V=30)
    padded = torch.cat([student, torch.full((5, 3, 2), 40.0, dtype=torch.float64)], -1).requires_grad_()
    ids, vals, lse = _topk(teacher, 6, 0.7)
    loss, _ = kd_loss_reference(padded, ids, vals, vocab_size=30, config=cfg, teacher_lse_SB=lse)
    (3.0 * loss).backward()
    x = student.clone().requires_grad_()
    ref, _ = kd_loss_reference(x, ids, vals, vocab_size=30, config=cfg, teacher_lse_SB=lse)
    (3.0 * ref).backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(padded.grad[..., :30], x.grad)
    assert padded.grad[..., 30:].abs().max() == 0


@pytest.mark.parametrize("bad,match", [
    ("id_high", "out of range"), ("id_neg", "out of range"), ("nan", "NaN/inf"), ("shape", "do not match"),
    ("k", "exceeds the vocabulary"),
])
def test_bad_payload_gives_a_clear_error(bad, match):
    student, teacher, _ = _data(V=12)
    ids, vals, lse = _topk(teacher, 4, 1.0)
    if bad == "id_high":
        ids[1, 1, 2] = 12
    elif bad == "id_neg":
        ids[0, 0, 0] = -1
    elif bad == "nan":
        vals[2, 0, 1] = float("nan")
    elif bad == "shape":
        ids, vals = ids[:4], vals[:4]
    elif bad == "k":
        ids, vals = torch.zeros(5, 3, 13, dtype=torch.int32), torch.zeros(5, 3, 13, dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        kd_loss_reference(student, ids, vals, vocab_size=12, config=KDLossConfig(), teacher_lse_SB=lse)


def test_config_errors_name_the_field():
    from kdtrain.config import from_dict

    for raw, field in [({"beta": 1.5}, "loss.beta"), ({"tau": 0}, "loss.tau"), ({"alpha": -1}, "loss.alpha"),
                       ({"divergence": "kl"}, "loss.divergence"), ({"tail": "drop"}, "loss.tail")]:
        with pytest.raises(ValueError, match=field):
            from_dict(KDLossConfig, raw, "loss")


def _tp2(rank, world, cfg, student, teacher, labels, k, vocab):
    import torch.distributed as dist

    ids, vals, lse = _topk(teacher[..., :vocab], k, cfg.tau)
    shard = student.shape[-1] // world
    local = student[..., rank * shard:(rank + 1) * shard].clone().requires_grad_()
    loss, _ = kd_loss_reference(local, ids, vals, vocab_size=vocab, config=cfg, tp_group=dist.group.WORLD,
                                teacher_lse_SB=lse, labels_SB=labels)
    (2.0 * loss).backward()
    full = student.clone().requires_grad_()
    ref, _ = kd_loss_reference(full, ids, vals, vocab_size=vocab, config=cfg, teacher_lse_SB=lse, labels_SB=labels)
    (2.0 * ref).backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(local.grad, full.grad[..., rank * shard:(rank + 1) * shard], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cfg", [KDLossConfig(), KDLossConfig(divergence="jsd", beta=0.5, tau=2.0, alpha=0.3),
                                 KDLossConfig(divergence="reverse_kl", tail="renorm")],
                         ids=["fkl", "jsd-alpha", "rkl-renorm"])
def test_tp2_equals_tp1(tmp_path, cfg):
    # Odd sizes: vocab 1271 padded to 1280 over 2 shards, 41 tokens, k = 401.
    student, teacher, labels = _data(S=41, B=1, V=1280, seed=5)
    run_spawn(2, _tp2, cfg, student, teacher, labels, 401, 1271, tmp_path=tmp_path)
