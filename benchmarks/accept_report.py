"""Verdicts on the benchmark targets from a ``bash benchmarks/run_h100.sh accept`` batch.

    tar xzf results.tgz -C /tmp/accept && python benchmarks/accept_report.py /tmp/accept
    python benchmarks/accept_report.py /tmp/accept --install benchmarks/results   # and file the reports

Reads what the batch leaves (each part optional; a missing one is reported as not measured):

    accept_llama/bench_llama.json, accept_qwen/bench_qwen.json   bench_vs_trl.py: TRL GKD vs kdtrain
    accept_llama_tc/bench_llama.json                              kdtrain, graphed student + compiled teacher
                                                                  (run_h100.sh accept_llama_tcompiled)
    accept_cache/bench_online_vs_cached.json                      online vs cached student phase
    kernel_status.txt, accept_mode.txt                            the fused-loss build, graphed or eager

and prints, then writes to ``<dir>/accept_verdict.md``:

* the device of every part: the targets are stated for an H100, and a batch that ran elsewhere
  (an H200 fallback, say) is named as such and never filed as H100 figures;
* per pair, kdtrain colocated (every variant that ran) against TRL GKD on the three things the
  target asks for, each stated with its rule (SPEED_RULE, MEMORY_RULE, LOSS_RULE below); a pair's
  target is met when one kdtrain row meets all three;
* cached / online student-phase samples/s against the 2x target;
* whether the fused KD-loss kernels loaded (else kdtrain ran the slower reference loss);
* for each profiled system (``--profile``), where its step goes: the device's busy share, kernels
  per step and busy time by category, which is what a missed target's "why" reads off.

``--install DEST`` copies the reports into ``DEST/vs_trl_<device>/`` (the Llama run with a compiled
teacher as ``bench_llama_tcompiled.*``), ``DEST/online_vs_cached_<device>/`` and the verdict into
``DEST/accept_<device>/``, ``<device>`` being the GPU the batch ran on (``h100``, ``h200``, ...);
the write-ups (README.md files) are then updated by hand from the verdict. It refuses (exit 3) a
batch with something missing, failed or unscored, or run on mixed or unknown devices, unless
``--force``: published reports are only replaced by a complete batch.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Optional

TRL_TARGET = 1.67  # kdtrain colocated / TRL GKD samples/s, both pairs (vs-TRL benchmark)
CACHE_TARGET = 2.0  # cached / online student-phase samples/s
LOSS_MIN_SHARE = 0.8  # of TRL GKD's held-out JSD improvement that kdtrain's must reach
SPEED_RULE = f"kdtrain's samples/s at least {TRL_TARGET}x TRL GKD's (same batch, sequence, steps)"
MEMORY_RULE = ("kdtrain's peak memory below TRL GKD's, both by peak reserved on CUDA (max_memory_reserved: what "
               "the process's caching allocator held, CUDA-graph pools included, which max allocated misses for a "
               "graphed student), by max RSS on CPU")
LOSS_RULE = (f"comparable when kdtrain's student improves on the untrained student's held-out full-vocabulary JSD "
             f"by at least {LOSS_MIN_SHARE:.0%} of the improvement TRL GKD's student makes in the same steps "
             "(same start, data, held-out windows and scoring function for both; kdtrain trains on top-k + tail, "
             "TRL on the full vocabulary, so the training losses themselves are not comparable)")
WORD = {True: "met", False: "missed", None: "not decided"}
LOADED = ("prebuilt extension kdtrain._C", "just-in-time build of csrc/")


def _load(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.is_file() else None


def device_tag(name: Optional[str]) -> Optional[str]:
    """``h100`` for 'NVIDIA H100 80GB HBM3', ``h200`` for an H200, ``cpu`` for a CPU run, the
    model's short name for another GPU, None when unknown."""
    if not name:
        return None
    if name.lower().startswith("cpu"):
        return "cpu"
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", name)
    return m.group(1).lower() if m else None


def kernel_loaded(kernel: Optional[dict]) -> Optional[bool]:
    """Whether a report's fused KD-loss kernels loaded (None: the report does not say, or CPU)."""
    if not kernel:
        return None
    if "loaded" in kernel and not str(kernel.get("status", "")).startswith("not used on CPU"):
        return bool(kernel["loaded"])
    status = str(kernel.get("status", ""))
    if status.startswith("not used on CPU"):
        return None
    return status in LOADED


