"""kdtrain checkpoint -> Hugging Face model directory (config.json + model.safetensors + tokenizer).

    kdtrain convert kdtrain-to-hf --ckpt checkpoints/student --model configs/models/student.yaml --out hf/student

The checkpoint may come from any TP/PP/DP layout (with or without ZeRO-1): every parameter is
reassembled from its stored pieces into the unpartitioned tensor, fp32 master weights preferred
over the run-dtype copy. Vocab padding never reaches the HF model: kdtrain checkpoints store only
the ``vocab_size`` real rows.

Tokenizer: with ``tokenizer="auto"`` (the default), when the run that wrote the checkpoint
tokenized its data with a Hugging Face tokenizer (``data.tokenizer``, recorded in the checkpoint),
its files (``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``) are copied
beside the weights, so ``AutoTokenizer.from_pretrained(out)`` works; a path names the tokenizer
instead, ``None`` writes none. A SentencePiece model is not written (transformers needs a
tokenizer class for it): the directory then holds the model only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

from ..config import ModelConfig, from_dict, load_model_config
from ..models.params import ParamSpec
from ..training.checkpoint import CheckpointReader, check_checkpoint_model, latest_checkpoint
from .hf_config import ARCH_SHORT, default_architecture, hf_config_from_model
from .layout import TO_HF, expected_shapes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def read_global_state(reader: CheckpointReader, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Every parameter of ``cfg`` as one unsharded fp32 tensor."""
    shapes = expected_shapes(cfg)
    missing = sorted(set(shapes) - reader.names())
    if missing:
        raise ValueError(f"checkpoint {reader.path} lacks {len(missing)} parameters of model {cfg.name!r}, "
                         f"e.g. {missing[:3]}")
    state = {}
    for key, shape in shapes.items():
        spec = ParamSpec(local_name=key, global_name=key, global_shape=shape, shard_dim=None, chunks=1,
                         is_vocab=False, tp_rank=0, tp_size=1, local_shape=shape)
        out = torch.zeros(shape, dtype=torch.float32)
        reader.read_into(spec, "master", out)  # checks shapes and completeness
        state[key] = out
    return state


def open_checkpoint(ckpt: str | os.PathLike) -> CheckpointReader:
    """A checkpoint root (its ``latest`` step) or one step directory."""
    path = Path(ckpt)
    if not path.exists():
        raise ValueError(f"--ckpt {path}: no such directory")
    return CheckpointReader(latest_checkpoint(path) or path)


def export_tokenizer(tokenizer: str, cfg: ModelConfig, out: Path, where: str = "--tokenizer") -> list[str]:
    """Copy a Hugging Face tokenizer's files into ``out``; the names written."""
    from ..data.tokenizer import Tokenizer, tokenizer_file

    try:
        src = tokenizer_file(tokenizer)
        if src.suffix != ".json":
            raise ValueError(f"{tokenizer} is a SentencePiece model; only Hugging Face tokenizers (tokenizer.json) "
                             "are written into a Hugging Face model directory")
        tok = Tokenizer(tokenizer)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"{where}: tokenizer {tokenizer} has {tok.vocab_size} ids but model {cfg.name!r} has "
                         f"vocab_size={cfg.vocab_size}")
    written = []
    for name in TOKENIZER_FILES:
        f = src if name == "tokenizer.json" else src.parent / name
        if f.is_file():
            tmp = out / f"{name}.tmp"
            tmp.write_bytes(f.read_bytes())
            os.replace(tmp, out / name)
            written.append(name)
    return written


def recorded_tokenizer(reader: CheckpointReader) -> Optional[str]:
    """The Hugging Face tokenizer the checkpoint's run read its data with, when it still exists."""
    from ..data.tokenizer import is_hf_tokenizer

    path = (reader.meta.get("data") or {}).get("tokenizer")
    try:
        return str(path) if path and is_hf_tokenizer(path) else None
    except ValueError:  # moved or deleted since the run
        return None


def export_hf(ckpt: str | os.PathLike, out: str | os.PathLike, model: Optional[str | ModelConfig] = None,
              arch: Optional[str] = None, dtype: str = "fp32", tokenizer: Optional[str] = "auto") -> Path:
    """Write ``out/config.json``, ``out/model.safetensors`` and the tokenizer's files (see the module
    docstring for ``tokenizer``); returns ``out``."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: not one of {list(DTYPES)}")
    reader = open_checkpoint(ckpt)
    if model is None:
        if "model" not in reader.meta:
            raise ValueError(f"checkpoint {reader.path} records no model config; pass --model")
        cfg = from_dict(ModelConfig, reader.meta["model"], "checkpoint.model")
    else:
        cfg = load_model_config(model, "--model")
        check_checkpoint_model(reader, cfg)
    if tokenizer == "auto":
        tokenizer = recorded_tokenizer(reader)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:  # first: a bad tokenizer fails before the weights are read
        export_tokenizer(tokenizer, cfg, out)
    arch = ARCH_SHORT.get(arch, arch) if arch else default_architecture(cfg)
    hf_cfg = hf_config_from_model(cfg, arch, _HF_DTYPE_NAMES[DTYPES[dtype]])
    state = read_global_state(reader, cfg)
    tensors = TO_HF[arch](state.__getitem__, cfg)
    tensors = {k: v.to(DTYPES[dtype]).contiguous() for k, v in tensors.items()}
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    return out
