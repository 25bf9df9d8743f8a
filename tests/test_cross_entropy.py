"""Vocab-parallel cross entropy: equals torch's over the real vocabulary, on 1 and 2 tensor ranks."""

import pytest
import torch
import torch.nn.functional as F

from kdtrain.loss import vocab_parallel_cross_entropy, vocab_shard

from conftest import run_spawn


def _reference(logits, labels, vocab_size):
    return F.cross_entropy(logits[..., :vocab_size].flatten(0, 1), labels.flatten(),
                           reduction="none").view(labels.shape)


@pytest.mark.parametrize("chunk_bytes", [256 << 20, 3 * 401 * 8])  # one chunk; chunks of 3 rows (41 x 3 rows)
def test_matches_torch_and_ignores_padding_columns(chunk_bytes):
    torch.manual_seed(0)
    # 41 x 3 tokens, vocab 401 padded to 512; padding columns hold huge logits that must not count.
    logits = torch.randn(41, 3, 512, dtype=torch.float64)
    logits[..., 401:] = 1e4
    logits.requires_grad_()
    labels = torch.randint(0, 401, (41, 3))
    grad_out = torch.rand(41, 3, dtype=torch.float64)
    ours = vocab_parallel_cross_entropy(logits, labels, 401, chunk_bytes=chunk_bytes)
    ref = _reference(logits, labels, 401)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    (g_ours,) = torch.autograd.grad(ours, logits, grad_out)
    (g_ref,) = torch.autograd.grad(ref, logits, grad_out)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-12)
    assert g_ours[..., 401:].abs().max() == 0


def test_bf16_logits_give_fp32_losses_close_to_fp64():
    torch.manual_seed(1)
    logits = torch.randn(16, 2, 384) * 4
    labels = torch.randint(0, 384, (16, 2))
    bf16 = logits.bfloat16().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ours = vocab_parallel_cross_entropy(bf16, labels, 384, chunk_bytes=5 * 384 * 4)
    # What backward keeps is one logits-sized tensor in the logits' dtype (no fp32 softmax).
    assert [(t.dtype, t.numel()) for t in saved] == [(torch.bfloat16, bf16.numel())]
    with torch.no_grad():  # evaluation: the same losses, no gradient made
        torch.testing.assert_close(vocab_parallel_cross_entropy(bf16, labels, 384), ours.detach(), rtol=0, atol=1e-6)
    assert ours.dtype == torch.float32
    ref = bf16.detach().double().requires_grad_()
    want = _reference(ref, labels, 384)
    torch.testing.assert_close(ours, want.float(), rtol=1e-5, atol=1e-5)
    # The gradient is made in the forward and stored in bf16, then scaled in fp32 and rounded again
    # in the backward: the fp64 one within two bf16 roundings.
    grad_out = torch.rand(16, 2) / 32
    (g_ours,) = torch.autograd.grad(ours, bf16, grad_out)
    (g_ref,) = torch.autograd.grad(want, ref, grad_out.double())
    assert g_ours.dtype == torch.bfloat16
    torch.testing.assert_close(g_ours.double(), g_ref, rtol=2**-7, atol=1e-9)


def test_vocab_shard_bounds():
    assert vocab_shard(256, 0, 401) == (0, 256)
    assert vocab_shard(256, 1, 401) == (256, 145)
    assert vocab_shard(256, 2, 401) == (512, 0)


def _tp2_worker(rank, world, logits, labels, grad_out, expected_loss, expected_grad, vocab):
    import torch.distributed as dist

    local = logits.chunk(world, dim=-1)[rank].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, labels, vocab, dist.group.WORLD)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(loss, local, grad_out)
    torch.testing.assert_close(grad, expected_grad.chunk(world, dim=-1)[rank], rtol=1e-12, atol=1e-12)


# 401: a real id in each shard; 200: the second rank's shard is all padding (its -inf target
# column once made every rank's loss NaN).
@pytest.mark.parametrize("vocab", [401, 200])
def test_two_tensor_ranks_equal_one(tmp_path, vocab):
    torch.manual_seed(2)
    logits = torch.randn(7, 5, 512, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, vocab, (7, 5))
    labels[0, 0], labels[1, 0] = 0, vocab - 1  # first and last real id
    grad_out = torch.rand(7, 5, dtype=torch.float64)
    loss = _reference(logits, labels, vocab)
    (grad,) = torch.autograd.grad(loss, logits, grad_out)
    run_spawn(2, _tp2_worker, logits.detach(), labels, grad_out, loss.detach(), grad, vocab, tmp_path=tmp_path)
