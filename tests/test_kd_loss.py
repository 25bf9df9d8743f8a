"""Top-k KD loss on CPU: the reference against dense formulas (k = V) and TRL's JSD convention,
gradients, masks, odd shapes, the kernels' algorithm (pure-torch emulation of the fused path)
against the reference, input errors, dispatch and the benchmark's CPU smoke run.

TP=2 runs are in test_kd_loss_tp.py; the CUDA kernels themselves in test_kd_loss_gpu.py."""

import json
import math
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kdtrain.loss import KDLossConfig, check_kd_inputs, kd_dense_reference, kd_loss, kd_loss_reference
from kdtrain.loss import _ext, kd_fused

REPO = Path(__file__).resolve().parents[1]
DIVS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.5), ("jsd", 1.0), ("jsd", 0.1)]
IMPLS = ["reference", "emulated"]


def trl_dense(student, teacher, beta, tau=1.0):
    """Per-token generalized JSD over the full vocabulary, written from TRL's GKD formula:
    beta = 0 -> KL(teacher || student), beta = 1 -> KL(student || teacher), otherwise
    log M = logsumexp(log q + log(1 - beta), log p + log beta) and
    JSD = beta * KL(p || M) + (1 - beta) * KL(q || M)."""
    logq = F.log_softmax(student / tau, -1)
    logp = F.log_softmax(teacher / tau, -1)
    kl = lambda log_a, log_b: (log_a.exp() * (log_a - log_b)).sum(-1)  # KL(a || b)
    if beta == 0:
        return kl(logp, logq)
    if beta == 1:
        return kl(logq, logp)
    logm = torch.logsumexp(torch.stack([logq + math.log(1 - beta), logp + math.log(beta)]), 0)
    return beta * kl(logp, logm) + (1 - beta) * kl(logq, logm)


def dense(student, teacher, cfg: KDLossConfig):
    beta = {"forward_kl": 0.0, "reverse_kl": 1.0}.get(cfg.divergence, cfg.beta)
    return trl_dense(student, teacher, beta, cfg.tau) * (cfg.tau ** 2 if cfg.scale_by_tau_sq else 1.0)


def make_data(S=5, B=3, V=37, seed=0, dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(S, B, V, generator=g, dtype=torch.float64)).to(dtype)
    teacher = scale * torch.randn(S, B, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (S, B), generator=g)
    return student, teacher, labels


def topk(teacher, k, tau):
    """(ids, values, the teacher's tail log-mass: logsumexp of teacher / tau outside the top-k)."""
    vals, ids = torch.topk(teacher, k, dim=-1)
    return ids.to(torch.int32), vals, torch.logsumexp((teacher / tau).scatter(-1, ids, float("-inf")), -1)


def full_lse(vals, tail, tau):
    """The teacher's whole log-normaliser from its top-k logits and tail log-mass."""
    return torch.logaddexp(torch.logsumexp(vals / tau, -1), tail)


def run(impl, student, ids, vals, grad_scale=1.0, **kw):
    x = student.clone().requires_grad_()
    loss, rep = kd_loss(x, ids, vals, impl=impl, **kw)
    (grad_scale * loss).backward()
    return loss.detach(), x.grad, rep


