"""``kdtrain prune``: a student initialised from the teacher, with fewer layers and/or a narrower
network, ready for ``student.load`` (the Minitron recipe: prune, then distil from the teacher).

    kdtrain prune --src /models/Llama-3.1-8B --out checkpoints/llama-8b-pruned \\
        --num-layers 24 --ffn-hidden-size 9216 --data data/llama3/text_document --calib-samples 256

``--src`` is a Hugging Face directory or a kdtrain checkpoint (any layout). Sizes not given keep
the teacher's. Layers: ``--keep-layers 0-15,20,31`` explicitly, or ``--num-layers N`` chosen by
Block Influence when calibration data is given (``--layer-order uniform``: evenly spaced, first
and last kept). Width targets (``--hidden-size``, ``--ffn-hidden-size``, ``--num-query-groups``)
keep the most important channels, neurons and query groups (importance.py), measured on
``--calib-samples`` windows of ``--data`` (an indexed dataset in the teacher's tokenization, cut
and attended as the distillation run will: ``--packing``, ``--attention``; padding counts in no
score), with the whole teacher on one device (GPU when there is one). Writes a layout-free checkpoint
(``OUT/latest``, ``OUT/step_0000000``), ``OUT/model.yaml`` and ``OUT/prune.json`` (the selection
and the scores it came from). Then distil with ``student.model=OUT/model.yaml student.load=OUT``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ..cli import DefaultsHelp

if TYPE_CHECKING:  # torch and the model code load only when a command runs (`kdtrain --help` stays fast)
    import torch

    from ..config import ModelConfig
    from .select import Selection


def parse_layers(text: str) -> list[int]:
    """``0-11,14,15`` -> [0, ..., 11, 14, 15]; a layer named twice (``1,1``, ``0-3,2``) is an error."""
    spans: list[tuple[int, int]] = []
    try:
        for part in text.split(","):
            lo, dash, hi = part.strip().partition("-")
            if dash and not hi:
                raise ValueError(part)  # `1-`: a range without its end
            spans.append((int(lo), int(hi) if dash else int(lo)))
    except ValueError:
        raise ValueError(f"--keep-layers {text!r}: expected indices and ranges like 0-11,14,15") from None
    backwards = [f"{lo}-{hi}" for lo, hi in spans if hi < lo]  # an empty range: silently nothing
    if backwards:
        raise ValueError(f"--keep-layers {text!r}: range {backwards[0]} runs backwards (write it low-high)")
    out = [i for lo, hi in spans for i in range(lo, hi + 1)]
    twice = sorted(i for i, n in Counter(out).items() if n > 1)
    if twice:
        raise ValueError(f"--keep-layers {text!r}: layer{'s' if len(twice) > 1 else ''} "
                         f"{', '.join(map(str, twice))} named more than once (each teacher layer is kept once)")
    return sorted(out)


def calibration_batches(data: list[str], cfg: ModelConfig, seq_length: int, samples: int, micro_batch: int,
                        device: torch.device, tokenizer: Optional[str] = None, packing: str = "stream",
                        attention: str = "window"):
    """The first ``samples`` training windows of the indexed dataset, ``micro_batch`` at a time, cut
    and attended as a run with that ``packing`` and ``attention`` (data.packing, data.attention)
    cuts and attends them (importance.CalibrationBatch)."""
    import numpy as np
    import torch

    from ..data.gpt_dataset import GPTWindowDataset
    from ..data.tokenizer import Tokenizer
    from .importance import CalibrationBatch

    fingerprint = Tokenizer(tokenizer).fingerprint if tokenizer else None
    ds = GPTWindowDataset(data, seq_length, split=(1.0, 0.0), seed=1234, vocab_size=cfg.vocab_size,
                          tokenizer_fingerprint=fingerprint, tokenizer_name=f"--tokenizer {tokenizer}", packing=packing,
                          document_positions=attention == "documents")
    samples = min(samples, ds.num_train_windows)
    for start in range(0, samples, micro_batch):
        ids = range(start, min(start + micro_batch, samples))
        tokens = torch.from_numpy(np.stack([ds.train_sample(g)[:seq_length] for g in ids]).astype("int64"))
        positions = None
        if attention == "documents":
            positions = torch.from_numpy(np.stack([ds.train_positions(g)[:seq_length] for g in ids])).to(device)
        content = torch.tensor([min(ds.train_content(g), seq_length) for g in ids], device=device)
        yield CalibrationBatch(tokens.to(device), positions, content)


def measure_importance(src: str, cfg: ModelConfig, batches_fn, device_name: str = "auto",
                       tokenizer: Optional[str] = None):
    """Build the whole teacher on one device, load ``src`` and score it (importance.py) on
    ``batches_fn``'s ids, of tokenizer ``tokenizer`` (a fingerprint; another than the teacher's
    training ids' is refused)."""
    import torch

    from ..parallel import one_process_world
    from ..training.checkpoint_load import load_whole_model
    from .importance import activation_importance

    with one_process_world(device_name) as env:
        if env.world_size != 1:
            raise ValueError("kdtrain prune runs as one process (the teacher whole on one device)")
        dtype = torch.bfloat16 if env.device.type == "cuda" else torch.float32
        # kdtrain's local layers: Transformer Engine fuses the norms into the next linear (the
        # norm modules the hooks read would be identities, seeing the un-normalised stream).
        _, model = load_whole_model(src, env.device, dtype, "prune --src", cfg, use_te=False, tokenizer=tokenizer)
        return activation_importance(model, batches_fn(env.device))


