"""kdtrain checkpoint -> Hugging Face model directory (config.json + safetensors weights + tokenizer).

    kdtrain convert kdtrain-to-hf --ckpt checkpoints/student --model configs/models/student.yaml --out hf/student

The checkpoint may come from any TP/PP/DP layout (with or without ZeRO-1): every parameter is
reassembled from its stored pieces into the unpartitioned tensor, fp32 master weights preferred
over the run-dtype copy. Vocab padding never reaches the HF model: kdtrain checkpoints store only
the ``vocab_size`` real rows. Parameters are converted one at a time and written in files of about
5 GB (``model.safetensors`` when the model fits one, else an index and numbered files, as
transformers writes them), so host memory stays near one file's worth whatever the model size.

Tokenizer: with ``tokenizer="auto"`` (the default), the tokenizer the run that wrote the
checkpoint read its data with (``data.tokenizer``, recorded in the checkpoint, else the one its
corpora's metadata name), or for a checkpoint imported from a Hugging Face directory the one that
directory holds, is written beside the weights, so ``AutoTokenizer.from_pretrained(out)`` works;
a path names the tokenizer instead, ``None`` writes none. A Hugging Face tokenizer's files
(``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``,
``chat_template.jinja``) are copied, chat template included. A SentencePiece model (``.model``,
e.g. the demo's) is written as a ``tokenizer.json`` that encodes every text to the ids kdtrain's
data pipeline gives it (kdtrain/convert/hf_sentencepiece.py); one that cannot be written so (a
Unigram model, say) is an error when named, a warning naming the file when found by ``auto``
(its end tokens still go into config.json). A tokenizer found by ``auto`` whose file changed
since the run (another fingerprint than the checkpoint records) is passed over with a warning.

End tokens: config.json always states ``bos/eos/pad_token_id`` (transformers would otherwise
fill in its class defaults, Llama's 1 and 2, and ``generate`` would not stop at the real end
token; without a generation_config.json, transformers takes them from config.json): those of
the imported Hugging Face model (with its ``generation_config.json``) unless the exported
tokenizer ends documents with another token, else the exported tokenizer's, else null
(``special_ids``).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Optional

import torch

from ..config import ModelConfig, from_dict, load_model_config
from ..durable import dead_scratch, fsync_dir, fsync_tree, reap_scratch, scratch_tag
from ..optional import need
from ..training.checkpoint import CheckpointReader
from ..training.checkpoint_load import check_checkpoint_model
from .hf_config import ARCH_SHORT, SPECIAL_IDS, default_architecture, hf_config_from_model
from .hf_weights import INDEX_FILE, SINGLE_FILE
from .layout import TO_HF, RuleSet
from .sources import check_complete, open_checkpoint, read_global

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_SHORT = {name: short for short, dt in DTYPES.items() for name in (_HF_DTYPE_NAMES[dt], str(dt))}


def auto_dtype(meta: dict) -> str:
    """``--dtype auto``: the precision the checkpoint's run computed in (``precision.dtype``), or for
    an imported checkpoint its Hugging Face model's dtype; fp32 when neither is recorded."""
    for name in (meta.get("dtype"), (meta.get("source") or {}).get("dtype")):
        if name in _SHORT:
            return _SHORT[name]
    return "fp32"
DEFAULT_SHARD_BYTES = 5 * 10**9  # transformers' own default split
# chat_template.jinja: where transformers keeps a chat model's template (its tokenizer_config.json
# may hold it instead); the exported student answers in the format it was distilled on.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def open_tokenizer(tokenizer: str, cfg: ModelConfig, where: str = "--tokenizer"):
    """(its defining file, the Tokenizer) of a tokenizer that fits ``cfg``'s vocabulary: a Hugging
    Face tokenizer.json (or its directory) or a SentencePiece model."""
    from ..data.tokenizer import Tokenizer, tokenizer_file

    try:
        src = tokenizer_file(tokenizer)
        tok = Tokenizer(tokenizer)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"{where}: tokenizer {tokenizer} has {tok.vocab_size} ids but model {cfg.name!r} has "
                         f"vocab_size={cfg.vocab_size}")
    return src, tok


