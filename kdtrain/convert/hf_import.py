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
from ..models.params import ParamSpec
from ..training.checkpoint import begin_checkpoint, commit_checkpoint, write_shard
from .hf_weights import HFModel

DEFAULT_SHARD_BYTES = 2 << 30


def hf_to_kdtrain_state(hf_dir: str | os.PathLike, name: str,
                        vocab_size: Optional[int] = None) -> tuple[ModelConfig, dict[str, torch.Tensor], str]:
    """(model config, {global kdtrain name: tensor}, architecture) of an HF model directory, whole
    in memory (small models and tests; ``import_hf`` streams)."""
    hf = HFModel(hf_dir, name)
    if vocab_size is not None:
        hf.trim_vocab(vocab_size)
    return hf.cfg, {key: hf.tensor(key) for key in hf.names()}, hf.arch


def _piece(key: str, t: torch.Tensor) -> dict:
    # One unsharded piece per parameter: what a TP=1 rank holding the whole tensor would write.
    shape = tuple(t.shape)
    spec = ParamSpec(local_name=key, global_name=key, global_shape=shape, shard_dim=None, chunks=1,
                     is_vocab=False, tp_rank=0, tp_size=1, local_shape=shape)
    return {"global_shape": list(shape), "dim": spec.dim, "ranges": spec.ranges(), "param": t.contiguous()}


def write_model_yaml(path: str | os.PathLike, cfg: ModelConfig, comment: str) -> None:
    data = to_dict(cfg)
    with open(path, "w") as f:
        f.write(f"# {comment}\n")
        yaml.safe_dump(data, f, sort_keys=False)


def import_hf(hf_dir: str | os.PathLike, out: str | os.PathLike, name: Optional[str] = None,
              vocab_size: Optional[int] = None, shard_bytes: int = DEFAULT_SHARD_BYTES) -> tuple[ModelConfig, Path]:
    """Convert (streaming, see the module docstring); returns the model config and the step directory."""
    if shard_bytes <= 0:
        raise ValueError(f"shard size must be positive, got {shard_bytes}")
    hf = HFModel(hf_dir, name)
    if vocab_size is not None:
        hf.trim_vocab(vocab_size)
    source = str(Path(hf_dir).resolve())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = begin_checkpoint(out, 0)
    part: dict[str, dict] = {}
    size = nfiles = 0
    for key in hf.names():
        t = hf.tensor(key)  # read and converted here; shape-checked against config.json
        part[key] = _piece(key, t)
        size += t.numel() * t.element_size()
        if size >= shard_bytes:
            write_shard(tmp, f"part{nfiles:05d}.pt", part)
            part, size, nfiles = {}, 0, nfiles + 1
    if part:
        write_shard(tmp, f"part{nfiles:05d}.pt", part)
    meta = {"model": to_dict(hf.cfg), "layout": {"tp": 1, "pp": 1, "dp": 1, "rank_offset": 0},
            "consumed_samples": 0, "kind": "hf-import", "source": {"hf_dir": source, "architecture": hf.arch}}
    step_dir = commit_checkpoint(out, 0, meta, keep=1)
    write_model_yaml(out / "model.yaml", hf.cfg, f"{hf.arch} imported from {source} by kdtrain convert")
    return hf.cfg, step_dir
