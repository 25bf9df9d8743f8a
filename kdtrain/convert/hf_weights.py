"""A Hugging Face model directory read as kdtrain parameters, one tensor at a time.

Two users:

* ``teacher.load`` / ``student.load`` / ``checkpoint.load`` may name a Hugging Face directory
  (``config.json`` + ``model.safetensors`` or an indexed set of shards) instead of a kdtrain
  checkpoint. Each rank then builds only the parameters of its own pipeline stage, and of each
  only its tensor-parallel slice, reading just those rows or columns of the safetensors tensors
  (``HFModel.part``: 1:1 and transposed tensors, fused QKV by whole query groups, [gate; up] by
  halves; other fusions are converted whole, then sliced): no conversion step, no copy of the
  model on disk, at TP=8 an eighth of each layer read per rank, and host memory bounded by one
  tensor rather than the model. ``HFWeights`` is the reader ``load_weights`` takes for it (the
  interface of ``CheckpointReader``).
* ``kdtrain convert hf-to-kdtrain`` streams the same per-tensor conversion into checkpoint shard
  files of bounded size (hf_import.py).

With ``model: <the same directory>`` (load_model_config reads its ``config.json``) a run uses a
Hugging Face model as is: ``teacher: {model: /models/Llama-3.1-8B, load: /models/Llama-3.1-8B}``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

import torch

from ..config import ModelConfig
from ..optional import need
from ..config.model import weight_differences
from .hf_config import model_config_from_hf, special_ids_from_hf
from .layout import IGNORED_SUFFIXES, TO_KDTRAIN, RuleSet, expected_shapes, fuse_qkv

_GPT2_PREFIX = "transformer."
INDEX_FILE, SINGLE_FILE = "model.safetensors.index.json", "model.safetensors"
# Vocabulary tables: their rows may be trimmed to a smaller model vocab (padded HF tables).
VOCAB_TABLES = ("embedding.word_embeddings.weight", "output_layer.weight")
# Model-config fields that do not shape or change the forward pass may differ from the Hugging
# Face config when a run names its own model YAML for a Hugging Face ``load`` (TRAINING_ONLY_FIELDS).


def is_finite(t: torch.Tensor) -> bool:
    """No NaN or infinite entry in ``t``. One pass, nothing allocated: NaN propagates through the
    minimum and maximum, an infinity ends up as one of them."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if t.dim() == 2 and not t.is_contiguous() and t.t().is_contiguous():
        t = t.t()  # a transposed view: the same entries, read in memory order
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def is_hf_model_dir(path: str | os.PathLike) -> bool:
    """A directory with ``config.json`` and safetensors weights (and no kdtrain checkpoint marker)."""
    p = Path(path)
    return (p.is_dir() and (p / "config.json").is_file() and not (p / "latest").exists()
            and ((p / SINGLE_FILE).is_file() or (p / INDEX_FILE).is_file()))


_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
               type(None): "null"}


def read_hf_config(path: str | os.PathLike) -> dict:
    """``config.json`` of a Hugging Face directory: a JSON object, else a ValueError naming the file."""
    f = Path(path) / "config.json"
    if not f.is_file():
        raise ValueError(f"{path}: no config.json (not a Hugging Face model directory)")
    try:
        value = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{f}: not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{f}: not a JSON object (a model config maps its settings to values; this file holds "
                         f"{_JSON_KINDS.get(type(value), type(value).__name__)})")
    return value


def read_generation_config(path: str | os.PathLike) -> Optional[dict]:
    """``generation_config.json`` of a Hugging Face directory (end tokens, sampling defaults), or None."""
    f = Path(path) / "generation_config.json"
    if not f.is_file():
        return None
    try:
        value = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{f}: not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{f}: not a JSON object")
    return value


