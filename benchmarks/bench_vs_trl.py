r"""kdtrain vs TRL's GKDTrainer on the same node: same models, data, batch, precision and divergence.

    # CI / laptop: tiny Llama-style pair on CPU, every variant that runs there (~45 s on 2 cores)
    python benchmarks/bench_vs_trl.py --cpu-tiny --out /tmp/bench-trl-cpu

    # One H100, both pairs: ~1.2B -> ~150M Llama-style, vocab 32000, and Qwen2.5-1.5B ->
    # Qwen2.5-0.5B shapes, vocab 151936; seq 1024, 10 timed steps after 3 warm-up steps. The four
    # eager systems took ~6 min for both pairs (+30 s on a fresh machine, where the fused loss
    # kernel is first JIT-built, outside the timings); the two compiled variants add their runs and
    # compilation, so run one pair per call where a call is time-limited
    python benchmarks/bench_vs_trl.py --preset llama --preset qwen --out benchmarks/results/trl-h100
    python benchmarks/bench_vs_trl.py --preset llama --systems trl-gkd,kdtrain-colocated --out /tmp/x

    # Your own pair on your own node: two local Hugging Face model directories (their weights; the
    # same vocab_size in both config.json: TRL's GKD compares the two logit tables column by
    # column, so Qwen2.5-7B's 152064 rows cannot pair with 0.5B's 151936), the llama preset's steps
    # and learning rate, your sequence length and batch
    python benchmarks/bench_vs_trl.py --teacher-hf /models/Qwen2.5-3B --student-hf /models/Qwen2.5-0.5B \
        --seq-length 2048 --micro-batch 2 --global-batch 64 --out /tmp/mine      # -> bench_custom.json

What runs (each system in its own process, so its peak memory is its own):
  (a) trl-gkd                GKDTrainer, lmbda=0 (off-policy: word-level KD on the dataset tokens),
                             seq_kd=False, full-vocabulary generalized JSD with ``--beta``
  (b) trl-gkd-liger          the same with use_liger_kernel=True (Liger's RMSNorm/RoPE/SwiGLU kernels
                             patched into the student; TRL's JSD loss itself is unchanged); skipped
                             with the reason when liger_kernel is not importable or there is no GPU
  (c) kdtrain-colocated      kdtrain.training.distill: teacher and student on the same device(s)
  (d) kdtrain-disaggregated  teacher on rank 0, student on rank 1 (torchrun, 2 ranks): run on CPU
                             (two processes) and where more than one GPU exists, else skipped
  trl-gkd-compiled, kdtrain-colocated-compiled
                             (a) with torch_compile=True and (c) with precision.compile=true
                             (torch.compile of the student, and of kdtrain's teacher layers);
                             the first step compiles, inside the warm-up. Run by default on GPU,
                             not with --cpu-tiny (same numbers, minutes of C++ compilation)
  kdtrain-colocated-graphs   (c) with precision.cuda_graphs=true: the student's layers replayed as
                             CUDA graphs (kdtrain/models/cuda_graphs.py); GPU only
  kdtrain-colocated-graphs-compiled
                             both options: graphed student layers, compiled teacher layers; GPU only

Shared by all: the HF teacher/student (random init from HF configs built here, no downloads, saved
as safetensors; kdtrain imports them with ``kdtrain.convert``, so both frameworks start from the
same weights), the token windows (kdtrain's seeded mock dataset: uniform random ids; TRL gets the
same windows in the same order, step t = samples [t*G, (t+1)*G)), sequence length, micro-batch,
global batch (gradient accumulation on one device), precision (GPU: bf16 teacher, student with fp32
master weights under bf16 compute; CPU: fp32), AdamW (same lr, betas, eps, no weight decay, clip
1.0, constant lr), no dropout, no gradient checkpointing, generalized JSD with the same ``beta`` at
temperature 1. TRL's convention: M = beta*p_teacher + (1-beta)*q_student, JSD = beta*KL(p||M) +
(1-beta)*KL(q||M), beta=0 -> KL(p||q), beta=1 -> KL(q||p); kdtrain uses the same definition.

Losses: TRL's training loss is that JSD over the full vocabulary; kdtrain's is over its teacher's
top-k support (``--topk``, 64 by default) plus a tail bucket, so the two training losses are not the
same quantity. For a like-for-like figure every trained student (kdtrain's exported back to HF with
``kdtrain convert``'s export) is scored afterwards by one function: the full-vocabulary JSD against
the teacher on held-out windows (``eval_full_vocab_jsd``; ``eval_full_vocab_jsd_init`` = the
untrained student). A random-init teacher is nearly uniform (``teacher_eval`` gives its entropy
and the mass of its top-k: ~10 nats and ~2% at vocab 32000), so a top-k objective sees little of
it; ``--teacher-logit-scale 6`` sharpens the same random teacher to a trained model's peakedness
(~2.5-4 nats, top-64 mass ~0.8-0.95) without changing any compute. These figures show whether
both systems optimise the same objective, not model quality.

Files: this script (command line, orchestration, report, chart) and vs_trl_systems.py beside it
(model pairs, data, the common evaluation, each system's worker).

Reported per system: samples/s and tokens/s (mean step time over the steps after ``--warmup``;
TRL's step is timed from its on_step_begin to its on_step_end callback, which leaves out its data
loading and logging; kdtrain's is its own step timer, which leaves out its logging), MFU on GPU
((student training + teacher forward FLOPs per token) x tokens/s / (devices x bf16 peak)), peak
memory per device (``peak_memory_gib``: CUDA max allocated, on CPU the process's max RSS;
``peak_reserved_gib``: CUDA max reserved), losses per step, the common evaluation, the TRL
version and every flag; with ``--profile``, a torch.profiler summary of two extra steps per system
(kdtrain.training.profiling: the device's busy share of the step, kernels per step, kernel time by
category; kdtrain also writes its Chrome trace, TRL does not), which is where the "why" of a ratio
comes from. Memory is compared (speedups, chart, accept_report.py) by peak reserved on CUDA: a
CUDA-graphed student's graph pools stay reserved between replays, which max allocated misses.
Output: ``OUT/bench_<preset>.json``
and ``OUT/bench_<preset>.png`` per preset; models and checkpoints go to ``--work`` (default
``OUT/work``).

Under a time limit (run_h100.sh): ``--budget S`` ends the command within S seconds (each system's
``--timeout`` cut to what is left, a system with too little left skipped with the reason); the
report is rewritten after every system, and a system's row as soon as its training ends, before
kdtrain's export or either system's evaluation, so a run cut off then keeps its timings (its
``eval_status`` says why the score is missing). A worker runs in its own process group and is
stopped with everything it started (torchrun's ranks) on a timeout or when this command is
stopped. ``--systems 'A|B,...'`` runs B only when A fails or is skipped (the eager student after a
failed graphed one). kdtrain's end-of-run checkpoint, which only feeds the export, holds the
weights (and fp32 masters) without Adam's moments.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from entry_runs import stop_group, stop_on_sigterm  # noqa: E402
from vs_trl_systems import (CPU_SYSTEMS, MEMORY_COMPARED_NOTE, PRESETS, REPO, SYSTEMS, collect_kdtrain,  # noqa: E402
                            compared_memory, custom_preset, prebuild_kernel, prepare_models, run_kdtrain_rank,
                            run_trl, trained_row)

REPORT_MARGIN_S = 8.0  # --budget: what is kept back for the last report and the cleanup
MIN_SYSTEM_S = 20.0  # --budget: a system is not started with less time than this left


# ---- orchestration --------------------------------------------------------------------------------
def _run_worker(job_file: Path, system: str, timeout: float, nproc: int, log_path: Path,
                poll=None) -> tuple[int, str]:
    """Run one system in a child process (its own process group, ended with everything it started
    on a timeout or when this process is stopped); returns (exit code, the log's most telling
    tail). ``poll()`` is called about once a second while it runs; it returns True when it needs
    no more calls."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               TRL_EXPERIMENTAL_SILENCE="1")
    me = [str(Path(__file__).resolve()), "--worker", system, "--job", str(job_file)]
    if system.startswith("kdtrain"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *me]
    else:
        cmd = [sys.executable, *me]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        end, rc = time.monotonic() + timeout, None
        try:
            while True:
                try:
                    rc = proc.wait(timeout=max(0.05, min(1.0, end - time.monotonic())))
                    break
                except subprocess.TimeoutExpired:
                    pass
                if poll is not None and poll():
                    poll = None
                if time.monotonic() >= end:
                    rc = 124
                    break
        finally:  # also after a timeout, or when this process is stopped (SIGTERM: see main)
            stop_group(proc)  # what the worker left running (nothing, normally)
    text = log_path.read_text(errors="replace")
    at = text.find("Traceback (most recent call last)")  # the first child's error, not the launcher's
    tail = text[at:at + 3000] if at >= 0 else text[-3000:]
    return rc, (f"timed out after {timeout:.0f} s; " if rc == 124 else "") + f"log {log_path}:\n{tail}"


