"""Shared harness of the benchmarks that time kdtrain's real entry points (bench_distill.py,
bench_online_vs_cached.py): command-line options, one run of a script in its own process with
its metrics log, and the steady-state part of the per-step records."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MOCK = ["data.mock=true", "data.path=[]"]  # seeded random tokens: no corpus needed
CPU_FP32 = ["precision.device=cpu", "precision.dtype=fp32"]
LOG = ["logging.interval=1", "logging.progress_bar=false", "logging.tensorboard=false", "checkpoint.dir=null"]


def add_run_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--out", required=True)
    ap.add_argument("--cpu-tiny", action="store_true", help="tiny models on CPU (smoke test of the harness)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None, help="steps left out of the medians (default 5, tiny 2)")
    ap.add_argument("--compile", action="store_true",
                    help="precision.compile=true in every run (torch.compile of the transformer layers; the "
                         "first step compiles, inside the warm-up)")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="precision.cuda_graphs=true in every run (the trained model's layers replayed as CUDA "
                         "graphs, captured when it is built)")


def run_overrides(args, device: list[str]) -> list[str]:
    """Overrides every run of a benchmark shares: the device/precision mode, --compile, --cuda-graphs."""
    return [*device, *(["precision.compile=true"] if args.compile else []),
            *(["precision.cuda_graphs=true"] if args.cuda_graphs else [])]


def resolve_run_args(args, default_steps: int) -> tuple[int, int, Path]:
    """(steps, warmup, output directory) from :func:`add_run_args` options."""
    steps = args.steps or default_steps
    warmup = args.warmup if args.warmup is not None else (2 if args.cpu_tiny else 5)
    if steps <= warmup:
        raise ValueError(f"--steps {steps} leaves no step after --warmup {warmup}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return steps, warmup, out


def launch(args: list[str]) -> tuple[float, str]:
    """Run ``python ARGS`` from the repository root; (wall seconds, stdout); raise on failure."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    print("$", " ".join(args), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{args[0]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    print(f"  {wall:.1f} s", flush=True)
    return wall, proc.stdout


def run_entry(script: str, config: str, overrides: list[str], log_dir: Path) -> tuple[float, list[dict]]:
    """One run of ``scripts/<script>`` logging every step to ``log_dir``: (wall seconds, records)."""
    wall, _ = launch([str(REPO / "scripts" / script), "--config", config, *overrides, f"logging.dir={log_dir}", *LOG])
    return wall, [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


def train_records(records: list[dict], warmup: int = 0) -> list[dict]:
    """The training records after step ``warmup`` (all of them when none is later)."""
    train = [r for r in records if r.get("kind", "train") == "train"]
    return [r for r in train if r["step"] > warmup] or train
