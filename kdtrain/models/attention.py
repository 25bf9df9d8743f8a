"""Core attention on ``torch.nn.functional.scaled_dot_product_attention``.

Drop-in for megatron-core's ``DotProductAttention`` in the local layer spec: same constructor, same
``[s, b, heads, head_dim]`` inputs and ``[s, b, heads * head_dim]`` output. It needs no global
memory buffer and no CUDA RNG tracker, so it runs on CPU, and on GPU SDPA dispatches to
flash/memory-efficient kernels. Causal masking and grouped-query attention are native to SDPA.

``attention_mask`` is None (causal attention over the whole sequence) or a mask broadcastable to
``[b, heads, s, s]`` in SDPA's convention (bool, True = may attend, or additive), which replaces
the causal mask: the layers pass ``DocumentMask.bias`` (documents.py) there.

Attention dropout with several tensor ranks: the ranks of a stage share one generator stream
(their hidden dropout after a row-parallel all-reduce must drop the same elements of the same
replicated activations), but each holds other heads, whose attention dropout must draw
independent masks (with the shared stream, head h of rank 0 and head h of rank 1 were dropped
alike). Megatron forks a per-tensor-rank generator kept beside the default one; here each call
draws a seed from the shared stream (the same on every tensor rank, which keeps the stream in
step) and runs SDPA on a fork of the device's generator seeded with ``seed + tensor rank``.
Activation recomputation and checkpoints need nothing more: they restore the shared stream, from
which the same seed is drawn again. Compiled layers (precision.compile) break their graph at the
draw, a host value; tensor-parallel layers already break at their overlapped all-reduces.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPAttention(MegatronModule):
    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism needs Transformer Engine attention")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"SDPAttention supports causal masks only, got {attn_mask_type}")
        tp = pg_collection.tp.size()
        self.tp_size, self.tp_rank = tp, pg_collection.tp.rank()
        self.heads_per_rank = config.num_attention_heads // tp
        self.groups_per_rank = config.num_query_groups // tp
        self.softmax_scale = softmax_scale  # None: SDPA's 1/sqrt(head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type=None, attention_bias=None,
                packed_seq_params=None) -> torch.Tensor:
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SDPAttention supports neither attention_bias nor packed sequences")
        seq, batch = query.shape[0], query.shape[1]
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout = self.dropout_p if self.training else 0.0
        gqa = self.heads_per_rank != self.groups_per_rank
        if gqa and attention_mask is not None:
            # An explicit mask rules out CUDA's flash kernel and the memory-efficient one takes no
            # grouped query heads: SDPA would fall back to the math kernel, which materialises
            # [b, heads, s, s] scores per layer. Each query head gets its group's key and value
            # instead (the same products, so the same result).
            per_group = self.heads_per_rank // self.groups_per_rank
            k, v = k.repeat_interleave(per_group, dim=1), v.repeat_interleave(per_group, dim=1)
            gqa = False
        rng = (tensor_rank_generator(q.device, self.tp_rank) if dropout > 0.0 and self.tp_size > 1
               else contextlib.nullcontext())
        with rng:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attention_mask, is_causal=attention_mask is None, scale=self.softmax_scale,
                dropout_p=dropout, enable_gqa=gqa,
            )
        return out.permute(2, 0, 1, 3).reshape(seq, batch, -1)


@contextlib.contextmanager
def tensor_rank_generator(device: torch.device, tp_rank: int):
    """Run the block on the device's generator seeded for this tensor rank, then give the shared
    stream back, advanced by one draw (the seed) on every tensor rank alike (module docstring).
    The seed comes from the CPU generator whatever the device (no device-to-host copy); on CUDA,
    the block's draws are the current device's."""
    seed = int(torch.randint(0, 2**62, (1,)))
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else [], device_type="cuda"):
        (torch.cuda.manual_seed if cuda else torch.manual_seed)(seed + tp_rank)
        yield