def memory(row: dict, both_reserved: bool) -> float:
    return row["peak_reserved_gib"] if both_reserved else row["peak_memory_gib"]


def trl_rows(report: dict, extra: Optional[dict] = None) -> tuple[Optional[dict], list[dict]]:
    """(TRL GKD row or None, kdtrain colocated rows that ran) of one pair's bench_vs_trl reports."""
    rows = [r for rep in (report, extra) if rep for r in rep["results"]]
    trl = next((r for r in rows if r["system"] == "trl-gkd" and r["status"] == "ok"), None)
    ours = [r for r in rows if r["system"].startswith("kdtrain-colocated") and r["status"] == "ok"]
    return trl, ours


def loss_verdict(row: dict, trl: dict, init: Optional[float]) -> tuple[Optional[bool], str]:
    """LOSS_RULE for one kdtrain row: (comparable / not / None when a score is missing, the words)."""
    kd, base = row.get("eval_full_vocab_jsd"), trl.get("eval_full_vocab_jsd")
    if kd is None or base is None or init is None:
        missing = [n for n, v in (("kdtrain", kd), ("TRL GKD", base), ("untrained", init)) if v is None]
        return None, f"not scored ({', '.join(missing)} held-out JSD missing)"
    d_kd, d_trl = init - kd, init - base
    ok = d_kd > 0 and d_kd >= LOSS_MIN_SHARE * max(d_trl, 0.0)
    share = f"{d_kd / d_trl:.0%} of TRL GKD's" if d_trl > 0 else "TRL GKD's student did not improve"
    return ok, f"improvement {d_kd:+.4f} vs TRL GKD's {d_trl:+.4f} ({share}; needs {LOSS_MIN_SHARE:.0%})"


def combine(*parts: Optional[bool]) -> Optional[bool]:
    """All met -> True, any missed -> False, else None."""
    if any(p is False for p in parts):
        return False
    return True if all(p is True for p in parts) else None


def pair_lines(name: str, report: Optional[dict], extra: Optional[dict]) -> tuple[list[str], Optional[bool]]:
    """Markdown lines for one pair and whether a kdtrain row meets the target: speed AND memory AND
    loss (None: not measured or not decided)."""
    if report is None:
        return [f"### {name}: not measured", ""], None
    trl, ours = trl_rows(report, extra)
    lines = [f"### {name}: {report['device']}, {report.get('created') or ''}", "",
             f"Command: `{report['command']}`" + (f"; `{extra['command']}`" if extra else ""), ""]
    for rep in (report, extra):
        if rep and rep.get("complete") is False:
            lines.append(f"- incomplete report (`{rep['command'][:80]}...`): the run stopped before its last system")
        if rep and kernel_loaded(rep.get("kernel")) is False:
            lines.append(f"- fused KD-loss kernels did not load, kdtrain ran the reference loss: "
                         f"{str(rep['kernel'].get('status'))[:300]}")
    failed = [r for rep in (report, extra) if rep for r in rep["results"] if r["status"] != "ok"
              and (r["status"] == "failed" or r["system"].startswith(("trl-gkd", "kdtrain-colocated")))]
    for r in failed:
        lines.append(f"- {r['system']} {r['status']}: {((r.get('reason') or '').splitlines() or ['(no reason recorded)'])[0][:300]}")
    for r in ours + ([trl] if trl else []):
        if r.get("eval_full_vocab_jsd") is None:
            lines.append(f"- {r['system']}: held-out JSD not measured ({(r.get('eval_status') or 'no score')[:200]})")
    if trl is None or not ours:
        lines += ["- no TRL GKD and kdtrain pair of rows to compare", ""]
        return lines, None
    both_reserved = trl.get("peak_reserved_gib") is not None and all(r.get("peak_reserved_gib") is not None
                                                                     for r in ours)
    mem_name = "peak reserved GiB" if both_reserved else "peak GiB (allocated / RSS)"
    init = report.get("eval_full_vocab_jsd_init")

    def jsd(r):
        return "-" if r.get("eval_full_vocab_jsd") is None else f"{r['eval_full_vocab_jsd']:.4f}"

    if lines[-1]:
        lines.append("")
    lines += [f"| system | samples/s | vs TRL GKD | {mem_name} | max allocated GiB | held-out full-vocab JSD | "
              "speed | memory | loss | target |",
              "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | --- |",
              f"| trl-gkd | {trl['samples_per_s']:.2f} | 1.00x | {memory(trl, both_reserved):.1f} | "
              f"{trl['peak_memory_gib']:.1f} | {jsd(trl)} | | | | |"]
    judged = []
    for r in ours:
        ratio = r["samples_per_s"] / trl["samples_per_s"]
        speed = ratio >= TRL_TARGET
        mem = memory(r, both_reserved) < memory(trl, both_reserved)
        loss, loss_words = loss_verdict(r, trl, init)
        verdict = combine(speed, mem, loss)
        judged.append((r, ratio, speed, mem, loss, loss_words, verdict))
        lines.append(f"| {r['system']} | {r['samples_per_s']:.2f} | {ratio:.2f}x | {memory(r, both_reserved):.1f} | "
                     f"{r['peak_memory_gib']:.1f} | {jsd(r)} | {WORD[speed]} | {WORD[mem]} | {WORD[loss]} | "
                     f"{WORD[verdict]} |")
    prof = [line for r in [trl, *ours] for line in profile_lines(r)]
    if prof:
        lines += [""] + prof
    # The row the pair is judged by: the fastest that meets everything, else the fastest not
    # known to miss anything, else the fastest.
    rank = {True: 2, None: 1, False: 0}
    r, ratio, speed, mem, loss, loss_words, met = max(judged, key=lambda j: (rank[j[6]], j[0]["samples_per_s"]))
    speed_words = ("met" if speed else f"missed by {TRL_TARGET - ratio:.2f}x, "
                   f"{100 * (TRL_TARGET / ratio - 1):.0f}% more speed needed")
    ours_mem, trl_mem = memory(r, both_reserved), memory(trl, both_reserved)
    lines += ["", "Untrained student: held-out full-vocab JSD " + ("-" if init is None else f"{init:.4f}") + ".",
              "", f"Best: {r['system']}: speed {ratio:.2f}x TRL GKD (target {TRL_TARGET}x: {speed_words}); "
              f"memory {ours_mem:.1f} vs {trl_mem:.1f} GiB {'peak reserved' if both_reserved else 'peak'} "
              f"({ours_mem / trl_mem:.2f}x TRL's: {WORD[mem]}); loss {loss_words}: {WORD[loss]}. "
              f"Target (speed, memory and loss): **{WORD[met]}**.", ""]
    return lines, met


