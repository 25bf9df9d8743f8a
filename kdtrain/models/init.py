"""Seeded, layout-independent weight initialisation.

Each global parameter is drawn from its own generator, seeded by ``(seed, global name)``; a rank
materialises the global tensor and keeps its slice. The same seed therefore gives the same model
whatever the TP/PP layout, which is what lets a TP=2 or PP=2 run reproduce the TP=PP=1 loss curve.
Values depend on the device's generator (CPU and CUDA streams differ), each reproducible.

Distributions follow megatron-core: N(0, std) for weights, N(0, std / sqrt(2 * num_layers)) for the
two projections that write into the residual stream, ones/zeros for norms and biases.
"""

from __future__ import annotations

import hashlib
import math

import torch

from ..config import ModelConfig
from .params import ParamSpec


def _seed_for(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def init_value(spec: ParamSpec, cfg: ModelConfig, seed: int, device: torch.device) -> torch.Tensor:
    """The global (unsharded) fp32 initial value of one parameter."""
    name = spec.global_name
    shape = spec.global_shape
    if name.endswith("bias"):
        return torch.zeros(shape, device=device)
    if "layernorm" in name:  # input_layernorm / pre_mlp_layernorm / final_layernorm weights
        return torch.ones(shape, device=device)
    std = cfg.init_std
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        std = cfg.init_std / math.sqrt(2.0 * cfg.num_layers)
    gen = torch.Generator(device=device)
    gen.manual_seed(_seed_for(seed, name))
    return torch.empty(shape, device=device).normal_(0.0, std, generator=gen)


@torch.no_grad()
def init_parameters(model: torch.nn.Module, specs: dict[str, ParamSpec], cfg: ModelConfig, seed: int) -> None:
    for name, p in model.named_parameters():
        spec = specs[name]
        full = init_value(spec, cfg, seed, p.device)
        spec.local_from_global(full.to(p.dtype), p.data)
