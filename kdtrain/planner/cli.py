r"""``kdtrain plan`` and ``kdtrain calibrate``.

    kdtrain plan --teacher llama-3.1-8b --student llama-3.2-1b --world-size 64 --gpus-per-node 8 \
        --seq-len 4096 --global-batch 1024 [--topk 64] [--profile h100-80gb|FILE] [--json] [--top 10]
        [--cuda-graphs] [--onpolicy-fraction 0.5 --prompt-len 256 --sample-batch 0]
    kdtrain plan --config configs/distill/llama-3.1-8b-to-3.2-1b-8xh100.yaml --world-size 8 [KEY=VALUE ...]
    kdtrain plan ... --sweep world_size [--values 8,64,512] [--plot sweep.png]
    kdtrain plan ... --sweep all --plot docs/planner_sweep.png      (every quantity, one panel each)
    kdtrain calibrate --out profiles/h100.json --model llama-1.2b-32k --seq-len 1024 --micro-batch 4 \
        --small-model llama-150m-32k --small-seq-len 512 --small-micro-batch 2
"""

from __future__ import annotations

import argparse
import json
import time

from ..cli import DefaultsHelp
from .memory import GiB


def _csv(kind):
    def parse(text: str):
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}")
    return parse


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="rank teacher/student splits by predicted samples/s",
                              formatter_class=DefaultsHelp)
    p.add_argument("--config", default=None, help="a distillation run config: its models, window, batch, top-k, "
                   "optimizer, recomputation, CUDA graphs and on-policy steps (instead of the flags below)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="with --config: overrides, as the scripts take")
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="default: with --config its split.gpus_per_node, else the profile's")
    p.add_argument("--profile", default=None, help="built-in name or a `kdtrain calibrate` JSON (default: with "
                   "--config its split.profile, else h100-80gb)")
    p.add_argument("--split", choices=("auto", "colocated", "disaggregated"), default="auto",
                   help="restrict the table to one split")
    run = p.add_argument_group("the run (without --config)")
    run.add_argument("--teacher", help="teacher model (name under configs/models/ or YAML)")
    run.add_argument("--student", help="student model (name under configs/models/ or YAML)")
    run.add_argument("--seq-len", type=int)
    run.add_argument("--global-batch", type=int, help="samples per step")
    run.add_argument("--topk", type=int, help="teacher.topk (default 64)")
    run.add_argument("--micro-batch", type=_csv(int), help="only these micro-batch sizes")
    run.add_argument("--recompute", choices=("never", "always", "auto"),
                     help="student full activation recomputation, training.recompute (default never; auto: let the "
                          "planner choose)")
    run.add_argument("--distributed-optimizer", choices=("auto", "on", "off"),
                     help="student ZeRO-1 (optimizer.distributed; default auto)")
    run.add_argument("--cuda-graphs", action="store_const", const=True,
                     help="precision.cuda_graphs: the student's layers replay as CUDA graphs (tp = pp = 1)")
    run.add_argument("--depth", type=int, help="split.depth: micro-batches the teacher may run ahead (default 2)")
    run.add_argument("--onpolicy-fraction", type=float,
                     help="onpolicy.fraction: share of steps on the student's own samples (default 0: none)")
    run.add_argument("--prompt-len", type=int,
                     help="onpolicy.prompt_length: positions before the first sampled one (default: half the window)")
    run.add_argument("--sample-batch", type=int, help="onpolicy.sample_batch: rows per sampling call "
                     "(default 0: all of a replica's rows)")
    run.add_argument("--values-dtype", choices=("fp32", "bf16"), help="teacher.values_dtype (default fp32)")
    p.add_argument("--top", type=int, default=10, help="rows in the table")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--sweep", default=None,
                   help="vary one of: world_size, teacher_size, seq_len, k, inter_node_bw; or all of them")
    p.add_argument("--values", type=_csv(float), default=None, help="sweep values (comma-separated)")
    p.add_argument("--plot", default=None, help="sweep PNG path (default: plan-sweep-<quantity>.png)")
    p.set_defaults(func=run_plan)

    c = subparsers.add_parser("calibrate", help="measure this device and write a planner profile",
                              formatter_class=DefaultsHelp)
    c.add_argument("--out", required=True, help="profile JSON to write")
    c.add_argument("--base", default=None, help="profile whose network figures are kept (default: h100-80gb on "
                                                  "CUDA, cpu otherwise)")
    c.add_argument("--model", default="demo-student", help="a model that keeps the device busy (fits the "
                                                             "memory-bound traffic)")
    c.add_argument("--seq-len", type=int, default=256, help="the --model's measured sequence length (default 256)")
    c.add_argument("--micro-batch", type=int, default=4, help="and micro-batch (default 4)")
    c.add_argument("--small-model", default=None, help="a model bound by kernel launches (fits the host time per "
                                                        "layer; default: keep --base's)")
    c.add_argument("--small-seq-len", type=int, default=None, help="default: --seq-len")
    c.add_argument("--small-micro-batch", type=int, default=None, help="default: --micro-batch")
    c.add_argument("--iters", type=int, default=5, help="timed repetitions of each measurement (default 5)")
    c.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: GPU when there is one")
    c.add_argument("--compile", action="store_true", help="measure with compiled layers (runs with "
                                                          "precision.compile=true plan with this profile)")
    c.set_defaults(func=run_calibrate)


