"""``kdtrain eval``: held-out next-token loss of checkpoints on a corpus, the same windows for
every model, whatever each run trained on.

    kdtrain eval --model checkpoints/student-a checkpoints/student-b --data data/chat/chat_document \\
        --seq-length 1024 --split 0.98 0.02

``--model`` takes kdtrain checkpoints (any layout) and Hugging Face directories. The windows are
the held-out split of ``--data`` exactly as a run with the same ``data.seq_length``,
``data.split``, ``data.seed`` and ``data.packing`` holds it out (the first ``--max-windows`` of them, else all).
Reported per model, in nats: the loss over the target tokens (on a conversation corpus the
replies; every token otherwise), over the other tokens (prompts) and over all tokens, with the
token counts. One process, the whole model on one device (GPU when there is one; bf16 there,
fp32 on CPU).
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

    sums = {k: [0.0, 0] for k in ("targets", "context", "all")}
    with torch.no_grad():
        for start in range(0, windows, batch):
            ids = range(start, min(start + batch, windows))
            w = torch.from_numpy(np.stack([dataset.valid_sample(j) for j in ids])).to(device)
            tokens, labels = w[:, :-1], w[:, 1:]
            pos = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
            logits = model(tokens, pos, None)[..., :vocab_size].float()  # [s, b, V]
            nll = F.cross_entropy(logits.permute(1, 2, 0), labels, reduction="none")  # [b, s]
            mask = (torch.from_numpy(np.stack([dataset.valid_loss_mask(j) for j in ids])).to(device)
                    if dataset.has_loss_mask else torch.ones_like(nll, dtype=torch.bool))
            for key, m in (("targets", mask), ("context", ~mask), ("all", torch.ones_like(mask))):
                sums[key][0] += float(nll[m].double().sum())
                sums[key][1] += int(m.sum())
    out = {f"{k}_loss": (s / n if n else float("nan")) for k, (s, n) in sums.items()}
    out.update(target_tokens=sums["targets"][1], tokens=sums["all"][1])
    return out


def evaluate_models(models: Sequence[str], data: Sequence[str], seq_length: int, *,
                    split: tuple[float, float] = (0.98, 0.02), seed: int = 1234, tokenizer: Optional[str] = None,
                    packing: str = "stream", max_windows: Optional[int] = None, batch: int = 8,
                    device: str = "auto") -> dict[str, dict]:
    import torch

    from ..convert.sources import open_weights
    from ..data.gpt_dataset import GPTWindowDataset
    from ..data.tokenizer import Tokenizer
    from ..parallel import one_process_world
    from ..training.checkpoint import load_whole_model

    if not models:
        raise ValueError("give at least one --model")
    if batch < 1 or (max_windows is not None and max_windows < 1):
        raise ValueError("--batch and --max-windows must be >= 1")
    configs = {m: open_weights(m).cfg for m in models}
    too_long = [m for m, c in configs.items() if seq_length > c.max_seq_length]
    if too_long:
        raise ValueError(f"--seq-length {seq_length} exceeds the max_seq_length of {too_long}")
    fingerprint = Tokenizer(tokenizer).fingerprint if tokenizer else None
    dataset = GPTWindowDataset(list(data), seq_length, split=tuple(split), seed=seed,
                               vocab_size=min(c.vocab_size for c in configs.values()), tokenizer_fingerprint=fingerprint,
                               packing=packing)
    windows = dataset.num_valid_windows if max_windows is None else min(max_windows, dataset.num_valid_windows)
    if windows == 0:
        raise ValueError(f"--data {' '.join(data)} has no held-out windows at --split {list(split)}")
    results = {}
    with one_process_world(device) as env:
        dtype = torch.bfloat16 if env.device.type == "cuda" else torch.float32
        for m in models:
            cfg, net = load_whole_model(m, env.device, dtype, "eval --model", configs[m])
            results[m] = heldout_losses(net, cfg.vocab_size, dataset, windows, batch, env.device)
            del net
    return results


def _run(args) -> int:
    results = evaluate_models(args.model, args.data, args.seq_length, split=tuple(args.split), seed=args.seed,
                              tokenizer=args.tokenizer, packing=args.packing, max_windows=args.max_windows,
                              batch=args.batch,
                              device=args.device)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    first = next(iter(results.values()))
    print(f"{'model':40s} {'targets':>9s} {'context':>9s} {'all':>9s}   "
          f"({first['tokens']} held-out tokens, {first['target_tokens']} targets)")
    for m, r in results.items():
        print(f"{Path(m).name:40s} {r['targets_loss']:9.4f} {r['context_loss']:9.4f} {r['all_loss']:9.4f}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval", help="held-out loss of checkpoints or HF models on a corpus",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", required=True, help="kdtrain checkpoints or Hugging Face directories")
    p.add_argument("--data", nargs="+", required=True, help="indexed dataset prefixes (a run's data.path)")
    p.add_argument("--seq-length", type=int, required=True, help="a run's data.seq_length")
    p.add_argument("--split", type=float, nargs=2, default=(0.98, 0.02), help="a run's data.split")
    p.add_argument("--seed", type=int, default=1234, help="a run's data.seed")
    p.add_argument("--tokenizer", help="checked against the corpus' tokenizer fingerprint")
    p.add_argument("--packing", choices=("stream", "documents"), default="stream", help="a run's data.packing")
    p.add_argument("--max-windows", type=int, help="only the first N held-out windows")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu or cuda")
    p.add_argument("--out", help="also write the results as JSON")
    p.set_defaults(func=_run)
