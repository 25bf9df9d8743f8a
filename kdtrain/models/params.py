"""Where each local parameter sits in the unpartitioned model.

A ``ParamSpec`` maps a parameter of one rank's module (``decoder.layers.1.mlp.linear_fc1.weight``
on pipeline stage 1, tensor rank 0 of 2) to its layout-independent identity: a global name
(``decoder.layers.5.mlp.linear_fc1.weight``), the global (unpadded, unsharded) shape, and which
global index ranges along the sharded dimension this rank holds. Initialisation, checkpoint
save/load and gradient-norm de-duplication all work from these specs, which is what makes weights,
checkpoints and loss curves identical across TP/PP/DP layouts.

Two sharding patterns are not "one contiguous slice per tensor rank":
* vocabulary tables (word embeddings, output layer) are padded to a multiple of 128 * tp; the
  padding rows have no global counterpart (``vocab_dim`` below) and stay zero;
* a gated MLP's ``linear_fc1`` stores [gate; up] stacked, and each tensor rank holds the matching
  slice of *both* halves (``chunks = 2``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

from ..config import ModelConfig

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
# Transformer Engine fuses the pre-attention / pre-MLP norms into the following linear layer.
_TE_CANONICAL = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}
VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")


@dataclass(frozen=True)
class ParamSpec:
    local_name: str
    global_name: str
    global_shape: tuple[int, ...]
    shard_dim: Optional[int]  # None: replicated across the tensor-parallel group
    chunks: int  # blocks along shard_dim, each split across tp ranks (2 for gated fc1)
    is_vocab: bool  # rows are vocabulary ids (padded locally)
    tp_rank: int
    tp_size: int
    local_shape: tuple[int, ...]
    tied_copy: bool = False  # last-stage copy of the tied word embedding (pp > 1)

    @property
    def tp_duplicate(self) -> bool:
        """Identical on every tensor rank: counted once (tp rank 0) in norms."""
        return self.shard_dim is None and self.tp_rank != 0

    @property
    def tp_partial_grad(self) -> bool:
        """Replicated across tensor ranks, but each rank's gradient covers only its own heads: the
        per-head query/key norms (every other replicated parameter sees the full, all-reduced
        gradient of its output). Summed over the tensor-parallel group before the update."""
        return (self.tp_size > 1 and self.shard_dim is None
                and (".self_attention.q_layernorm." in self.global_name
                     or ".self_attention.k_layernorm." in self.global_name))

    def ranges(self) -> list[tuple[int, int, int]]:
        """(global_start, global_stop, local_start) along ``dim``: what this rank holds."""
        if self.shard_dim is None:
            return [(0, self.global_shape[0] if self.global_shape else 1, 0)]
        local = self.local_shape[self.shard_dim]
        if self.is_vocab:
            start = self.tp_rank * local
            stop = min(start + local, self.global_shape[self.shard_dim])
            return [(start, stop, 0)] if stop > start else []
        block = self.global_shape[self.shard_dim] // self.chunks
        part = block // self.tp_size
        return [(j * block + self.tp_rank * part, j * block + (self.tp_rank + 1) * part, j * part)
                for j in range(self.chunks)]

    @property
    def dim(self) -> int:
        return 0 if self.shard_dim is None else self.shard_dim

    def local_from_global(self, full: torch.Tensor, out: torch.Tensor) -> None:
        """Fill local tensor ``out`` from the global tensor ``full`` (padding rows -> 0)."""
        if self.is_vocab:
            out.zero_()
        for g0, g1, l0 in self.ranges():
            out.narrow(self.dim, l0, g1 - g0).copy_(full.narrow(self.dim, g0, g1 - g0))


def _global_layer_name(local_name: str, layer_offset: int) -> str:
    m = _LAYER.match(local_name)
    if not m:
        return local_name
    rest = local_name[m.end():]
    rest = _TE_CANONICAL.get(rest, rest)
    return f"decoder.layers.{int(m.group(1)) + layer_offset}.{rest}"


def _shard_dim(module: torch.nn.Module, param_name: str) -> Optional[int]:
    """Tensor-parallel dimension of ``module.<param_name>``, from the module type.

    (megatron-core tags parameters with ``partition_dim`` only inside its own initialisation,
    which kdtrain replaces, so the tags cannot be relied on.)
    """
    mode = getattr(module, "parallel_mode", None)  # Transformer Engine linear layers
    if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)) or mode == "column":
        return 0 if param_name in ("weight", "bias") else None
    if isinstance(module, RowParallelLinear) or mode == "row":
        return 1 if param_name == "weight" else None
    return None


def param_specs(model: torch.nn.Module, cfg: ModelConfig, tp_rank: int, tp_size: int,
                layer_offset: int) -> dict[str, ParamSpec]:
    """Specs of every parameter of one rank's GPT module, keyed by local name."""
    owners = {f"{mname}.{pname}" if mname else pname: (module, pname)
              for mname, module in model.named_modules() for pname, _ in module.named_parameters(recurse=False)}
    specs = {}
    for name, p in model.named_parameters():
        global_name = _global_layer_name(name, layer_offset)
        tied_copy = name == "output_layer.weight" and cfg.tie_embeddings
        if tied_copy:
            global_name = "embedding.word_embeddings.weight"
        is_vocab = global_name in VOCAB_PARAMS
        shard_dim = _shard_dim(*owners[name]) if tp_size > 1 else None
        if is_vocab:
            shard_dim = 0
        chunks = 2 if (cfg.activation == "swiglu" and ".mlp.linear_fc1." in global_name
                       and shard_dim is not None) else 1
        shape = list(p.shape)
        if is_vocab:
            shape[0] = cfg.vocab_size
        elif shard_dim is not None:
            shape[shard_dim] *= tp_size
        specs[name] = ParamSpec(name, global_name, tuple(shape), shard_dim, chunks, is_vocab,
                                tp_rank, tp_size, tuple(p.shape), tied_copy)
    return specs


def iter_params(model: torch.nn.Module, specs: dict[str, ParamSpec]) -> Iterator[tuple[ParamSpec, torch.nn.Parameter]]:
    for name, p in model.named_parameters():
        yield specs[name], p