# The flags that describe the run, and their defaults without --config.
RUN_FLAGS = {"teacher": None, "student": None, "seq_len": None, "global_batch": None, "topk": 64, "micro_batch": None,
             "recompute": "never", "distributed_optimizer": "auto", "cuda_graphs": False, "depth": 2,
             "onpolicy_fraction": 0.0, "prompt_len": None, "sample_batch": 0, "values_dtype": "fp32"}


def _problem(args):
    from ..config import load_model_config
    from .profiles import get_profile
    from .problem import Sampling
    from .search import make_problem

    if args.top < 1:
        raise ValueError(f"--top: must be >= 1, got {args.top}")
    given = [k for k in RUN_FLAGS if getattr(args, k) is not None]
    if args.config:
        return _problem_from_config(args, given)
    profile = get_profile(args.profile or "h100-80gb")
    gpn = profile.gpus_per_node if args.gpus_per_node is None else args.gpus_per_node
    if args.overrides:
        raise ValueError(f"{args.overrides[0]}: overrides go with --config")
    missing = [k for k in ("teacher", "student", "seq_len", "global_batch") if getattr(args, k) is None]
    if missing:
        raise ValueError(f"--{missing[0].replace('_', '-')}: required (or give a run config with --config)")
    for k, default in RUN_FLAGS.items():
        if getattr(args, k) is None:
            setattr(args, k, default)
    teacher = load_model_config(args.teacher, "--teacher")
    student = load_model_config(args.student, "--student")
    mbs = tuple(args.micro_batch) if args.micro_batch else None
    onpolicy = None
    if args.onpolicy_fraction:
        onpolicy = Sampling(args.onpolicy_fraction, args.seq_len // 2 if args.prompt_len is None else args.prompt_len,
                            args.sample_batch)
    elif args.prompt_len is not None or args.sample_batch:
        raise ValueError("--prompt-len and --sample-batch describe on-policy steps: give --onpolicy-fraction too")
    return make_problem(teacher, student, args.world_size, gpn, args.seq_len, args.global_batch, args.topk,
                        profile, micro_batches=mbs, depth=args.depth,
                        values_bytes=4 if args.values_dtype == "fp32" else 2,
                        recompute={"never": False, "always": True, "auto": None}[args.recompute],
                        distributed_optimizer={"auto": None, "on": True, "off": False}[args.distributed_optimizer],
                        student_graphs=args.cuda_graphs, onpolicy=onpolicy)


def _problem_from_config(args, given: list[str]):
    """The problem of a distillation config, as ``split: auto`` sees it (bf16 unless the config says
    fp32: plans are for GPUs; the config's split.profile and split.gpus_per_node unless the flags
    say otherwise)."""
    from ..config.distill import load_distill_config
    from .from_config import plan_inputs
    from .profiles import get_profile
    from .problem import CLI_NAMES, CONFIG_NAMES
    from .search import make_problem

    if given:
        raise ValueError(f"--{given[0].replace('_', '-')}: with --config the run's own settings are planned; "
                         f"change them as overrides (KEY=VALUE)")
    cfg = load_distill_config(args.config, args.overrides)
    # Errors name the config's fields, or the flags where the flags gave the value.
    names = {**CONFIG_NAMES, "world_size": CLI_NAMES["world_size"]}
    for key in ("profile", "gpus_per_node"):
        if getattr(args, key) is not None:
            names[key] = CLI_NAMES[key]
    profile = get_profile(args.profile or cfg.split.profile or "h100-80gb", names["profile"])
    gpn = next(g for g in (args.gpus_per_node, cfg.split.gpus_per_node, profile.gpus_per_node) if g is not None)
    kw = plan_inputs(cfg, fp32=cfg.precision.dtype == "fp32")
    teacher, student = kw.pop("teacher_model"), kw.pop("student_model")
    seq, batch, topk = kw.pop("seq_len"), kw.pop("global_batch"), kw.pop("topk")
    return make_problem(teacher, student, args.world_size, gpn, seq, batch, topk, profile,
                        micro_batches=(kw.pop("micro_batch"),), names=names, **kw)


