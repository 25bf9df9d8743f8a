"""Shared harness of the benchmarks that time kdtrain's real entry points (bench_distill.py,
bench_online_vs_cached.py): command-line options, one run of a script in its own process with
its metrics log, and the steady-state part of the per-step records."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

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


def stop_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """End a child started with ``start_new_session=True`` and every process it started (torchrun's
    ranks, data workers): SIGTERM to its process group, SIGKILL to what is left after ``grace_s``."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    end = time.monotonic() + grace_s
    while time.monotonic() < end:
        proc.poll()  # reaps the leader, so that the group empties
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def stop_on_sigterm() -> None:
    """Turn SIGTERM (a time limit's ``timeout``) into a normal exit, so that the cleanups of
    :func:`launch` (and the callers' ``finally`` blocks) run and no child is left on the GPU."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


class LaunchTimeout(RuntimeError):
    """A launched script ran past its time limit (and was stopped)."""


def launch(args: list[str], timeout: Optional[float] = None) -> tuple[float, str]:
    """Run ``python ARGS`` from the repository root; (wall seconds, stdout); raise on failure, and
    :class:`LaunchTimeout` after ``timeout`` seconds (the run and what it started are stopped)."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    print("$", " ".join(args), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_group(proc)
        out, err = proc.communicate()
        raise LaunchTimeout(f"{args[0]} stopped after its {timeout:.0f} s limit:\n{out[-3000:]}\n{err[-5000:]}") from None
    finally:
        stop_group(proc)  # also when this process is being stopped (stop_on_sigterm)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{args[0]} failed ({proc.returncode}):\n{out[-3000:]}\n{err[-5000:]}")
    print(f"  {wall:.1f} s", flush=True)
    return wall, out


def run_entry(script: str, config: str, overrides: list[str], log_dir: Path,
              timeout: Optional[float] = None) -> tuple[float, list[dict]]:
    """One run of ``scripts/<script>`` logging every step to ``log_dir``: (wall seconds, records)."""
    wall, _ = launch([str(REPO / "scripts" / script), "--config", config, *overrides, f"logging.dir={log_dir}", *LOG],
                     timeout)
    return wall, [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


def train_records(records: list[dict], warmup: int = 0) -> list[dict]:
    """The training records after step ``warmup`` (all of them when none is later)."""
    train = [r for r in records if r.get("kind", "train") == "train"]
    return [r for r in train if r["step"] > warmup] or train
