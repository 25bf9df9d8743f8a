r"""Padding of whole-document packing (data.packing): next fit in corpus order vs best fit
decreasing per block, for several sequence lengths, and the time to pack at start-up. The two
corpora come from ``WORK=/tmp/kdtrain-chat bash benchmarks/bench_chat.sh /tmp/kdtrain-chat/results``
(any indexed corpora do):

    python benchmarks/bench_packing.py --data /tmp/kdtrain-chat/data/demo_chat_document \
        /tmp/kdtrain-chat/data/demo_text_document --seq-length 512 1024 2048 4096 \
        --synthetic 1000000 --out benchmarks/results/packing_cpu/packing.json

``--data``: indexed corpora (each packed on its own); ``--synthetic N``: N documents with
log-normal lengths (median 300 tokens, the spread of chat data), for the packing time at scale.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdtrain.data.indexed import open_indexed_dataset  # noqa: E402
from kdtrain.data.packing import pack_documents  # noqa: E402


def measure(name: str, lengths: np.ndarray, seq_lengths: list[int]) -> list[dict]:
    rows = []
    for seq in seq_lengths:
        row = {"corpus": name, "documents": int((lengths > 0).sum()), "tokens": int(lengths.sum()), "seq_length": seq}
        for strategy in ("next_fit", "best_fit"):
            t0 = time.perf_counter()
            packed = pack_documents(lengths, seq + 1, strategy)
            row[strategy] = {"windows": packed.num_windows, "padding_share": round(packed.padding_share, 4),
                             "pack_s": round(time.perf_counter() - t0, 3),
                             # pieces that continue a longer document (each repeats one token)
                             "continuations": int(packed.piece_continues.sum())}
        rows.append(row)
        nf, bf = row["next_fit"], row["best_fit"]
        print(f"{name:22s} {row['documents']:>9d} docs  seq {seq:>5d}  windows {nf['windows']:>8d} -> {bf['windows']:>8d}"
              f"  padding {100 * nf['padding_share']:5.1f}% -> {100 * bf['padding_share']:5.1f}%"
              f"  pack {nf['pack_s']:.2f} s / {bf['pack_s']:.2f} s", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="*", default=[], help="indexed dataset prefixes")
    ap.add_argument("--seq-length", nargs="+", type=int, default=[1024])
    ap.add_argument("--synthetic", type=int, default=0, help="also N log-normal document lengths")
    ap.add_argument("--out", help="write the rows as JSON")
    args = ap.parse_args(argv)
    rows = []
    for prefix in args.data:
        rows += measure(Path(prefix).name, open_indexed_dataset(prefix).document_lengths.astype(np.int64),
                        args.seq_length)
    if args.synthetic:
        lengths = np.maximum(1, np.random.default_rng(0).lognormal(np.log(300), 0.8, args.synthetic)).astype(np.int64)
        rows += measure(f"lognormal-{args.synthetic}", lengths, args.seq_length)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
