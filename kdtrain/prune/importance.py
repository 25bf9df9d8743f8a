"""Activation-based importance of a model's layers, query groups, MLP neurons and hidden channels.

One forward pass over calibration samples, with hooks on the modules the layer forward calls
(kdtrain/models/layer.py), in the spirit of Minitron (Muralidharan et al., 2024):

* MLP neuron ``n`` of a layer: the magnitude of its activation, ``act(x W_gate^T)_n * (x W_up^T)_n``
  for SwiGLU (``act(x W_1^T)_n`` otherwise), where ``x`` is the pre-MLP norm's output;
* query group: the summed magnitude of its heads' attention outputs (before ``linear_proj``);
* hidden channel: the magnitude of the channel in the outputs of every layer's two norms, summed
  over layers (the residual stream is shared, so one ranking for the whole model);
* layer: its Block Influence, the mean over tokens of ``1 - cos(input, output)`` of the layer
  (Men et al., 2024, "ShortGPT"): a layer that hardly changes the residual stream scores near 0.

Magnitudes are reduced as Minitron found best: mean of ``|value|`` over a sample's tokens, then the
L2 norm over samples. Calibration runs on one device with the whole model (TP = PP = 1), with the
attention the distillation run will use (over the window, or within documents) and over the data
tokens only: the padding of packed windows counts in no score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Union

import torch
import torch.nn.functional as F

from ..models import KDGPTModel
from ..models.documents import DocumentMask


@dataclass
class CalibrationBatch:
    """Token windows [b, s]; each token's position in its document (attention within documents,
    else None: over the window); and how many leading tokens of each window are data ([b], None:
    all of them)."""

    tokens: torch.Tensor
    positions: Optional[torch.Tensor] = None
    content: Optional[torch.Tensor] = None


@dataclass
class Importance:
    layers: torch.Tensor  # [L] block influence
    hidden: torch.Tensor  # [h]
    ffn: list[torch.Tensor]  # per layer [f]
    groups: list[torch.Tensor]  # per layer [groups]
    samples: int

    def to_dict(self) -> dict:
        return {"samples": self.samples, "layers": self.layers.tolist(), "hidden": self.hidden.tolist(),
                "ffn": [t.tolist() for t in self.ffn], "groups": [t.tolist() for t in self.groups]}


class _SumSq:
    """Accumulates the L2-over-samples of per-sample means over tokens of ``|x|`` ([s, b, n] input;
    ``weight`` [s, b, 1]: 1 on the tokens that count, 0 on padding)."""

    def __init__(self):
        self.sq = None

    def add(self, x: torch.Tensor, weight: torch.Tensor) -> None:
        per_sample = (x.float().abs() * weight).sum(dim=0) / weight.sum(dim=0)  # [b, n]
        s = per_sample.pow(2).sum(dim=0)
        self.sq = s if self.sq is None else self.sq + s

    def result(self) -> torch.Tensor:
        return self.sq.sqrt().cpu()


@torch.no_grad()
def activation_importance(model: KDGPTModel, batches: Iterable[Union[torch.Tensor, CalibrationBatch]]) -> Importance:
    """Scores of ``model`` (one rank holding it whole) over calibration batches on its device (a
    plain [b, s] token tensor: attention over the window, every token counted)."""
    if model.pre_process is False or model.post_process is False or model.config.tensor_model_parallel_size != 1:
        raise ValueError("prune: importance is measured on a whole model (tp = pp = 1)")
    cfg = model.config
    layers = list(model.decoder.layers)
    heads, groups = cfg.num_attention_heads, cfg.num_query_groups or cfg.num_attention_heads
    hidden = _SumSq()
    ffn = [_SumSq() for _ in layers]
    heads_acc = [_SumSq() for _ in layers]
    influence = torch.zeros(len(layers), dtype=torch.float64)
    tokens_seen = 0
    handles = []
    weight = None  # [s, b, 1] of the batch in flight: 1 on data tokens, 0 on padding

    def norm_hook(_module, _args, out):
        hidden.add(out, weight)

    def mlp_hook(i):
        fc1 = layers[i].mlp.linear_fc1

        def hook(_module, _args, out):
            h = F.linear(out, fc1.weight, fc1.bias)
            if cfg.gated_linear_unit:
                gate, up = torch.chunk(h, 2, dim=-1)
                h = cfg.activation_func(gate) * up
            else:
                h = cfg.activation_func(h)
            ffn[i].add(h, weight)
        return hook

    def attn_hook(i):
        def hook(_module, _args, out):
            s, b, _ = out.shape
            heads_acc[i].add(out.float().view(s, b, heads, -1).norm(dim=-1), weight)
        return hook

    def layer_hook(i):
        def hook(_module, args, kwargs, out):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = out[0] if isinstance(out, tuple) else out
            cos = F.cosine_similarity(x_in.float(), x_out.float(), dim=-1)  # [s, b]
            influence[i] += float(((1.0 - cos) * weight[..., 0]).sum())
        return hook

    for i, layer in enumerate(layers):
        handles += [layer.input_layernorm.register_forward_hook(norm_hook),
                    layer.pre_mlp_layernorm.register_forward_hook(norm_hook),
                    layer.pre_mlp_layernorm.register_forward_hook(mlp_hook(i)),
                    layer.self_attention.core_attention.register_forward_hook(attn_hook(i)),
                    layer.register_forward_hook(layer_hook(i), with_kwargs=True)]
    was_training = model.training
    model.eval()
    samples = 0
    try:
        for batch in batches:
            if isinstance(batch, torch.Tensor):
                batch = CalibrationBatch(batch)
            tokens = batch.tokens
            b, s = tokens.shape
            index = torch.arange(s, device=tokens.device)
            content = torch.full((b,), s, device=tokens.device) if batch.content is None else batch.content
            weight = (index[:, None] < content[None, :]).float().unsqueeze(-1)  # [s, b, 1]
            # The hooks read activations only: no logits (logit_rows empty; whole, [s, b, V] in
            # the model's dtype: 8 GB at 8192 x 4 positions over a 128k vocabulary).
            no_logits = torch.empty(0, dtype=torch.long, device=tokens.device)
            if batch.positions is None:
                model(tokens, index.unsqueeze(0).expand(b, s), None, logit_rows=no_logits)
            else:
                model(tokens, batch.positions, DocumentMask(batch.positions), logit_rows=no_logits)
            samples += b
            tokens_seen += int(content.sum())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if samples == 0:
        raise ValueError("prune: no calibration samples")
    hpg = heads // groups
    per_head = [acc.result() for acc in heads_acc]
    return Importance(layers=(influence / tokens_seen).float(), hidden=hidden.result(),
                      ffn=[acc.result() for acc in ffn],
                      groups=[h.view(groups, hpg).sum(dim=1) for h in per_head], samples=samples)
