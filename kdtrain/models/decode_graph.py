"""One decode position as a fixed-shape computation, replayed as a CUDA graph.

Why: sampling (on-policy steps, generate.py) runs one forward per position over a few rows. At
those sizes the GPU finishes each layer's kernels faster than Python launches them, so decoding is
bound by host time per layer (docs/planner.md, ``decode_layer_s``). Captured once per sampling
call, a position's whole model forward (embedding, every layer's key/value-cached forward, final
norm, output layer) is one graph launch.

What makes the forward capturable: nothing in it depends on host values that change from position
to position. The token, each row's position (its document position, or the window position),
the cache slot and the first key each row may see live in static device buffers that each call
copies into; the layers write the new key and value at the slot with ``index_copy_`` and attend
over the whole preallocated cache under a mask (keys from the row's first visible one up to the
slot), so every shape is the same at every position (layer.py, ``cached_forward`` with a tensor
offset). Unwritten cache slots are masked out but still multiply their values by zero weights,
so the caches start zeroed (generate.py).

The draw (``pick_tokens``), the decoder's row bookkeeping and stretches of given tokens (several
positions in one forward) stay eager. Requirements, checked by the caller: one pipeline stage and
one tensor rank (no collectives in the graph), layers on kdtrain's direct forward.

On CPU there are no CUDA graphs: the same fixed-shape step runs eagerly, which is how the tests
check it against the decoder's ordinary path (tests/test_generate.py); on CUDA a test compares
the replayed graph with it (tests/test_cuda_graphs_gpu.py).
"""

from __future__ import annotations

from typing import Optional

import torch


class DecodeStep:
    """``step(tokens, slot, positions) -> logits [b, V]`` for one position of ``b`` rows, over
    caches of ``length`` slots (``caches``, ``rope``: generate.decode_state's, the caches zeroed).
    ``graph``: capture on the first call (CUDA only)."""

    def __init__(self, model, caches: list, rope: Optional[tuple], rows: int, length: int, graph: bool):
        device = caches[0][0].device
        if graph and device.type != "cuda":
            raise ValueError(f"CUDA graphs for decoding need a CUDA device, the model is on {device.type}")
        self.model, self.caches, self.rope = model, caches, rope
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.first_key = torch.zeros(rows, dtype=torch.long, device=device)
        self.keys = torch.arange(length, device=device)
        self.use_graph = graph
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.logits: Optional[torch.Tensor] = None

    def _forward(self) -> torch.Tensor:
        model, b = self.model, self.tokens.shape[0]
        hidden = model.embedding(input_ids=self.tokens, position_ids=self.positions)  # [1, b, h]
        # Each row's rotary angles at its own position: [1, b, 1, d].
        cos_sin = None if self.rope is None else tuple(r[:, 0, 0][self.positions.t()].unsqueeze(2) for r in self.rope)
        allowed = (self.keys >= self.first_key[:, None]) & (self.keys <= self.slot)  # [b, length]
        allowed = allowed.view(b, 1, 1, -1)
        for layer, kv in zip(model.decoder.layers, self.caches):
            hidden = layer.cached_forward(hidden, cos_sin, kv, self.slot, allowed)
        return model._postprocess(model.decoder.final_layernorm(hidden))[-1]

    def _capture(self) -> None:
        """Warm up on a side stream (allocator, library workspaces), then record one position.
        Both write the current slot's key and value, which the real replay overwrites."""
        side = torch.cuda.Stream(device=self.slot.device)
        side.wait_stream(torch.cuda.current_stream(self.slot.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream(self.slot.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.logits = self._forward()
        except RuntimeError as e:
            raise RuntimeError(f"capturing a decode step as a CUDA graph failed ({e}); sample without graphs "
                               "(precision.cuda_graphs=false, or kdtrain generate without --cuda-graphs)") from e

    def __call__(self, tokens: torch.Tensor, slot: int, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [b, V/tp] of position ``slot`` given its ``tokens`` [b] and their positions in their
        documents ([b]; a row then sees its document from its start, ``slot - position``), or None:
        attention over the window, every row at position ``slot``. The graph's output buffer is
        overwritten by the next call: read it before then."""
        self.tokens.copy_(tokens.view(-1, 1))
        self.slot.fill_(slot)
        if positions is None:
            self.positions.fill_(slot)
            self.first_key.zero_()
        else:
            self.positions.copy_(positions.view(-1, 1))
            self.first_key.copy_(positions).neg_().add_(slot)
        if not self.use_graph:
            return self._forward()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits
