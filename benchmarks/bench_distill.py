"""What distillation costs on top of plain training: teacher forward, student training and the
distillation step of one pair, measured back to back on the same device with the same batch.

    python benchmarks/bench_distill.py --out benchmarks/results/distill_h100     # one GPU, bf16
    python benchmarks/bench_distill.py --cpu-tiny --out /tmp/bench_distill       # CI smoke mode

Three runs of the real entry points (single process, mock tokens, random weights):
  student_train  scripts/pretrain_gpt.py with the student model: plain training throughput
  teacher_train  scripts/pretrain_gpt.py with the teacher model: plain training (for scale)
  distill        scripts/distill_gpt.py with the distill config (colocated): the KD step; its
                 teacher_compute_s is the teacher's forward + top-k alone (synchronised timer),
                 so the plain teacher forward rate is tokens_per_step / teacher_compute_s.
Each figure is the median over the steps after ``--warmup``. MFU counts model FLOPs
(kdtrain/training/metrics.py): the distill step's MFU counts the student's training FLOPs plus
the teacher's forward FLOPs. Peak memory is torch.cuda.max_memory_allocated of each run.
Writes ``bench_distill.json`` and ``bench_distill.md`` under --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.entry_runs import (CPU_FP32, MOCK, REPO, add_run_args, resolve_run_args,  # noqa: E402
                                   run_entry, train_records)
from kdtrain.config.distill import load_distill_config  # noqa: E402

GPU = dict(distill="configs/distill/llama-1.2b-to-150m-h100.yaml", pretrain="configs/pretrain/llama-3.2-1b-h100.yaml",
           steps=20, device=[])
CPU_TINY = dict(distill="configs/distill/tiny.yaml", pretrain="configs/pretrain/tiny.yaml", steps=6, device=CPU_FP32)


def run(script: str, config: str, overrides: list[str], log_dir: Path) -> list[dict]:
    return train_records(run_entry(script, config, overrides, log_dir)[1])


def summarise(records: list[dict], warmup: int, keys: tuple[str, ...]) -> dict:
    steady = train_records(records, warmup)
    out = {"steps_timed": len(steady)}
    for k in keys:
        vals = [r[k] for r in steady if k in r]
        if vals:
            out[k] = statistics.median(vals)
    if "peak_mem_gib" in records[-1]:
        out["peak_mem_gib"] = max(r.get("peak_mem_gib", 0.0) for r in records)
    return out


RATE_KEYS = ("step_time_s", "samples_per_s", "tokens_per_s", "tflops_per_device", "mfu")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(ap)
    args = ap.parse_args(argv)
    mode = CPU_TINY if args.cpu_tiny else GPU
    steps, warmup, out = resolve_run_args(args, mode["steps"])
    dcfg = load_distill_config(str(REPO / mode["distill"]), MOCK + mode["device"])
    tm, sm = dcfg.teacher.model, dcfg.student.model
    tr, seq = dcfg.training, dcfg.data.seq_length
    # The plain-training runs take the distill run's shapes, so every rate is per the same batch.
    shape = [f"data.seq_length={seq}", f"training.micro_batch_size={tr.micro_batch_size}",
             f"training.global_batch_size={tr.global_batch_size}", f"training.train_steps={steps}",
             "training.eval_batches=0", *MOCK, *mode["device"]]
    res: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.cpu_tiny
                 else platform.processor() or "cpu",
                 "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "command": " ".join(sys.argv),
                 "teacher": {"model": tm.name, "params_M": tm.num_params() / 1e6},
                 "student": {"model": sm.name, "params_M": sm.num_params() / 1e6},
                 "seq_length": seq, "micro_batch_size": tr.micro_batch_size,
                 "global_batch_size": tr.global_batch_size, "steps": steps, "warmup": warmup,
                 "topk": dcfg.teacher.topk, "divergence": dcfg.loss.divergence, "beta": dcfg.loss.beta,
                 "dtype": dcfg.precision.dtype, "runs": {}}
    tmp = out / "logs"
    recs = run("pretrain_gpt.py", mode["pretrain"], [f"model={sm.name}", *shape], tmp / "student_train")
    res["runs"]["student_train"] = summarise(recs, warmup, RATE_KEYS)
    recs = run("pretrain_gpt.py", mode["pretrain"], [f"model={tm.name}", *shape], tmp / "teacher_train")
    res["runs"]["teacher_train"] = summarise(recs, warmup, RATE_KEYS)
    recs = run("distill_gpt.py", mode["distill"], [f"training.train_steps={steps}", "training.eval_batches=0", *MOCK, *mode["device"]], tmp / "distill")
    d = summarise(recs, warmup, RATE_KEYS + ("teacher_compute_s", "teacher_wait_s", "teacher_mfu",
                                             "teacher_tflops_per_device"))
    res["runs"]["distill"] = d
    tokens = tr.global_batch_size * seq
    fwd_flops = tm.flops_per_token(seq) / 3
    if d.get("teacher_compute_s"):
        tf = {"tokens_per_s": tokens / d["teacher_compute_s"],
              "samples_per_s": tr.global_batch_size / d["teacher_compute_s"]}
        tf["tflops_per_device"] = fwd_flops * tf["tokens_per_s"] / 1e12
        if "mfu" in d:  # same peak as the runs' MFU
            tf["mfu"] = tf["tflops_per_device"] / (d["tflops_per_device"] / d["mfu"])
        res["runs"]["teacher_forward"] = tf
    if "mfu" in d:  # whole-step MFU: student training FLOPs + teacher forward FLOPs
        d["combined_mfu"] = d["mfu"] + d.get("teacher_mfu", 0.0)
    st = res["runs"]["student_train"]
    res["distill_vs_student_train"] = d["samples_per_s"] / st["samples_per_s"]
    (out / "bench_distill.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "bench_distill.md").write_text(markdown(res))
    print(markdown(res))
    return 0


def markdown(res: dict) -> str:
    lines = [f"# Distillation step vs plain training: {res['teacher']['model']} -> {res['student']['model']}", "",
             f"{res['device']}, {res['date']}, torch {res['torch']}, {res['dtype']}, seq {res['seq_length']}, "
             f"micro-batch {res['micro_batch_size']}, global batch {res['global_batch_size']}, top-{res['topk']} "
             f"{res['divergence']} (beta {res['beta']}); medians over steps {res['warmup'] + 1}-{res['steps']}.", "",
             f"Command: `{res['command']}`", "",
             "| run | samples/s | tokens/s | step s | TFLOP/s/dev | MFU | peak mem GiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in res["runs"].items():
        mfu = r.get("combined_mfu", r.get("mfu"))
        lines.append(f"| {name} | {r['samples_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r.get('step_time_s', float('nan')):.3f} | "
                     f"{r['tflops_per_device']:.1f} | {'' if mfu is None else f'{100 * mfu:.1f}%'} | "
                     f"{r.get('peak_mem_gib', float('nan')):.1f} |")
    lines += ["", f"Distillation runs at {100 * res['distill_vs_student_train']:.0f}% of the student's plain training "
              "samples/s (the teacher forward is the difference). The distill row's MFU counts the student's "
              "training FLOPs plus the teacher's forward FLOPs.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