def profile_lines(row: dict) -> list[str]:
    """One line on where a profiled system's step goes (rank 0), or none."""
    prof = (row.get("profile") or {}).get("0") or (row.get("profile") or {}).get(0)
    if not prof or "device_busy_s_per_step" not in prof:
        return []
    cats = ", ".join(f"{k} {1e3 * v:.0f}" for k, v in list(prof["by_category_s_per_step"].items())[:5])
    return [f"- {row['system']}: step {1e3 * prof['wall_s_per_step']:.0f} ms, device busy "
            f"{1e3 * prof['device_busy_s_per_step']:.0f} ms ({100 * (prof['device_busy_fraction'] or 0):.0f}%), "
            f"{prof['kernels_per_step']:.0f} kernels; busy ms by category: {cats}"]


def cache_lines(report: Optional[dict]) -> tuple[list[str], Optional[bool]]:
    if report is None:
        return ["### Online vs cached: not measured", ""], None
    head = [f"### Online vs cached: {report['teacher']} -> {report['student']}, {report['device']}, "
            f"{report['date']}" + (", CUDA-graphed student" if report.get("cuda_graphs") else ""), "",
            f"Command: `{report['command']}`", ""]
    for name, why in (report.get("not_run") or {}).items():
        head.append(f"- {name} not run: {why[:300]}")
    if kernel_loaded(report.get("kernel")) is False:
        head.append(f"- fused KD-loss kernels did not load, the runs used the reference loss: "
                    f"{str(report['kernel'].get('status'))[:300]}")
    if "cached_vs_online_student_samples_per_s" not in report:
        return head + ["- no online and cached pair of runs to compare", ""], None
    r, ratio = report["runs"], report["cached_vs_online_student_samples_per_s"]
    lines = head + [
        f"Student phase: online {r['online']['samples_per_s']:.2f}, cached {r['cached']['samples_per_s']:.2f} "
        f"samples/s: {ratio:.2f}x (target {CACHE_TARGET}x: "
        + ("met" if ratio >= CACHE_TARGET else f"missed by {CACHE_TARGET - ratio:.2f}x") + "). "
        f"Held-out loss online {r['online'].get('valid_loss', float('nan')):.4f}, "
        f"cached {r['cached'].get('valid_loss', float('nan')):.4f}.", ""]
    return lines, ratio >= CACHE_TARGET


