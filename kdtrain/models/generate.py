"""Sampling continuations from a GPT (the student's own sequences for on-policy distillation).

``sample(model, prompts, total_length, ...)`` extends each prompt to ``total_length`` tokens, one
token at a time, on a model held whole in depth (pp = 1, any tensor parallelism).

Key/value cache. Layers on the direct forward (models/layer.py, the local spec) keep each
position's keys and values in a preallocated ``[total_length, b, groups, head_dim]`` cache: the
prompt is one forward, every new token a one-position forward attending to the cache. Other
layers (Transformer Engine's spec) fall back to re-running the whole prefix per token; the tokens
are the same, the cost quadratic.

Randomness that does not depend on the layout. Token ``t`` of sample ``g`` is
``argmax_v (logit_v / temperature + G_v)`` over the real vocabulary (the Gumbel-max form of
sampling from ``softmax(logits / temperature)``), with Gumbel noise ``G = -log(-log U)`` drawn from
a generator seeded by ``(seed, g, t)`` over the whole padded vocabulary. Every tensor rank draws
the same noise and takes its own vocabulary slice, the ranks agree on the maximum with one small
all-gather, and the sequence of sample ``g`` is the same whatever the tensor- and data-parallel
layout, the micro-batch it is in, or the rank that runs it. ``temperature = 0`` is greedy.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def noise_seed(seed: int, sample: int, position: int) -> int:
    """A 63-bit generator seed for (run seed, sample, position): splitmix64 of their mix."""
    x = (seed * _MIX[0] + sample * _MIX[1] + position * _MIX[2]) & (2**64 - 1)
    x = ((x ^ (x >> 30)) * _MIX[1]) & (2**64 - 1)
    x = ((x ^ (x >> 27)) * _MIX[2]) & (2**64 - 1)
    return (x ^ (x >> 31)) & (2**63 - 1)


def gumbel_noise(seed: int, samples: Sequence[int], position: int, width: int, device: torch.device) -> torch.Tensor:
    """[len(samples), width] Gumbel noise, row ``i`` a function of (seed, samples[i], position) only."""
    out = torch.empty(len(samples), width, dtype=torch.float32, device=device)
    gen = torch.Generator(device=device)
    for i, g in enumerate(samples):
        gen.manual_seed(noise_seed(seed, int(g), position))
        out[i].uniform_(generator=gen)
    # U in [0, 1): clamp away from 0 and 1 so both logs are finite.
    return -torch.log(-torch.log(out.clamp_(1e-20, 1.0 - 1e-7)))


def pick_tokens(logits_bVl: torch.Tensor, vocab_size: int, temperature: float, noise: Optional[torch.Tensor],
                tp_group) -> torch.Tensor:
    """Next tokens [b] from this rank's vocabulary slice of the last position's logits [b, V/tp]:
    the argmax of ``logits / temperature + noise`` over the real vocabulary of all tensor ranks
    (ties to the lower id)."""
    b, width = logits_bVl.shape
    tp = 1 if tp_group is None else dist.get_world_size(tp_group)
    rank = 0 if tp_group is None else dist.get_rank(tp_group)
    first = rank * width
    score = logits_bVl.float()
    if temperature > 0:
        score = score / temperature + noise[:, first:first + width]
    ids = torch.arange(first, first + width, device=score.device)
    score = score.masked_fill(ids[None, :] >= vocab_size, float("-inf"))  # padded rows never win
    best, arg = score.max(dim=-1)
    if tp == 1:
        return arg
    cand = torch.stack([best, (arg + first).float()], dim=-1)  # ids < 2^24: exact in fp32
    gathered = [torch.empty_like(cand) for _ in range(tp)]
    dist.all_gather(gathered, cand, group=tp_group)
    cand = torch.stack(gathered)  # [tp, b, 2]; rank order = id order, so the first maximum is the lowest id
    pick = cand[..., 0].argmax(dim=0)
    return cand[pick, torch.arange(b, device=cand.device), 1].long()


def _cached_layers(model) -> bool:
    return all(getattr(layer, "direct", False) for layer in model.decoder.layers)


def _forward_positions(model, tokens: torch.Tensor, offset: int, rope, caches) -> torch.Tensor:
    """Logits [n, b, V/tp] of positions ``[offset, offset + n)`` given their tokens [b, n]."""
    b, n = tokens.shape
    pos = torch.arange(offset, offset + n, device=tokens.device).unsqueeze(0).expand(b, n)
    hidden = model.embedding(input_ids=tokens, position_ids=pos)
    cos_sin = None if rope is None else (rope[0][offset:offset + n], rope[1][offset:offset + n])
    for layer, kv in zip(model.decoder.layers, caches):
        hidden = layer.cached_forward(hidden, cos_sin, kv, offset)
    return model._postprocess(model.decoder.final_layernorm(hidden))


@torch.no_grad()
def sample(model, prompts: torch.Tensor, total_length: int, *, vocab_size: int, temperature: float, seed: int,
           sample_ids: Sequence[int], tp_group=None) -> torch.Tensor:
    """``prompts`` [b, P] extended to [b, total_length] by sampling (see the module docstring);
    ``sample_ids``: the global dataset sample of each row (the noise's key)."""
    if not (model.pre_process and model.post_process):
        raise ValueError("sampling needs the whole model on one rank in depth (pp = 1)")
    b, P = prompts.shape
    assert len(sample_ids) == b and 0 < P < total_length, (len(sample_ids), b, P, total_length)
    was_training = model.training
    model.eval()
    tokens = torch.empty(b, total_length, dtype=torch.long, device=prompts.device)
    tokens[:, :P] = prompts
    tp = 1 if tp_group is None else dist.get_world_size(tp_group)

    def next_tokens(logits_bVl, t):
        noise = None
        if temperature > 0:  # over the whole padded vocabulary, the same on every tensor rank
            noise = gumbel_noise(seed, sample_ids, t, logits_bVl.shape[-1] * tp, prompts.device)
        return pick_tokens(logits_bVl, vocab_size, temperature, noise, tp_group)

    try:
        if _cached_layers(model):
            dtype = next(model.parameters()).dtype
            layer0 = model.decoder.layers[0]
            groups = layer0.self_attention.num_query_groups_per_partition
            d = layer0.self_attention.hidden_size_per_attention_head
            caches = [(torch.empty(total_length, b, groups, d, dtype=dtype, device=prompts.device),
                       torch.empty(total_length, b, groups, d, dtype=dtype, device=prompts.device))
                      for _ in model.decoder.layers]
            rope = None
            if getattr(model, "rotary_pos_emb", None) is not None and model.position_embedding_type == "rope":
                freqs = model.rotary_pos_emb(total_length)
                rope = (torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype))
            logits = _forward_positions(model, prompts, 0, rope, caches)[-1]
            for t in range(P, total_length):
                tokens[:, t] = next_tokens(logits, t)
                if t + 1 < total_length:
                    logits = _forward_positions(model, tokens[:, t:t + 1], t, rope, caches)[-1]
        else:
            for t in range(P, total_length):
                pos = torch.arange(t, device=prompts.device).unsqueeze(0).expand(b, t)
                tokens[:, t] = next_tokens(model(tokens[:, :t], pos, None)[-1], t)
    finally:
        model.train(was_training)
    return tokens
