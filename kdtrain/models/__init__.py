"""megatron-core GPT builders, SDPA attention, and the layout-independent parameter map."""

from .gpt import KDGPTModel, build_gpt, transformer_config, transformer_engine_available, transformer_engine_layers
from .params import ParamSpec, param_specs

__all__ = ["KDGPTModel", "build_gpt", "transformer_config", "transformer_engine_available",
           "transformer_engine_layers", "ParamSpec", "param_specs"]
