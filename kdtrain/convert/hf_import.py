"""Hugging Face model directory -> kdtrain checkpoint + model config YAML.

    kdtrain convert hf-to-kdtrain --hf path/to/Llama-3.2-1B --out checkpoints/llama-1b [--name llama-1b]

writes ``OUT/latest``, ``OUT/step_0000000/`` (a regular kdtrain checkpoint: weights only, every
parameter stored once, unsharded, real vocabulary rows only) and ``OUT/model.yaml``. Because
kdtrain checkpoints are layout-independent, the result loads into any TP/PP/DP layout:
``teacher.load: OUT`` with ``teacher.model: OUT/model.yaml``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
import yaml

from ..config import ModelConfig, to_dict
from ..models.params import ParamSpec
from ..training.checkpoint import save_checkpoint
from .hf_config import model_config_from_hf
from .layout import IGNORED_SUFFIXES, TO_KDTRAIN, expected_shapes

_GPT2_PREFIX = "transformer."


class SafetensorsDir:
    """Lazy access to the tensors of an HF directory: ``model.safetensors`` or an indexed set of shards."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index}: not a safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            weight_map, files = None, [single.name]
        else:
            raise ValueError(f"{self.path}: no model.safetensors or model.safetensors.index.json "
                             "(only safetensors checkpoints are converted)")
        self._handles = {}
        self.where: dict[str, str] = {}  # tensor name -> file name
        for fname in files:
            f = self.path / fname
            if not f.is_file():
                raise ValueError(f"{index}: shard {fname} is missing")
            try:
                self._handles[fname] = safe_open(str(f), framework="pt")
            except Exception as e:  # truncated or not safetensors
                raise ValueError(f"cannot read {f}: {e}") from None
            for name in self._handles[fname].keys():
                self.where[name] = fname
        if weight_map is not None:
            missing = sorted(n for n, fname in weight_map.items() if self.where.get(n) != fname)
            if missing:
                raise ValueError(f"{index}: tensor {missing[0]!r} is not in {weight_map[missing[0]]}")
        self.used: set[str] = set()

    def names(self) -> set[str]:
        return set(self.where)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise ValueError(f"{self.path}: tensor {name!r} is missing from the safetensors files")
        self.used.add(name)
        return self._handles[self.where[name]].get_tensor(name)


def read_hf_config(path: str | os.PathLike) -> dict:
    f = Path(path) / "config.json"
    if not f.is_file():
        raise ValueError(f"{path}: no config.json (not a Hugging Face model directory)")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON: {e}") from None


def hf_to_kdtrain_state(hf_dir: str | os.PathLike, name: str,
                        vocab_size: Optional[int] = None) -> tuple[ModelConfig, dict[str, torch.Tensor], str]:
    """(model config, {global kdtrain name: tensor}, architecture) of an HF model directory.

    ``vocab_size`` trims the embedding/output tables to the tokenizer's real ids when the HF table
    carries padding rows (Qwen2.5: 151936 rows for 151665 ids)."""
    hf_dir = Path(hf_dir)
    hf = read_hf_config(hf_dir)
    cfg, arch = model_config_from_hf(hf, name, str(hf_dir / "config.json"))
    files = SafetensorsDir(hf_dir)
    # Older GPT-2 checkpoints store names without the "transformer." prefix.
    bare = arch == "GPT2LMHeadModel" and not any(n.startswith(_GPT2_PREFIX) for n in files.names())

    def get(hf_name: str) -> torch.Tensor:
        if bare and hf_name.startswith(_GPT2_PREFIX):
            hf_name = hf_name[len(_GPT2_PREFIX):]
        return files.get(hf_name)

    state = TO_KDTRAIN[arch](get, cfg)
    leftover = sorted(n for n in files.names() - files.used
                      if not n.endswith(IGNORED_SUFFIXES) and not (cfg.tie_embeddings and n == "lm_head.weight"))
    if leftover:
        raise ValueError(f"{hf_dir}: {len(leftover)} tensors have no kdtrain counterpart, e.g. {leftover[:3]} "
                         f"(config.json does not describe these weights)")
    if vocab_size is not None:
        if not 0 < vocab_size <= cfg.vocab_size:
            raise ValueError(f"--vocab-size {vocab_size}: must be in [1, {cfg.vocab_size}] (the HF table's rows)")
        cfg.vocab_size = vocab_size
        for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
            if key in state:
                state[key] = state[key][:vocab_size].contiguous()
    shapes = expected_shapes(cfg)
    assert set(shapes) == set(state), sorted(set(shapes) ^ set(state))
    for key, shape in shapes.items():
        if tuple(state[key].shape) != shape:
            raise ValueError(f"{hf_dir}: tensor for {key} has shape {tuple(state[key].shape)}, config.json implies "
                             f"{shape} (config and weights disagree)")
    return cfg, state, arch


def write_kdtrain_checkpoint(out: str | os.PathLike, cfg: ModelConfig, state: dict[str, torch.Tensor],
                             extra_meta: Optional[dict] = None) -> Path:
    """Save ``state`` as step 0 of a kdtrain checkpoint under ``out`` (atomic, one shard file)."""
    params = []
    for key, t in state.items():
        shape = tuple(t.shape)
        # One unsharded piece per parameter: what a TP=1 rank holding the whole tensor would write.
        spec = ParamSpec(local_name=key, global_name=key, global_shape=shape, shard_dim=None, chunks=1,
                         is_vocab=False, tp_rank=0, tp_size=1, local_shape=shape)
        params.append((spec, t.contiguous()))
    meta = {"model": to_dict(cfg), "layout": {"tp": 1, "pp": 1, "dp": 1, "rank_offset": 0},
            "consumed_samples": 0, "kind": "hf-import", **(extra_meta or {})}
    Path(out).mkdir(parents=True, exist_ok=True)
    return save_checkpoint(out, 0, params, None, 0, None, 0, meta, keep=1)


def write_model_yaml(path: str | os.PathLike, cfg: ModelConfig, comment: str) -> None:
    data = to_dict(cfg)
    with open(path, "w") as f:
        f.write(f"# {comment}\n")
        yaml.safe_dump(data, f, sort_keys=False)


def import_hf(hf_dir: str | os.PathLike, out: str | os.PathLike, name: Optional[str] = None,
              vocab_size: Optional[int] = None) -> tuple[ModelConfig, Path]:
    """Convert; returns the model config and the checkpoint step directory."""
    name = name or Path(hf_dir).resolve().name
    cfg, state, arch = hf_to_kdtrain_state(hf_dir, name, vocab_size)
    step_dir = write_kdtrain_checkpoint(out, cfg, state, {"source": {"hf_dir": str(Path(hf_dir).resolve()),
                                                                     "architecture": arch}})
    write_model_yaml(Path(out) / "model.yaml", cfg, f"{arch} imported from {Path(hf_dir).resolve()} by kdtrain convert")
    return cfg, step_dir