def prune(src: str, out: str, *, name: Optional[str] = None, keep_layers: Optional[list[int]] = None,
          num_layers: Optional[int] = None, layer_order: str = "influence", hidden_size: Optional[int] = None,
          ffn_hidden_size: Optional[int] = None, num_query_groups: Optional[int] = None,
          data: Optional[list[str]] = None, tokenizer: Optional[str] = None, seq_length: Optional[int] = None,
          calib_samples: int = 256, micro_batch: int = 4, device: str = "auto",
          shard_bytes: int = 2 * 10**9, vocab_size: Optional[int] = None, packing: str = "stream",
          attention: str = "window") -> tuple[ModelConfig, Selection]:
    from ..config import DataConfig, to_dict
    from ..cli import check_out_dir
    from ..convert.hf_import import write_model_yaml
    from ..convert.sources import open_weights
    from ..training.checkpoint import write_global_checkpoint
    from ..training.resume import data_tokenizer
    from .select import build_selection, prune_tensor, pruned_config, pruned_names

    if Path(out).resolve() == Path(src).resolve():
        raise ValueError(f"--out {out}: is --src; write the pruned student to another directory (the teacher "
                         "would be overwritten)")
    check_out_dir(out)  # before the teacher is read and scored
    if calib_samples < 1 or micro_batch < 1:
        raise ValueError(f"--calib-samples and --micro-batch must be >= 1, got {calib_samples} and {micro_batch}")
    if layer_order not in ("influence", "uniform"):
        raise ValueError(f"--layer-order {layer_order!r}: influence or uniform")
    if packing not in ("stream", "documents", "best_fit") or attention not in ("window", "documents"):
        raise ValueError(f"--packing {packing!r} / --attention {attention!r}: stream, documents or best_fit / "
                         f"window or documents")
    weights = open_weights(src)
    if vocab_size is not None and vocab_size != weights.cfg.vocab_size:
        if not hasattr(weights, "trim_vocab"):
            raise ValueError(f"--vocab-size {vocab_size}: {src} is a kdtrain checkpoint, which holds its real "
                             f"vocabulary ({weights.cfg.vocab_size}) already")
        weights.trim_vocab(vocab_size)
    cfg = weights.cfg
    narrower = any(v is not None and v != full for v, full in (
        (hidden_size, cfg.hidden_size), (ffn_hidden_size, cfg.ffn_hidden_size),
        (num_query_groups, cfg.num_query_groups)))
    by_influence = num_layers is not None and num_layers != cfg.num_layers and layer_order == "influence"
    scores = None
    if narrower or (by_influence and data):
        if not data:
            raise ValueError("prune: width targets need calibration data (--data PREFIX, the teacher's tokenization)")
        if seq_length is None:
            seq_length = min(1024, cfg.max_seq_length)
        if not 1 <= seq_length <= cfg.max_seq_length:
            raise ValueError(f"--seq-length {seq_length}: calibration windows must fit the teacher's "
                             f"max_seq_length={cfg.max_seq_length} ({src})")
        ids_of = data_tokenizer(DataConfig(path=list(data), tokenizer=tokenizer))
        scores = measure_importance(src, cfg, lambda dev: calibration_batches(
            data, cfg, seq_length, calib_samples, micro_batch, dev, tokenizer, packing, attention), device, ids_of)
    elif by_influence:
        layer_order = "uniform"  # no data: evenly spaced
        print(f"prune: no --data to measure Block Influence on: keeping {num_layers} evenly spaced layers "
              "(--layer-order uniform)", flush=True)
    sel = build_selection(
        cfg, layers=keep_layers, num_layers=num_layers,
        layer_scores=scores.layers if scores is not None and layer_order == "influence" else None,
        hidden_size=hidden_size, hidden_scores=None if scores is None else scores.hidden,
        ffn_hidden_size=ffn_hidden_size, ffn_scores=None if scores is None else scores.ffn,
        num_query_groups=num_query_groups, group_scores=None if scores is None else scores.groups)
    student = pruned_config(cfg, sel, name or Path(out).name)
    record = {"source": str(Path(src).resolve()), "teacher": to_dict(cfg), "layer_order": layer_order,
              "selection": sel.to_dict(), "importance": None if scores is None else scores.to_dict(),
              "calibration": None if scores is None else {"data": list(data), "seq_length": seq_length,
                                                          "packing": packing, "attention": attention}}
    # The tokenizer of the source's training ids stays the student's (checked when it is loaded).
    fingerprint = weights.reader.meta.get("tokenizer_fingerprint") if hasattr(weights, "reader") else None
    write_global_checkpoint(out, student, pruned_names(student), lambda k: prune_tensor(k, weights.tensor, cfg, sel),
                            {"kind": "prune", "prune": {k: record[k] for k in ("source", "layer_order", "selection")},
                             "tokenizer_fingerprint": fingerprint}, shard_bytes)
    write_model_yaml(Path(out) / "model.yaml", student,
                     f"{student.num_params() / 1e6:.1f}M-parameter student pruned from {record['source']} by kdtrain prune")
    (Path(out) / "prune.json").write_text(json.dumps(record, indent=1) + "\n")
    return student, sel


