"""``logging.profile_steps: [first, last]``: torch.profiler over a window of training steps.

Every rank records the steps ``first..last`` (1-based, as logged) and writes, under
``<logging.dir>/profile/``:

* ``rank<R>_summary.json``: per step, the wall time, the device's busy time (sum of kernel
  durations) and kernel count, and the busy time by category (matmul, attention, KD loss, top-k,
  communication, optimizer, other = norms, rotary, activations, copies, reductions); the top
  operators/kernels by self time. On CPU there are no kernels: the categories sum the operators'
  self CPU time instead. What bounds a step reads off it: a device busy for a small share of the
  wall time is waiting on the host (kernel launches, Python), a busy device with a large "other"
  share is memory-bound outside the GEMMs.
* ``rank<R>_ops.txt``: torch's operator table (self device time on GPU, self CPU time on CPU).
* ``rank<R>_trace.json.gz``: the Chrome/Perfetto trace (open in ui.perfetto.dev).

The same summary is used for other systems' steps (benchmarks/vs_trl_systems.py profiles TRL's).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch

# First match wins; names of CUDA kernels and of aten/c10d operators (lower case).
CATEGORIES = (
    ("kd_loss", ("kd_loss", "kdtrain")),
    ("attention", ("flash", "fmha", "scaled_dot_product", "attention", "sdpa")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "aten::mm", "aten::addmm", "aten::bmm",
                "aten::matmul", "aten::linear", "_scaled_mm")),
    ("topk", ("topk", "radix", "sort")),
    ("communication", ("nccl", "gloo", "all_reduce", "allreduce", "all_gather", "reduce_scatter", "broadcast",
                       "c10d", "send", "recv")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
)


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def _is_device(evt) -> bool:
    return getattr(evt, "device_type", None) == torch.autograd.DeviceType.CUDA


def summarize(prof, steps: int, wall_s: float, top: int = 25) -> dict:
    """Per-step figures of a finished ``torch.profiler.profile`` over ``steps`` steps."""
    events = list(prof.events())
    kernels = [e for e in events if _is_device(e)]
    by_cat: dict[str, float] = {}
    per_name: dict[str, list] = {}
    if kernels:
        for e in kernels:
            dur = e.time_range.elapsed_us() * 1e-6
            by_cat[category(e.name)] = by_cat.get(category(e.name), 0.0) + dur
            rec = per_name.setdefault(e.name, [0, 0.0])
            rec[0] += 1
            rec[1] += dur
        busy = sum(by_cat.values())
    else:  # CPU: self time of the operators (leaf work, no double counting of parents)
        for a in prof.key_averages():
            if a.key.startswith("ProfilerStep") or a.self_cpu_time_total <= 0:
                continue
            dur = a.self_cpu_time_total * 1e-6
            by_cat[category(a.key)] = by_cat.get(category(a.key), 0.0) + dur
            per_name[a.key] = [a.count, dur]
        busy = None
        op_time = sum(by_cat.values())
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:top]
    out = {
        "device": "cuda" if kernels else "cpu",
        "steps": steps,
        "wall_s_per_step": wall_s / steps,
        "by_category_s_per_step": {k: v / steps for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "top": [{"name": n[:160], "count": c, "self_s": s, "category": category(n)} for n, (c, s) in ranked],
    }
    if kernels:
        out["kernels_per_step"] = len(kernels) / steps
        out["device_busy_s_per_step"] = busy / steps
        out["device_busy_fraction"] = busy / wall_s if wall_s > 0 else None
    else:  # the rest of the wall time is Python and framework overhead (and the profiler's own)
        out["op_time_s_per_step"] = op_time / steps
        out["op_time_fraction"] = op_time / wall_s if wall_s > 0 else None
    return out


def write_profile(prof, out_dir: Path, tag: str, steps: int, wall_s: float, trace: bool = True) -> dict:
    """Summary JSON, operator table and (``trace``) gzipped Chrome trace of ``prof`` under
    ``out_dir``; the trace's export takes seconds."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(prof, steps, wall_s)
    (out_dir / f"{tag}_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    sort_by = "self_cuda_time_total" if summary["device"] == "cuda" else "self_cpu_time_total"
    (out_dir / f"{tag}_ops.txt").write_text(prof.key_averages().table(sort_by=sort_by, row_limit=60))
    if not trace:
        return summary
    raw = out_dir / f"{tag}_trace.json"
    prof.export_chrome_trace(str(raw))
    with open(raw, "rb") as src, gzip.open(f"{raw}.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.remove(raw)
    return summary


def read_profiles(log_dir) -> dict:
    """{rank: summary} written under ``log_dir/profile`` (empty when nothing was profiled)."""
    return {int(p.name.split("_")[0].removeprefix("rank")): json.loads(p.read_text())
            for p in sorted((Path(log_dir) / "profile").glob("rank*_summary.json"))}


class StepProfiler:
    """Records steps ``first..last`` (1-based) of a training loop:

        prof = StepProfiler(cfg.logging.profile_steps, cfg.logging.dir, rank, device)
        while step < train_steps:
            prof.begin(step + 1)
            ...  # the step
            step += 1
            prof.end(step, stopping=job_ends_here)

    A job that resumes inside the window records from its first step; one that stops inside it
    (``stopping``) writes the steps it recorded.

    ``settle``: waits for the communication this rank started in the window that gloo runs in its
    own threads and that outlives the step (the stop requests' reductions, a disaggregated
    teacher's sends and statistics, run ahead of the students), called before the recording
    stops. torch's profiler follows such work into those threads; work that ends after the
    recording stopped corrupts the profiler's memory, and the process dies later (at exit: SIGSEGV
    or "free(): invalid pointer", most runs of a disaggregated CPU run before this wait).
    """

    def __init__(self, window: Optional[tuple[int, int]], log_dir: str, rank: int, device: torch.device,
                 trace: bool = True, settle: Optional[Callable[[], None]] = None):
        self.window, self.rank, self.device, self.trace, self.settle = window, rank, device, trace, settle
        self.out_dir = Path(log_dir) / "profile"
        self._prof = None
        self._t0 = 0.0
        self._first = 0  # the first recorded step
        self._started = False

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def begin(self, step: int) -> None:
        if self.window is None or self._started or not self.window[0] <= step <= self.window[1]:
            return
        self._started, self._first = True, step
        acts = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        self._sync()
        self._prof = torch.profiler.profile(activities=acts, record_shapes=False, with_stack=False)
        self._prof.__enter__()
        self._t0 = time.perf_counter()

    def end(self, step: int, stopping: bool = False) -> Optional[dict]:
        """After ``step``: writes the recording (steps first recorded..step) at the window's last
        step, or earlier when the job is ``stopping``; else None."""
        if self._prof is None or (step != self.window[1] and not stopping):
            return None
        if self.settle is not None:
            self.settle()
        self._sync()
        wall = time.perf_counter() - self._t0
        self._prof.__exit__(None, None, None)
        prof, self._prof = self._prof, None
        return write_profile(prof, self.out_dir, f"rank{self.rank}", step - self._first + 1, wall, self.trace)

    def close(self) -> None:
        """Stop a recording the job left running (it raised inside the window); nothing is written."""
        if self._prof is not None:
            prof, self._prof = self._prof, None
            prof.__exit__(None, None, None)
