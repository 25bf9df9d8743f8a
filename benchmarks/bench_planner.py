r"""Planner vs measurement: colocated teacher+student steps on one device, predicted and measured.

One command on the GPU host (an H100: about 3 minutes, the first KD-loss kernel build included):

    python benchmarks/bench_planner.py --out benchmarks/results/planner-h100

It (1) calibrates the device the way ``kdtrain calibrate`` does (achieved bf16 GEMM rate, copy
bandwidth; a student-only training step of ``--calibrate-model`` fits the memory-bound traffic per
activation element and one of ``--small-model`` the host's launch time per layer) and writes
``DIR/profile.json``; (2) for each teacher:student pair runs what a
colocated kdtrain step runs on one rank (kdtrain's GPTModel builder, bf16, mock tokens: the lean
teacher's forwards and vocab-parallel top-k payloads for every micro-batch, then the student's
1F1B step with the top-k KD loss, gradient buffer and AdamW) and times it, and measures the
student's activation peak in a separate forward/backward (CUDA: peak allocated minus the bytes
held before it), then one on-policy sampling call of the student over the step's rows (every
position after the first half of each window; models/generate.py) and its memory peak; (3) asks
the planner for the same step (``evaluate_colocated`` on a world of one) and the same sampling
call (``timing.sampling_time``, ``memory.sampling_bytes``) with the calibrated and with the
built-in profile, and writes ``DIR/planner_bench.json`` and ``DIR/planner_bench.md``.

CPU smoke (tiny models, fp32, a few seconds; what the tests run):

    python benchmarks/bench_planner.py --cpu-tiny --out /tmp/planner-cpu

After a change to the planner's models, re-predict stored measurements without a GPU (same
calibrated profile, same measured times and peaks; only the prediction columns change):

    python benchmarks/bench_planner.py --rescore benchmarks/results/planner-h100/planner_bench.json \
        --out benchmarks/results/planner-h100
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kdtrain.config import OptimizerConfig, load_model_config
from kdtrain.loss import KDLossConfig, _ext, kd_loss
from kdtrain.models import build_gpt
from kdtrain.parallel import RoleLayout, build_role_groups, init_distributed, shutdown_distributed
from kdtrain.planner.calibrate import calibrate
from kdtrain.models.generate import sample_replies
from kdtrain.planner.memory import GiB, ModelShape, sampling_bytes, student_stage_memory
from kdtrain.planner.profiles import HardwareProfile, get_profile, load_profile
from kdtrain.planner.problem import Layout
from kdtrain.planner.search import evaluate_colocated, make_problem
from kdtrain.planner.timing import sampling_time
from kdtrain.stream import vocab_parallel_topk
from kdtrain.training.batches import make_microbatch
from kdtrain.training.pretrain import build_trainable
from kdtrain.training.step import global_token_count, train_step

GPU_PAIRS = "llama-1.2b-32k:llama-150m-32k,llama-3.1-8b:llama-3.2-1b,qwen2.5-7b:qwen2.5-0.5b"
# Pairs, step shape, timed steps; the calibration's device-bound model and host-bound small model.
GPU_DEFAULTS = dict(pairs=GPU_PAIRS, seq_len=1024, micro_batch=4, microbatches=4, steps=5,
                    calibrate_model="llama-1.2b-32k", calibrate_seq_len=1024, calibrate_micro_batch=4,
                    small_model="llama-150m-32k", small_seq_len=512, small_micro_batch=2, iters=5)
CPU_TINY = dict(pairs="tiny:tiny", seq_len=32, micro_batch=2, microbatches=2, steps=2,
                calibrate_model="tiny", calibrate_seq_len=32, calibrate_micro_batch=2,
                small_model="tiny", small_seq_len=8, small_micro_batch=1, iters=2)


class ColocatedStep:
    """One rank's colocated step: teacher forwards + top-k for every micro-batch, then the
    student's train step consuming the payloads in order."""

    def __init__(self, tname: str, sname: str, seq: int, mb: int, n_mb: int, topk: int, device, dtype):
        self.tcfg, self.scfg = load_model_config(tname), load_model_config(sname)
        if self.tcfg.vocab_size != self.scfg.vocab_size:
            raise ValueError(f"--pairs: {tname} and {sname} have different vocabularies")
        self.t_groups = build_role_groups(RoleLayout("teacher", 0, 1, 1, 1))
        self.s_groups = build_role_groups(RoleLayout("student", 0, 1, 1, 1))
        self.teacher = build_gpt(self.tcfg, self.t_groups, device=device, dtype=dtype, seed=2).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.student = build_trainable(self.scfg, self.s_groups, OptimizerConfig(), seq, mb, device, dtype, seed=1)
        rng = np.random.default_rng(0)
        self.mbs = [make_microbatch(rng.integers(0, self.scfg.vocab_size, size=(mb, seq + 1)), device)
                    for _ in range(n_mb)]
        self.topk, self.device, self.loss_cfg = topk, device, KDLossConfig()
        self.cuda = device.type == "cuda"
        self.queue: list = []

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def teacher_phase(self) -> None:
        self.queue = []
        for m in self.mbs:
            logits = self.teacher(m.tokens, m.position_ids, None)
            self.queue.append(vocab_parallel_topk(logits, self.topk, self.tcfg.vocab_size, None))
            del logits

    def forward_step(self, model, m):
        out = model(m.tokens, m.position_ids, None)

        def loss_func(logits_SBVl, total_tokens):
            ids, values, lse = self.queue.pop(0)
            loss, rep = kd_loss(logits_SBVl, ids, values, vocab_size=self.scfg.vocab_size, config=self.loss_cfg,
                                num_tokens=total_tokens, teacher_tail_lse_SB=lse)
            return loss, m.loss_mask.sum(), {"tokens": rep["tokens"]}
        return out, loss_func

    def student_phase(self) -> None:
        s = self.student
        train_step(s.schedule, self.forward_step, self.mbs, s.grads, s.optimizer, self.s_groups, 1e-5, 1.0,
                   self.scfg.tie_embeddings, ("tokens",))

    def timed(self, steps: int) -> dict:
        """Median seconds of the whole step and of each phase over ``steps`` steps (after a
        warm-up step that builds kernels and allocates the Adam state)."""
        self.teacher_phase()
        self.student_phase()
        self.sync()
        rows = []
        for _ in range(steps):
            t0 = time.perf_counter()
            self.teacher_phase()
            self.sync()
            t1 = time.perf_counter()
            self.student_phase()
            self.sync()
            rows.append((time.perf_counter() - t0, t1 - t0, time.perf_counter() - t1))
        med = [sorted(col)[len(col) // 2] for col in zip(*rows)]
        return {"step_s": med[0], "teacher_s": med[1], "student_s": med[2]}

    def sampling(self, steps: int) -> dict:
        """Median seconds of one sampling call of the student over every row of the step (the
        windows' second halves sampled), after an untimed call, and its peak bytes above what was
        held before it (NaN off CUDA)."""
        windows = torch.cat([torch.cat([m.tokens, m.labels[:, -1:]], dim=1) for m in self.mbs])
        rows, length = windows.shape
        spans = [[(length // 2, length)]] * rows
        model = self.student.model

        def call():
            sample_replies(model, windows, spans, vocab_size=self.scfg.vocab_size, temperature=1.0, seed=0,
                           sample_ids=range(rows))
        call()
        self.sync()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            call()
            self.sync()
            times.append(time.perf_counter() - t0)
        peak = float("nan")
        if self.cuda:
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            call()
            self.sync()
            peak = float(torch.cuda.max_memory_allocated(self.device) - before)
        return {"sample_s": sorted(times)[len(times) // 2], "sample_bytes": peak, "rows": rows,
                "prompt": length // 2}

    def activation_peak(self) -> float:
        """Peak bytes allocated during the student's forward/backward above what it held before
        (weights, gradient buffer, Adam state, payloads); NaN off CUDA."""
        if not self.cuda:
            return float("nan")
        self.teacher_phase()
        s = self.student
        total = global_token_count(self.mbs, self.s_groups, self.device)
        s.grads.zero()
        self.sync()
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        s.schedule.forward_backward(self.forward_step, self.mbs, total)
        self.sync()
        return float(torch.cuda.max_memory_allocated(self.device) - before)


def predict(profile, tname: str, sname: str, seq: int, mb: int, n_mb: int, topk: int, d: int) -> dict:
    prob = make_problem(load_model_config(tname), load_model_config(sname), 1, 1, seq, mb * n_mb, topk, profile,
                        dtype_bytes=d, micro_batches=(mb,))
    plan = evaluate_colocated(prob, Layout(1, 1, 1), Layout(1, 1, 1), mb, False)
    return {"step_s": plan.step_time, "teacher_s": plan.times["teacher"], "student_s": plan.times["student"],
            "fits": plan.fits, "bottleneck": plan.bottleneck}


def score(row: dict, profile, builtin, d: int) -> dict:
    """Fill a row's predictions (calibrated and built-in profile, student activations, sampling)
    and errors."""
    shape = (row["seq_len"], row["micro_batch"], row["microbatches"], row["topk"], d)
    meas = row["measured"]
    pc, pb = predict(profile, row["teacher"], row["student"], *shape), predict(builtin, row["teacher"],
                                                                               row["student"], *shape)
    student = ModelShape.of(load_model_config(row["student"]))
    act = student_stage_memory(student, 1, 1, 1, 0, row["seq_len"], row["micro_batch"], row["microbatches"],
                               d=d).activations
    out = {**row, "predicted_calibrated": pc, "predicted_builtin": pb, "predicted_activation_bytes": act,
           "error_calibrated": _err(pc["step_s"], meas["step_s"]), "error_builtin": _err(pb["step_s"], meas["step_s"]),
           "error_activation": _err(act, meas["activation_bytes"])}
    if "sample_s" in meas:  # rows stored before sampling was measured have none
        rows, prompt = meas["rows"], meas["prompt"]
        sc, sb = (sampling_time(student, 1, 1, row["seq_len"], rows, 1, prompt, p, d) for p in (profile, builtin))
        nbytes = sampling_bytes(student, 1, 1, 0, row["seq_len"], rows, prompt, d)
        out.update(predicted_sample_s_calibrated=sc, predicted_sample_s_builtin=sb, predicted_sample_bytes=nbytes,
                   error_sample_calibrated=_err(sc, meas["sample_s"]), error_sample_builtin=_err(sb, meas["sample_s"]),
                   error_sample_bytes=_err(nbytes, meas["sample_bytes"]))
    return out


def rescore(path: str, out: Path) -> dict:
    """Re-predict a stored benchmark's measurements with the current planner."""
    result = json.loads(Path(path).read_text())
    profile = HardwareProfile(**result["profile"])
    builtin = get_profile(result["builtin_profile"])
    d = 2 if result["dtype"] == "bfloat16" else 4
    result["rows"] = [score(row, profile, builtin, d) for row in result["rows"]]
    result["rescored"] = datetime.date.today().isoformat()
    return result


def _err(pred: float, meas: float) -> float:
    return (pred - meas) / meas if meas == meas and meas > 0 else float("nan")


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:+.0f}%"


def markdown(result: dict) -> str:
    cal = result["calibration"]
    lines = [
        f"# Planner: predicted vs measured colocated step ({result['device']})", "",
        f"{result['date']}, torch {result['torch']}, {result['dtype']}; KD loss kernels: {result['kd_loss']}.", "",
        f"Command: `{result['command']}`" + (f"; predictions recomputed on {result['rescored']} with `--rescore`"
                                            if result.get("rescored") else "") + ".", "",
        *([result["note"], ""] if result.get("note") else []),
        f"Calibration: GEMM {cal['matmul_tflops']:.1f} TFLOP/s, copy {cal['copy_gbps']:.0f} GB/s; training step of "
        f"{cal['model']} (seq {cal['seq_len']} x mb {cal['micro_batch']}) {1e3 * cal['step_time_s']:.1f} ms -> "
        f"{cal['elementwise_bytes']:.1f} B per activation element; of {cal.get('small_model', '-')} "
        f"{1e3 * cal.get('small_step_time_s', float('nan')):.1f} ms -> host {1e3 * cal['layer_overhead_s']:.2f} ms "
        "per layer pass. The pairs below are not part of the fit.", "",
        "Step = teacher forwards + top-k of every micro-batch, then the student's step (1F1B forward/backward "
        "with the top-k KD loss, gradient clipping, AdamW). Predicted with the calibrated profile and with the "
        f"built-in `{result['builtin_profile']}` profile.", "",
        "| teacher -> student | seq x mb x M | measured step ms (teacher + student) | predicted ms, calibrated "
        "(teacher + student) | error | predicted ms, built-in | error | measured act GiB | predicted act GiB "
        "| error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        m, pc, pb = r["measured"], r["predicted_calibrated"], r["predicted_builtin"]
        act = "n/a" if m["activation_bytes"] != m["activation_bytes"] else f"{m['activation_bytes'] / GiB:.2f}"
        lines.append(
            f"| {r['teacher']} -> {r['student']} | {r['seq_len']} x {r['micro_batch']} x {r['microbatches']} | "
            f"{1e3 * m['step_s']:.1f} ({1e3 * m['teacher_s']:.1f} + {1e3 * m['student_s']:.1f}) | "
            f"{1e3 * pc['step_s']:.1f} ({1e3 * pc['teacher_s']:.1f} + {1e3 * pc['student_s']:.1f}) | "
            f"{_pct(r['error_calibrated'])} | {1e3 * pb['step_s']:.1f} | {_pct(r['error_builtin'])} | {act} | "
            f"{r['predicted_activation_bytes'] / GiB:.2f} | {_pct(r['error_activation'])} |")
    sampled = [r for r in result["rows"] if "predicted_sample_s_calibrated" in r]
    if sampled:
        decode = (f"; host time of a decode forward: {1e3 * cal['decode_layer_s']:.2f} ms per layer + "
                  f"{1e3 * cal['decode_token_s']:.2f} ms, fitted to sampling calls of {cal['small_model']} "
                  f"({1e3 * cal['decode_s']:.1f} ms) and of it cut to one layer "
                  f"({1e3 * cal['decode_one_layer_s']:.1f} ms)"
                  if "decode_s" in cal else "")
        lines += ["", "On-policy sampling: one call of the student over the step's rows (micro-batch x M), every "
                  f"position after the first half of each window sampled{decode}.", "",
                  "| student | rows x window | measured ms | predicted ms, calibrated | error | predicted ms, built-in "
                  "| error | measured GiB | predicted GiB | error |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sampled:
            m = r["measured"]
            nb = "n/a" if m["sample_bytes"] != m["sample_bytes"] else f"{m['sample_bytes'] / GiB:.3f}"
            lines.append(
                f"| {r['student']} | {m['rows']} x {r['seq_len'] + 1} | {1e3 * m['sample_s']:.1f} | "
                f"{1e3 * r['predicted_sample_s_calibrated']:.1f} | {_pct(r['error_sample_calibrated'])} | "
                f"{1e3 * r['predicted_sample_s_builtin']:.1f} | {_pct(r['error_sample_builtin'])} | {nb} | "
                f"{r['predicted_sample_bytes'] / GiB:.3f} | {_pct(r['error_sample_bytes'])} |")
    return "\n".join(lines) + "\n"


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for profile.json, planner_bench.json/.md")
    ap.add_argument("--rescore", default=None, help="a planner_bench.json: re-predict its measurements, measure nothing")
    ap.add_argument("--cpu-tiny", action="store_true", help="CPU, fp32, tiny models: a smoke run in seconds")
    ap.add_argument("--pairs", default=None, help=f"teacher:student,... (default: {GPU_PAIRS})")
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--microbatches", type=int, default=None, help="micro-batches per step")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per pair (median reported)")
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--calibrate-model", default=None)
    ap.add_argument("--calibrate-seq-len", type=int, default=None)
    ap.add_argument("--calibrate-micro-batch", type=int, default=None)
    ap.add_argument("--small-model", default=None, help="calibration model bound by kernel launches")
    ap.add_argument("--small-seq-len", type=int, default=None)
    ap.add_argument("--small-micro-batch", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None, help="calibration repetitions")
    ap.add_argument("--profile", default=None, help="skip calibration: use this profile JSON instead")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = ap.parse_args(argv)
    defaults = CPU_TINY if args.cpu_tiny else GPU_DEFAULTS
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.cpu_tiny:
        args.device = "cpu"
    for flag in ("seq_len", "micro_batch", "microbatches", "steps", "iters"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')}: must be >= 1")
    return args


def write(result: dict, out: Path) -> None:
    (out / "planner_bench.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    table = markdown(result)
    (out / "planner_bench.md").write_text(table)
    print(table)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.rescore:
        write(rescore(args.rescore, out), out)
        return 0
    started_here = not torch.distributed.is_initialized()
    env = init_distributed(args.device)
    try:
        cuda = env.device.type == "cuda"
        dtype, d = (torch.bfloat16, 2) if cuda else (torch.float32, 4)
        builtin = get_profile("h100-80gb" if cuda else "cpu")
        if args.profile:
            profile, cal = load_profile(args.profile), json.loads(Path(args.profile).read_text()).get("measurements")
            if not cal:
                raise ValueError(f"--profile: {args.profile} holds no calibration measurements")
        else:
            res = calibrate(str(out / "profile.json"), model=args.calibrate_model, seq_len=args.calibrate_seq_len,
                            micro_batch=args.calibrate_micro_batch, iters=args.iters, device=env.device.type,
                            small_model=args.small_model, small_seq_len=args.small_seq_len,
                            small_micro_batch=args.small_micro_batch)
            profile, cal = res["profile"], res["measurements"]
        print(f"profile {profile.name}: GEMM {profile.matmul_flops / 1e12:.1f} TFLOP/s, "
              f"{profile.elementwise_bytes:.1f} B per activation element, "
              f"host {1e3 * profile.layer_overhead_s:.2f} ms per layer pass", flush=True)
        rows = []
        for pair in args.pairs.split(","):
            tname, sname = pair.split(":")
            bench = ColocatedStep(tname, sname, args.seq_len, args.micro_batch, args.microbatches, args.topk,
                                  env.device, dtype)
            meas = bench.timed(args.steps)
            meas["activation_bytes"] = bench.activation_peak()
            meas.update(bench.sampling(args.steps))
            del bench
            if cuda:
                torch.cuda.empty_cache()
            rows.append(score({"teacher": tname, "student": sname, "seq_len": args.seq_len,
                               "micro_batch": args.micro_batch, "microbatches": args.microbatches, "topk": args.topk,
                               "measured": meas}, profile, builtin, d))
            row = rows[-1]
            print(f"{tname} -> {sname}: measured {1e3 * meas['step_s']:.1f} ms, predicted "
                  f"{1e3 * row['predicted_calibrated']['step_s']:.1f} ms ({_pct(row['error_calibrated'])}); sampling "
                  f"{1e3 * meas['sample_s']:.1f} ms, predicted {1e3 * row['predicted_sample_s_calibrated']:.1f} ms "
                  f"({_pct(row['error_sample_calibrated'])})", flush=True)
        result = {"device": torch.cuda.get_device_name(env.device) if cuda else f"cpu ({platform.processor() or 'x86'})",
                  "date": datetime.date.today().isoformat(), "command": "python " + " ".join(
                      ["benchmarks/bench_planner.py", *(sys.argv[1:] if argv is None else argv)]),
                  "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."),
                  "kd_loss": _ext.extension_status(), "builtin_profile": builtin.name, "calibration": cal, "profile": dataclasses.asdict(profile),
                  "rows": rows}
        write(result, out)
    finally:
        if started_here:
            shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
