"""A pruned model: which layers, query groups, MLP neurons and hidden channels of the teacher stay,
and the student's parameters sliced out of the teacher's.

The selection works on whole (TP=1 layout) parameters, so it applies to any source
(convert/sources.py) and the result is an ordinary layout-free checkpoint. Student layer ``i`` is
teacher layer ``layers[i]`` (increasing). Per kept layer, ``groups[i]`` are the teacher's query
groups kept (each with all its query heads, its key and its value head: grouped-query attention
stays grouped) and ``ffn[i]`` its MLP neurons; ``hidden`` are the residual-stream channels kept
everywhere (embeddings, every norm, every projection's input or output, the output layer).

Where each index lands in a kdtrain tensor (megatron's TP=1 layouts, see convert/layout.py):

* ``linear_qkv`` rows are grouped ``[q heads of g0 | k g0 | v g0 | q heads of g1 | ...]``, so a
  query group is one contiguous block of ``(heads_per_group + 2) * head_dim`` rows; its columns
  are hidden channels.
* ``linear_proj`` columns are the heads in query order, ``heads_per_group * head_dim`` per group;
  its rows are hidden channels.
* ``linear_fc1`` rows are ``[gate; up]`` for SwiGLU (neuron ``n`` is rows ``n`` and ``f + n``),
  else the neurons; ``linear_fc2`` columns are the neurons.
* Query/key norms (Qwen3) act on one head's ``head_dim`` values and are kept whole.

Removing a query group or an MLP neuron is exact: the pruned network computes what the teacher
computes with that group's (neuron's) output projection columns set to zero. Removing a layer
equals setting its two output projections to zero (the layer then adds nothing to the residual).
Removing hidden channels is not exact with RMSNorm/LayerNorm (the norm's statistics are over the
kept channels); the distillation that follows recovers it (Minitron).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..config import ModelConfig
from ..convert.layout import expected_shapes

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


@dataclass
class Selection:
    """What stays of a teacher (indices into the teacher; see the module docstring)."""

    layers: list[int]
    groups: list[list[int]]  # per kept layer
    ffn: list[list[int]]  # per kept layer
    hidden: list[int]

    @classmethod
    def everything(cls, cfg: ModelConfig) -> "Selection":
        return cls(list(range(cfg.num_layers)), [list(range(cfg.num_query_groups))] * cfg.num_layers,
                   [list(range(cfg.ffn_hidden_size))] * cfg.num_layers, list(range(cfg.hidden_size)))

    def check(self, cfg: ModelConfig) -> None:
        def ordered(name: str, idx: list[int], bound: int) -> None:
            if not idx:
                raise ValueError(f"prune: {name} keeps nothing")
            if any(b <= a for a, b in zip(idx, idx[1:])) or idx[0] < 0 or idx[-1] >= bound:
                raise ValueError(f"prune: {name} must be increasing indices in [0, {bound}), got {idx}")

        ordered("layers", self.layers, cfg.num_layers)
        ordered("hidden channels", self.hidden, cfg.hidden_size)
        for what, per_layer, bound in (("query groups", self.groups, cfg.num_query_groups),
                                       ("MLP neurons", self.ffn, cfg.ffn_hidden_size)):
            if len(per_layer) != len(self.layers):
                raise ValueError(f"prune: {what} given for {len(per_layer)} layers, {len(self.layers)} are kept")
            sizes = {len(idx) for idx in per_layer}
            if len(sizes) != 1:
                raise ValueError(f"prune: every layer must keep the same number of {what}, got {sorted(sizes)}")
            for layer, idx in zip(self.layers, per_layer):
                ordered(f"{what} of layer {layer}", idx, bound)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def pruned_config(cfg: ModelConfig, sel: Selection, name: str) -> ModelConfig:
    """The student's model config (the head size stays the teacher's, so it is set explicitly)."""
    sel.check(cfg)
    hpg = cfg.num_attention_heads // cfg.num_query_groups
    out = dataclasses.replace(cfg, name=name, num_layers=len(sel.layers), hidden_size=len(sel.hidden),
                              ffn_hidden_size=len(sel.ffn[0]), num_query_groups=len(sel.groups[0]),
                              num_attention_heads=len(sel.groups[0]) * hpg, kv_channels=cfg.kv_channels)
    out.check("prune")
    return out


def _blocks(idx: list[int], size: int) -> torch.Tensor:
    """Row/column indices of blocks ``idx`` of ``size`` consecutive entries each."""
    i = torch.as_tensor(idx, dtype=torch.long)
    return (i[:, None] * size + torch.arange(size)).reshape(-1)


def prune_tensor(name: str, get: Callable[[str], torch.Tensor], cfg: ModelConfig, sel: Selection) -> torch.Tensor:
    """Student parameter ``name`` (student numbering) sliced out of the teacher's parameters."""
    hidden = torch.as_tensor(sel.hidden, dtype=torch.long)
    m = _LAYER.match(name)
    if m is None:  # embeddings, final norm, output layer: only hidden channels go
        t = get(name)
        return t.index_select(t.dim() - 1, hidden).contiguous()
    i, rest = int(m.group(1)), m.group(2)
    t = get(f"decoder.layers.{sel.layers[i]}.{rest}")
    d, hpg, f = cfg.kv_channels, cfg.num_attention_heads // cfg.num_query_groups, cfg.ffn_hidden_size
    groups, ffn = sel.groups[i], torch.as_tensor(sel.ffn[i], dtype=torch.long)
    if rest.endswith("layernorm.weight") or rest.endswith("layernorm.bias"):
        if rest.startswith("self_attention."):  # per-head query/key norms: one head's values
            return t
        return t.index_select(0, hidden).contiguous()
    if rest.startswith("self_attention.linear_qkv."):
        t = t.index_select(0, _blocks(groups, (hpg + 2) * d))
        return (t.index_select(1, hidden) if t.dim() == 2 else t).contiguous()
    if rest == "self_attention.linear_proj.weight":
        return t.index_select(0, hidden).index_select(1, _blocks(groups, hpg * d)).contiguous()
    if rest.startswith("mlp.linear_fc1."):
        rows = torch.cat([ffn, ffn + f]) if cfg.activation == "swiglu" else ffn
        t = t.index_select(0, rows)
        return (t.index_select(1, hidden) if t.dim() == 2 else t).contiguous()
    if rest == "mlp.linear_fc2.weight":
        return t.index_select(0, hidden).index_select(1, ffn).contiguous()
    if rest in ("self_attention.linear_proj.bias", "mlp.linear_fc2.bias"):
        return t.index_select(0, hidden).contiguous()
    raise AssertionError(f"prune: no slicing rule for {name}")


