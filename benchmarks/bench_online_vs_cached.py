"""The same student budget three ways: online teacher every step, from a teacher cache, mixed.

    python benchmarks/bench_online_vs_cached.py --out benchmarks/results/online_vs_cached_h100   # one GPU
    python benchmarks/bench_online_vs_cached.py --cpu-tiny --out /tmp/bench_cache                  # CI smoke
    python benchmarks/bench_online_vs_cached.py --cuda-graphs --out DIR   # student layers as CUDA graphs
    python benchmarks/bench_online_vs_cached.py --runs online,cached --steps 20 --out DIR   # the ratio only
    python benchmarks/bench_online_vs_cached.py ... --budget 140   # end within 140 s, keep what finished

Runs of the real entry points, one process each (mock tokens, the distill config's seeded random
teacher; student budget ``--steps`` x global batch):
  online   scripts/distill_gpt.py, teacher.source=online (colocated: teacher + student per step)
  cache    scripts/cache_teacher.py over exactly the samples the student consumes (values bf16)
  cached   scripts/distill_gpt.py, teacher.source=cache  (no teacher built)
  mixed    scripts/distill_gpt.py, teacher.source=mixed, live_fraction=--live-fraction

Reported per run: process wall time (start-up included, the same for every run), the student
phase's time (sum of its step times), student-phase
samples/s (median over the steps after --warmup) and the student's final held-out loss, and
whether the fused KD-loss kernels loaded (else every run used the reference loss). The report is
rewritten after every run, so a run cut short by a time limit keeps what finished; with
``--budget`` a run past it is stopped (with what it started) and later ones are skipped, each
named under ``not_run``; the teacher cache is deleted however the command ends. The
break-even: with ``r`` student runs (or epochs) over the same samples, caching wins when
``r * T_online > T_cache + r * T_cached``, i.e. ``r > T_cache / (T_online - T_cached)``; the
report states that ``r`` from the measured times. Writes bench_online_vs_cached.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.entry_runs import (CPU_FP32, MOCK, REPO, LaunchTimeout, add_run_args, launch,  # noqa: E402
                                   resolve_run_args, run_entry, run_overrides, stop_on_sigterm, train_records)
from kdtrain.config.distill import load_distill_config  # noqa: E402

GPU = dict(config="configs/distill/llama-1.2b-to-150m-h100.yaml", steps=30, device=[], eval_batches=2)
CPU_TINY = dict(config="configs/distill/tiny.yaml", steps=6, device=CPU_FP32, eval_batches=1)


MIN_RUN_S = 20.0  # --budget: a run is not started with less time than this left
REPORT_MARGIN_S = 5.0  # --budget: kept back for the last report


def distill(config: str, overrides: list[str], log_dir: Path, warmup: int, timeout=None) -> dict:
    wall, recs = run_entry("distill_gpt.py", config, overrides, log_dir, timeout)
    train = train_records(recs)
    steady = train_records(recs, warmup)
    valid = [r for r in recs if r.get("kind") == "valid"]
    out = {"wall_s": wall, "samples_per_s": statistics.median(r["samples_per_s"] for r in steady),
           "step_time_s": statistics.median(r["step_time_s"] for r in steady),
           "student_phase_s": sum(r["step_time_s"] for r in train), "final_train_loss": train[-1]["loss"],
           "live_steps": sum(r.get("teacher_live", 1) for r in train)}
    if valid:
        out["valid_loss"] = valid[-1]["valid_loss"]
    if "peak_mem_gib" in train[-1]:
        out["peak_mem_gib"] = max(r.get("peak_mem_gib", 0.0) for r in train)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(ap)
    ap.add_argument("--live-fraction", type=float, default=0.25, help="mixed mode's share of live-teacher steps")
    ap.add_argument("--cache-dtype", default="bf16")
    ap.add_argument("--runs", default="online,cached,mixed",
                    help="comma list out of online, cached, mixed (the cache pass runs when cached or mixed does)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for this whole command (run_h100.sh: its stage's limit less a margin): a run "
                         "past what is left is stopped, one that cannot start in time is skipped, and the report "
                         "says which")
    args = ap.parse_args(argv)
    stop_on_sigterm()
    deadline = None if args.budget is None else time.monotonic() + args.budget
    wanted = [r.strip() for r in args.runs.split(",") if r.strip()]
    if not wanted or set(wanted) - {"online", "cached", "mixed"}:
        raise ValueError(f"--runs {args.runs!r}: a non-empty comma list out of online, cached, mixed")
    mode = CPU_TINY if args.cpu_tiny else GPU
    steps, warmup, out = resolve_run_args(args, mode["steps"])
    config = str(REPO / mode["config"])
    common = [*MOCK, *run_overrides(args, mode["device"]), f"training.train_steps={steps}", f"training.eval_batches={mode['eval_batches']}",
              "training.eval_interval=0"]
    cfg = load_distill_config(config, common)
    tr = cfg.training
    cache_dir = out / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)

    res: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.cpu_tiny else "cpu",
                 "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "command": " ".join(sys.argv),
                 "teacher": cfg.teacher.model.name, "student": cfg.student.model.name, "steps": steps,
                 "global_batch_size": tr.global_batch_size, "seq_length": cfg.data.seq_length,
                 "topk": cfg.teacher.topk, "cache_dtype": args.cache_dtype, "live_fraction": args.live_fraction,
                 "compile": cfg.precision.compile, "cuda_graphs": cfg.precision.cuda_graphs,
                 "runs": {}, "not_run": {}}
    runs = res["runs"]
    # Byte-compile once and build the KD kernels (just in time on first use): equal start-ups.
    # The kernels' status goes into the report: without them the runs use the reference loss.
    _, said = launch(["-c", "import json, kdtrain.training.distill, kdtrain.cache.job; "
                            "from kdtrain.loss._ext import extension_status, load_kernels; m = load_kernels(); "
                            "print(json.dumps({'status': extension_status(), 'loaded': m is not None}))"])
    res["kernel"] = json.loads(said.strip().splitlines()[-1])
    if args.cpu_tiny:
        res["kernel"]["status"] = "not used on CPU (pure-torch loss)"

    def report() -> None:
        on, ca, c = runs.get("online"), runs.get("cached"), runs.get("cache")
        if on and ca:
            res["cached_vs_online_student_samples_per_s"] = ca["samples_per_s"] / on["samples_per_s"]
            saved = on["wall_s"] - ca["wall_s"]
            res["break_even_reuses"] = c["wall_s"] / saved if saved > 0 else None
        res["complete"] = set(wanted) <= set(runs)
        for name, text in (("bench_online_vs_cached.json", json.dumps(res, indent=2) + "\n"),
                           ("bench_online_vs_cached.md", markdown(res))):
            tmp = out / f"{name}.part"  # never half a report, for a reader or a run killed mid-write
            tmp.write_text(text)
            tmp.replace(out / name)

    def attempt(name: str, run) -> bool:
        """Run ``run(timeout)`` as ``runs[name]`` unless --budget is spent; a run stopped by the
        budget is recorded in ``not_run`` (the report stays valid); False when it did not finish."""
        left = None if deadline is None else deadline - time.monotonic() - REPORT_MARGIN_S
        if left is not None and left < MIN_RUN_S:
            res["not_run"][name] = f"no time left: {max(left, 0.0):.0f} s of --budget {args.budget:.0f} s remained"
        else:
            try:
                runs[name] = run(left)
            except LaunchTimeout as e:
                res["not_run"][name] = f"stopped at the --budget limit ({left:.0f} s left when it started): " + \
                    (str(e).splitlines() or [''])[0]
        report()
        return name in runs

    try:
        if "online" in wanted:
            attempt("online", lambda t: distill(config, common, out / "logs" / "online", warmup, t))
        if {"cached", "mixed"} & set(wanted):
            def cache_pass(t):
                wall, _ = launch([str(REPO / "scripts" / "cache_teacher.py"), "--config", config, "--out",
                                  str(cache_dir), "--samples", str(steps * tr.global_batch_size),
                                  f"cache.dtype={args.cache_dtype}", *common], t)
                size = sum(f.stat().st_size for f in cache_dir.rglob("*") if f.is_file())
                return {"wall_s": wall, "bytes": size,
                        "bytes_per_token": size / (steps * tr.global_batch_size * cfg.data.seq_length)}

            if attempt("cache", cache_pass):
                src = [f"teacher.cache={cache_dir}"]
                if "cached" in wanted:
                    attempt("cached", lambda t: distill(config, [*common, "teacher.source=cache", *src],
                                                        out / "logs" / "cached", warmup, t))
                if "mixed" in wanted:
                    attempt("mixed", lambda t: distill(config, [*common, "teacher.source=mixed", *src,
                                                                f"teacher.live_fraction={args.live_fraction}"],
                                                       out / "logs" / "mixed", warmup, t))
    finally:  # hundreds of MB, and a killed pass leaves partial shards: never left for the results
        shutil.rmtree(cache_dir, ignore_errors=True)
    print(markdown(res))
    return 0


def markdown(res: dict) -> str:
    r = res["runs"]
    lines = [f"# Online vs cached vs mixed teacher: {res['teacher']} -> {res['student']}", "",
             f"{res['device']}, {res['date']}, torch {res['torch']}{', compiled layers' if res.get('compile') else ''}"
             f"{', CUDA-graphed student layers' if res.get('cuda_graphs') else ''}; "
             f"{res['steps']} student steps x global batch "
             f"{res['global_batch_size']} x seq {res['seq_length']}, top-{res['topk']}, cache values "
             f"{res['cache_dtype']}, mixed live fraction {res['live_fraction']}.", "",
             f"Command: `{res['command']}`", "",
             "| run | wall s | student phase s | student samples/s | live-teacher steps | final train loss | held-out loss | peak GiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in ("online", "cached", "mixed"):
        if name not in r:
            continue
        x = r[name]
        lines.append(f"| {name} | {x['wall_s']:.1f} | {x['student_phase_s']:.1f} | {x['samples_per_s']:.2f} | {x['live_steps']} | "
                     f"{x['final_train_loss']:.4f} | {x.get('valid_loss', float('nan')):.4f} | "
                     f"{x.get('peak_mem_gib', float('nan')):.1f} |")
    c = r.get("cache")
    if c is not None:
        lines += [f"| cache pass | {c['wall_s']:.1f} | | | | | | |", "",
                  f"Cache: {c['bytes'] / 2**20:.1f} MiB, {c['bytes_per_token']:.1f} bytes/token."]
    if "cached_vs_online_student_samples_per_s" in res:
        be = res["break_even_reuses"]
        lines += ["", f"Student phase from the cache: {res['cached_vs_online_student_samples_per_s']:.2f}x the online "
                  "samples/s. Caching pays off "
                  + (f"from {be:.2f} student runs over the same samples (cache pass / wall time saved per run)."
                     if be is not None else "never here (the cached run was not faster end to end).")]
    for name, why in (res.get("not_run") or {}).items():
        lines += ["", f"Not run: {name}: {why}."]
    if res.get("kernel"):
        lines += ["", f"Fused KD-loss kernels: {res['kernel']['status']}."]
    if not res.get("complete", True):
        lines += ["", "Incomplete: the benchmark stopped before every requested run finished."]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
