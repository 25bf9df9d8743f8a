"""What distillation costs on top of plain training: teacher forward, student training and the
distillation step of one pair, measured back to back on the same device with the same batch.

    python benchmarks/bench_distill.py --out benchmarks/results/distill_h100     # one GPU, bf16
    python benchmarks/bench_distill.py --cpu-tiny --out /tmp/bench_distill       # CI smoke mode
    python benchmarks/bench_distill.py --compile --profile --out DIR   # compiled layers; where time goes
    python benchmarks/bench_distill.py --cuda-graphs --profile --out DIR   # layers replayed as CUDA graphs
    python benchmarks/bench_distill.py --cuda-graphs --compile --out DIR   # graphed student, compiled teacher

Three runs of the real entry points (single process, mock tokens, random weights):
  student_train  scripts/pretrain_gpt.py with the student model: plain training throughput
  teacher_train  scripts/pretrain_gpt.py with the teacher model: plain training (for scale)
  distill        scripts/distill_gpt.py with the distill config (colocated): the KD step; its
                 teacher_compute_s is the teacher's forward + top-k alone (synchronised timer),
                 so the plain teacher forward rate is tokens_per_step / teacher_compute_s.
Each figure is the median over the steps after ``--warmup``. MFU counts model FLOPs
(kdtrain/training/metrics.py): the distill step's MFU counts the student's training FLOPs plus
the teacher's forward FLOPs. Peak memory is torch.cuda.max_memory_allocated of each run.
``--compile`` runs every entry point with ``precision.compile=true``, ``--cuda-graphs`` with
``precision.cuda_graphs=true`` (the trained model's layers; the teacher's forward stays eager);
both together graph the student and compile the teacher (in the plain-training runs too: the
student's run graphed, the teacher's compiled). ``--profile`` adds two steps
per run under torch.profiler and reports, per run, the step's device-busy share, kernel count and
time by category (matmul, attention, KD loss, top-k, other = memory-bound and glue kernels).
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
                                   run_entry, run_overrides, train_records)
from kdtrain.config.distill import load_distill_config  # noqa: E402
from kdtrain.training.profiling import read_profiles  # noqa: E402

GPU = dict(distill="configs/distill/llama-1.2b-to-150m-h100.yaml", pretrain="configs/pretrain/llama-3.2-1b-h100.yaml",
           steps=20, device=[])
CPU_TINY = dict(distill="configs/distill/tiny.yaml", pretrain="configs/pretrain/tiny.yaml", steps=6, device=CPU_FP32)


PROFILED_STEPS = 2  # --profile: two extra steps at the end of each run, left out of the medians


def run(script: str, config: str, overrides: list[str], log_dir: Path) -> tuple[list[dict], dict]:
    """(training records, {rank: profile summary}) of one run."""
    return train_records(run_entry(script, config, overrides, log_dir)[1]), read_profiles(log_dir)


def summarise(records: list[dict], warmup: int, keys: tuple[str, ...], steps: int) -> dict:
    steady = [r for r in train_records(records, warmup) if r["step"] <= steps]
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
    ap.add_argument("--profile", action="store_true",
                    help=f"run {PROFILED_STEPS} more steps per run under torch.profiler (logging.profile_steps); "
                         "their summaries go into the report, their times stay out of the medians")
    args = ap.parse_args(argv)
    mode = CPU_TINY if args.cpu_tiny else GPU
    steps, warmup, out = resolve_run_args(args, mode["steps"])
    device = run_overrides(args, mode["device"])
    dcfg = load_distill_config(str(REPO / mode["distill"]), MOCK + device)
    tm, sm = dcfg.teacher.model, dcfg.student.model
    tr, seq = dcfg.training, dcfg.data.seq_length
    # The plain-training runs take the distill run's shapes, so every rate is per the same batch.
    run_steps = steps + (PROFILED_STEPS if args.profile else 0)
    length = [f"training.train_steps={run_steps}", "training.eval_batches=0", *MOCK, *device,
              *([f"logging.profile_steps=[{steps + 1},{run_steps}]"] if args.profile else [])]
    shape = [f"data.seq_length={seq}", f"training.micro_batch_size={tr.micro_batch_size}",
             f"training.global_batch_size={tr.global_batch_size}", *length]
    res: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.cpu_tiny
                 else platform.processor() or "cpu",
                 "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "command": " ".join(sys.argv),
                 "teacher": {"model": tm.name, "params_M": tm.num_params() / 1e6},
                 "student": {"model": sm.name, "params_M": sm.num_params() / 1e6},
                 "seq_length": seq, "micro_batch_size": tr.micro_batch_size,
                 "global_batch_size": tr.global_batch_size, "steps": steps, "warmup": warmup,
                 "topk": dcfg.teacher.topk, "divergence": dcfg.loss.divergence, "beta": dcfg.loss.beta,
                 "dtype": dcfg.precision.dtype, "compile": dcfg.precision.compile,
                 "cuda_graphs": dcfg.precision.cuda_graphs, "runs": {}}
    tmp = out / "logs"
    profiles = {}
    # Both options: a model's layers are graphed or compiled, as the distill run does per role.
    both = args.compile and args.cuda_graphs
    as_student, as_teacher = (["precision.compile=false"], ["precision.cuda_graphs=false"]) if both else ([], [])
    recs, profiles["student_train"] = run("pretrain_gpt.py", mode["pretrain"],
                                          [f"model={sm.name}", *shape, *as_student], tmp / "student_train")
    res["runs"]["student_train"] = summarise(recs, warmup, RATE_KEYS, steps)
    recs, profiles["teacher_train"] = run("pretrain_gpt.py", mode["pretrain"],
                                          [f"model={tm.name}", *shape, *as_teacher], tmp / "teacher_train")
    res["runs"]["teacher_train"] = summarise(recs, warmup, RATE_KEYS, steps)
    recs, profiles["distill"] = run("distill_gpt.py", mode["distill"], length, tmp / "distill")
    d = summarise(recs, warmup, RATE_KEYS + ("teacher_compute_s", "teacher_wait_s", "teacher_mfu",
                                             "teacher_tflops_per_device"), steps)
    res["runs"]["distill"] = d
    if args.profile:
        res["profiles"] = {name: p[0] for name, p in profiles.items() if 0 in p}
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
             f"{res['device']}, {res['date']}, torch {res['torch']}, {res['dtype']}"
             f"{', compiled layers' if res.get('compile') else ''}"
             f"{', CUDA-graphed layers' if res.get('cuda_graphs') else ''}, seq {res['seq_length']}, "
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
    if res.get("profiles"):
        lines += profile_table(res["profiles"])
    return "\n".join(lines)


def profile_table(profiles: dict) -> list[str]:
    """Where a profiled step's time goes (kdtrain/training/profiling.py summaries, rank 0)."""
    cats = sorted({c for p in profiles.values() for c in p["by_category_s_per_step"]})
    gpu = all(p["device"] == "cuda" for p in profiles.values())
    busy = "device busy" if gpu else "op time"
    lines = [f"Profiled steps (torch.profiler, rank 0; ms per step; {busy} = "
             + ("sum of kernel time" if gpu else "sum of operator self CPU time") + "):", "",
             f"| run | step ms | {busy} | kernels | " + " | ".join(cats) + " |",
             "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in cats) + " |"]
    for name, p in profiles.items():
        b = p.get("device_busy_s_per_step", p.get("op_time_s_per_step", 0.0))
        lines.append(f"| {name} | {1e3 * p['wall_s_per_step']:.1f} | {1e3 * b:.1f} ({100 * b / p['wall_s_per_step']:.0f}%) | "
                     f"{p.get('kernels_per_step', 0):.0f} | "
                     + " | ".join(f"{1e3 * p['by_category_s_per_step'].get(c, 0.0):.1f}" for c in cats) + " |")
    return lines + [""]


if __name__ == "__main__":
    sys.exit(main())
