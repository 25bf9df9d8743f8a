"""megatron-core GPT builders, SDPA attention, and the layout-independent parameter map."""

from ..te_guard import guard_transformer_engine

guard_transformer_engine()  # before anything imports megatron-core (te_guard.py)

from .gpt import (KDGPTModel, build_gpt, transformer_config, transformer_engine_available,  # noqa: E402
                  transformer_engine_layers)
from .params import ParamSpec, param_specs  # noqa: E402

__all__ = ["KDGPTModel", "build_gpt", "transformer_config", "transformer_engine_available",
           "transformer_engine_layers", "ParamSpec", "param_specs"]