def _run(args) -> int:
    s, _ = prune(args.src, args.out, name=args.name,
                 keep_layers=parse_layers(args.keep_layers) if args.keep_layers else None,
                 num_layers=args.num_layers, layer_order=args.layer_order, hidden_size=args.hidden_size,
                 ffn_hidden_size=args.ffn_hidden_size, num_query_groups=args.num_query_groups, data=args.data,
                 tokenizer=args.tokenizer, seq_length=args.seq_length, calib_samples=args.calib_samples,
                 micro_batch=args.micro_batch, device=args.device, shard_bytes=int(args.shard_gb * 10**9),
                 packing=args.packing, attention=args.attention,
                 vocab_size=args.vocab_size)
    print(f"{s.name}: {s.num_params() / 1e6:.2f}M parameters, {s.num_layers} layers, hidden {s.hidden_size}, "
          f"ffn {s.ffn_hidden_size}, {s.num_attention_heads} heads / {s.num_query_groups} groups -> {args.out}")
    print(f"distil with: student.model={args.out}/model.yaml student.load={args.out}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("prune", help="a student pruned from the teacher (depth and width), for student.load",
                              formatter_class=DefaultsHelp)
    p.add_argument("--src", required=True, help="teacher: Hugging Face directory or kdtrain checkpoint")
    p.add_argument("--out", required=True, help="output checkpoint directory (gets model.yaml and prune.json)")
    p.add_argument("--name", default=None, help="student model name (default: the output directory's name)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--keep-layers", default=None, help="teacher layers to keep, e.g. 0-11,14,15")
    g.add_argument("--num-layers", type=int, default=None, help="number of layers to keep")
    p.add_argument("--layer-order", default="influence", choices=["influence", "uniform"],
                   help="how --num-layers picks: Block Influence on the calibration data, or evenly spaced")
    p.add_argument("--hidden-size", type=int, default=None, help="hidden width to keep (needs --data)")
    p.add_argument("--ffn-hidden-size", type=int, default=None, help="MLP width to keep (needs --data)")
    p.add_argument("--num-query-groups", type=int, default=None,
                   help="query groups to keep (with their heads; needs --data)")
    p.add_argument("--data", nargs="+", default=None, help="indexed dataset prefix(es) for calibration")
    p.add_argument("--tokenizer", default=None, help="the data's tokenizer (checked against the dataset)")
    p.add_argument("--seq-length", type=int, default=None, help="calibration window length: the distillation "
                   "run's data.seq_length (default: the teacher's max_seq_length, at most 1024)")
    p.add_argument("--packing", default="stream", choices=["stream", "documents", "best_fit"],
                   help="how calibration windows are cut: the distillation run's data.packing")
    p.add_argument("--attention", default="window", choices=["window", "documents"],
                   help="what calibration tokens attend to: the run's data.attention")
    p.add_argument("--calib-samples", type=int, default=256, help="calibration windows scored")
    p.add_argument("--micro-batch", type=int, default=4, help="calibration windows per forward")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the teacher scores them")
    p.add_argument("--shard-gb", type=float, default=2.0, help="size of the written checkpoint's files")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="keep the first N rows of a Hugging Face teacher's (padded) vocabulary table")
    p.set_defaults(func=_run)