def _parts(root: Path) -> dict:
    return {"llama": _load(root / "accept_llama" / "bench_llama.json"),
            "llama_tc": _load(root / "accept_llama_tc" / "bench_llama.json"),
            "qwen": _load(root / "accept_qwen" / "bench_qwen.json"),
            "cache": _load(root / "accept_cache" / "bench_online_vs_cached.json")}


def devices(parts: dict) -> dict:
    """{part: device name} of the parts that ran."""
    return {k: v["device"] for k, v in parts.items() if v is not None}


def _read_text(path: Path) -> Optional[str]:
    return path.read_text().strip() if path.is_file() else None


def verdict(root: Path) -> tuple[str, dict]:
    """The verdict markdown and {target: met / not / None} for a batch's result directory."""
    parts = _parts(root)
    devs = devices(parts)
    tags = {device_tag(d) for d in devs.values()}
    lines = ["# Acceptance batch (benchmarks/run_h100.sh accept)", ""]
    if devs:
        lines.append("Device: " + "; ".join(sorted({f"{d} ({', '.join(k for k in devs if devs[k] == d)})"
                                                    for d in devs.values()})))
    if tags and tags != {"h100"}:
        lines.append(f"**Not an H100 batch** ({', '.join(sorted(str(t) for t in tags))}): the targets are stated "
                     "for an H100, so these figures are not H100 figures; --install files them under the device's "
                     "own directories.")
    for fname, label in (("accept_mode.txt", "Student layers"), ("kernel_status.txt", "Fused KD-loss kernels")):
        text = _read_text(root / fname)
        if text:
            lines.append(f"{label}: {text.splitlines()[0][:400]}")
    lines += ["", "Rules: speed: " + SPEED_RULE + ". Memory: " + MEMORY_RULE + ". Loss: " + LOSS_RULE + ".", ""]
    l_lines, l_met = pair_lines("Llama 1.2B -> 150M", parts["llama"], parts["llama_tc"])
    q_lines, q_met = pair_lines("Qwen2.5 1.5B -> 0.5B shapes", parts["qwen"], None)
    c_lines, c_met = cache_lines(parts["cache"])
    lines += l_lines + q_lines + c_lines
    met = {"vs_trl_llama": l_met, "vs_trl_qwen": q_met, "cached_vs_online": c_met}
    what = {"vs_trl_llama": "speed, memory and loss", "vs_trl_qwen": "speed, memory and loss",
            "cached_vs_online": "student-phase samples/s"}
    measured = {"vs_trl_llama": parts["llama"] is not None and all(trl_rows(parts["llama"], parts["llama_tc"])),
                "vs_trl_qwen": parts["qwen"] is not None and all(trl_rows(parts["qwen"])),
                "cached_vs_online": "cached_vs_online_student_samples_per_s" in (parts["cache"] or {})}
    where = "" if tags == {"h100"} else f" (on {', '.join(sorted(set(devs.values()))) or 'nothing'}, not an H100)"
    lines += ["## Targets" + where, ""]
    lines += [f"- {k} ({what[k]}): {WORD[v] if measured[k] else 'not measured'}" for k, v in met.items()] + [""]
    problems = batch_problems(root, parts)
    if problems:
        lines += ["## Not a complete batch (--install refuses it without --force)", ""]
        lines += [f"- {p}" for p in problems] + [""]
    return "\n".join(lines), met


