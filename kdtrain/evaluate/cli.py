"""``kdtrain eval``: held-out next-token loss of checkpoints on a corpus, the same windows for
every model, whatever each run trained on.

    kdtrain eval --model checkpoints/student-a checkpoints/student-b     # the first run's own held-out data
    kdtrain eval --model checkpoints/student /models/Qwen2.5-0.5B --data data/chat/chat_document \
        --seq-length 1024 --split 0.98 0.02 --packing documents

``--model`` takes kdtrain checkpoints (any layout) and Hugging Face directories. The data: without
``--data``, the ``data`` section the first checkpoint's run recorded (corpora, weights,
tokenizer, sequence length, split, seed, packing, attention, loss mask), so the windows are that run's
held-out windows; with ``--data``, those flags (defaults as a run's). Either way the corpus is
opened as a run opens it (blends, packing, tokenizer and vocabulary checks), and the first
``--max-windows`` held-out windows (else all) are scored. Reported per model, in nats: the loss
over the target tokens (on a conversation corpus the replies; every token otherwise), over the
other tokens (prompts, padding) and over all tokens, with the token counts. One process, the
whole model on one device (GPU when there is one; bf16 there, fp32 on CPU).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence


def heldout_losses(model, vocab_size: int, dataset, windows: int, batch: int, device) -> dict:
    """Cross entropy of ``model`` on the first ``windows`` held-out windows of ``dataset``, split by
    the dataset's target flags: ``{targets,context,all}_loss`` and the token counts."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from ..training.batches import make_microbatch, stack_rows

    sums = {k: [0.0, 0] for k in ("targets", "context", "all")}
    with torch.no_grad():
        for start in range(0, windows, batch):
            ids = range(start, min(start + batch, windows))
            mb = make_microbatch(np.stack([dataset.valid_sample(j) for j in ids]), device,
                                 positions=stack_rows(dataset.valid_positions, ids))
            logits = mb.forward(model)[..., :vocab_size].float()  # [s, b, V]
            nll = F.cross_entropy(logits.permute(1, 2, 0), mb.labels, reduction="none")  # [b, s]
            mask = (torch.from_numpy(np.stack([dataset.valid_loss_mask(j) for j in ids])).to(device)
                    if dataset.has_loss_mask else torch.ones_like(nll, dtype=torch.bool))
            for key, m in (("targets", mask), ("context", ~mask), ("all", torch.ones_like(mask))):
                sums[key][0] += float(nll[m].double().sum())
                sums[key][1] += int(m.sum())
    out = {f"{k}_loss": (s / n if n else float("nan")) for k, (s, n) in sums.items()}
    out.update(target_tokens=sums["targets"][1], tokens=sums["all"][1])
    return out


def run_data_config(model: str):
    """The DataConfig a kdtrain checkpoint's run recorded; ValueError when there is none."""
    from ..config import DataConfig, from_dict
    from ..convert.hf_weights import is_hf_model_dir
    from ..convert.sources import CheckpointWeights

    if is_hf_model_dir(model):
        raise ValueError(f"{model} is a Hugging Face directory, which records no training data: pass --data "
                         "and --seq-length")
    recorded = CheckpointWeights(model).reader.meta.get("data")
    if not recorded:
        raise ValueError(f"checkpoint {model} records no data section: pass --data and --seq-length")
    return from_dict(DataConfig, recorded, f"{model}: data")


