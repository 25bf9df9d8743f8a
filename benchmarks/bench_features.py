"""What three options cost or save, each as an A/B pair of real runs on the same device with the
same batch (single process, random weights):

    python benchmarks/bench_features.py --out benchmarks/results/features_h100               # one GPU, bf16
    python benchmarks/bench_features.py --pair qwen --out benchmarks/results/features_qwen_h100
    python benchmarks/bench_features.py --cpu-tiny --out /tmp/bench_features                 # CI smoke mode

  recompute  scripts/pretrain_gpt.py with the student model: training.recompute false / true
             (activation memory against the recomputed forward's time)
  attention  scripts/distill_gpt.py on short documents packed by best fit: data.attention
             window / documents (SDPA with a per-batch mask instead of the causal kernel)
  targets    scripts/distill_gpt.py on conversations whose replies are 40% of the tokens:
             data.loss_mask false (logits, top-k and loss at every position) / true (at the
             replies only: MicroBatch.logit_rows)

The corpora are written under --out (random tokens, log-normal document lengths). ``--pair``:
``llama`` (configs/distill/llama-1.2b-to-150m-h100.yaml, vocabulary 32000) or ``qwen``
(Qwen2.5-1.5B -> Qwen2.5-0.5B shapes on the same config, vocabulary 151665, where the output
layer weighs most). Figures: median step time over the steps after --warmup, samples/s, the
teacher's forward + top-k time per step (distill runs) and the peak of
torch.cuda.max_memory_allocated. Writes ``bench_features.json`` and ``bench_features.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.entry_runs import (CPU_FP32, REPO, add_run_args, resolve_run_args, run_entry,  # noqa: E402
                                   run_overrides, train_records)
from kdtrain.config.distill import load_distill_config  # noqa: E402
from kdtrain.data import write_indexed_dataset  # noqa: E402

GPU = dict(distill="configs/distill/llama-1.2b-to-150m-h100.yaml", pretrain="configs/pretrain/llama-3.2-1b-h100.yaml",
           steps=20, device=[], median_tokens=300)
CPU_TINY = dict(distill="configs/distill/tiny.yaml", pretrain="configs/pretrain/tiny.yaml", steps=6, device=CPU_FP32,
                median_tokens=12)
PAIRS = {"llama": [], "qwen": ["teacher.model=qwen2.5-1.5b", "student.model=qwen2.5-0.5b"]}
KEYS = ("step_time_s", "samples_per_s", "teacher_compute_s")
REPLY_SHARE = 0.4


def write_corpus(prefix: Path, tokens_needed: int, median: int, vocab: int, replies: bool) -> str:
    """Random documents of log-normal lengths (at least ``tokens_needed`` tokens); with
    ``replies`` each document's last 40% is a reply target (a loss mask)."""
    rng = np.random.default_rng(0)
    docs, total = [], 0
    while total < tokens_needed:
        n = max(4, int(rng.lognormal(np.log(median), 0.6)))
        ids = rng.integers(1, vocab, n)
        docs.append((ids, np.arange(n) >= int(n * (1 - REPLY_SHARE))) if replies else ids)
        total += n
    write_indexed_dataset(str(prefix), docs, vocab, {"eos_id": 0})
    return str(prefix)


