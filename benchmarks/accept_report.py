"""Verdicts on the benchmark targets from a ``bash benchmarks/run_h100.sh accept`` batch.

    tar xzf results.tgz -C /tmp/accept && python benchmarks/accept_report.py /tmp/accept
    python benchmarks/accept_report.py /tmp/accept --install benchmarks/results   # and file the reports

Reads what the batch leaves (each part optional; a missing one is reported as not measured):

    accept_llama/bench_llama.json, accept_qwen/bench_qwen.json   bench_vs_trl.py: TRL GKD vs kdtrain
    accept_llama_tc/bench_llama.json                              kdtrain, graphed student + compiled teacher
    accept_cache/bench_online_vs_cached.json                      online vs cached student phase

and prints, then writes to ``<dir>/accept_verdict.md``:

* per pair, kdtrain colocated (every variant that ran) against TRL GKD: samples/s ratio against
  the 1.67x target, peak memory against TRL's, and the common full-vocabulary JSD after the same
  steps (with the untrained student's) for the loss comparison;
* cached / online student-phase samples/s against the 2x target;
* for each profiled system (``--profile``), where its step goes: the device's busy share, kernels
  per step and busy time by category, which is what a missed target's "why" reads off.

``--install DEST`` copies the reports into ``DEST/vs_trl_h100/`` (the Llama run with a compiled
teacher as ``bench_llama_tcompiled.*``), ``DEST/online_vs_cached_h100/`` and the verdict into
``DEST/accept_h100/``; the write-ups (README.md files) are then updated by hand from the verdict.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Optional

TRL_TARGET = 1.67  # kdtrain colocated / TRL GKD samples/s, both pairs (vs-TRL benchmark)
CACHE_TARGET = 2.0  # cached / online student-phase samples/s


def _load(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.is_file() else None


def trl_rows(report: dict, extra: Optional[dict] = None) -> tuple[Optional[dict], list[dict]]:
    """(TRL GKD row or None, kdtrain rows that ran) of one pair's bench_vs_trl reports."""
    rows = [r for rep in (report, extra) if rep for r in rep["results"]]
    trl = next((r for r in rows if r["system"] == "trl-gkd" and r["status"] == "ok"), None)
    ours = [r for r in rows if r["system"].startswith("kdtrain-colocated") and r["status"] == "ok"]
    return trl, ours


def pair_lines(name: str, report: Optional[dict], extra: Optional[dict]) -> tuple[list[str], Optional[bool]]:
    """Markdown lines for one pair and whether its best kdtrain row meets the target (None: not measured)."""
    if report is None:
        return [f"### {name}: not measured", ""], None
    trl, ours = trl_rows(report, extra)
    lines = [f"### {name}: {report['device']}, {report.get('created') or ''}", "",
             f"Command: `{report['command']}`" + (f"; `{extra['command']}`" if extra else ""), ""]
    failed = [r for rep in (report, extra) if rep for r in rep["results"] if r["status"] == "failed"]
    for r in failed:
        lines.append(f"- {r['system']} failed: {(r['reason'] or '').splitlines()[0][:300]}")
    if trl is None or not ours:
        lines += ["- no TRL GKD and kdtrain pair of rows to compare", ""]
        return lines, None
    lines += ["| system | samples/s | vs TRL GKD | peak GiB | full-vocab JSD after the steps |",
              "| --- | ---: | ---: | ---: | ---: |",
              f"| trl-gkd | {trl['samples_per_s']:.2f} | 1.00x | {trl['peak_memory_gib']:.1f} | "
              f"{trl['eval_full_vocab_jsd']:.4f} |"]
    met = False
    for r in ours:
        ratio = r["samples_per_s"] / trl["samples_per_s"]
        ok = ratio >= TRL_TARGET and r["peak_memory_gib"] < trl["peak_memory_gib"]
        met |= ok
        lines.append(f"| {r['system']} | {r['samples_per_s']:.2f} | {ratio:.2f}x | {r['peak_memory_gib']:.1f} | "
                     f"{r['eval_full_vocab_jsd']:.4f} |")
    lines += [""] + [line for r in [trl, *ours] for line in profile_lines(r)]
    best = max(ours, key=lambda r: r["samples_per_s"])
    ratio = best["samples_per_s"] / trl["samples_per_s"]
    lines += ["", f"Untrained student: full-vocab JSD {report['eval_full_vocab_jsd_init']:.4f}. "
              f"Best: {best['system']} at {ratio:.2f}x TRL GKD (target {TRL_TARGET}x: "
              + ("met" if ratio >= TRL_TARGET else f"missed by {TRL_TARGET - ratio:.2f}x, "
                 f"{100 * (TRL_TARGET / ratio - 1):.0f}% more speed needed")
              + f"), peak memory {best['peak_memory_gib'] / trl['peak_memory_gib']:.2f}x TRL's.", ""]
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
    if report is None or "cached_vs_online_student_samples_per_s" not in report:
        return ["### Online vs cached: not measured", ""], None
    r, ratio = report["runs"], report["cached_vs_online_student_samples_per_s"]
    graphs = ", CUDA-graphed student" if report.get("cuda_graphs") else ""
    lines = [f"### Online vs cached: {report['teacher']} -> {report['student']}, {report['device']}, "
             f"{report['date']}{graphs}", "", f"Command: `{report['command']}`", "",
             f"Student phase: online {r['online']['samples_per_s']:.2f}, cached {r['cached']['samples_per_s']:.2f} "
             f"samples/s: {ratio:.2f}x (target {CACHE_TARGET}x: "
             + ("met" if ratio >= CACHE_TARGET else f"missed by {CACHE_TARGET - ratio:.2f}x") + "). "
             f"Held-out loss online {r['online'].get('valid_loss', float('nan')):.4f}, "
             f"cached {r['cached'].get('valid_loss', float('nan')):.4f}.", ""]
    return lines, ratio >= CACHE_TARGET


