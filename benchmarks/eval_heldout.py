"""Held-out next-token loss of checkpoints on a corpus, over its target tokens (a conversation
corpus: the replies), over the others (the prompts) and over every token, whatever each run
trained on. One process, CPU or one
GPU; after `bash benchmarks/bench_chat.sh OUT`:

    python benchmarks/eval_heldout.py --data /tmp/kdtrain-pruned-init/data/demo_chat_document \\
        --checkpoints /tmp/kdtrain-pruned-init/checkpoints/chat-distill-replies \\
                      /tmp/kdtrain-pruned-init/checkpoints/chat-distill-all --seq-length 256 --out /tmp/heldout.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from eval_own_samples import load
from kdtrain.data.gpt_dataset import GPTWindowDataset
from kdtrain.parallel import init_distributed, shutdown_distributed


@torch.no_grad()
def heldout_losses(model, cfg, ds: GPTWindowDataset, batch: int, device) -> dict:
    sums = {"targets": [0.0, 0], "context": [0.0, 0], "all": [0.0, 0]}
    for start in range(0, ds.num_valid_windows, batch):
        ids = range(start, min(start + batch, ds.num_valid_windows))
        w = torch.from_numpy(np.stack([ds.valid_sample(j) for j in ids])).to(device)
        tokens, labels = w[:, :-1], w[:, 1:]
        pos = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
        logits = model(tokens, pos, None)[..., :cfg.vocab_size].float()  # [s, b, V]
        nll = F.cross_entropy(logits.permute(1, 2, 0), labels, reduction="none")  # [b, s]
        mask = (torch.from_numpy(np.stack([ds.valid_loss_mask(j) for j in ids])).to(device) if ds.has_loss_mask
                else torch.ones_like(nll, dtype=torch.bool))
        sums["targets"][0] += float(nll[mask].sum())
        sums["targets"][1] += int(mask.sum())
        sums["context"][0] += float(nll[~mask].sum())
        sums["context"][1] += int((~mask).sum())
        sums["all"][0] += float(nll.sum())
        sums["all"][1] += nll.numel()
    return {f"{k}_loss": s / max(n, 1) for k, (s, n) in sums.items()} | {
        "target_tokens": sums["targets"][1], "tokens": sums["all"][1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", nargs="+", required=True, help="run checkpoint directories")
    ap.add_argument("--data", nargs="+", required=True, help="indexed dataset prefixes (the runs' data.path)")
    ap.add_argument("--seq-length", type=int, required=True)
    ap.add_argument("--split", type=float, nargs=2, default=(0.98, 0.02), help="the runs' data.split")
    ap.add_argument("--seed", type=int, default=1234, help="the runs' data.seed")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", help="JSON file for the results")
    args = ap.parse_args()
    env = init_distributed("auto")
    try:
        ds = GPTWindowDataset(args.data, args.seq_length, split=tuple(args.split), seed=args.seed)
        results = {}
        print(f"{'checkpoint':40s} {'targets':>9s} {'context':>9s} {'all':>9s}   "
              f"({ds.num_valid_windows} held-out windows)")
        for path in args.checkpoints:
            cfg, model = load(path, env.device, seed=0)
            results[path] = heldout_losses(model, cfg, ds, args.batch, env.device)
            r = results[path]
            print(f"{Path(path).name:40s} {r['targets_loss']:9.4f} {r['context_loss']:9.4f} {r['all_loss']:9.4f}")
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    main()
