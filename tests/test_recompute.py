"""``training.recompute`` (full activation recomputation, kdtrain/models/layer.py): the same loss and
gradients as storing the activations (bitwise on CPU: the backward reruns the same operations,
dropout with the same masks), with far fewer bytes kept for the backward. Multi-rank runs
with it: tests/test_distill.py (colocated TP=2) and tests/test_documents.py (PP=2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdtrain.config import ModelConfig

V = 97


def _pair(dropout: float = 0.0, compile: bool = False, layers: int = 3):
    from kdtrain.models import build_gpt
    from kdtrain.parallel import RoleLayout, build_role_groups

    cfg = ModelConfig(name="llama", num_layers=layers, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=96, vocab_size=V, max_seq_length=64, init_std=0.1, hidden_dropout=dropout,
                      attention_dropout=dropout)
    cfg.check()
    groups = build_role_groups(RoleLayout("m", 0, 1, 1, 1))
    return tuple(build_gpt(cfg, groups, device=torch.device("cpu"), dtype=torch.float32, seed=3, compile=compile,
                           recompute=r) for r in (False, True))


def _step(model, tokens, mask=None, seed=0):
    """Loss and gradients of one forward + backward; the bytes autograd kept for the backward."""
    kept = {}

    def pack(t):
        kept[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    model.zero_grad()
    torch.manual_seed(seed)
    pos = torch.arange(tokens.shape[1]).expand_as(tokens) if mask is None else mask.positions
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(tokens, pos, mask)
        loss = logits.float().logsumexp(-1).mean() - logits.float()[..., 0].mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, sum(kept.values())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_recompute_gives_the_same_gradients_and_keeps_less(world_of_one, dropout):
    from kdtrain.data.gpt_dataset import positions_from_starts
    from kdtrain.models.documents import DocumentMask

    plain, recomputed = _pair(dropout)
    assert all(layer.recompute for layer in recomputed.decoder.layers)
    tokens = torch.randint(0, V, (2, 48), generator=torch.Generator().manual_seed(0))
    pos = torch.tensor(np.stack([positions_from_starts(48, np.array([20])), positions_from_starts(48, np.array([]))]))
    for mask in (None, DocumentMask(pos)):
        ref_loss, ref_grads, ref_kept = _step(plain, tokens, mask)
        loss, grads, kept = _step(recomputed, tokens, mask)
        assert torch.equal(loss, ref_loss)
        for name, g in ref_grads.items():
            assert torch.equal(grads[name], g), name
        # Without recomputation every layer keeps its norms, projections, attention and MLP
        # activations; with it, only the layer inputs are kept (outside the hooks' view) and the
        # output layer's tensors remain.
        assert kept < ref_kept / 3, (kept, ref_kept)
    if dropout:  # dropout draws differently per seed: the equality above is not vacuous
        assert not torch.equal(_step(plain, tokens, seed=1)[0], ref_loss)
    with torch.no_grad():  # no backward, nothing to recompute: the plain forward
        assert torch.equal(recomputed.eval()(tokens, torch.arange(48).expand(2, 48), None),
                           plain.eval()(tokens, torch.arange(48).expand(2, 48), None))


def _compiled_recompute(rank, world):
    import os

    from torch._dynamo.utils import counters

    os.environ["KDTRAIN_COMPILE_BACKEND"] = "aot_eager"
    (plain, _), (_, compiled) = _pair(), _pair(compile=True)
    tokens = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(1))
    counters.clear()
    ref_loss, ref_grads, _ = _step(plain, tokens)
    loss, grads, _ = _step(compiled, tokens)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_compiled_layers_recompute(tmp_path):
    """torch.compile traces the checkpointed layer (no graph break) and computes the same."""
    from conftest import run_spawn

    run_spawn(1, _compiled_recompute, tmp_path=tmp_path)


def _tensor_parallel_dropout(rank, world):
    import dataclasses

    from kdtrain.models import build_gpt
    from kdtrain.parallel import RoleLayout, build_role_groups

    cfg = ModelConfig(name="llama", num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=96, vocab_size=V, max_seq_length=64, init_std=0.1, hidden_dropout=0.1,
                      attention_dropout=0.3,
                      make_vocab_size_divisible_by=1)  # 97 ids -> 98: real ids on both ranks, each rank's loss
                                                       # (over its vocab shard) reaches its own heads' gradients
    groups = build_role_groups(RoleLayout("m", 0, 2, 1, 1))

    def build(c, recompute):
        return build_gpt(c, groups, device=torch.device("cpu"), dtype=torch.float32, seed=3, recompute=recompute)

    tokens = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(0))
    ref_loss, ref_grads, _ = _step(build(cfg, False), tokens)
    loss, grads, _ = _step(build(cfg, True), tokens)
    assert torch.equal(loss, ref_loss)
    for name, g in ref_grads.items():
        assert torch.equal(grads[name], g), name
    # The attention dropout draws on the tensor ranks (with it alone, another seed gives another
    # loss): the equality above is not that of two runs without it.
    attention_only = build(dataclasses.replace(cfg, hidden_dropout=0.0), False)
    assert not torch.equal(_step(attention_only, tokens, seed=1)[0], _step(attention_only, tokens, seed=0)[0])


def test_recompute_redraws_the_tensor_ranks_attention_dropout(tmp_path):
    """With tp=2 each tensor rank's attention dropout draws from its own fork of the generator
    (kdtrain/models/attention.py): the recomputed forward draws the same masks (bitwise-equal
    gradients with hidden and attention dropout on)."""
    from conftest import run_spawn

    run_spawn(2, _tensor_parallel_dropout, tmp_path=tmp_path)


def test_recompute_with_cuda_graphs_is_refused():
    from kdtrain.config import load_pretrain_config
    from kdtrain.config.distill import load_distill_config

    with pytest.raises(ValueError, match="training.recompute"):
        load_pretrain_config("tiny", ["training.recompute=true", "precision.cuda_graphs=true"]).validate(1)
    with pytest.raises(ValueError, match="training.recompute"):
        load_distill_config("tiny", ["data.mock=true", "training.recompute=true",
                                     "precision.cuda_graphs=true"]).validate(1)