def summarise(records: list[dict], warmup: int) -> dict:
    steady = train_records(records, warmup)
    out = {k: statistics.median(r[k] for r in steady) for k in KEYS if all(k in r for r in steady)}
    peaks = [r["peak_mem_gib"] for r in records if "peak_mem_gib" in r]
    if peaks:
        out["peak_mem_gib"] = max(peaks)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(ap)
    ap.add_argument("--pair", choices=sorted(PAIRS), default="llama")
    ap.add_argument("--only", nargs="+", choices=("recompute", "attention", "targets"),
                    default=["recompute", "attention", "targets"])
    args = ap.parse_args(argv)
    mode = CPU_TINY if args.cpu_tiny else GPU
    steps, warmup, out = resolve_run_args(args, mode["steps"])
    device = run_overrides(args, mode["device"])
    pair = [] if args.cpu_tiny else PAIRS[args.pair]
    dcfg = load_distill_config(str(REPO / mode["distill"]), ["data.mock=true", "data.path=[]", *pair, *device])
    tm, sm, tr, seq = dcfg.teacher.model, dcfg.student.model, dcfg.training, dcfg.data.seq_length
    common = [f"training.train_steps={steps}", "training.eval_batches=0", *device]
    shape = [f"data.seq_length={seq}", f"training.micro_batch_size={tr.micro_batch_size}",
             f"training.global_batch_size={tr.global_batch_size}"]
    res: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.cpu_tiny
                 else platform.processor() or "cpu", "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                 "command": " ".join(sys.argv), "teacher": tm.name, "student": sm.name, "vocab_size": sm.vocab_size,
                 "seq_length": seq, "micro_batch_size": tr.micro_batch_size, "global_batch_size": tr.global_batch_size,
                 "steps": steps, "warmup": warmup, "pairs": {}}
    logs = out / "logs"
    needed = int(1.3 * (steps * tr.global_batch_size * (seq + 1)))

    def ab(name: str, script: str, config: str, base: list[str], flag: str, values: tuple[str, str]) -> None:
        runs = {}
        for v in values:
            records = run_entry(script, config, [*base, f"{flag}={v}"], logs / f"{name}-{v}")[1]
            runs[f"{flag}={v}"] = summarise(records, warmup)
        res["pairs"][name] = runs
        (out / "bench_features.json").write_text(json.dumps(res, indent=2) + "\n")  # after every pair

    if "recompute" in args.only:
        ab("recompute", "pretrain_gpt.py", mode["pretrain"],
           [f"model={sm.name}", "data.mock=true", "data.path=[]", *shape, *common], "training.recompute",
           ("false", "true"))
    data = ["data.mock=false", "data.packing=best_fit", "data.split=[1.0,0.0]", *pair, *common]
    if "attention" in args.only:
        docs = write_corpus(out / "data" / "documents", needed, mode["median_tokens"], sm.vocab_size, replies=False)
        ab("attention", "distill_gpt.py", mode["distill"], [f"data.path=[{docs}]", *data], "data.attention",
           ("window", "documents"))
    if "targets" in args.only:
        chats = write_corpus(out / "data" / "conversations", needed, mode["median_tokens"], sm.vocab_size,
                             replies=True)
        ab("targets", "distill_gpt.py", mode["distill"], [f"data.path=[{chats}]", *data], "data.loss_mask",
           ("false", "true"))
    (out / "bench_features.md").write_text(markdown(res))
    print(markdown(res))
    return 0


def markdown(res: dict) -> str:
    lines = [f"# Options A/B: {res['teacher']} -> {res['student']} (vocabulary {res['vocab_size']}), {res['device']}",
             "", f"`{res['command']}`, {res['date']}, torch {res['torch']}; seq {res['seq_length']}, micro-batch "
             f"{res['micro_batch_size']}, global batch {res['global_batch_size']}, median of steps "
             f"{res['warmup'] + 1}-{res['steps']}.", "",
             "| pair | run | step s | samples/s | teacher fwd+top-k s | peak GiB |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for name, runs in res["pairs"].items():
        for run, r in runs.items():
            cells = [f"{r[k]:.4f}" if k in r else "-" for k in ("step_time_s",)]
            cells += [f"{r['samples_per_s']:.2f}" if "samples_per_s" in r else "-",
                      f"{r['teacher_compute_s']:.4f}" if "teacher_compute_s" in r else "-",
                      f"{r['peak_mem_gib']:.2f}" if "peak_mem_gib" in r else "-"]
            lines.append(f"| {name} | `{run}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
