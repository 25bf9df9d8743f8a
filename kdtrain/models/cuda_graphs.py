"""``precision.cuda_graphs: true``: replay each transformer layer's forward and backward as CUDA graphs.

Why: a small model is bound by host time, not by the GPU. The 146M student of the benchmark pair
issues a few hundred kernels per layer and micro-batch (forward and backward), and launching them
from Python costs more than the GPU takes to run them (docs/planner.md, ``layer_overhead_s``). A
CUDA graph records a layer's kernels once and replays them with one launch, so the host time per
layer drops to two replays per micro-batch (forward, backward) whatever the layer does.

How (``torch.cuda.make_graphed_callables``): every layer of this pipeline stage is wrapped in a
``_LayerBody`` (hidden -> hidden, the layer's direct forward with the rotary table bound), and all
bodies are captured together, sharing one memory pool, forward in layer order and backward in
reverse, exactly the order of a training micro-batch. Each graphed layer is one autograd node: its
forward copies the incoming hidden states into a static input buffer and replays the forward
graph; its backward copies the incoming gradient into a static buffer, replays the backward graph
and returns the gradients of the input and of the layer's parameters, which autograd accumulates
as usual (so the fp32 ``main_grad`` hooks of training/grads.py see them like eager gradients).

Constraints this imposes, enforced here or by construction:

* Static shapes: the graphs are captured for one micro-batch shape ``[s, b, h]``, dtype and rotary
  table. A call with anything else (evaluation with another batch, no grad, eval mode, a mask)
  runs the eager direct forward; the graphs stay valid.
* One micro-batch in flight: a replay overwrites the static outputs and the activations saved for
  backward, so a micro-batch's backward must run before the next one's forward. The 1F1B schedule
  does exactly that with one pipeline stage; with pp > 1 several micro-batches are in flight, so
  ``pp = 1`` is required.
* No collectives inside the graphs: ``tp = 1`` is required (the layers' linears are then plain
  ``F.linear``; tensor-parallel linears all-reduce in their backward).
* Parameters keep their storage: the optimizer, checkpoint loading and the data-parallel
  broadcast all update parameters in place, which the graphs read at replay.
* Capture at a quiet moment: ``capture_layer_graphs`` runs one forward of the model on dummy
  tokens right after it is built, before any other thread (the cache prefetcher) uses the GPU;
  the first layer's call inside that forward captures every layer with the exact arguments the
  model passes at run time (the rotary table is megatron-core's cached tensor for the run's
  sequence length).

The graphs replay the same kernels as the eager direct forward, so losses and gradients equal
eager ones (tests/test_cuda_graphs_gpu.py on CUDA). On CPU, where there are no CUDA graphs, the
same wrapping runs with a capture function that emulates the static-buffer semantics
(tests/test_cuda_graphs.py), which checks the integration: dispatch, fallbacks, gradient flow
through the graphed autograd node, and that a training step reads no static buffer after it is
overwritten.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ..parallel import RoleLayout

Capture = Callable[[tuple, tuple], Sequence[Callable[[torch.Tensor], torch.Tensor]]]


def check_graph_support(layout: RoleLayout, device: torch.device, compile: bool, use_te: bool,
                        where: str = "precision.cuda_graphs") -> None:
    """ValueError before building anything when the run cannot replay its layers as graphs."""
    if device.type != "cuda":
        raise ValueError(f"{where}: CUDA graphs need a CUDA device, the run is on {device.type} "
                         "(set precision.cuda_graphs=false)")
    if compile:
        raise ValueError(f"{where} and precision.compile are exclusive for one model: choose one (both remove "
                         "the host time per layer; compiled layers also fuse the memory-bound kernels). In "
                         "distillation both together graph the student and compile the teacher")
    if use_te:
        raise ValueError(f"{where}: graphs are captured for kdtrain's local layer spec; Transformer Engine "
                         "layers are in use (set KDTRAIN_NO_TE=1 or precision.cuda_graphs=false)")
    if layout.pp != 1:
        raise ValueError(f"{where}: needs pp=1 for the {layout.name} (a graph replay overwrites the "
                         f"activations of the micro-batch before it, and with pp={layout.pp} several are in flight)")
    if layout.tp != 1:
        raise ValueError(f"{where}: needs tp=1 for the {layout.name} (tensor-parallel linears communicate in "
                         f"their backward, which the graphs do not capture), got tp={layout.tp}")


class _LayerBody(torch.nn.Module):
    """One layer's direct forward with its rotary table bound: ``hidden -> hidden``. Its
    parameters are the layer's, which is what the graphed autograd node returns gradients for."""

    def __init__(self, layer: torch.nn.Module, freqs: Optional[torch.Tensor]):
        super().__init__()
        self.layer = layer
        self.freqs = freqs

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.layer.direct_forward(hidden, None, self.freqs)


