"""Hugging Face model directory -> kdtrain checkpoint + model config YAML.

    kdtrain convert hf-to-kdtrain --hf path/to/Llama-3.2-1B --out checkpoints/llama-1b [--name llama-1b]

writes ``OUT/latest``, ``OUT/step_0000000/`` (a regular kdtrain checkpoint: weights only, every
parameter stored once, unsharded, real vocabulary rows only) and ``OUT/model.yaml``. Because
kdtrain checkpoints are layout-independent, the result loads into any TP/PP/DP layout:
``teacher.load: OUT`` with ``teacher.model: OUT/model.yaml``. (A run can also load the Hugging
Face directory itself, see hf_weights.py; converting pays off when it is loaded many times or the
source should not be needed later.)

The conversion streams: parameters are converted one at a time and written in shard files of
about ``shard_bytes`` each, so host memory stays near one shard whatever the model size (a 70B
teacher converts on a machine with a few GB free). Written atomically, like every checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
import yaml

from ..config import ModelConfig, to_dict
from ..durable import write_atomically
from ..training.checkpoint import write_global_checkpoint
from .hf_weights import HFModel, read_generation_config

DEFAULT_SHARD_BYTES = 2 << 30


def hf_to_kdtrain_state(hf_dir: str | os.PathLike, name: str,
                        vocab_size: Optional[int] = None) -> tuple[ModelConfig, dict[str, torch.Tensor], str]:
    """(model config, {global kdtrain name: tensor}, architecture) of an HF model directory, whole
    in memory (small models and tests; ``import_hf`` streams)."""
    hf = HFModel(hf_dir, name)
    if vocab_size is not None:
        hf.trim_vocab(vocab_size)
    return hf.cfg, {key: hf.tensor(key) for key in hf.names()}, hf.arch


def write_model_yaml(path: str | os.PathLike, cfg: ModelConfig, comment: str) -> None:
    """Write ``cfg`` as a model YAML in one step: a crash leaves the whole file or none (a cut one
    could read as a model with default values for the fields it lost)."""
    write_atomically(path, f"# {comment}\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False))


def import_hf(hf_dir: str | os.PathLike, out: str | os.PathLike, name: Optional[str] = None,
              vocab_size: Optional[int] = None, shard_bytes: int = DEFAULT_SHARD_BYTES) -> tuple[ModelConfig, Path]:
    """Convert (streaming, see the module docstring); returns the model config and the step directory."""
    hf = HFModel(hf_dir, name)
    if vocab_size is not None:
        hf.trim_vocab(vocab_size)
    source = str(Path(hf_dir).resolve())
    # The special ids and the generation defaults travel with the weights: an export writes them
    # back (hf_export.py), so the model still stops at its end token.
    record = {"hf_dir": source, "architecture": hf.arch, "special_ids": hf.special_ids,
              "generation_config": read_generation_config(hf_dir), "dtype": hf.dtype}
    # Each tensor is read and converted when written (shape-checked against config.json).
    step_dir = write_global_checkpoint(out, hf.cfg, hf.names(), hf.tensor, {"kind": "hf-import", "source": record},
                                       shard_bytes)
    write_model_yaml(Path(out) / "model.yaml", hf.cfg, f"{hf.arch} imported from {source} by kdtrain convert")
    return hf.cfg, step_dir