def pruned_names(student: ModelConfig) -> list[str]:
    return list(expected_shapes(student))


def prune_state(get: Callable[[str], torch.Tensor], cfg: ModelConfig, sel: Selection,
                name: str = "pruned") -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The whole pruned model in memory (tests, small models; the CLI streams)."""
    student = pruned_config(cfg, sel, name)
    return student, {k: prune_tensor(k, get, cfg, sel) for k in pruned_names(student)}


def top_k_sorted(scores: torch.Tensor, k: int, what: str) -> list[int]:
    """Indices of the ``k`` largest scores, in increasing index order (ties: lower index)."""
    n = scores.numel()
    if not 0 < k <= n:
        raise ValueError(f"prune: {what} must be in [1, {n}], got {k}")
    order = sorted(range(n), key=lambda j: (-float(scores[j]), j))
    return sorted(order[:k])


def evenly_spaced(n: int, k: int) -> list[int]:
    """``k`` of ``range(n)`` spread evenly, the first and (for k > 1) the last included."""
    if not 0 < k <= n:
        raise ValueError(f"prune: --num-layers must be in [1, {n}], got {k}")
    if k == 1:
        return [0]
    return sorted({round(j * (n - 1) / (k - 1)) for j in range(k)})


def build_selection(cfg: ModelConfig, *, layers: Optional[list[int]] = None, num_layers: Optional[int] = None,
                    layer_scores: Optional[torch.Tensor] = None, hidden_size: Optional[int] = None,
                    hidden_scores: Optional[torch.Tensor] = None, ffn_hidden_size: Optional[int] = None,
                    ffn_scores: Optional[list[torch.Tensor]] = None, num_query_groups: Optional[int] = None,
                    group_scores: Optional[list[torch.Tensor]] = None) -> Selection:
    """A Selection from target sizes and importance scores (importance.py). Sizes left ``None``
    keep everything; a smaller size needs the matching scores (except layers: explicit
    ``layers``, or ``num_layers`` chosen by ``layer_scores`` when given, else evenly spaced)."""
    if layers is not None and num_layers is not None:
        raise ValueError("prune: give the layers to keep or their number, not both")
    if layers is None:
        if num_layers is None or num_layers == cfg.num_layers:
            layers = list(range(cfg.num_layers))
        elif layer_scores is not None:
            layers = top_k_sorted(layer_scores, num_layers, "--num-layers")
        else:
            layers = evenly_spaced(cfg.num_layers, num_layers)

    def pick(size, full, scores, what):
        if size is None or size == full:
            return list(range(full))
        if scores is None:
            raise ValueError(f"prune: {what} {size} < {full} needs importance scores (calibration data)")
        return top_k_sorted(scores, size, what)

    hidden = pick(hidden_size, cfg.hidden_size, hidden_scores, "--hidden-size")
    ffn = [pick(ffn_hidden_size, cfg.ffn_hidden_size, None if ffn_scores is None else ffn_scores[layer],
                "--ffn-hidden-size") for layer in layers]
    groups = [pick(num_query_groups, cfg.num_query_groups, None if group_scores is None else group_scores[layer],
                   "--num-query-groups") for layer in layers]
    sel = Selection(layers, groups, ffn, hidden)
    sel.check(cfg)
    return sel
