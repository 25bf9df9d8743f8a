"""Attention within documents on the GPU (kdtrain/models/documents.py, layer.py): the additive mask
the layers hand SDPA gives the bool mask's output on every attention kernel CUDA offers for it,
and the key/value-cached decoder runs under a mask on a grouped-query model with only the fused
kernels allowed (no fall-back to the math kernel, which materialises every head's scores).

    pytest -q -s -m gpu tests/test_documents_gpu.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _positions(b: int, s: int, device) -> torch.Tensor:
    from kdtrain.data.gpt_dataset import positions_from_starts

    rng = np.random.default_rng(0)
    rows = [positions_from_starts(s, np.sort(rng.choice(np.arange(1, s), size=5, replace=False))) for _ in range(b)]
    return torch.tensor(np.stack(rows), device=device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_additive_mask_gives_the_bool_masks_output_on_every_kernel(dtype):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kdtrain.models.documents import DocumentMask

    b, heads, s, d = 2, 8, 256, 64
    mask = DocumentMask(_positions(b, s, "cuda"))
    g = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(b, heads, s, d, device="cuda", dtype=dtype, generator=g) for _ in range(3))
    ran = []
    for backend in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
        try:
            with sdpa_kernel([backend]):
                want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.allowed)
                got = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.bias(dtype))
        except RuntimeError as e:  # this kernel does not take this case on this GPU / build
            print(f"{backend.name}: not available ({str(e).splitlines()[0][:120]})")
            continue
        assert torch.isfinite(got).all(), backend
        exact = torch.equal(got, want)
        print(f"{backend.name}: additive vs bool mask bitwise equal = {exact}")
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2, msg=lambda m: f"{backend.name}: {m}")
        ran.append(backend)
    assert SDPBackend.EFFICIENT_ATTENTION in ran


def test_cached_decoding_under_a_mask_needs_no_math_kernel(world_of_one):
    """Prompts within documents and single positions (plain and fixed-shape, CUDA-graphed) on a
    grouped-query model, with only the flash and memory-efficient kernels allowed."""
    import dataclasses

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kdtrain.config import load_model_config
    from kdtrain.models import build_gpt
    from kdtrain.models.generate import sample_replies
    from kdtrain.parallel import RoleLayout, build_role_groups

    cfg = dataclasses.replace(load_model_config("llama-3.2-1b"), num_layers=2, hidden_size=256, num_attention_heads=8,
                              num_query_groups=2, kv_channels=None, ffn_hidden_size=512, vocab_size=1000,
                              max_seq_length=256)
    model = build_gpt(cfg, build_role_groups(RoleLayout("model", 0, 1, 1, 1)), device=torch.device("cuda"),
                      dtype=torch.bfloat16, seed=3, use_te=False)
    b, s = 4, 128
    windows = torch.randint(1, cfg.vocab_size, (b, s), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    positions = _positions(b, s, "cuda")
    spans = [[(40 + 8 * i, s)] for i in range(b)]
    out = {}
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        for graphs in (False, True):
            out[graphs] = sample_replies(model, windows, spans, vocab_size=cfg.vocab_size, temperature=0.0, seed=0,
                                         sample_ids=list(range(b)), positions=positions, graphs=graphs)
    for tokens, flags, _ in out.values():
        assert flags.any() and int(tokens.max()) < cfg.vocab_size
        assert torch.equal(tokens[~flags], windows[~flags])  # no stop token: the prompts stay, the rest sampled
    print(f"graphed vs plain cached decoding under a mask: same tokens = {torch.equal(out[False][0], out[True][0])}")
