"""Benchmark of the top-k KD loss: fused CUDA kernels vs the pure-torch reference, a dense
full-vocabulary torch JSD and Liger-Kernel's JSD (when installed).

Fused implementations: ``fused`` = the kernels with the single-read path allowed
(``KDTRAIN_KD_SINGLE_PASS=1``: the cluster kernel when the logits are one vocab shard, on sm_90+
and the row fits a cluster; else the two-pass kernels), ``fused_2pass`` = the two-pass kernels
(the default of ``kd_loss`` while the single-read path is opt-in). The
``path`` column of the report says which kernels each fused row ran.

    # H100, all shapes (about 10 minutes; the reference and dense baselines OOM on the largest):
    python benchmarks/bench_kd_loss.py --out benchmarks/results/kd_loss
    # the acceptance shape (16384 tokens x 128256 vocab x k=64, full and 1/8 shard) and a small one:
    python benchmarks/bench_kd_loss.py --quick --out benchmarks/results/kd_loss
    # CPU smoke run (tiny shapes, the emulated fused path instead of the kernels):
    python benchmarks/bench_kd_loss.py --device cpu --quick --out /tmp/kd_bench

Per (tokens, vocab, k, shard, impl): forward and forward+backward time (median), peak memory beyond
the inputs and the logits' gradient, and achieved bandwidth = bytes that must move / time, as a
fraction of the device-to-device copy bandwidth measured here (a ``clone`` of a 1 GiB buffer on
the GPU, counting its read and its write). Bytes that must move:

* ``min``: top-k losses read the student logits once and write their gradient once, plus the
  teacher payload (ids, values, lse); dense losses also read the teacher's full logits.
* ``algo`` (fused only): what the path that ran moves. Two-pass: the logits twice (the gradient
  needs the normaliser over all TP shards, reduced between the passes), the gradient once, the
  payload and the per-token statistics; its ceiling is 2/3 of the copy bandwidth in ``min``
  terms. Single-read: the logits once, the gradient once and the payload (= ``min``).

``shard = V/8`` is the work of one rank of a TP=8 split (its 1/8 of the columns, the whole
payload) on one GPU, without the all-reduces. Dense and Liger baselines have no top-k and no
sharding: they run at k = 64 on the full vocabulary only. Loss: JSD beta = 0.5, tau = 1, tail
bucket with the teacher's tail log-mass, bf16 logits (fp32 on CPU), grad_output = 1 (so the
fused backward skips its scaling pass), input validation off (it costs one small reduction and a
host sync per call).

Writes ``bench_kd_loss.json`` and ``bench_kd_loss.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from kdtrain.loss import (KDLossConfig, extension_status, kd_dense_reference, kd_fused, kd_loss,  # noqa: E402
                          load_kernels)

FULL = dict(tokens=[4096, 16384], vocab=[32000, 128256, 151936], k=[16, 64, 256], shard=["full", "V/8"])
QUICK = [(4096, 32000, 64, "full"), (16384, 128256, 64, "full"), (16384, 128256, 64, "V/8")]
CPU_QUICK = [(64, 1000, 16, "full"), (64, 1000, 16, "V/8")]
BASELINE_K = 64
FUSED = ("fused", "fused_2pass", "emulated")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device, nbytes: int) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    sync(device)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * nbytes / min(times)


def liger_jsd():
    try:
        from liger_kernel.transformers import LigerJSD
    except Exception:
        return None
    return LigerJSD


def make_inputs(tokens, vocab, k, shard, dtype, device, need_teacher):
    g = torch.Generator(device=device).manual_seed(0)
    local = vocab if shard == "full" else -(-vocab // 8)
    student = (2 * torch.randn(tokens, 1, local, generator=g, device=device)).to(dtype).requires_grad_()
    # Teacher payload: distinct ids spread over the whole vocabulary (a random offset per token plus
    # a stride, so about 1/8 of them fall in a V/8 shard), with decreasing logits.
    offset = torch.randint(0, vocab, (tokens, 1), generator=g, device=device)
    ids = ((offset + torch.arange(k, device=device) * (vocab // k)) % vocab).to(torch.int32)
    vals = torch.sort(4 * torch.randn(tokens, k, generator=g, device=device), dim=-1, descending=True).values
    lse = torch.logsumexp(vals, -1) + 0.5  # the tail's log-mass: some mass outside the top-k
    teacher = (2 * torch.randn(tokens, 1, vocab, generator=g, device=device)).to(dtype) if need_teacher else None
    return student, ids.view(tokens, 1, k), vals.view(tokens, 1, k), lse.view(tokens, 1), teacher


@contextlib.contextmanager
def single_pass(enabled: bool):
    """KDTRAIN_KD_SINGLE_PASS for the duration (``fused_2pass`` forces the two-pass kernels)."""
    old = os.environ.get(kd_fused.SINGLE_PASS_ENV)
    os.environ[kd_fused.SINGLE_PASS_ENV] = "1" if enabled else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(kd_fused.SINGLE_PASS_ENV, None)
        else:
            os.environ[kd_fused.SINGLE_PASS_ENV] = old


def step_fn(impl, student, ids, vals, lse, teacher, vocab, cfg):
    if impl in ("fused", "fused_2pass", "reference", "emulated"):
        which = "fused" if impl == "fused_2pass" else impl
        allow_single = impl == "fused"  # fused_2pass: the two-pass kernels only

        def fwd():
            with single_pass(allow_single):
                return kd_loss(student, ids, vals, vocab_size=vocab, config=cfg, teacher_tail_lse_SB=lse,
                               validate=False, impl=which)[0]
    elif impl == "dense_torch_jsd":
        def fwd():
            return kd_dense_reference(student, teacher, cfg).mean()
    elif impl == "liger_jsd":
        jsd = liger_jsd()(beta=cfg.beta)

        def fwd():
            log_q = torch.log_softmax(student.flatten(0, 1).float() / cfg.tau, dim=-1)
            log_p = torch.log_softmax(teacher.flatten(0, 1).float() / cfg.tau, dim=-1)
            return jsd(log_q, log_p)
    else:
        raise ValueError(impl)
    return fwd


def measure(fwd, student, device, warmup, iters):
    def fwd_bwd():
        student.grad = None
        fwd().backward()

    for _ in range(warmup):
        fwd_bwd()
    sync(device)
    f_times, fb_times = [], []
    for _ in range(iters):
        t0 = time.perf_counter()
        with torch.no_grad():
            fwd()
        sync(device)
        f_times.append(time.perf_counter() - t0)
    student.grad = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    for _ in range(iters):
        t0 = time.perf_counter()
        fwd_bwd()
        sync(device)
        fb_times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else None
    student.grad = None
    return statistics.median(f_times), statistics.median(fb_times), peak


def shapes(args):
    if args.device == "cpu":
        return CPU_QUICK
    if args.quick:
        return QUICK
    return list(itertools.product(FULL["tokens"], FULL["vocab"], FULL["k"], FULL["shard"]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="the acceptance shape and a small one")
    ap.add_argument("--impls", default="fused,fused_2pass,reference,dense_torch_jsd,liger_jsd",
                    help="comma list of fused (auto: single-read when it applies), fused_2pass (two-pass "
                         "kernels forced), emulated, reference, dense_torch_jsd, liger_jsd")
    ap.add_argument("--dtype", default=None, help="logits dtype (default bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/kd_loss")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    if device.type != "cuda":
        impls = [("emulated" if i == "fused" else i) for i in impls if i not in ("liger_jsd", "fused_2pass")]
        if "emulated" not in impls:
            impls.insert(0, "emulated")
    elif "fused" in impls and load_kernels() is None:
        print(f"fused kernels unavailable: {extension_status()}", file=sys.stderr)
    load_kernels()  # records why the kernels are (not) available, for the report
    cfg = KDLossConfig(divergence="jsd", beta=0.5, tau=1.0)
    elem = torch.finfo(dtype).bits // 8
    copy_bw = copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (64 << 20))
    print(f"{device} copy bandwidth: {copy_bw / 1e9:.0f} GB/s", flush=True)

    results = []
    for tokens, vocab, k, shard in shapes(args):
        for impl in impls:
            baseline = impl in ("dense_torch_jsd", "liger_jsd")
            if baseline and (shard != "full" or (k != BASELINE_K and args.device != "cpu")):
                continue
            if impl == "liger_jsd" and liger_jsd() is None:
                continue
            if impl in ("fused", "fused_2pass") and (device.type != "cuda" or load_kernels() is None):
                continue
            row = dict(tokens=tokens, vocab=vocab, k=k, shard=shard, impl=impl, dtype=str(dtype).removeprefix("torch."))
            student = ids = vals = lse = teacher = None
            try:
                student, ids, vals, lse, teacher = make_inputs(tokens, vocab, k, shard, dtype, device, baseline)
                local = student.shape[-1]
                logits_bytes = tokens * local * elem
                payload = ids.numel() * 4 + vals.numel() * 4 + lse.numel() * 4
                fwd_s, fb_s, peak = measure(step_fn(impl, student, ids, vals, lse, teacher, vocab, cfg), student,
                                            device, args.warmup, args.iters)
                bytes_min = 3 * logits_bytes if baseline else 2 * logits_bytes + payload
                row.update(local_vocab=local, ms=fb_s * 1e3, fwd_ms=fwd_s * 1e3, bytes_min=bytes_min,
                           bw_frac_min=bytes_min / fb_s / copy_bw)
                if impl in FUSED:
                    row["path"] = kd_fused.last_path()
                    if impl == "fused" and load_kernels() is not None:
                        cluster, smem, why = kd_fused.CudaKernels(load_kernels()).single_info(
                            student.detach().reshape(-1, local), k)
                        row["single_plan"] = (f"cluster {cluster} x {smem / 1024:.1f} KiB smem/CTA" if cluster
                                              else f"unavailable: {why}")
                    if row["path"] == "single":
                        row["bytes_algo"] = bytes_min
                    else:
                        stats = tokens * (5 + k) * 4 * 4  # written, read, reduced, read again
                        row["bytes_algo"] = 3 * logits_bytes + payload + stats
                    row["bw_frac_algo"] = row["bytes_algo"] / fb_s / copy_bw
                if peak is not None:
                    extra = peak - logits_bytes  # beyond the logits' gradient (inputs are in the baseline)
                    row.update(peak_extra_bytes=extra, extra_frac_of_logits=extra / logits_bytes)
            except torch.cuda.OutOfMemoryError:
                row["error"] = "out of memory"
            except Exception as e:  # a failing baseline must not hide the others
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            finally:
                del student, ids, vals, lse, teacher
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            results.append(row)
            print(_fmt(row), flush=True)

    for r in results:  # speed-up of the fused paths over each baseline (and fused over fused_2pass)
        if r["impl"] in FUSED and "ms" in r:
            for o in results:
                if (o["tokens"], o["vocab"], o["shard"]) == (r["tokens"], r["vocab"], r["shard"]) and "ms" in o \
                        and o["impl"] not in FUSED and (o["k"] == r["k"] or o["impl"] != "reference"):
                    r[f"speedup_vs_{o['impl']}"] = o["ms"] / r["ms"]
                same = (o["tokens"], o["vocab"], o["k"], o["shard"]) == (r["tokens"], r["vocab"], r["k"], r["shard"])
                if r["impl"] == "fused" and o["impl"] == "fused_2pass" and "ms" in o and same:
                    r["speedup_vs_fused_2pass"] = o["ms"] / r["ms"]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), command=" ".join(sys.argv),
                device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                torch=torch.__version__, cuda=torch.version.cuda, extension=extension_status(),
                copy_bandwidth_GBps=copy_bw / 1e9, loss=vars(cfg) | {"values": "logits + teacher lse"},
                dtype=str(dtype).removeprefix("torch."), warmup=args.warmup, iters=args.iters)
    (out / "bench_kd_loss.json").write_text(json.dumps(dict(meta=meta, results=results), indent=1))
    (out / "bench_kd_loss.md").write_text(_markdown(meta, results))
    print(f"wrote {out / 'bench_kd_loss.json'} and {out / 'bench_kd_loss.md'}")


def _fmt(r):
    if "error" in r:
        return f"{r['tokens']:>6} x {r['vocab']:>6} k={r['k']:<4} {r['shard']:<4} {r['impl']:<16} {r['error']}"
    extra = f" extra {r['extra_frac_of_logits'] * 100:6.2f}% of logits" if "extra_frac_of_logits" in r else ""
    algo = f" (algo {r['bw_frac_algo'] * 100:5.1f}%)" if "bw_frac_algo" in r else ""
    algo += f" path {r['path']}" if r.get("path") else ""
    return (f"{r['tokens']:>6} x {r['vocab']:>6} k={r['k']:<4} {r['shard']:<4} {r['impl']:<16} fwd {r['fwd_ms']:9.3f} ms"
            f"  fwd+bwd {r['ms']:9.3f} ms  bw {r['bw_frac_min'] * 100:5.1f}% of copy{algo}{extra}")


def _path_summary(results) -> str:
    """Which kernels `fused` ran, per shape."""
    parts = [f"{r['tokens']}x{r['vocab']} k={r['k']} {r['shard']}: {r['path']}"
             + (f" ({r['single_plan']})" if r.get("single_plan") else "")
             for r in results if r["impl"] == "fused" and r.get("path")]
    return ("`fused` ran: " + "; ".join(parts) + ".") if parts else ""


def _markdown(meta, results):
    lines = [f"# KD loss benchmark ({meta['device']}, {meta['dtype']})", "",
             f"- date {meta['date']}; torch {meta['torch']}; CUDA {meta['cuda']}; extension: {meta['extension']}",
             f"- command: `{meta['command']}`",
             f"- copy bandwidth: {meta['copy_bandwidth_GBps']:.0f} GB/s; loss: JSD beta 0.5, tau 1, tail, teacher lse; "
             f"median of {meta['iters']} iterations",
             "- fused paths: `fused` = kd_loss's choice (single-read cluster kernel when the logits are one vocab "
             "shard on sm_90+ and the row fits a cluster, else two-pass); `fused_2pass` = two-pass kernels forced. "
             + _path_summary(results), "",
             "| tokens | vocab | k | shard | impl | path | fwd ms | fwd+bwd ms | bw % of copy (min) | bw % (algo) "
             "| extra mem % of logits | speed-up vs reference | vs dense | vs Liger | fused vs fused_2pass |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    pct = lambda r, key: f"{r[key] * 100:.1f}" if key in r else ""
    x = lambda r, key: f"{r[key]:.1f}x" if key in r else ""
    for r in results:
        if "error" in r:
            lines.append(f"| {r['tokens']} | {r['vocab']} | {r['k']} | {r['shard']} | {r['impl']} | | {r['error']} "
                         "| | | | | | | | |")
            continue
        lines.append(f"| {r['tokens']} | {r['vocab']} | {r['k']} | {r['shard']} | {r['impl']} | {r.get('path', '')} "
                     f"| {r['fwd_ms']:.3f} | {r['ms']:.3f} | {pct(r, 'bw_frac_min')} | {pct(r, 'bw_frac_algo')} "
                     f"| {pct(r, 'extra_frac_of_logits')} | {x(r, 'speedup_vs_reference')} "
                     f"| {x(r, 'speedup_vs_dense_torch_jsd')} | {x(r, 'speedup_vs_liger_jsd')} "
                     f"| {x(r, 'speedup_vs_fused_2pass')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