def evaluate_models(models: Sequence[str], data=None, *, max_windows: Optional[int] = None, batch: int = 8,
                    device: str = "auto") -> tuple[dict[str, dict], object]:
    """Scores of every model on the held-out windows of ``data`` (a DataConfig; None: the first
    model's run's). Returns (results by model, the DataConfig used)."""
    import torch

    from ..convert.sources import open_weights
    from ..parallel import one_process_world
    from ..training.checkpoint import load_whole_model
    from ..training.pretrain import open_dataset

    if not models:
        raise ValueError("give at least one --model")
    if batch < 1 or (max_windows is not None and max_windows < 1):
        raise ValueError("--batch and --max-windows must be >= 1")
    data = data if data is not None else run_data_config(models[0])
    if data.mock:
        raise ValueError("the run used mock data: pass --data and --seq-length")
    data.check()
    configs = {m: open_weights(m).cfg for m in models}
    too_long = [m for m, c in configs.items() if data.seq_length > c.max_seq_length]
    if too_long:
        raise ValueError(f"sequence length {data.seq_length} exceeds the max_seq_length of {too_long}")
    dataset = open_dataset(data, min(configs.values(), key=lambda c: c.vocab_size))
    windows = dataset.num_valid_windows if max_windows is None else min(max_windows, dataset.num_valid_windows)
    if windows == 0:
        raise ValueError(f"data {list(data.path)} has no held-out windows at split {list(data.split)}")
    results = {}
    with one_process_world(device) as env:
        dtype = torch.bfloat16 if env.device.type == "cuda" else torch.float32
        for m in models:
            cfg, net = load_whole_model(m, env.device, dtype, "eval --model", configs[m])
            results[m] = heldout_losses(net, cfg.vocab_size, dataset, windows, batch, env.device)
            del net
    return results, data


def _run(args) -> int:
    from ..config import DataConfig

    data = None
    if args.data:
        if args.seq_length is None:
            raise ValueError("--data needs --seq-length (the run's data.seq_length)")
        given = {"split": None if args.split is None else tuple(args.split), "seed": args.seed,
                 "packing": args.packing, "attention": args.attention, "tokenizer": args.tokenizer}
        data = DataConfig(path=list(args.data), seq_length=args.seq_length, loss_mask=not args.every_token,
                          **{k: v for k, v in given.items() if v is not None})
    elif any(v is not None for v in (args.seq_length, args.tokenizer, args.packing, args.attention, args.split,
                                     args.seed)) or args.every_token:
        raise ValueError("--seq-length, --split, --seed, --packing, --attention, --tokenizer and --every-token "
                         "describe --data; without --data the first checkpoint's run data is used as it was")
    results, data = evaluate_models(args.model, data, max_windows=args.max_windows, batch=args.batch,
                                    device=args.device)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    first = next(iter(results.values()))
    print(f"data: {', '.join(data.path)}, seq {data.seq_length}, split {list(data.split)}, {data.packing} packing, "
          f"attention within the {data.attention}: {first['tokens']} held-out tokens, {first['target_tokens']} targets")
    print(f"{'model':40s} {'targets':>9s} {'context':>9s} {'all':>9s}")
    for m, r in results.items():
        print(f"{Path(m).name:40s} {r['targets_loss']:9.4f} {r['context_loss']:9.4f} {r['all_loss']:9.4f}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval", help="held-out loss of checkpoints or HF models on a corpus",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", required=True, help="kdtrain checkpoints or Hugging Face directories")
    p.add_argument("--data", nargs="+", help="indexed dataset prefixes (default: the first checkpoint's run data)")
    p.add_argument("--seq-length", type=int, help="with --data: the run's data.seq_length")
    p.add_argument("--split", type=float, nargs=2, help="with --data: the run's data.split (default 0.98 0.02)")
    p.add_argument("--seed", type=int, help="with --data: the run's data.seed (default 1234)")
    p.add_argument("--packing", choices=("stream", "documents", "best_fit"),
                   help="with --data: the run's data.packing")
    p.add_argument("--attention", choices=("window", "documents"), help="with --data: the run's data.attention")
    p.add_argument("--tokenizer", help="with --data: checked against the corpus' tokenizer fingerprint")
    p.add_argument("--every-token", action="store_true", help="with --data: ignore the corpus' loss mask")
    p.add_argument("--max-windows", type=int, help="only the first N held-out windows")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu or cuda")
    p.add_argument("--out", help="also write the results as JSON")
    p.set_defaults(func=_run)
