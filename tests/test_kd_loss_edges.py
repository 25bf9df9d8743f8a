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