def _table(plans, world_size: int) -> str:
    head = (f"{'#':>3}  {'split':<13} {'teacher':<18} {'student':<18} {'mb':>3} {'zero':>4} "
            f"{'samples/s':>10} {'step ms':>9}  {'memory GiB/rank':<22} bottleneck")
    rows = [head, "-" * len(head)]
    for i, pl in enumerate(plans, 1):
        t = f"{pl.teacher_ranks}r {pl.teacher}"
        s = f"{pl.student_ranks}r {pl.student}"
        mem = " ".join(f"{k[0].upper()}{v.total / GiB:.1f}" for k, v in pl.memory.items())
        rows.append(f"{i:>3}  {pl.split:<13} {t:<18} {s:<18} {pl.micro_batch:>3} {'yes' if pl.distributed_optimizer else 'no':>4} "
                    f"{pl.samples_per_s:>10.2f} {pl.step_time * 1e3:>9.1f}  {mem:<22} {pl.bottleneck}")
    return "\n".join(rows)


def run_plan(args) -> int:
    from .search import search_plans

    t0 = time.perf_counter()
    prob = _problem(args)
    if args.sweep:
        return _run_sweep(args, prob)
    splits = ("colocated", "disaggregated") if args.split == "auto" else (args.split,)
    res = search_plans(prob, splits)
    elapsed = time.perf_counter() - t0
    plans = res.plans[:args.top]
    if args.json:
        print(json.dumps({"teacher": prob.teacher.name, "student": prob.student.name, "world_size": prob.world_size,
                          "gpus_per_node": prob.gpus_per_node, "seq_len": prob.seq_len,
                          "global_batch": prob.global_batch, "topk": prob.topk, "profile": prob.profile.name,
                          "evaluated": res.evaluated, "rejected": res.rejected, "search_s": elapsed,
                          "plans": [pl.to_json() for pl in plans],
                          "closest_rejects": [pl.to_json() for pl in res.closest_rejects]}, indent=1))
        return 0 if plans else 1
    print(f"{prob.teacher.name} -> {prob.student.name} on {prob.world_size} x {prob.profile.name} "
          f"({prob.gpus_per_node}/node), seq {prob.seq_len}, global batch {prob.global_batch}, top-{prob.topk}: "
          f"{res.evaluated} plans, {res.rejected} do not fit, searched in {elapsed:.2f} s")
    if not plans:
        print("no plan fits. closest:")
        for pl in res.closest_rejects:
            print(f"  {pl.label()} mb={pl.micro_batch}: {pl.reject}")
        return 1
    print(_table(plans, prob.world_size))
    best = res.plans[0]
    other = res.best("disaggregated" if best.split == "colocated" else "colocated")
    print(f"best:      {best.describe()}")
    if other:
        print(f"other split: {other.describe()} ({best.samples_per_s / other.samples_per_s:.2f}x slower)")
    return 0


def _run_sweep(args, prob) -> int:
    from .sweep import QUANTITIES, plot, plot_all, report, sweep, to_json

    quantities = list(QUANTITIES) if args.sweep == "all" else [args.sweep]
    if args.sweep == "all" and args.values:
        raise ValueError("--values: give one quantity to --sweep, not all")
    results = {q: sweep(prob, q, args.values) for q in quantities}
    title = (f"{prob.teacher.name} -> {prob.student.name} ({prob.profile.name}), world {prob.world_size}, "
             f"seq {prob.seq_len}, batch {prob.global_batch}, top-{prob.topk}")
    path = args.plot or f"plan-sweep-{args.sweep}.png"
    if args.sweep == "all":
        plot_all(results, path, title)
    else:
        plot(results[args.sweep], args.sweep, path, title)
    if args.json:
        print(json.dumps({"sweeps": [to_json(pts, q) for q, pts in results.items()], "plot": path}, indent=1))
        return 0
    print(f"sweep: {title}")
    for q, pts in results.items():
        print()
        print(report(pts, q))
    print(f"plot: {path}")
    return 0


def run_calibrate(args) -> int:
    from .calibrate import calibrate

    result = calibrate(args.out, base=args.base, model=args.model, seq_len=args.seq_len,
                       micro_batch=args.micro_batch, iters=args.iters, device=args.device,
                       small_model=args.small_model, small_seq_len=args.small_seq_len,
                       small_micro_batch=args.small_micro_batch, compile=args.compile)
    m = result["measurements"]
    print(f"device {m['device']}: matmul {m['matmul_tflops']:.3f} TFLOP/s, copy {m['copy_gbps']:.1f} GB/s, "
          f"{args.model} step {m['step_time_s'] * 1e3:.1f} ms -> {m['elementwise_bytes']:.1f} B per activation "
          f"element, host {m['layer_overhead_s'] * 1e3:.2f} ms per layer pass"
          + (f"; a decode forward {m['decode_layer_s'] * 1e3:.2f} ms per layer + {m['decode_token_s'] * 1e3:.2f} ms"
             if "decode_s" in m else "")
          + f"; profile written to {args.out}")
    return 0
