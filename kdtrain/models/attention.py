"""Core attention on ``torch.nn.functional.scaled_dot_product_attention``.

Drop-in for megatron-core's ``DotProductAttention`` in the local layer spec: same constructor, same
``[s, b, heads, head_dim]`` inputs and ``[s, b, heads * head_dim]`` output. It needs no global
memory buffer and no CUDA RNG tracker, so it runs on CPU, and on GPU SDPA dispatches to
flash/memory-efficient kernels. Causal masking and grouped-query attention are native to SDPA.

``attention_mask`` is None (causal attention over the whole sequence) or a bool tensor
broadcastable to ``[b, heads, s, s]`` in SDPA's convention, True = may attend, which replaces the
causal mask: the layers pass ``DocumentMask.allowed`` (documents.py) there.
"""

from __future__ import annotations

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
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attention_mask, is_causal=attention_mask is None, scale=self.softmax_scale,
            dropout_p=self.dropout_p if self.training else 0.0,
            enable_gqa=self.heads_per_rank != self.groups_per_rank,
        )
        return out.permute(2, 0, 1, 3).reshape(seq, batch, -1)
