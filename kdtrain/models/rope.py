"""Rotary embedding that stays on the model's device.

megatron-core 0.16.1's ``RotaryEmbedding.get_emb`` moves ``inv_freq`` to the current CUDA device
unconditionally, which fails on CPU. This subclass computes the same table wherever ``inv_freq``
lives; the builder creates ``inv_freq`` on the model's device, so CPU and GPU run one code path.
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding


class DeviceRotaryEmbedding(RotaryEmbedding):
    def get_emb(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)  # [s, dim/2] on inv_freq's device
        if not self.rotary_interleaved:
            emb = torch.cat((freqs, freqs), dim=-1)
        else:
            emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(freqs.shape[0], -1)
        return emb[:, None, None, :]  # [s, 1, 1, dim]