def safetensors_files(path: str | os.PathLike) -> tuple[list[str], Optional[dict]]:
    """(weight file names, the index's tensor -> file map or None) of a Hugging Face directory."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index ({e})") from None
        return sorted(set(weight_map.values())), weight_map
    if (path / SINGLE_FILE).is_file():
        return [SINGLE_FILE], None
    raise ValueError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are read)")


class SafetensorsDir:
    """Lazy, memory-mapped access to the tensors of a Hugging Face directory.

    Every file is opened (its header read) and checked against the index up front, or with
    ``lazy`` (a training rank loading its part: a pipeline stage needs the files of its layers
    only, and 1024 ranks opening 191 files each is 195k opens and header reads) each file when a
    tensor of it is first read; the index then names the tensors."""

    def __init__(self, path: str | os.PathLike, lazy: bool = False):
        self._safe_open = need("safetensors", f"reading Hugging Face weights ({path})").safe_open
        self.path = Path(path)
        self.files, self._index = safetensors_files(self.path)
        self._handles = {}
        self.where: dict[str, str] = {}  # tensor name -> file name
        if lazy and self._index is not None:
            self.where = dict(self._index)
            return
        for fname in self.files:
            for name in self._open(fname).keys():
                self.where[name] = fname
        if self._index is not None:
            missing = sorted(n for n, fname in self._index.items() if self.where.get(n) != fname)
            if missing:
                raise ValueError(f"{self.path / INDEX_FILE}: tensor {missing[0]!r} is not in {self._index[missing[0]]}")

    def _open(self, fname: str):
        """File ``fname``'s handle, opened on first use; a file the index lists that is missing,
        unreadable or without a tensor the index puts in it is a ValueError naming it."""
        if fname in self._handles:
            return self._handles[fname]
        f = self.path / fname
        if not f.is_file():
            raise ValueError(f"{self.path / INDEX_FILE}: shard {fname} is missing")
        try:
            handle = self._safe_open(str(f), framework="pt")
        except Exception as e:  # truncated or not safetensors
            raise ValueError(f"cannot read {f}: {e}") from None
        if self._index is not None:
            keys = set(handle.keys())
            absent = sorted(n for n, where in self._index.items() if where == fname and n not in keys)
            if absent:
                raise ValueError(f"{self.path / INDEX_FILE}: tensor {absent[0]!r} is not in {fname}")
        self._handles[fname] = handle
        return handle

    def names(self) -> set[str]:
        return set(self.where)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise ValueError(f"{self.path}: tensor {name!r} is missing from the safetensors files")
        return self._open(self.where[name]).get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """From the file header (nothing read)."""
        return tuple(self._open(self.where[name]).get_slice(name).get_shape())

    def get_part(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Entries ``[start, stop)`` along ``dim``, reading only those from the file."""
        index = (slice(None),) * dim + (slice(start, stop),)
        return self._open(self.where[name]).get_slice(name)[index]