def verdict(root: Path) -> tuple[str, dict]:
    """The verdict markdown and {target: met / not / None} for a batch's result directory."""
    llama = _load(root / "accept_llama" / "bench_llama.json")
    llama_tc = _load(root / "accept_llama_tc" / "bench_llama.json")
    qwen = _load(root / "accept_qwen" / "bench_qwen.json")
    cache = _load(root / "accept_cache" / "bench_online_vs_cached.json")
    lines = ["# Acceptance batch (benchmarks/run_h100.sh accept)", ""]
    l_lines, l_met = pair_lines("Llama 1.2B -> 150M", llama, llama_tc)
    q_lines, q_met = pair_lines("Qwen2.5 1.5B -> 0.5B shapes", qwen, None)
    c_lines, c_met = cache_lines(cache)
    lines += l_lines + q_lines + c_lines
    met = {"vs_trl_llama": l_met, "vs_trl_qwen": q_met, "cached_vs_online": c_met}
    word = {True: "met", False: "missed", None: "not measured"}
    lines += ["## Targets", ""] + [f"- {k}: {word[v]}" for k, v in met.items()] + [""]
    return "\n".join(lines), met


def install(root: Path, dest: Path, text: str) -> list[Path]:
    """Copy the batch's reports into ``dest`` (see the module docstring); the paths written."""
    plan = [(root / "accept_llama", "bench_llama", dest / "vs_trl_h100", "bench_llama"),
            (root / "accept_qwen", "bench_qwen", dest / "vs_trl_h100", "bench_qwen"),
            (root / "accept_llama_tc", "bench_llama", dest / "vs_trl_h100", "bench_llama_tcompiled"),
            (root / "accept_cache", "bench_online_vs_cached", dest / "online_vs_cached_h100", "bench_online_vs_cached")]
    written = []
    for src_dir, stem, dst_dir, dst_stem in plan:
        for ext in (".json", ".png", ".md"):
            src = src_dir / f"{stem}{ext}"
            if src.is_file():
                dst_dir.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst_dir / f"{dst_stem}{ext}")
                written.append(dst_dir / f"{dst_stem}{ext}")
    (dest / "accept_h100").mkdir(parents=True, exist_ok=True)
    (dest / "accept_h100" / "verdict.md").write_text(text)
    written.append(dest / "accept_h100" / "verdict.md")
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="the unpacked results.tgz of run_h100.sh accept")
    ap.add_argument("--install", metavar="DEST", default=None,
                    help="copy the reports and the verdict under DEST (benchmarks/results)")
    args = ap.parse_args(argv)
    root = Path(args.results)
    if not root.is_dir():
        print(f"error: {root} is not a directory", file=sys.stderr)
        return 2
    text, _ = verdict(root)
    (root / "accept_verdict.md").write_text(text)
    print(text)
    if args.install:
        for p in install(root, Path(args.install), text):
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
