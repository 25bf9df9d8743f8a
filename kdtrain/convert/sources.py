"""Where whole (unsharded, TP=1 layout) kdtrain parameters come from, one at a time.

Converters and pruning read a model through two calls, ``names()`` and ``tensor(name)``, plus its
``cfg``: :class:`~kdtrain.convert.hf_weights.HFModel` for a Hugging Face directory,
:class:`CheckpointWeights` for a kdtrain checkpoint written with any layout (each parameter
reassembled from its stored pieces, fp32 master weights preferred). ``open_weights`` picks one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from ..config import ModelConfig, from_dict
from ..models.params import ParamSpec
from ..training.checkpoint import CheckpointReader
from ..training.step_dirs import latest_checkpoint
from .layout import expected_shapes

def check_complete(reader: CheckpointReader, cfg: ModelConfig) -> None:
    missing = sorted(set(expected_shapes(cfg)) - reader.names())
    if missing:
        raise ValueError(f"checkpoint {reader.path} lacks {len(missing)} parameters of model {cfg.name!r}, "
                         f"e.g. {missing[:3]}")


def read_global(reader: CheckpointReader, cfg: ModelConfig, key: str) -> torch.Tensor:
    """Parameter ``key`` of ``cfg`` as one unsharded fp32 tensor, from whatever pieces hold it."""
    shape = expected_shapes(cfg)[key]
    spec = ParamSpec(local_name=key, global_name=key, global_shape=shape, shard_dim=None, chunks=1,
                     is_vocab=False, tp_rank=0, tp_size=1, local_shape=shape)
    out = torch.zeros(shape, dtype=torch.float32)
    reader.read_into(spec, "master", out)  # checks shapes and completeness
    return out


def open_checkpoint(ckpt: str | os.PathLike) -> CheckpointReader:
    """A checkpoint root (its ``latest`` step) or one step directory."""
    path = Path(ckpt)
    if not path.exists():
        raise ValueError(f"{path}: no such directory")
    return CheckpointReader(latest_checkpoint(path) or path)


class CheckpointWeights:
    """A kdtrain checkpoint's parameters, whole; the model config it records unless given."""

    def __init__(self, path: str | os.PathLike, cfg: Optional[ModelConfig] = None):
        self.reader = open_checkpoint(path)
        if cfg is None:
            if "model" not in self.reader.meta:
                raise ValueError(f"checkpoint {self.reader.path} records no model config")
            cfg = from_dict(ModelConfig, self.reader.meta["model"], "checkpoint.model")
        self.cfg = cfg
        check_complete(self.reader, cfg)

    def names(self) -> list[str]:
        return list(expected_shapes(self.cfg))

    def tensor(self, name: str) -> torch.Tensor:
        return read_global(self.reader, self.cfg, name)


def open_weights(path: str | os.PathLike):
    """An HFModel for a Hugging Face directory, else CheckpointWeights."""
    from .hf_weights import HFModel, is_hf_model_dir

    if is_hf_model_dir(path):
        return HFModel(path)
    return CheckpointWeights(path)