class HFModel:
    """The kdtrain parameters of a Hugging Face directory, each computed on demand.

    Opening reads ``config.json`` and the safetensors headers only (``lazy``: the index, the
    files' headers when first read, as ``SafetensorsDir``) and checks that the tensors
    present are exactly those the architecture's conversion rules need (a missing or unexpected
    tensor is a ValueError naming it); ``tensor(name)`` reads and converts one parameter and
    checks its shape against the config, and that it holds no NaN or infinity (``part`` too:
    such weights are refused, naming the tensor, before a conversion writes or a run loads them)."""

    def __init__(self, hf_dir: str | os.PathLike, name: Optional[str] = None, lazy: bool = False):
        self.path = Path(hf_dir)
        hf = read_hf_config(self.path)
        self.cfg, self.arch = model_config_from_hf(hf, name or self.path.resolve().name,
                                                   str(self.path / "config.json"))
        self.special_ids = special_ids_from_hf(hf, self.arch)
        self.dtype = hf.get("dtype") or hf.get("torch_dtype")  # what transformers loads it as (or None)
        self.files = SafetensorsDir(self.path, lazy)
        names = self.files.names()
        # Older GPT-2 checkpoints store names without the "transformer." prefix.
        self._bare = self.arch == "GPT2LMHeadModel" and not any(n.startswith(_GPT2_PREFIX) for n in names)
        self.rules = RuleSet(TO_KDTRAIN[self.arch](self.cfg))
        needed = {self._stored_name(n) for n in self.rules.inputs()}
        missing = sorted(needed - names)
        if missing:
            raise ValueError(f"{self.path}: tensor {missing[0]!r} is missing from the safetensors files "
                             f"({len(missing)} missing; config.json describes weights the files lack)")
        leftover = sorted(n for n in names - needed if not n.endswith(IGNORED_SUFFIXES)
                          and not (self.cfg.tie_embeddings and n == "lm_head.weight"))
        if leftover:
            raise ValueError(f"{self.path}: {len(leftover)} tensors have no kdtrain counterpart, e.g. {leftover[:3]} "
                             f"(config.json does not describe these weights)")
        self._shapes = expected_shapes(self.cfg)
        self.table_rows = self.cfg.vocab_size  # rows of the stored vocabulary tables
        self.elements_read = 0  # tensor elements converted so far (what loading cost)

    def _stored_name(self, hf_name: str) -> str:
        if self._bare and hf_name.startswith(_GPT2_PREFIX):
            return hf_name[len(_GPT2_PREFIX):]
        return hf_name

    def _get(self, hf_name: str) -> torch.Tensor:
        return self.files.get(self._stored_name(hf_name))

    def trim_vocab(self, vocab_size: int, where: str = "--vocab-size") -> None:
        """Keep only the first ``vocab_size`` rows of the vocabulary tables (the tokenizer's real
        ids when the Hugging Face table carries padding rows, e.g. Qwen2.5: 151936 rows, 151665 ids)."""
        if not 0 < vocab_size <= self.table_rows:
            raise ValueError(f"{where} {vocab_size}: must be in [1, {self.table_rows}] (the rows of the vocabulary "
                             f"table in {self.path})")
        self.cfg = dataclasses.replace(self.cfg, vocab_size=vocab_size)

    def names(self) -> list[str]:
        return self.rules.outputs()

    def part(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Entries ``[start, stop)`` along ``dim`` of parameter ``name`` (what one tensor rank
        needs), reading only those from the files where the conversion allows: 1:1 and transposed
        tensors, and the Llama-family fusions when the range covers whole query groups (QKV) or
        lies in one of the gate / up halves; otherwise the whole tensor, sliced. Source shapes are
        checked against the config from the headers either way."""
        rule = self.rules.by_output[name]
        expected = self._shapes[name]
        if rule.kind in ("copy", "transpose"):
            (src,) = rule.inputs
            stored = self.files.shape(self._stored_name(src))
            if rule.kind == "transpose":
                stored = stored[::-1]
            if stored != expected:
                raise ValueError(f"{self.path}: tensor for {name} has shape {stored}, config.json implies "
                                 f"{expected} (config and weights disagree)")
            if rule.kind == "copy":
                return self._read_part(src, dim, start, stop)
            return self._read_part(src, 1 - dim, start, stop).t()
        if rule.kind in ("qkv", "gated") and dim == 0:
            out = self._fused_part(rule, expected, start, stop)
            if out is not None:
                return out
        t = self.tensor(name)
        return t.narrow(dim, start, stop - start)

    def _read_part(self, hf_name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        t = self.files.get_part(self._stored_name(hf_name), dim, start, stop)
        self.elements_read += t.numel()
        if not is_finite(t):
            self._refuse_non_finite([hf_name])
        return t

    def _refuse_non_finite(self, sources: list[str], name: Optional[str] = None) -> None:
        """A ValueError naming the source tensors (of ``sources``) that hold NaN or infinite values."""
        bad = [n for n in sources if not is_finite(self._get(n))] if len(sources) > 1 else sources
        stored = ", ".join(self._stored_name(n) for n in (bad or sources))
        into = f" (kdtrain {name})" if name else ""
        raise ValueError(f"{self.path}: tensor {stored}{into} holds NaN or infinite values: the weights are "
                         "corrupt or come from a diverged run (they would make every loss NaN)")

    def _fused_part(self, rule, expected: tuple[int, ...], start: int, stop: int) -> Optional[torch.Tensor]:
        """Rows [start, stop) of a fused QKV or [gate; up] tensor from row ranges of its parts, or
        None when the range does not split cleanly (then the caller converts the whole tensor)."""
        cfg = self.cfg
        d, groups = cfg.kv_channels, cfg.num_query_groups
        hpg = cfg.num_attention_heads // groups
        self._check_fused_sources(rule, expected)
        if rule.kind == "qkv":
            block = (hpg + 2) * d  # rows of one query group in the fused layout
            if start % block or stop % block:
                return None
            g0, g1 = start // block, stop // block
            q, k, v = (self._read_part(src, 0, g0 * n, g1 * n) for src, n in zip(rule.inputs, (hpg * d, d, d)))
            part_cfg = dataclasses.replace(cfg, num_query_groups=g1 - g0, num_attention_heads=(g1 - g0) * hpg)
            return fuse_qkv(q, k, v, part_cfg)
        f = cfg.ffn_hidden_size
        if stop <= f:
            return self._read_part(rule.inputs[0], 0, start, stop)
        if start >= f:
            return self._read_part(rule.inputs[1], 0, start - f, stop - f)
        return None

    def _check_fused_sources(self, rule, expected: tuple[int, ...]) -> None:
        """The parts of a fused QKV or [gate; up] tensor have the shapes config.json implies (checked
        from the headers, before the fusion reshapes them)."""
        cfg, rest = self.cfg, expected[1:]
        d, groups = cfg.kv_channels, cfg.num_query_groups
        if rule.kind == "qkv":
            shapes = [(cfg.num_attention_heads * d, *rest), (groups * d, *rest), (groups * d, *rest)]
        else:
            shapes = [(cfg.ffn_hidden_size, *rest)] * 2
        for src, shape in zip(rule.inputs, shapes):
            stored = self.files.shape(self._stored_name(src))
            if stored != shape:
                raise ValueError(f"{self.path}: tensor {src} has shape {stored}, config.json implies {shape} "
                                 f"(config and weights disagree)")

    def tensor(self, name: str) -> torch.Tensor:
        """Global (TP=1, unpadded) kdtrain parameter ``name`` in the stored dtype."""
        rule = self.rules.by_output[name]
        if rule.kind in ("qkv", "gated"):
            self._check_fused_sources(rule, self._shapes[name])
        t = self.rules.compute(name, self._get)
        self.elements_read += t.numel()
        if tuple(t.shape) != self._shapes[name]:
            raise ValueError(f"{self.path}: tensor for {name} has shape {tuple(t.shape)}, config.json implies "
                             f"{self._shapes[name]} (config and weights disagree)")
        if name in VOCAB_TABLES and self.cfg.vocab_size < t.shape[0]:
            t = t[:self.cfg.vocab_size]
        if not is_finite(t):  # after the trim: padding rows no model reads do not count
            self._refuse_non_finite(list(rule.inputs), name)
        return t


def check_model_matches(hf: HFModel, model: ModelConfig, what: str) -> None:
    """``model`` (the run's config) describes the Hugging Face model, up to training-only fields
    and a vocabulary no larger than the stored table (which is then trimmed)."""
    ours, theirs = dataclasses.asdict(model), dataclasses.asdict(hf.cfg)
    diff = weight_differences(theirs, model, free=("vocab_size",))
    if diff:
        k = diff[0]
        raise ValueError(f"{what}.load: {hf.path} is a different model: {k} = {theirs.get(k)!r} in its "
                         f"config.json, {ours[k]!r} in the run's model {model.name!r} (differing fields: {diff}; "
                         f"name the directory as the model to take its config.json)")
    if model.vocab_size > hf.table_rows:
        raise ValueError(f"{what}.load: {hf.path} has {hf.table_rows} vocabulary rows, the run's model {model.name!r} "
                         f"has vocab_size={model.vocab_size}")
    hf.trim_vocab(model.vocab_size, f"{what}.load: vocab_size")


class HFWeights:
    """``CheckpointReader``'s interface for ``load_weights`` over a Hugging Face directory."""

    def __init__(self, path: str | os.PathLike, model: ModelConfig, what: str):
        self.path = Path(path)
        self.hf = HFModel(self.path, model.name, lazy=True)  # each rank opens the files it reads
        check_model_matches(self.hf, model, what)

    def names(self) -> set[str]:
        return set(self.hf.names())

    def read_into(self, spec, key: str, out: torch.Tensor) -> None:
        """Fill ``out`` (this rank's local tensor for ``spec``) from the converted global tensor."""
        from ..training.pieces import copy_overlap

        if key != "master":
            raise ValueError(f"{self.path} is a Hugging Face model: it holds weights, no {key!r} state")
        if spec.shard_dim is None:  # replicated: the whole tensor
            t = self.hf.tensor(spec.global_name)
            assert tuple(t.shape) == spec.global_shape, (spec.global_name, t.shape, spec.global_shape)
            copy_overlap(t, 0, [(0, t.shape[0], 0)], out, 0, spec.ranges())
            return
        # Sharded: only this rank's ranges (several for a chunked [gate; up]), each read on its own.
        dim = spec.dim
        for start, stop, local in spec.ranges():
            out.narrow(dim, local, stop - start).copy_(self.hf.part(spec.global_name, dim, start, stop))


def hf_weight_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a Hugging Face directory (what a teacher cache's identity hashes)."""
    files, _ = safetensors_files(path)
    return [Path(path) / f for f in files]