def skip_reason(system: str, job: dict, n_dev: int, force_disaggregated: bool):
    if system == "trl-gkd-liger":
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger_kernel is not importable (pip install liger-kernel)"
        if job["device"] != "cuda":
            return "Liger's Triton kernels need a GPU"
    if system.startswith("trl") and importlib.util.find_spec("trl") is None:
        return "trl is not importable"
    if "-graphs" in system and job["device"] != "cuda":
        return "CUDA graphs need a GPU"
    if system.endswith("-compiled"):
        import torch

        from kdtrain.models.compile import check_compile_support

        try:
            check_compile_support(torch.device(job["device"]), "torch.compile")
        except ValueError as e:
            return str(e)
    if system == "kdtrain-disaggregated" and job["device"] == "cuda" and n_dev < 2 and not force_disaggregated:
        return f"needs more than one GPU ({n_dev} visible): teacher and student each take a device"
    return None


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for pkg in ("trl", "transformers", "accelerate", "datasets", "liger-kernel", "megatron-core", "kdtrain"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [{**r, "memory_compared_gib": compared_memory(r)[0]} for r in result["results"] if r["status"] == "ok"]
    reserved = any(r.get("peak_reserved_gib") is not None for r in rows)
    panels = [("samples_per_s", "samples/s"), ("tokens_per_s", "tokens/s"), ("mfu", "MFU"),
              ("memory_compared_gib", "peak reserved / device (GiB)" if reserved else "peak memory / device (GiB)"),
              ("eval_full_vocab_jsd", f"full-vocab JSD after {result['settings']['steps']} steps")]
    panels = [p for p in panels if any(r[p[0]] is not None for r in rows)]
    if not rows or not panels:
        return
    colors = {"trl-gkd": "#888888", "trl-gkd-liger": "#bbbbbb", "trl-gkd-compiled": "#666666",
              "kdtrain-colocated": "#1f77b4", "kdtrain-colocated-compiled": "#17becf",
              "kdtrain-colocated-graphs": "#9467bd", "kdtrain-colocated-graphs-compiled": "#c5b0d5",
              "kdtrain-disaggregated": "#2ca02c"}
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        vals = [r[key] if r[key] is not None else 0.0 for r in rows]
        bars = ax.bar(range(len(rows)), vals, color=[colors[r["system"]] for r in rows])
        ax.set_xticks(range(len(rows)), [r["system"] for r in rows], rotation=25, ha="right", fontsize=8)
        ax.set_title(label, fontsize=9)
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.3g}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                        fontsize=7)
        if key == "eval_full_vocab_jsd":
            ax.axhline(result["eval_full_vocab_jsd_init"], color="k", ls=":", lw=1, label="untrained")
            ax.legend(fontsize=7)
    fig.suptitle(f"kdtrain vs TRL GKD: {result['preset']} on {result['device']} (kdtrain top-{result['settings']['topk']},"
                 f" JSD beta={result['settings']['beta']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def resolve_preset(name: str, args) -> dict:
    """The pair and shapes of preset ``name`` (``custom``: ``--teacher-hf``/``--student-hf`` with the
    shapes of ``--preset`` or its default), with the command line's shape overrides."""
    import torch

    if name == "custom":
        base = args.preset[0] if args.preset else ("llama" if torch.cuda.is_available() else "cpu-tiny")
        preset = custom_preset(args.teacher_hf, args.student_hf, PRESETS[base])
    else:
        preset = dict(PRESETS[name])
    for key in ("seq_length", "micro_batch", "global_batch"):
        if getattr(args, key) is not None:
            if getattr(args, key) < 1:
                raise ValueError(f"--{key.replace('_', '-')}: must be >= 1, got {getattr(args, key)}")
            preset[key] = getattr(args, key)
    if preset["global_batch"] % preset["micro_batch"]:
        raise ValueError(f"--global-batch {preset['global_batch']} is not a multiple of --micro-batch "
                         f"{preset['micro_batch']}")
    return preset


def run_preset(name: str, args, out: Path, work: Path, on_update=None) -> dict:
    """Prepare the pair, run every system, return the report. ``on_update(report)`` is called
    after each system with the report so far (``complete`` false until the last one), so a run
    killed by a time limit keeps the systems it finished."""
    import torch

    preset = resolve_preset(name, args)
    cuda = torch.cuda.is_available() and name != "cpu-tiny"
    steps = args.steps or preset["steps"]
    warmup = preset["warmup"] if args.warmup is None else args.warmup
    if not 0 <= warmup < steps:
        raise ValueError(f"--warmup {warmup} must be in [0, --steps {steps})")
    job = {"preset": name, "work": str(work / name), "seq_length": preset["seq_length"],
           "micro_batch": preset["micro_batch"], "global_batch": preset["global_batch"], "steps": steps,
           "warmup": warmup, "lr": preset["lr"], "weight_decay": 0.0, "adam_betas": [0.9, 0.95], "adam_eps": 1e-8,
           "clip_grad": 1.0, "beta": args.beta, "topk": args.topk, "teacher_logit_scale": args.teacher_logit_scale, "profile": args.profile, "seed": 1234, "data_seed": 4321,
           "vocab_size": preset["student"]["vocab_size"], "device": "cuda" if cuda else "cpu",
           "precision": "bf16" if cuda else "fp32", "eval_samples": 2 * preset["micro_batch"]}
    Path(job["work"]).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    prepare_models(job, preset)
    prep_s = time.perf_counter() - t0
    kernel = prebuild_kernel(job)
    job_file = Path(job["work"]) / "job.json"
    job_file.write_text(json.dumps(job, indent=1))
    n_dev = torch.cuda.device_count() if cuda else 1
    results: list[dict] = []
    report = {
        "preset": name, "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({os.cpu_count()} cores)",
        "num_devices": n_dev, "versions": _versions(),
        "settings": {k: v for k, v in job.items()
                     if not k.endswith(("_hf", "_ckpt", "_yaml")) and k not in ("work", "teacher_eval")
                     and not k.startswith("eval_")},
        "notes": {"divergence": f"generalized JSD, beta={args.beta}, temperature 1; TRL: full vocabulary; kdtrain: "
                                f"teacher top-{args.topk} support + tail bucket",
                  "eval_full_vocab_jsd": f"full-vocabulary JSD of the trained student vs the teacher on "
                                         f"{job['eval_samples']} held-out windows, same code for every system",
                  "trl_mode": "GKDTrainer lmbda=0 (off-policy), seq_kd=False; its compute_loss empties the CUDA "
                              "cache every micro-batch (as shipped)",
                  "timing": f"mean over steps {warmup + 1}..{steps}; TRL on_step_begin->on_step_end, kdtrain's step "
                            "timer; logging excluded in both",
                  "mfu": "(student training + teacher forward FLOPs/token) x tokens/s / (devices x bf16 peak)",
                  "peak_memory": "max over devices; peak_memory_gib: CUDA max allocated, or process max RSS on "
                                 "CPU; peak_reserved_gib: CUDA max reserved",
                  "peak_memory_compared": MEMORY_COMPARED_NOTE},
        "models": {role: {"hf_config": preset[role], "params": _num_params(job[f"{role}_yaml"]),
                          **({"dir": preset[f"{role}_dir"]} if preset.get(f"{role}_dir") else {})}
                   for role in ("teacher", "student")},
        "prepare_s": prep_s, "kernel": kernel, "eval_full_vocab_jsd_init": job["eval_full_vocab_jsd_init"],
        "teacher_eval": job["teacher_eval"],
        "results": results, "speedups": {}, "complete": False, "created": None,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    systems = args.systems or (SYSTEMS if cuda else CPU_SYSTEMS)

    def publish(rows: list[dict], complete: bool) -> None:
        report.update(results=rows, speedups=_speedups(rows), complete=complete,
                      created=time.strftime("%Y-%m-%dT%H:%M:%S"))
        if on_update is not None:
            on_update(report)

    for i, entry in enumerate(systems):
        # "A|B": B runs only when A did not end with a row (failed or skipped), e.g. the eager
        # student when the graphed one fails; every attempt keeps its row.
        for system in entry.split("|"):
            row = _run_system(system, job, job_file, n_dev, args, name,
                              on_trained=lambda r: publish([*results, r], False))
            results.append(row)
            publish(list(results), False)
            if row["status"] == "ok":
                break
        publish(results, i == len(systems) - 1)
    return report


RESULT_KEYS = ("samples_per_s", "tokens_per_s", "mfu", "step_time_s", "peak_memory_gib", "first_loss", "final_loss",
               "eval_full_vocab_jsd")


def _run_system(system: str, job: dict, job_file: Path, n_dev: int, args, name: str, on_trained=None) -> dict:
    """One system's result row (status ok / skipped / failed with the reason). ``on_trained(row)``
    gets the row as soon as the system's training has finished (its evaluation pending), so that
    a report written then keeps the timings if the run is cut off later."""
    res = {"system": system, "status": "ok", "reason": None}
    reason = skip_reason(system, job, n_dev, args.force_disaggregated)
    left = None if args.deadline is None else args.deadline - time.monotonic() - REPORT_MARGIN_S
    if not reason and left is not None and left < MIN_SYSTEM_S:
        reason = f"no time left: {max(left, 0.0):.0f} s of --budget {args.budget:.0f} s remained"
    if reason:
        res.update(status="skipped", reason=reason)
    else:
        nproc = 2 if system == "kdtrain-disaggregated" else 1
        if system.startswith("kdtrain"):
            shutil.rmtree(Path(job["work"]) / system, ignore_errors=True)  # a stale checkpoint would resume
            (Path(job["work"]) / system).mkdir(parents=True)
        else:
            for stale in (f"{system}.json", f"{system}.trained.json"):
                (Path(job["work"]) / stale).unlink(missing_ok=True)
        timeout = args.timeout if left is None else min(args.timeout, left)
        pending: list[dict] = []

        def poll() -> bool:
            row = trained_row(job, system, nproc)
            if row is None:
                return False
            pending.append({**res, **row, "eval_status": "pending (export and evaluation running)"})
            if on_trained is not None:
                on_trained(_complete_row(dict(pending[-1])))
            return True

        t1 = time.perf_counter()
        rc, log = _run_worker(job_file, system, timeout, nproc, Path(job["work"]) / f"{system}.log", poll)
        res["process_wall_s"] = time.perf_counter() - t1
        print(f"[{name}] {system}: exit {rc} after {res['process_wall_s']:.1f} s", flush=True)
        try:
            if rc != 0:
                raise RuntimeError(f"exit code {rc}")
            if system.startswith("kdtrain"):
                res.update(collect_kdtrain(job, system.removeprefix("kdtrain-"), nproc))
            else:
                res.update(json.loads((Path(job["work"]) / f"{system}.json").read_text()))
            res["eval_status"] = "done"
        except (RuntimeError, OSError, KeyError, IndexError, ValueError) as e:
            trained = pending[-1] if pending else trained_row(job, system, nproc)
            if trained is not None:  # trained and timed; the export or evaluation did not finish
                res.update({**trained, "process_wall_s": res["process_wall_s"],
                            "eval_status": f"not finished: {e}; {log}"})
            else:
                res.update(status="failed", reason=f"{e}; {log}")
    return _complete_row(res)


def _complete_row(res: dict) -> dict:
    for k in RESULT_KEYS:
        res.setdefault(k, None)
    return res


def _speedups(results: list[dict]) -> dict:
    """kdtrain / TRL ratios of samples/s and of peak memory (the compared figure: peak reserved on
    CUDA, see vs_trl_systems.MEMORY_COMPARED_NOTE), for every pair that ran."""
    by = {r["system"]: r for r in results if r["status"] == "ok"}
    return {f"{ours}/{base}": {"samples_per_s": by[ours]["samples_per_s"] / by[base]["samples_per_s"],
                               "peak_memory": compared_memory(by[ours])[0] / compared_memory(by[base])[0]}
            for base in ("trl-gkd", "trl-gkd-liger", "trl-gkd-compiled")
            for ours in ("kdtrain-colocated", "kdtrain-colocated-compiled", "kdtrain-colocated-graphs",
                         "kdtrain-colocated-graphs-compiled",
                         "kdtrain-disaggregated")
            if base in by and ours in by}


def _write_atomic(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file, so a reader (or a process killed mid-write) never
    sees half a report."""
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text)
    tmp.replace(path)


def _num_params(yaml_path: str) -> int:
    from kdtrain.config import load_model_config

    return load_model_config(yaml_path).num_params()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", action="append", choices=sorted(PRESETS),
                    help="model pair; repeat for several (default: llama and qwen on GPU, cpu-tiny on CPU)")
    ap.add_argument("--cpu-tiny", action="store_true", help="tiny models on CPU, every variant that runs there")
    ap.add_argument("--out", help="results directory (bench_<preset>.json / .png); required")
    ap.add_argument("--work", default=None, help="models, checkpoints, run logs (default OUT/work)")
    ap.add_argument("--teacher-hf", default=None, help="your own teacher: a local Hugging Face model directory "
                                                       "(with --student-hf; report bench_custom.json)")
    ap.add_argument("--student-hf", default=None, help="your own student: a local Hugging Face model directory")
    ap.add_argument("--seq-length", type=int, default=None, help="tokens per sample (default: the preset's)")
    ap.add_argument("--micro-batch", type=int, default=None, help="samples per micro-batch (default: the preset's)")
    ap.add_argument("--global-batch", type=int, default=None, help="samples per step (default: the preset's)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per system (default: the preset's)")
    ap.add_argument("--warmup", type=int, default=None, help="steps left out of the timing (default: the preset's)")
    ap.add_argument("--beta", type=float, default=0.5, help="generalized JSD beta (every system)")
    ap.add_argument("--topk", type=int, default=64, help="kdtrain teacher top-k (its default)")
    ap.add_argument("--teacher-logit-scale", type=float, default=1.0,
                    help="multiply the random teacher's logits (its final-norm weight) by this; 6 gives a trained "
                         "model's peakedness (~3 nats, top-64 mass ~0.9). Same teacher for every system")
    ap.add_argument("--systems", default=None, help=f"comma list out of {SYSTEMS} (default: all of them on GPU, "
                                                    f"{CPU_SYSTEMS} on CPU); 'A|B' runs B only when A fails or "
                                                    "is skipped (e.g. kdtrain-colocated-graphs|kdtrain-colocated)")
    ap.add_argument("--profile", action="store_true",
                    help="every system runs 2 more steps under torch.profiler (left out of the timing); the "
                         "summary (device-busy share, kernels, time by category) goes into the report")
    ap.add_argument("--force-disaggregated", action="store_true", help="run (d) on one GPU too (2 ranks share it)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per system")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for this whole command (run_h100.sh: its stage's time limit less a margin): each "
                         "system's --timeout is cut to what is left, and one is skipped with the reason when too "
                         "little is, so the report holds whatever finished in time")
    ap.add_argument("--keep-work", action="store_true",
                    help="keep the models and exported students in --work (default: delete them, keep the logs)")
    ap.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:  # child process: one system
        job = json.loads(Path(args.job).read_text())
        if args.worker.startswith("kdtrain"):
            run_kdtrain_rank(job, args.worker.removeprefix("kdtrain-"))
        else:
            def trained(res, path=Path(job["work"]) / f"{args.worker}.trained.json"):
                _write_atomic(path, json.dumps(res, default=str))

            res = run_trl(job, liger=args.worker == "trl-gkd-liger", compile=args.worker == "trl-gkd-compiled",
                          on_trained=trained)
            _write_atomic(Path(job["work"]) / f"{args.worker}.json", json.dumps(res, default=str))
        return 0

    import torch

    # A time limit's SIGTERM (run_h100.sh's `timeout`) ends this process through Python's exit path,
    # so _run_worker's cleanup stops the running worker's process group (a group of its own, which
    # the limit's signal does not reach) instead of leaving it on the GPU.
    stop_on_sigterm()
    args.deadline = None if args.budget is None else time.monotonic() + args.budget

    if not args.out:
        ap.error("--out is required")
    if not 0.0 <= args.beta <= 1.0:
        raise ValueError(f"--beta {args.beta}: must be in [0, 1]")
    args.systems = [s.strip() for s in (args.systems or "").split(",") if s.strip()]
    bad = [s for entry in args.systems for s in entry.split("|") if s not in SYSTEMS]
    if bad:
        raise ValueError(f"--systems: {bad} not in {SYSTEMS}")
    if (args.teacher_hf is None) != (args.student_hf is None):
        ap.error("--teacher-hf and --student-hf go together")
    if args.teacher_hf is not None:
        if args.teacher_logit_scale != 1.0:
            ap.error("--teacher-logit-scale rescales a random teacher; your own teacher is used as it is")
        if args.cpu_tiny or (args.preset and len(args.preset) > 1):
            ap.error("with --teacher-hf/--student-hf, at most one --preset (whose steps and lr are used)")
        presets = ["custom"]
    else:
        presets = args.preset or []
        if args.cpu_tiny:
            presets = [*presets, "cpu-tiny"]
        presets = list(dict.fromkeys(presets or (["llama", "qwen"] if torch.cuda.is_available() else ["cpu-tiny"])))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work).resolve() if args.work else out / "work"
    ok = True
    for name in presets:
        json_path = out / f"bench_{name}.json"

        def write(report, json_path=json_path, name=name):
            _write_atomic(json_path, json.dumps(report, indent=1, default=str))
            plot(report, out / f"bench_{name}.png")

        result = run_preset(name, args, out, work, on_update=write)
        for r in result["results"]:
            if r["status"] == "ok":
                jsd = r["eval_full_vocab_jsd"]
                print(f"[{name}] {r['system']:22s} {r['samples_per_s']:9.2f} samples/s {r['tokens_per_s']:11.1f} tokens/s"
                      f"  mfu {r['mfu'] or 0:.3f}  peak {r['peak_memory_gib']:.2f} GiB"
                      f" (compared: {compared_memory(r)[0]:.2f})  loss {r['final_loss']:.4g}"
                      f"  eval JSD {'not measured' if jsd is None else format(jsd, '.4g')}")
            else:
                print(f"[{name}] {r['system']:22s} {r['status']}: {((r['reason'] or '').splitlines() or [''])[0]}")
        print(f"[{name}] speedups {json.dumps(result['speedups'])}\nwrote {json_path}", flush=True)
        ok &= all(r["status"] != "failed" for r in result["results"])
        if not args.keep_work:  # gigabytes of safetensors and checkpoints; the logs stay
            for heavy in ("models", "trl", "trl-liger", "trl-compiled", *(f"{s}/hf_student" for s in SYSTEMS)):
                shutil.rmtree(work / name / heavy, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as e:  # bad arguments or models: one line naming the culprit
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
