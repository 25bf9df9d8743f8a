"""Configs: dataclasses loaded from YAML; every user error is a ValueError naming the field."""

from .loader import apply_overrides, from_dict, load_yaml, resolve_config_path, to_dict
from .model import ModelConfig, load_model_config
from .run import (
    CheckpointConfig,
    DataConfig,
    DistributedConfig,
    LoggingConfig,
    OptimizerConfig,
    ParallelConfig,
    PrecisionConfig,
    PretrainConfig,
    TrainingConfig,
    load_pretrain_config,
    load_run_dict,
)

__all__ = [
    "apply_overrides", "from_dict", "load_yaml", "resolve_config_path", "to_dict",
    "ModelConfig", "load_model_config",
    "CheckpointConfig", "DataConfig", "DistributedConfig", "LoggingConfig", "OptimizerConfig",
    "ParallelConfig", "PrecisionConfig", "PretrainConfig", "TrainingConfig",
    "load_pretrain_config", "load_run_dict",
]