class LayerGraphs:
    """The graphed layers of one pipeline stage (shared by its ``DirectTransformerLayer``s, which
    consult ``run`` on every call)."""

    def __init__(self, layers: Sequence[torch.nn.Module], capture: Optional[Capture] = None):
        self.layers = list(layers)
        self.position = {id(layer): i for i, layer in enumerate(self.layers)}
        self.capture = capture if capture is not None else torch.cuda.make_graphed_callables
        self.graphed: Optional[list] = None
        self.armed = False  # the next eligible call of the first layer captures
        self.freqs: Optional[torch.Tensor] = None
        self.signature: Optional[tuple] = None  # (shape, dtype, device) of the captured hidden states

    def run(self, layer, hidden: torch.Tensor, attention_mask, freqs) -> Optional[torch.Tensor]:
        """The layer's output from its graphs, or None when this call must run eagerly."""
        if not (layer.training and torch.is_grad_enabled() and hidden.requires_grad and attention_mask is None):
            return None
        if self.graphed is None:
            if not (self.armed and layer is self.layers[0]):
                return None
            self._capture(hidden, freqs)
        if freqs is not self.freqs or (tuple(hidden.shape), hidden.dtype, hidden.device) != self.signature:
            return None
        return self.graphed[self.position[id(layer)]](hidden)

    def _capture(self, hidden: torch.Tensor, freqs: Optional[torch.Tensor]) -> None:
        self.armed = False
        if freqs is not None:  # cos/sin tables computed now, outside the graphs (layer.py caches them)
            for layer in self.layers:
                layer.rope_tables(freqs, hidden.dtype)
        bodies = tuple(_LayerBody(layer, freqs) for layer in self.layers)
        # Sample inputs: copies of the real hidden states (no draw from the global RNG for them;
        # with dropout on, the capture's warm-up forwards do draw from it, so a run with graphs
        # then follows other random streams than one without).
        samples = tuple((hidden.detach().clone().requires_grad_(),) for _ in bodies)
        self.graphed = list(self.capture(bodies, samples))
        assert len(self.graphed) == len(self.layers)
        self.freqs = freqs
        self.signature = (tuple(hidden.shape), hidden.dtype, hidden.device)


def attach_layer_graphs(model: torch.nn.Module, capture: Optional[Capture] = None) -> LayerGraphs:
    """Give every transformer layer of this stage one shared ``LayerGraphs`` (not captured yet)."""
    layers = list(model.decoder.layers)
    unsupported = [i for i, layer in enumerate(layers) if not getattr(layer, "direct", False)]
    if unsupported:
        raise ValueError(f"precision.cuda_graphs: layers {unsupported} are not kdtrain direct-forward layers "
                         "(an unsupported layer configuration, see kdtrain/models/layer.py)")
    graphs = LayerGraphs(layers, capture)
    for layer in layers:
        layer.graphs = graphs
    return graphs


def capture_layer_graphs(model: torch.nn.Module, micro_batch: int, seq_length: int) -> bool:
    """Capture the graphs of a model given ``attach_layer_graphs``, with one training-mode forward
    of dummy tokens (discarded). Returns whether the graphs exist afterwards."""
    layers = list(model.decoder.layers)
    if not layers:
        return False
    graphs: LayerGraphs = layers[0].graphs
    device = next(model.parameters()).device
    tokens = torch.zeros(micro_batch, seq_length, dtype=torch.int64, device=device)
    positions = torch.arange(seq_length, device=device).unsqueeze(0).expand(micro_batch, seq_length)
    was_training = model.training
    model.train()
    graphs.armed = True
    try:
        with torch.enable_grad():
            model(tokens, positions, None)
    except RuntimeError as e:  # an operation CUDA graphs cannot capture, out of memory, ...
        raise RuntimeError(f"precision.cuda_graphs: capturing the transformer layers as CUDA graphs failed "
                           f"(micro-batch {micro_batch} x seq {seq_length}); run with precision.cuda_graphs=false. "
                           f"Cause: {e}") from e
    finally:
        graphs.armed = False
        model.train(was_training)
    return graphs.graphed is not None
