"""Top-k KD loss at the edges of its inputs, every CPU implementation (the reference, and the
emulation of the fused kernels; tests/test_csrc_emulation.py runs the kernels' own source):
masked tokens holding non-finite logits, and a student whose tail lies far below its top-k."""

import torch

from kdtrain.loss import KDLossConfig, kd_loss

IMPLS = ["reference", "emulated"]


def _teacher(S, B, V, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    zt = 2 * torch.randn(S, B, V, generator=g)
    vals, ids = zt.topk(k, -1)
    return ids.to(torch.int32), vals, torch.logsumexp(zt.scatter(-1, ids, float("-inf")), -1)


def test_masked_tokens_with_non_finite_logits_do_not_reach_the_loss():
    """A masked token's logits (NaN, +inf) neither poison the loss nor its gradient: the loss is
    that of the other tokens alone, and the masked rows' gradient is zero."""
    S, B, V, k = 3, 2, 50, 5
    g = torch.Generator().manual_seed(1)
    z = torch.randn(S, B, V, generator=g)
    ids, vals, tail = _teacher(S, B, V, k)
    mask = torch.ones(S, B)
    mask[1, 0] = mask[2, 1] = 0
    cfg = KDLossConfig(divergence="jsd", beta=0.5)
    for impl in IMPLS:
        clean = z.clone().requires_grad_(True)
        want, _ = kd_loss(clean, ids, vals, vocab_size=V, config=cfg, teacher_tail_lse_SB=tail, loss_mask_SB=mask,
                          impl=impl)
        want.backward()
        bad = z.clone()
        bad[1, 0, 7], bad[2, 1, 3] = float("inf"), float("nan")
        bad.requires_grad_(True)
        got, _ = kd_loss(bad, ids, vals, vocab_size=V, config=cfg, teacher_tail_lse_SB=tail, loss_mask_SB=mask,
                         impl=impl, validate=False)
        got.backward()
        assert torch.equal(got, want), (impl, got, want)
        assert torch.equal(bad.grad, clean.grad), impl
        assert bad.grad[1, 0].abs().sum() == 0 and bad.grad[2, 1].abs().sum() == 0


def test_a_student_tail_far_below_its_top_k_keeps_its_mass_and_gradient():
    """A collapsed student at a low temperature: every logit outside the teacher's top-k lies 60
    below the top-k (120 nats at tau = 0.5), past fp32's exponent range relative to the row
    maximum, while the teacher keeps 20% of its mass outside K. The tail bucket is summed relative
    to its own maximum, so the fp32 loss and gradient equal the fp64 ones (before, the tail
    underflowed to 0 and the whole row lost its gradient)."""
    import math

    V, k, tau = 64, 4, 0.5
    zs = torch.zeros(2, 1, V)
    zs[..., :k] = 60.0
    zs[1, 0, k:] = torch.linspace(-3.0, 3.0, V - k)  # a tail with a shape of its own
    zt = torch.zeros(2, 1, V)
    zt[..., :k] = tau * math.log(0.8 * (V - k) / (0.2 * k))  # teacher tail mass 0.2
    ids = torch.arange(k).view(1, 1, k).expand(2, 1, k).to(torch.int32)
    tail = torch.logsumexp(zt[..., k:] / tau, -1)
    for div, beta in (("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5)):
        cfg = KDLossConfig(divergence=div, beta=beta, tau=tau, alpha=0.1)
        labels = torch.tensor([[1], [9]])
        out = {}
        for impl, dtype in (("reference", torch.float64), *((i, torch.float32) for i in IMPLS)):
            x = zs.to(dtype).clone().requires_grad_(True)
            loss, _ = kd_loss(x, ids, zt[..., :k].to(dtype), vocab_size=V, config=cfg, teacher_tail_lse_SB=tail.to(dtype),
                              labels_SB=labels, impl=impl)
            loss.backward()
            out[impl, dtype] = loss.item(), x.grad.double()
        want, want_grad = out["reference", torch.float64]
        assert want_grad[..., k:].abs().sum() > 1e-3  # the tail has a gradient to give
        for impl in IMPLS:
            got, grad = out[impl, torch.float32]
            assert abs(got - want) <= 1e-5 * abs(want), (div, impl, got, want)
            # fp32 with logits of 120 / ln 2 base-2 units: ~1e-5 of rounding, relative to the largest entry
            assert torch.allclose(grad, want_grad, rtol=1e-4, atol=1e-4 * want_grad.abs().max()), (div, impl)


def test_jsd_with_a_small_beta_keeps_its_gradient_in_fp32():
    """Generalized JSD's gradient is (1 - beta) Q log(Q / M), O(beta) next to O(1) log-terms:
    written as log Q - logaddexp(...) it was lost to fp32 rounding for a small beta (1% error at
    1e-6, 60% at 1e-8). Computed from log P - log Q, as -logaddexp(log beta + log P - log Q,
    log(1 - beta)), the fp32 loss and gradient follow fp64 at every beta."""
    S, B, V, k = 4, 2, 200, 16
    g = torch.Generator().manual_seed(3)
    zs = 2 * torch.randn(S, B, V, generator=g, dtype=torch.float64)
    ids, vals, tail = _teacher(S, B, V, k, seed=4)
    for beta in (1e-2, 1e-4, 1e-6, 1e-8, 1 - 1e-6):
        cfg = KDLossConfig(divergence="jsd", beta=beta)
        out = {}
        for impl, dtype in (("reference", torch.float64), *((i, torch.float32) for i in IMPLS)):
            x = zs.to(dtype).clone().requires_grad_(True)
            loss, _ = kd_loss(x, ids, vals.to(dtype), vocab_size=V, config=cfg, teacher_tail_lse_SB=tail.to(dtype),
                              impl=impl)
            loss.backward()
            out[impl, dtype] = loss.item(), x.grad.double()
        want, want_grad = out["reference", torch.float64]
        for impl in IMPLS:
            got, grad = out[impl, torch.float32]
            assert abs(got - want) <= 1e-5 * abs(want), (beta, impl, got, want)
            err = ((grad - want_grad).norm() / want_grad.norm()).item()
            assert err < 1e-5, (beta, impl, err)


def test_fractional_token_weights_keep_their_precision_with_bf16_logits():
    """A loss mask of fractional weights (0.3, 0.7) weighs tokens in the loss's fp32 arithmetic,
    not rounded to the logits' bf16 (0.3 -> 0.30078): the reference and the emulated kernel path
    give the same loss for bf16 logits."""
    S, B, V, k = 4, 1, 64, 8
    g = torch.Generator().manual_seed(5)
    z = torch.randn(S, B, V, generator=g).bfloat16()
    ids, vals, tail = _teacher(S, B, V, k, seed=6)
    mask = torch.tensor([[0.3], [1.0], [0.7], [1.0]])
    cfg = KDLossConfig(divergence="forward_kl")
    got = {impl: kd_loss(z, ids, vals, vocab_size=V, config=cfg, teacher_tail_lse_SB=tail, loss_mask_SB=mask,
                         impl=impl)[0].item() for impl in IMPLS}
    assert abs(got["reference"] - got["emulated"]) <= 1e-6 * abs(got["emulated"]), got