def tokenizer_files(src: Path, tok) -> dict[str, bytes]:
    """The exported tokenizer's files by name: a Hugging Face tokenizer's own (those of
    ``TOKENIZER_FILES`` beside its tokenizer.json ``src``), a SentencePiece model's tokenizer.json
    and tokenizer_config.json (``sentencepiece_files``: ValueError, naming the file, when it cannot
    be written to encode as it does)."""
    if src.suffix != ".json":
        from .hf_sentencepiece import sentencepiece_files

        return sentencepiece_files(tok)
    files = {}
    for name in TOKENIZER_FILES:
        f = src if name == "tokenizer.json" else src.parent / name
        if f.is_file():
            files[name] = f.read_bytes()
    return files


def write_files(out: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        tmp = out / f"{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, out / name)


def _corpus_tokenizers(data: dict) -> list[str]:
    """The tokenizers the metadata of the run's corpora (``data.path``) name."""
    from ..data.indexed import corpus_tokenizer_path

    found = []
    for prefix in data.get("path") or []:
        try:
            path = corpus_tokenizer_path(prefix)
        except (OSError, ValueError):  # unreadable, or no JSON object
            continue
        if path is not None and path not in found:
            found.append(path)
    return found


def recorded_tokenizer(reader: CheckpointReader) -> Optional[str]:
    """The tokenizer the checkpoint's run read its data with (``data.tokenizer``, else the one its
    corpora record), or for an imported checkpoint the one beside its source weights (a
    tokenizer.json or, in an older Llama-style directory, tokenizer.model), when it still exists
    and, when the checkpoint records the fingerprint of its ids' tokenizer, still has it."""
    from ..data.tokenizer import Tokenizer, tokenizer_file

    data = reader.meta.get("data") or {}
    want = reader.meta.get("tokenizer_fingerprint")
    candidates = [data.get("tokenizer"), *_corpus_tokenizers(data), (reader.meta.get("source") or {}).get("hf_dir")]
    for path in candidates:
        if not path:
            continue
        try:
            tokenizer_file(path)
            tok = Tokenizer(path)
        except ValueError:  # moved or deleted since, or no tokenizer (an imported directory without one)
            continue
        if want is not None and tok.fingerprint != want:
            warnings.warn(f"kdtrain: tokenizer {path} is not the one checkpoint {reader.path} was trained on (its "
                          f"fingerprint is {tok.fingerprint}, the checkpoint's ids are of {want}): not exported")
            continue
        return str(path)
    return None


def special_ids(reader: CheckpointReader, tok) -> tuple[dict, bool]:
    """(``{bos,eos,pad}_token_id`` for config.json, whether they are the recorded source's).

    An imported checkpoint records its Hugging Face model's ids (several end tokens, e.g.
    Llama-3-Instruct's, included); they are kept unless the exported tokenizer ``tok`` ends
    documents with another token (a model trained on data of another tokenizer learned to stop
    at that one), in which case, as without a record, the tokenizer's ids are written; without
    either, None."""
    recorded = (reader.meta.get("source") or {}).get("special_ids")
    if recorded is not None:
        eos = recorded.get("eos_token_id")
        if tok is None or tok.eos_id in (eos if isinstance(eos, list) else [eos]):
            return {key: recorded.get(key) for key in SPECIAL_IDS}, True
    if tok is None:
        return {key: None for key in SPECIAL_IDS}, False
    ids = (tok.bos_id, tok.eos_id, tok.pad_id)
    return {key: (i if i >= 0 else None) for key, i in zip(SPECIAL_IDS, ids)}, False


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def export_hf(ckpt: str | os.PathLike, out: str | os.PathLike, model: Optional[str | ModelConfig] = None,
              arch: Optional[str] = None, dtype: str = "auto", tokenizer: Optional[str] = "auto",
              shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write ``out/config.json``, the weights (``model.safetensors``, or index + files of about
    ``shard_bytes`` each), the tokenizer's files (see the module docstring for ``tokenizer``) and,
    for a checkpoint imported from Hugging Face, its ``generation_config.json``; returns ``out``.
    Everything is checked before ``out`` is touched, the weights as they are read; the export is
    written into a directory beside ``out`` that replaces it once complete, so a failure (a
    damaged or non-finite weight) or a kill before leaves an earlier export in ``out`` as it was
    (and removes the directories this call created). Of an earlier export, only files that no
    export writes are kept (its tokenizer and generation files would describe another model). A
    non-empty ``out`` that no export wrote (no ``EXPORT_MARKER``) is refused: a mistyped --out
    would have replaced another model's files."""
    if shard_bytes <= 0:
        raise ValueError(f"shard size must be positive, got {shard_bytes}")
    if dtype not in (*DTYPES, "auto"):
        raise ValueError(f"--dtype {dtype!r}: not one of {[*DTYPES, 'auto']}")
    out = Path(out)
    _recover(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and not (out / EXPORT_MARKER).is_file():
        held = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
        if held:  # another model's directory (a mistyped --out): its files would be replaced
            raise ValueError(f"--out {out} holds files ({', '.join(held[:4])}{', ...' if len(held) > 4 else ''}) "
                             f"but no {EXPORT_MARKER}, which every export leaves: another model's directory? Export "
                             "to a new or empty directory (an export by a kdtrain release that did not write the "
                             f"marker: remove it, or create an empty {EXPORT_MARKER} in it to replace it)")
    reader = open_checkpoint(ckpt)
    if dtype == "auto":
        dtype = auto_dtype(reader.meta)
    if model is None:
        if "model" not in reader.meta:
            raise ValueError(f"checkpoint {reader.path} records no model config; pass --model")
        cfg = from_dict(ModelConfig, reader.meta["model"], "checkpoint.model")
    else:
        cfg = load_model_config(model, "--model")
        check_checkpoint_model(reader, cfg)
    check_complete(reader, cfg)
    named = tokenizer != "auto"
    if not named:
        tokenizer = recorded_tokenizer(reader)
    arch = ARCH_SHORT.get(arch, arch) if arch else default_architecture(cfg)
    src, tok = open_tokenizer(tokenizer, cfg) if tokenizer is not None else (None, None)
    files = {}
    if tok is not None:
        try:
            files = tokenizer_files(src, tok)
        except ValueError as e:
            if named:
                raise ValueError(f"--tokenizer: {e}") from None
            _no_tokenizer(e)
    ids, from_source = special_ids(reader, tok)
    hf_cfg = hf_config_from_model(cfg, arch, _HF_DTYPE_NAMES[DTYPES[dtype]], ids)
    # The source's generation defaults (sampling settings, end tokens) go with its ids only.
    generation = (reader.meta.get("source") or {}).get("generation_config") if from_source else None
    created = next((d for d in reversed(out.parents) if not d.exists()), None)  # the first missing parent
    out.parent.mkdir(parents=True, exist_ok=True)
    # Everything is written into a directory beside ``out`` that replaces it when complete: a
    # failure or a kill before leaves an earlier export as it was (the swap's two renames are not
    # one step: the next export to ``out`` puts back what a kill between them left aside).
    stage = out.parent / f".{out.name}.export-{scratch_tag()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        write_safetensors(stage, RuleSet(TO_HF[arch](cfg)), lambda key: read_global(reader, cfg, key),
                          DTYPES[dtype], shard_bytes)
        write_files(stage, files)
        if generation is not None:
            _write_json(stage / "generation_config.json", generation)
        _write_json(stage / "config.json", hf_cfg)
        if files and src.suffix != ".json":  # transformers' choice of class for the model type, checked
            from .hf_sentencepiece import transformers_differs

            if (why := transformers_differs(stage, tok)) is not None:
                why = f"SentencePiece model {src} written as a Hugging Face tokenizer: {why}"
                if named:
                    raise ValueError(f"--tokenizer: {why}")
                for name in files:
                    (stage / name).unlink()
                _no_tokenizer(why)
        _write_json(stage / EXPORT_MARKER, {"checkpoint": str(reader.path.resolve()), "architecture": arch,
                                             "dtype": dtype})
        _replace_dir(out, stage)
    except BaseException:  # a weight the checkpoint cannot give (damaged, non-finite), an interrupt
        shutil.rmtree(stage, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    return out


def _no_tokenizer(why) -> None:
    warnings.warn(f"kdtrain: {why}. The export holds no tokenizer; config.json names its end tokens")


def _recover(out: Path) -> None:
    """Clear what a killed export to ``out`` left beside it (``durable.reap_scratch``): its
    staging directory (a whole model), and the earlier export it had moved aside, which goes back
    to ``out`` when the kill came between the two renames of the swap (``out`` missing), else is
    stale (the swap was done)."""
    reap_scratch(out.parent, f".{out.name}.export-")
    for old in dead_scratch(out.parent, f".{out.name}.old-"):
        if not out.exists():
            os.replace(old, out)
            fsync_dir(out.parent)
        else:
            shutil.rmtree(old, ignore_errors=True)


def _export_file(name: str) -> bool:
    """Whether an export writes files of this name (an earlier export's are replaced, not kept)."""
    return (name in (*TOKENIZER_FILES, "generation_config.json", "config.json", EXPORT_MARKER, INDEX_FILE)
            or (name.startswith("model") and name.endswith(".safetensors")))


def _replace_dir(out: Path, stage: Path) -> None:
    """``stage`` becomes ``out``. Files of an earlier ``out`` that no export writes (a README the
    user put there) are copied over first; the export's own are not (they would describe another
    model: a tokenizer this export does not write, weights split otherwise). The staging
    directory's files are synced before it is renamed: after a machine crash ``out`` holds the
    earlier export or this whole one."""
    if out.exists():
        for p in out.iterdir():
            if not _export_file(p.name):
                (shutil.copytree if p.is_dir() else shutil.copy2)(p, stage / p.name)
        fsync_tree(stage)
        old = out.parent / f".{out.name}.old-{scratch_tag()}"
        os.replace(out, old)
        try:
            os.replace(stage, out)
        except BaseException:  # an interrupt between the renames (a notebook's Ctrl-C): put it back
            os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        fsync_tree(stage)
        os.replace(stage, out)
    fsync_dir(out.parent)


# Written last by every export: a later export may replace a directory that holds it.
EXPORT_MARKER = "kdtrain_export.json"


def write_safetensors(out: Path, rules: RuleSet, get, dtype: torch.dtype, shard_bytes: int) -> list[str]:
    """The rules' outputs as ``model.safetensors``, or, past ``shard_bytes``, as
    ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json`` (the layout
    transformers reads for large models) in ``out``, a new directory (export_hf's staging one);
    one file's tensors in memory at a time. The files are written under temporary names and named
    once their count is known. Returns the file names."""
    save_file = need("safetensors.torch", "writing Hugging Face weights").save_file

    parts: list[list[str]] = []  # tensor names of each written file
    tensors: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush():
        save_file(tensors, str(out / f"part{len(parts):05d}.safetensors.tmp"), metadata={"format": "pt"})
        parts.append(list(tensors))

    for rule in rules.rules:
        for key, t in rules.run(rule, get).items():
            tensors[key] = t.to(dtype).contiguous()
            size += tensors[key].numel() * tensors[key].element_size()
        if size >= shard_bytes:
            flush()
            total += size
            tensors, size = {}, 0
    if tensors or not parts:
        flush()
        total += size
    n = len(parts)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for i, fname in enumerate(names):
        os.replace(out / f"part{i:05d}.safetensors.tmp", out / fname)
    if n > 1:
        weight_map = {key: fname for fname, keys in zip(names, parts) for key in keys}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names