def batch_problems(root: Path, parts: Optional[dict] = None) -> list[str]:
    """What keeps a batch from replacing the published reports: missing parts, incomplete
    reports, failed or unscored rows, kernels that did not load, mixed or unknown devices."""
    parts = _parts(root) if parts is None else parts
    out = []
    for key, label in (("llama", "Llama pair (accept_llama)"), ("qwen", "Qwen pair (accept_qwen)")):
        rep = parts[key]
        if rep is None:
            out.append(f"{label}: no report")
            continue
        if rep.get("complete") is False:
            out.append(f"{label}: the report is incomplete (the run stopped before its last system)")
        fallback_ok = any(r["status"] == "ok" and r["system"].startswith("kdtrain-colocated") for r in rep["results"])
        for r in rep["results"]:
            if r["status"] == "failed" and not (fallback_ok and r["system"].startswith("kdtrain-colocated")):
                out.append(f"{label}: {r['system']} failed")  # (a failed graphed row whose eager
                # fallback ran is not: run_h100.sh's `A|B`; the report's table shows both)
            elif r["status"] == "ok" and r.get("eval_full_vocab_jsd") is None:
                out.append(f"{label}: {r['system']} has no held-out JSD ({(r.get('eval_status') or '')[:120]})")
        trl, ours = trl_rows(rep)
        if trl is None:
            out.append(f"{label}: no TRL GKD row")
        if not ours:
            out.append(f"{label}: no kdtrain colocated row")
        if kernel_loaded(rep.get("kernel")) is False:
            out.append(f"{label}: the fused KD-loss kernels did not load")
    cache = parts["cache"]
    if cache is None:
        out.append("online vs cached (accept_cache): no report")
    else:
        if cache.get("complete") is False:
            out.append("online vs cached: incomplete ("
                       + ", ".join(f"{k}: {v[:80]}" for k, v in (cache.get("not_run") or {}).items()) + ")")
        if "cached_vs_online_student_samples_per_s" not in cache:
            out.append("online vs cached: no online and cached pair of runs")
        if kernel_loaded(cache.get("kernel")) is False:
            out.append("online vs cached: the fused KD-loss kernels did not load")
    tc = parts["llama_tc"]
    if tc is not None and any(r["status"] == "failed" for r in tc["results"]):
        out.append("accept_llama_tc: a row failed")
    tags = {device_tag(d) for d in devices(parts).values()}
    if len(tags) > 1:
        out.append(f"the parts ran on different devices: {devices(parts)}")
    if None in tags:
        out.append(f"unknown device: {devices(parts)}")
    if "cpu" in tags:
        out.append("a CPU run, not a GPU batch")
    return out


def install(root: Path, dest: Path, text: str) -> list[Path]:
    """Copy the batch's reports into ``dest`` under directories named for the batch's device (see
    the module docstring); the paths written."""
    tags = {device_tag(d) for d in devices(_parts(root)).values()} - {None}
    tag = tags.pop() if len(tags) == 1 else "unknown-device"
    plan = [(root / "accept_llama", "bench_llama", dest / f"vs_trl_{tag}", "bench_llama"),
            (root / "accept_qwen", "bench_qwen", dest / f"vs_trl_{tag}", "bench_qwen"),
            (root / "accept_llama_tc", "bench_llama", dest / f"vs_trl_{tag}", "bench_llama_tcompiled"),
            (root / "accept_cache", "bench_online_vs_cached", dest / f"online_vs_cached_{tag}",
             "bench_online_vs_cached")]
    written = []
    for src_dir, stem, dst_dir, dst_stem in plan:
        for ext in (".json", ".png", ".md"):
            src = src_dir / f"{stem}{ext}"
            if src.is_file():
                dst_dir.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst_dir / f"{dst_stem}{ext}")
                written.append(dst_dir / f"{dst_stem}{ext}")
    (dest / f"accept_{tag}").mkdir(parents=True, exist_ok=True)
    (dest / f"accept_{tag}" / "verdict.md").write_text(text)
    written.append(dest / f"accept_{tag}" / "verdict.md")
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="the unpacked results.tgz of run_h100.sh accept")
    ap.add_argument("--install", metavar="DEST", default=None,
                    help="copy the reports and the verdict under DEST (benchmarks/results), in directories named "
                         "for the batch's device")
    ap.add_argument("--force", action="store_true",
                    help="--install even an incomplete or failed batch (see the verdict's list of problems)")
    args = ap.parse_args(argv)
    root = Path(args.results)
    if not root.is_dir():
        print(f"error: {root} is not a directory", file=sys.stderr)
        return 2
    text, _ = verdict(root)
    (root / "accept_verdict.md").write_text(text)
    print(text)
    if args.install:
        problems = batch_problems(root)
        if problems and not args.force:
            print("error: not installing an incomplete or failed batch over the published reports (--force to "
                  "install it anyway):\n" + "\n".join(f"  - {p}" for p in problems), file=sys.stderr)
            return 3
        for p in install(root, Path(args.install), text):
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