# ------------------------------------------------------------------------- reference = dense


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("div,beta", DIVS)
@pytest.mark.parametrize("tail", ["tail", "renorm"])
@pytest.mark.parametrize("tau", [1.0, 2.5])
@pytest.mark.parametrize("sq", [False, True])
def test_k_equal_v_matches_dense_fp64(impl, div, beta, tail, tau, sq):
    """k = V: the top-k loss equals the dense full-vocab loss; the tail bucket is empty, and
    neither the loss nor its gradient holds a NaN."""
    cfg = KDLossConfig(divergence=div, beta=beta, tau=tau, scale_by_tau_sq=sq, tail=tail)
    student, teacher, _ = make_data()
    ids, vals, lse = topk(teacher, teacher.shape[-1], tau)
    loss, grad, rep = run(impl, student, ids, vals, vocab_size=37, config=cfg, teacher_tail_lse_SB=lse)
    y = student.clone().requires_grad_()
    ref = dense(y, teacher, cfg).mean()
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, y.grad, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(rep["loss_SB"], dense(student, teacher, cfg), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_trl_convention(beta):
    """TRL's beta: 0 is forward KL, 1 is reverse KL, 0.5 the symmetric mixture, for the top-k loss
    at k = V and for the dense baseline the benchmark uses."""
    student, teacher, _ = make_data(seed=7)
    cfg = KDLossConfig(divergence="jsd", beta=beta, tau=1.3)
    ids, vals, lse = topk(teacher, 37, 1.3)
    loss, _ = kd_loss_reference(student, ids, vals, vocab_size=37, config=cfg, teacher_tail_lse_SB=lse)
    expect = trl_dense(student, teacher, beta, 1.3)
    torch.testing.assert_close(loss, expect.mean(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(kd_dense_reference(student, teacher, cfg), expect, rtol=1e-10, atol=1e-12)
    named = {0.0: "forward_kl", 1.0: "reverse_kl"}.get(beta)
    if named:
        same, _ = kd_loss_reference(student, ids, vals, vocab_size=37, config=KDLossConfig(divergence=named, tau=1.3),
                                    teacher_tail_lse_SB=lse)
        torch.testing.assert_close(loss, same, rtol=0, atol=0)
    else:  # symmetric at 0.5: swapping the roles gives the same value
        assert 0 < float(loss) < math.log(2)
        swapped = trl_dense(teacher, student, 0.5, 1.3)
        torch.testing.assert_close(expect, swapped, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_tail_bucket_equals_dense_over_k_plus_one_outcomes(impl):
    """k < V, tail mode: the (k+1)-bucket distributions built by hand from the dense softmaxes."""
    cfg = KDLossConfig(divergence="jsd", beta=0.3, tau=1.5)
    student, teacher, _ = make_data(V=50)
    ids, vals, lse = topk(teacher, 7, cfg.tau)
    loss, _, _ = run(impl, student, ids, vals, vocab_size=50, config=cfg, teacher_tail_lse_SB=lse)
    p, q = F.softmax(teacher / cfg.tau, -1), F.softmax(student / cfg.tau, -1)
    pk, qk = p.gather(-1, ids.long()), q.gather(-1, ids.long())
    P = torch.cat([pk, 1 - pk.sum(-1, keepdim=True)], -1)
    Q = torch.cat([qk, 1 - qk.sum(-1, keepdim=True)], -1)
    M = 0.3 * P + 0.7 * Q
    ref = (0.3 * (P * (P / M).log()).sum(-1) + 0.7 * (Q * (Q / M).log()).sum(-1)).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_renorm_and_teacher_value_modes(impl):
    """renorm = both distributions renormalised over K; log-prob values = logits with lse; logits
    without lse = teacher normalised over K (tail mode: teacher tail 0)."""
    student, teacher, _ = make_data(V=40, seed=2)
    tau = 0.8
    ids, vals, lse = topk(teacher, 6, tau)
    cfg = KDLossConfig(divergence="forward_kl", tau=tau, tail="renorm")
    loss, _, _ = run(impl, student, ids, vals, vocab_size=40, config=cfg)
    P = F.softmax(vals / tau, -1)
    logQ = F.log_softmax(student.gather(-1, ids.long()) / tau, -1)
    torch.testing.assert_close(loss, (P * (P.log() - logQ)).sum(-1).mean(), rtol=1e-10, atol=1e-12)

    cfg_t = KDLossConfig(divergence="reverse_kl", tau=tau)
    with_lse, g1, _ = run(impl, student, ids, vals, vocab_size=40, config=cfg_t, teacher_tail_lse_SB=lse)
    logprobs = vals / tau - full_lse(vals, lse, tau)[..., None]
    cfg_lp = KDLossConfig(divergence="reverse_kl", tau=tau, values_are_logprobs=True)
    as_lp, g2, _ = run(impl, student, ids, logprobs, vocab_size=40, config=cfg_lp)
    torch.testing.assert_close(with_lse, as_lp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-14)

    # Forward KL, logits without lse, tail mode: P_t = 0, the tail bucket only enters through Q_t.
    fkl, _, _ = run(impl, student, ids, vals, vocab_size=40, config=KDLossConfig(tau=tau))
    q = F.softmax(student / tau, -1).gather(-1, ids.long())
    torch.testing.assert_close(fkl, (P * (P.log() - q.log())).sum(-1).mean(), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("div,beta", DIVS[:3] + [("jsd", 0.5), ("jsd", 1.0)])
@pytest.mark.parametrize("tail", ["tail", "renorm"])
def test_gradcheck_reference_fp64(div, beta, tail):
    cfg = KDLossConfig(divergence=div, beta=beta, tau=1.3, tail=tail, alpha=0.25, scale_by_tau_sq=True)
    student, teacher, labels = make_data(S=3, B=2, V=11, seed=3)
    ids, vals, lse = topk(teacher, 4, cfg.tau)
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    x = student.clone().requires_grad_()
    f = lambda x: kd_loss_reference(x, ids, vals, vocab_size=11, config=cfg, teacher_tail_lse_SB=lse, labels_SB=labels,
                                    loss_mask_SB=mask, num_tokens=7.0)[0]
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("div,beta", DIVS[:3] + [("jsd", 0.5), ("jsd", 1.0)])
@pytest.mark.parametrize("tail", ["tail", "renorm"])
def test_emulated_gradient_is_the_finite_difference_fp64(div, beta, tail):
    """The gradient written in the forward (closed form) against central differences. (The
    Function hands its buffer out once, so torch.autograd.gradcheck's second backward cannot run.)"""
    cfg = KDLossConfig(divergence=div, beta=beta, tau=0.9, tail=tail, alpha=0.3)
    student, teacher, labels = make_data(S=2, B=2, V=9, seed=4)
    student = torch.cat([student, torch.zeros(2, 2, 2, dtype=torch.float64)], -1)  # 2 padding columns
    ids, vals, lse = topk(teacher, 3, cfg.tau)
    mask = torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    kw = dict(vocab_size=9, config=cfg, teacher_tail_lse_SB=lse, labels_SB=labels, loss_mask_SB=mask, num_tokens=5.0)
    _, grad, _ = run("emulated", student, ids, vals, **kw)
    fd = torch.zeros_like(student)
    h = 1e-6
    for idx in range(student.numel()):
        e = torch.zeros(student.numel(), dtype=torch.float64)
        e[idx] = h
        e = e.view_as(student)
        up = kd_loss(student + e, ids, vals, impl="emulated", **kw)[0]
        dn = kd_loss(student - e, ids, vals, impl="emulated", **kw)[0]
        fd.view(-1)[idx] = (up - dn) / (2 * h)
    torch.testing.assert_close(grad, fd, rtol=1e-5, atol=1e-8)
    assert grad[..., 9:].abs().max() == 0 and grad[1, 0].abs().max() == 0  # padding, masked token


# ------------------------------------------------------- emulated fused path = reference


def _variants():
    out = []
    for div, beta in DIVS:
        for tail in ("tail", "renorm"):
            for mode in ("tail_lse", "logits", "logprobs"):
                if mode == "logits" and tail == "tail" and (div == "reverse_kl" or (div == "jsd" and beta == 1.0)):
                    continue  # refused: see test_reverse_kl_without_teacher_tail_is_refused
                out.append((div, beta, tail, mode))
    return out


@pytest.mark.parametrize("div,beta,tail,mode", _variants())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_emulated_equals_reference(div, beta, tail, mode, dtype):
    """The two-pass algorithm with its closed-form gradient equals autograd through the spec, with
    masks, ignored labels, padding columns, CE mixing, tau^2 and a grad_output != 1."""
    tau = 1.7
    cfg = KDLossConfig(divergence=div, beta=beta, tail=tail, alpha=0.3, tau=tau, scale_by_tau_sq=True,
                       values_are_logprobs=mode == "logprobs")
    student, teacher, labels = make_data(S=5, B=3, V=37, seed=11, dtype=dtype)
    student = torch.cat([student, torch.randn(5, 3, 3, dtype=dtype)], -1)  # padded table
    ids, vals, lse = topk(teacher, 7, tau)
    if mode == "logprobs":
        vals = vals / tau - full_lse(vals, lse, tau)[..., None]
    labels[0, 0] = -100
    mask = torch.ones(5, 3)
    mask[2, 1] = 0
    kw = dict(vocab_size=37, config=cfg, labels_SB=labels, loss_mask_SB=mask,
              teacher_tail_lse_SB=lse if mode == "tail_lse" else None)
    la, ga, ra = run("reference", student, ids, vals, grad_scale=2.5, **kw)
    lb, gb, rb = run("emulated", student, ids, vals, grad_scale=2.5, **kw)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(lb, la, **tol)
    torch.testing.assert_close(gb, ga, **tol)
    for key in ("kd_sum", "ce_sum", "tokens", "loss_SB"):
        torch.testing.assert_close(rb[key].to(ra[key].dtype), ra[key], **tol)
    assert gb[..., 37:].abs().max() == 0 and gb[0, 0].abs().max() == 0 and gb[2, 1].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_odd_shapes_low_precision(dtype):
    """41 tokens x vocab 1271 x k = 401 (nothing a power of two), fp32/bf16/fp16 logits: emulated
    path against the reference on the same (rounded) inputs."""
    cfg = KDLossConfig(divergence="jsd", beta=0.4, tau=1.2, alpha=0.1)
    student, teacher, labels = make_data(S=41, B=1, V=1271, seed=5, dtype=dtype)
    ids, vals, lse = topk(teacher.float(), 401, cfg.tau)
    kw = dict(vocab_size=1271, config=cfg, labels_SB=labels, teacher_tail_lse_SB=lse, num_tokens=50)
    la, ga, _ = run("reference", student, ids, vals.to(torch.bfloat16), grad_scale=64.0, **kw)
    lb, gb, _ = run("emulated", student, ids, vals.to(torch.bfloat16), grad_scale=64.0, **kw)
    assert gb.dtype == dtype
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-6)
    ulp = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(gb.float(), ga.float(), rtol=ulp, atol=ulp * ga.float().abs().max().item())


def test_fp16_gradients_keep_their_scale():
    """fp16: per-token gradients are stored at full scale and 1/num_tokens is applied in backward,
    so a large token count does not flush them to zero (they would underflow fp16 otherwise)."""
    cfg = KDLossConfig()
    student, teacher, _ = make_data(S=4, B=2, V=300, seed=9, dtype=torch.float16, scale=3.0)
    ids, vals, lse = topk(teacher.float(), 8, 1.0)
    kw = dict(vocab_size=300, config=cfg, teacher_tail_lse_SB=lse, num_tokens=1e6)
    _, ga, _ = run("reference", student.float(), ids, vals, grad_scale=2.0 ** 16, **kw)
    _, gb, _ = run("emulated", student, ids, vals, grad_scale=2.0 ** 16, **kw)
    nonzero = ga.abs() > 6e-8 * 4  # representable in fp16 after scaling
    assert (gb[nonzero] != 0).all()
    torch.testing.assert_close(gb.float()[nonzero], ga[nonzero], rtol=2e-3, atol=1e-7)


# ---------------------------------------------------------------- masks, counts, reports


@pytest.mark.parametrize("impl", IMPLS)
def test_masks_ignore_index_and_num_tokens(impl):
    cfg = KDLossConfig(divergence="jsd", beta=0.5, alpha=0.2)
    student, teacher, labels = make_data(seed=6)
    ids, vals, lse = topk(teacher, 5, 1.0)
    labels[1, :] = -100
    mask = torch.ones(5, 3, dtype=torch.bool)
    mask[3, 2] = False
    kw = dict(vocab_size=37, config=cfg, teacher_tail_lse_SB=lse)
    loss, grad, rep = run(impl, student, ids, vals, labels_SB=labels, loss_mask_SB=mask, **kw)
    valid = mask & (labels != -100)
    assert rep["tokens"] == valid.sum() == 11
    assert grad[1].abs().max() == 0 and grad[3, 2].abs().max() == 0
    # Same loss from the valid tokens alone; an explicit global count rescales the sum.
    keep = valid.flatten()
    sub = lambda t: t.reshape(15, 1, *t.shape[2:])[keep]
    loss_sub, _, _ = run(impl, sub(student), sub(ids), sub(vals), labels_SB=sub(labels), teacher_tail_lse_SB=sub(lse),
                         vocab_size=37, config=cfg)
    torch.testing.assert_close(loss, loss_sub, rtol=1e-12, atol=1e-12)
    loss_n, grad_n, rep_n = run(impl, student, ids, vals, labels_SB=labels, loss_mask_SB=mask, num_tokens=44, **kw)
    torch.testing.assert_close(loss_n * 44, loss * 11, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_n * 44, grad * 11, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close((1 - cfg.alpha) * rep["kd_sum"] + cfg.alpha * rep["ce_sum"], loss * 11)
    assert (rep["loss_SB"][~valid] == 0).all()
    # No valid token: loss 0 (the default count is clamped at 1), not NaN.
    empty, g0, _ = run(impl, student, ids, vals, loss_mask_SB=torch.zeros(5, 3), **kw | {"config": KDLossConfig()})
    assert empty == 0 and g0.abs().max() == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_alpha_mixes_hard_label_cross_entropy(impl):
    cfg = KDLossConfig(alpha=0.4, tau=2.0)
    student, teacher, labels = make_data()
    labels[0, 0] = -100
    ids, vals, lse = topk(teacher, 37, 2.0)
    loss, _, rep = run(impl, student, ids, vals, vocab_size=37, config=cfg, teacher_tail_lse_SB=lse, labels_SB=labels)
    valid = labels != -100
    ce = F.cross_entropy(student.reshape(-1, 37), labels.reshape(-1), ignore_index=-100, reduction="sum")
    kd = (dense(student, teacher, cfg) * valid).sum()
    torch.testing.assert_close(rep["ce_sum"], ce)
    torch.testing.assert_close(loss, (0.6 * kd + 0.4 * ce) / valid.sum())
    # alpha = 1: pure CE, exactly F.cross_entropy's gradient.
    only_ce, g, _ = run(impl, student, ids, vals, vocab_size=37, config=KDLossConfig(alpha=1.0, tau=2.0),
                        teacher_tail_lse_SB=lse, labels_SB=labels)
    y = student.clone().requires_grad_()
    F.cross_entropy(y.reshape(-1, 37), labels.reshape(-1), ignore_index=-100).backward()
    torch.testing.assert_close(only_ce, ce / valid.sum())
    torch.testing.assert_close(g, y.grad)


@pytest.mark.parametrize("impl", IMPLS)
def test_padding_columns_and_grad_output(impl):
    cfg = KDLossConfig(divergence="reverse_kl", tau=0.7)
    student, teacher, _ = make_data(V=30)
    padded = torch.cat([student, torch.full((5, 3, 2), 40.0, dtype=torch.float64)], -1)
    ids, vals, lse = topk(teacher, 6, 0.7)
    loss, gpad, _ = run(impl, padded, ids, vals, grad_scale=3.0, vocab_size=30, config=cfg, teacher_tail_lse_SB=lse)
    ref, gref, _ = run(impl, student, ids, vals, grad_scale=3.0, vocab_size=30, config=cfg, teacher_tail_lse_SB=lse)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gpad[..., :30], gref)
    assert gpad[..., 30:].abs().max() == 0


def test_fused_function_plumbing():
    """Loss-only calls write no gradient; a second backward through the buffer is refused."""
    cfg = KDLossConfig()
    student, teacher, _ = make_data()
    ids, vals, lse = topk(teacher, 5, 1.0)
    with torch.no_grad():
        a, _ = kd_loss(student, ids, vals, vocab_size=37, config=cfg, teacher_tail_lse_SB=lse, impl="emulated")
    b, _ = kd_loss_reference(student, ids, vals, vocab_size=37, config=cfg, teacher_tail_lse_SB=lse)
    torch.testing.assert_close(a, b)
    x = student.clone().requires_grad_()
    loss, _ = kd_loss(x, ids, vals, vocab_size=37, config=cfg, teacher_tail_lse_SB=lse, impl="emulated")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward twice"):
        loss.backward()


# --------------------------------------------------------------------------- input errors


@pytest.mark.parametrize("bad,match", [
    ("id_high", "out of range"), ("id_neg", "out of range"), ("nan", "NaN/inf"), ("inf", "NaN/inf"),
    ("lse_nan", "tail log-mass contains"), ("shape", "does not match"), ("k_shape", "do not match"),
    ("k", "exceeds the vocabulary"), ("dup", "repeat an id"), ("ids_float", "int32 or int64"),
    ("vals_int", "floating point"), ("labels", "labels are outside"), ("mask_shape", "loss mask shape"),
    ("device", "are on meta"), ("logprobs", "look like logits"), ("table", "ids beyond the table"),
    ("logits_rank", "must be a tensor"),
])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("validate", [True, "deferred"])
def test_bad_payload_gives_a_clear_error(bad, match, impl, validate):
    """``validate="deferred"`` (the training loop's): host-side checks raise at the call, value
    checks from ``report["check"]()``; either way the same clear error."""
    student, teacher, labels = make_data(V=12)
    ids, vals, lse = topk(teacher, 4, 1.0)
    kw = dict(vocab_size=12, config=KDLossConfig(alpha=0.5), teacher_tail_lse_SB=lse, labels_SB=labels)
    if bad == "id_high":
        ids[1, 1, 2] = 12
    elif bad == "id_neg":
        ids[0, 0, 0] = -1
    elif bad == "nan":
        vals[2, 0, 1] = float("nan")
    elif bad == "inf":
        vals[2, 0, 1] = float("inf")
    elif bad == "lse_nan":
        lse[1, 1] = float("nan")
    elif bad == "shape":
        ids, vals = ids[:4], vals[:4]
    elif bad == "k_shape":
        vals = vals[..., :3]
    elif bad == "k":
        ids, vals = torch.zeros(5, 3, 13, dtype=torch.int32), torch.zeros(5, 3, 13, dtype=torch.float64)
    elif bad == "dup":
        ids[4, 2, 3] = ids[4, 2, 0]
    elif bad == "ids_float":
        ids = ids.double()
    elif bad == "vals_int":
        vals = vals.long()
    elif bad == "labels":
        labels[0, 1] = 12
    elif bad == "mask_shape":
        kw["loss_mask_SB"] = torch.ones(5)
    elif bad == "device":
        ids = ids.to("meta")
    elif bad == "logprobs":
        kw["config"] = KDLossConfig(values_are_logprobs=True)
    elif bad == "table":
        kw["vocab_size"] = 13
        student = student[..., :12]
    elif bad == "logits_rank":
        student = student[0]
    if validate == "deferred" and bad in VALUE_CHECKS:
        _, report = kd_loss(student, ids, vals, impl=impl, validate=validate, **kw)  # no sync, no error yet
        with pytest.raises(ValueError, match=match):
            report["check"]()
    else:
        with pytest.raises(ValueError, match=match):
            kd_loss(student, ids, vals, impl=impl, validate=validate, **kw)


VALUE_CHECKS = {"id_high", "id_neg", "nan", "inf", "lse_nan", "dup", "labels", "logprobs"}


def test_kernel_topk_limit_and_reverse_kl_without_teacher_tail():
    student, teacher, _ = make_data(S=1, B=1, V=1100)
    ids, vals, lse = topk(teacher, 1025, 1.0)
    with pytest.raises(ValueError, match="kernel's limit of 1024"):
        check_kd_inputs(student, ids, vals, 1100, lse, max_k=1024)
    ids, vals, lse = topk(teacher, 8, 1.0)
    for cfg in (KDLossConfig(divergence="reverse_kl"), KDLossConfig(divergence="jsd", beta=1.0)):
        for impl in IMPLS:
            with pytest.raises(ValueError, match="needs the teacher's tail mass"):
                kd_loss(student, ids, vals, vocab_size=1100, config=cfg, impl=impl)
        kd_loss(student, ids, vals, vocab_size=1100, config=cfg, teacher_tail_lse_SB=lse, impl="reference")  # fine
    with pytest.raises(ValueError, match="needs labels"):
        kd_loss(student, ids, vals, vocab_size=1100, config=KDLossConfig(alpha=0.1), impl="emulated")


def test_config_errors_name_the_field():
    from kdtrain.config import from_dict

    for raw, field in [({"beta": 1.5}, "loss.beta"), ({"tau": 0}, "loss.tau"), ({"alpha": -1}, "loss.alpha"),
                       ({"divergence": "kl"}, "loss.divergence"), ({"tail": "drop"}, "loss.tail"),
                       ({"values_are_logprobs": "yes"}, "loss.values_are_logprobs"),
                       ({"scale_by_tau_sq": 1}, "loss.scale_by_tau_sq")]:
        with pytest.raises(ValueError, match=field):
            from_dict(KDLossConfig, raw, "loss")
        with pytest.raises(ValueError, match=field.split(".")[1]):
            KDLossConfig(**raw)
    with pytest.raises(ValueError, match="tau"):
        KDLossConfig(tau=float("inf"))


# ------------------------------------------------------------------------------ dispatch


def test_fallback_warns_exactly_once_and_only_on_cuda(monkeypatch):
    monkeypatch.setattr(kd_fused, "_fallback_warned", False)
    monkeypatch.delenv("KDTRAIN_KD_IMPL", raising=False)
    student, teacher, _ = make_data()
    ids, vals, lse = topk(teacher, 5, 1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = [kd_loss(student, ids, vals, vocab_size=37, config=KDLossConfig(), teacher_tail_lse_SB=lse)[0]
                  for _ in range(3)]
        for _ in range(2):  # a CUDA run whose kernels did not load
            kd_fused._warn_fallback("extension not built")
    fallback = [w for w in caught if "fused KD loss unavailable" in str(w.message)]
    # Once per process, and not for CPU logits (the reference is the only path there; the run's
    # start-up line names the implementation).
    assert len(fallback) == 1 and "extension not built" in str(fallback[0].message)
    ref, _ = kd_loss_reference(student, ids, vals, vocab_size=37, config=KDLossConfig(), teacher_tail_lse_SB=lse)
    assert all(torch.equal(x, ref) for x in losses)
    with pytest.raises(ValueError, match="impl='fused' cannot run"):
        kd_loss(student, ids, vals, vocab_size=37, config=KDLossConfig(), impl="fused")
    with pytest.raises(ValueError, match="impl must be one of"):
        kd_loss(student, ids, vals, vocab_size=37, config=KDLossConfig(), impl="triton")
    monkeypatch.setenv("KDTRAIN_KD_IMPL", "emulated")
    assert kd_fused.select_impl(student, 5) == ("emulated", "requested")


def test_single_read_dispatch(monkeypatch):
    """One vocab shard takes the single-read path when KDTRAIN_KD_SINGLE_PASS=1 (off by default)
    unless the backend lacks it / declines it; every path gives the same loss and gradient (the emulation's
    fused_single is pass 1 + pass 2)."""
    cfg = KDLossConfig(divergence="jsd", beta=0.5, alpha=0.3, tau=1.5)
    student, teacher, labels = make_data()
    ids, vals, lse = topk(teacher, 5, 1.5)
    kw = dict(vocab_size=37, config=cfg, teacher_tail_lse_SB=lse, labels_SB=labels)

    def fwd_bwd():
        x = student.clone().requires_grad_()
        loss, _ = kd_loss(x, ids, vals, impl="emulated", **kw)
        (2.0 * loss).backward()
        return loss.detach(), x.grad, kd_fused.last_path()

    monkeypatch.setenv(kd_fused.SINGLE_PASS_ENV, "1")
    l1, g1, p1 = fwd_bwd()
    monkeypatch.delenv(kd_fused.SINGLE_PASS_ENV, raising=False)
    l2, g2, p2 = fwd_bwd()
    monkeypatch.setenv(kd_fused.SINGLE_PASS_ENV, "1")
    monkeypatch.setattr(kd_fused.TorchKernels, "single_supported", lambda self, logits, k: False)
    l3, g3, p3 = fwd_bwd()
    monkeypatch.undo()
    assert (p1, p2, p3) == ("single", "two_pass", "two_pass")
    assert torch.equal(l1, l2) and torch.equal(g1, g2) and torch.equal(l1, l3) and torch.equal(g1, g3)
    ref, _ = kd_loss_reference(student, ids, vals, **kw)
    torch.testing.assert_close(l1, ref)

    class NoSingle:  # a kernel module built before the single-read path: passes 1 and 2 only
        def __init__(self):
            self.t, self.calls = kd_fused.TorchKernels(), 0

        def pass1(self, *args):
            self.calls += 1
            return self.t.pass1(*args)

        def pass2(self, *args):
            return self.t.pass2(*args)

        def scale_grad_(self, grad, factor):
            self.t.scale_grad_(grad, factor)

    backend, n = NoSingle(), student.shape[0] * student.shape[1]
    x = student.clone().requires_grad_()
    params = kd_fused.KernelParams.build(cfg, 0, 37, 5, 37, True)
    loss, _ = kd_fused.FusedKDLoss.apply(x.reshape(n, 37), ids.reshape(n, 5), vals.reshape(n, 5), lse.reshape(n),
                                         labels.reshape(n), torch.full((n,), 1.0 / n, dtype=torch.float64), 1.0,
                                         params, None, backend)
    assert kd_fused.last_path() == "two_pass" and backend.calls == 1
    torch.testing.assert_close(loss.detach(), l1)


def test_extension_loading_reports_why(monkeypatch):
    monkeypatch.setattr(_ext, "_state", {"tried": False, "module": None, "status": "not loaded yet"})
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    assert _ext.load_kernels() is None
    status = _ext.extension_status()
    assert "kdtrain._C not built" in status and "no CUDA device" in status
    assert _ext.load_kernels() is None  # cached, no second attempt


def test_benchmark_smoke_on_cpu(tmp_path):
    """The benchmark script runs end to end on CPU with a tiny shape and writes its tables."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_kd_loss.py"), "--device", "cpu",
                           "--quick", "--iters", "1", "--warmup", "0", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "bench_kd_loss.json").read_text())
    impls = {r["impl"] for r in data["results"]}
    assert {"reference", "emulated", "dense_torch_jsd"} <= impls
    assert all(r["ms"] > 0 for r in data["results"] if "error" not in r)
    assert "| impl |" in (tmp_path / "bench_kd_loss.md").read_text()


def test_a_leftover_kernel_build_lock_is_an_error_not_a_hang(monkeypatch, tmp_path):
    """torch waits for its extension build lock without a bound; a build killed midway leaves the
    lock, so kdtrain waits a bounded time for it and then names the file."""
    import threading

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / _ext.JIT_NAME / "lock"
    lock.parent.mkdir(parents=True)
    _ext.wait_for_build_lock(timeout_s=0.1)  # no lock: returns at once
    lock.touch()
    with pytest.raises(RuntimeError, match=f"build lock {re.escape(str(lock))} has been held .* Delete it"):
        _ext.wait_for_build_lock(timeout_s=0.3, poll_s=0.05)
    # Another rank's build releasing the lock in time: the wait ends.
    threading.Timer(0.2, lock.unlink).start()
    _ext.wait_for_build_lock(timeout_s=30, poll_s=0.05)
    assert not lock.exists()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("div", ["reverse_kl", "forward_kl", "jsd"])
@pytest.mark.parametrize("lead", [30.0, 100.0])
def test_a_confident_teacher_s_tail_is_charged_exactly(impl, div, lead):
    """A teacher 30 nats sure of one token leaves about 1e-10 to its tail: from its own tail sum
    the loss equals the divergence over the k + 1 buckets computed from the whole softmax in fp64.
    (From the whole log-normaliser, 1 - sum_K p rounded to 0 and reverse KL charged a uniform
    student 86.8 per token for the floor of an empty tail instead of 23.1.) At 100 nats the tail,
    about e^-93, lies below the floor of an empty bucket (log 2^-126) and keeps its own log."""
    V, k = 1000, 8
    teacher = torch.randn(3, 2, V, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.5
    teacher[..., 7] = lead
    student = torch.randn(3, 2, V, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.5
    ids, vals, tail = topk(teacher, k, 1.0)
    cfg = KDLossConfig(divergence=div, beta=0.5)
    loss, _, _ = run(impl, student.float(), ids, vals.float(), vocab_size=V, config=cfg,
                     teacher_tail_lse_SB=tail.float())
    p, q = F.softmax(teacher, -1), F.softmax(student, -1)
    pk, qk = p.gather(-1, ids.long()), q.gather(-1, ids.long())
    p_tail = torch.exp(torch.logsumexp(teacher.scatter(-1, ids.long(), float("-inf")), -1)
                       - torch.logsumexp(teacher, -1))  # summed outside K, in fp64
    P = torch.cat([pk, p_tail.unsqueeze(-1)], -1)
    Q = torch.cat([qk, (1 - qk.sum(-1)).unsqueeze(-1)], -1)
    kl = lambda a, b: (a * (a.log() - b.log())).sum(-1)
    M = 0.5 * P + 0.5 * Q
    want = {"forward_kl": kl(P, Q), "reverse_kl": kl(Q, P), "jsd": 0.5 * kl(P, M) + 0.5 * kl(Q, M)}[div].mean()
    torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-6)
