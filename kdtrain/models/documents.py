"""Attention within documents (``data.attention: documents``).

A training window holds the end of one document and the start of the next (stream windows) or
several whole documents (``data.packing: documents``). By default every token attends to every
earlier token of its window, whatever document that token is in, and its position is its offset
in the window (Megatron-LM's default). With attention within documents a token attends only to
the earlier tokens of its own document and its position counts from that document's first token
in the window: every document of the window is computed as if it were alone
(tests/test_documents.py checks exactly that against one forward per document, and
tests/test_convert_hf.py against Hugging Face models run on each document).

What a micro-batch carries is ``positions`` [b, s]: each token's position in its document, 0
where a document starts (and at the window's first token, which may be inside one). Documents are
the runs that start at a 0, so ``segment = cumsum(positions == 0)`` numbers them, and

- ``allowed`` [b, 1, s, s] (bool, SDPA's convention: True = may attend): query i sees key j iff
  ``j <= i`` and ``segment[j] == segment[i]``. Built when a forward first needs it and dropped
  once the bias below is made from it. Every query sees at least itself, so no softmax row is
  empty.
- ``rope(table)``: the rotary table ``[S, 1, 1, d]`` gathered at the positions, ``[s, b, 1, d]``,
  which the layers' rotation broadcasts over heads exactly like the shared table. Gathered once
  per micro-batch and reused by every layer (the layers cache cos/sin per table object).
- learned absolute position embeddings read ``positions`` as the model's ``position_ids``.

The layers hand SDPA ``bias(dtype)``, the same mask as an additive one in the activations' dtype,
made once per forward: given a bool mask SDPA converts it to that float tensor in every call,
and each layer's backward kept its own copy (for a 32-layer model at s = 8192, b = 1, in bf16:
4 GiB of masks where one, 128 MiB, is shared now). Cost: b * s * s bytes for ``allowed`` while
the bias is made, and 2 b * s * s for the bias per micro-batch whose backward is pending; with an
explicit mask CUDA's SDPA runs its memory-efficient kernel rather than flash attention (which
takes no grouped query heads: each query head gets its group's key and value, attention.py),
over the whole window whatever the documents' lengths.
The key/value-cached decoder (generate.py) applies the same rule position by position.
"""

from __future__ import annotations

from typing import Optional

import torch


class DocumentMask:
    """The attention mask and rotary positions of one micro-batch's documents (the module
    docstring); passed to the model as its ``attention_mask``."""

    def __init__(self, positions: torch.Tensor):
        assert positions.dim() == 2 and positions.dtype == torch.int64, (positions.shape, positions.dtype)
        self.positions = positions  # [b, s]
        self._allowed: Optional[torch.Tensor] = None
        self._rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (table, gathered)
        self._bias: Optional[torch.Tensor] = None

    @property
    def allowed(self) -> torch.Tensor:
        """[b, 1, s, s] bool, True where a query may attend (module docstring). Made when a forward
        first needs it, dropped once the bias is made from it and by ``release``: a step builds all
        its micro-batches up front, and b * s * s bytes each (1 GiB at s = 32768) would otherwise
        be held for the whole step."""
        if torch.compiler.is_compiling():
            return self._make_allowed()
        if self._allowed is None:
            self._allowed = self._make_allowed()
        return self._allowed

    def _make_allowed(self) -> torch.Tensor:
        segment = (self.positions == 0).cumsum(dim=1)
        s = self.positions.shape[1]
        causal = torch.ones(s, s, dtype=torch.bool, device=self.positions.device).tril_()
        return ((segment[:, :, None] == segment[:, None, :]) & causal).unsqueeze(1)

    def bias(self, dtype: torch.dtype) -> torch.Tensor:
        """``allowed`` as SDPA's additive mask [b, 1, s, s] in ``dtype``: 0 where a query may attend,
        the dtype's lowest finite value elsewhere. Every query may attend to itself, so a masked
        key's weight is exp(lowest - row max) = 0 exactly, as with -inf (the same scores, bitwise);
        finite, since cuDNN's attention mishandles -inf (torch's own bool-mask conversion for it
        avoids -inf likewise). Made once and shared by the layers until ``release``."""
        if torch.compiler.is_compiling():  # computed in the graph (no Python-side cache there)
            return self._make_bias(dtype)
        if self._bias is None or self._bias.dtype != dtype:
            self._bias = self._make_bias(dtype)
            self._allowed = None  # the layers need only the bias now (made again if asked for)
        return self._bias

    def _make_bias(self, dtype: torch.dtype) -> torch.Tensor:
        zero = torch.zeros((), dtype=dtype, device=self.allowed.device)
        return torch.where(self.allowed, zero, torch.full((), torch.finfo(dtype).min, dtype=dtype, device=zero.device))

    def release(self) -> None:
        """Drop what the forward made for its layers (the model's forward calls it when it ends):
        a micro-batch's mask stays with its batch for the whole step, the backward keeps what
        it needs through autograd (a recomputed forward makes them again)."""
        self._allowed = None
        self._bias = None
        self._rope = None

    def rope(self, table: torch.Tensor) -> torch.Tensor:
        """The rotary table ``[>= s, 1, 1, d]`` at each token's position: ``[s, b, 1, d]``."""
        if torch.compiler.is_compiling():  # computed in the graph (no Python-side cache there)
            return table[:, 0, 0][self.positions.t()].unsqueeze(2)
        if self._rope is None or self._rope[0] is not table:
            self._rope = (table, table[:, 0, 0][self.positions.t()].unsqueeze(2))
        return self._rope[1]
