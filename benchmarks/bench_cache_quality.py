"""Storage report of the teacher cache: bytes per token and the KD quality cost of each value
dtype and top-k on the demo pair (student held-out loss after the same budget).

    bash scripts/quickstart.sh          # demo data, demo teacher, online distilled + scratch students
    python benchmarks/bench_cache_quality.py --out benchmarks/results/cache_quality

For each value dtype (fp32, bf16, fp16, fp8-e4m3 with a per-row scale) at k=64, and for k in
{16, 256} (bf16; read as prefixes of one k=256 cache, since cached ids are sorted by logit), the
teacher is cached once over the samples the demo run consumes and the demo student is distilled
from the cache with configs/distill/demo.yaml (same seed and data) for as many steps as the
quickstart's scratch student trained (120 by default; the committed figures used
TEACHER_STEPS=200 STUDENT_STEPS=200). The online run (live teacher, fp32 values, k=64) and the
quickstart's scratch student are the reference rows.
Each run goes through the real entry points under torchrun with --nproc ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# (label, cache dtype, cached k, k read by the student)
VARIANTS = [("fp32 k64", "fp32", 64, 64), ("bf16 k64", "bf16", 64, 64), ("fp16 k64", "fp16", 64, 64),
            ("fp8 k64", "fp8", 64, 64), ("bf16 k256", "bf16", 256, 256), ("bf16 k16 (prefix of k256)", "bf16", 256, 16)]


def torchrun(nproc: int, script: str, args: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "scripts" / script), *args]
    print("$", " ".join(cmd[3:]), flush=True)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if proc.returncode != 0:
        raise RuntimeError(f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")


def final_valid(run_dir: Path) -> float:
    return _last_valid(run_dir)["valid_loss"]


def _last_valid(run_dir: Path) -> dict:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in recs if r.get("kind") == "valid"]
    if not valid:
        raise ValueError(f"{run_dir}: no held-out loss logged")
    return valid[-1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--runs", default="runs", help="where the quickstart left runs/demo-distill and -scratch")
    ap.add_argument("overrides", nargs="*", help="extra overrides for every run (e.g. the quickstart's data paths)")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(args.runs) / "demo-student-scratch"
    if not (scratch / "metrics.jsonl").is_file():
        raise ValueError(f"{scratch}: run scripts/quickstart.sh first (it trains the teacher and the scratch student)")
    # Every run trains the scratch student's budget, so that its row compares like with like.
    steps = int(_last_valid(scratch)["step"])
    budget = [f"training.train_steps={steps}"]
    online = out / "runs" / "online"
    shutil.rmtree(online, ignore_errors=True)
    torchrun(args.nproc, "distill_gpt.py", ["--config", "demo", f"logging.dir={online}", "checkpoint.dir=null",
                                            "logging.progress_bar=false", *budget, *args.overrides])
    rows = [{"label": "online (live teacher, fp32 values, k64)", "bytes_per_token": None,
             "valid_loss": final_valid(online)}]
    caches: dict = {}
    for label, dtype, ck, k in VARIANTS:
        cdir = out / f"cache-{dtype}-k{ck}"
        if (dtype, ck) not in caches:
            shutil.rmtree(cdir, ignore_errors=True)
            t0 = time.time()
            torchrun(args.nproc, "cache_teacher.py", ["--config", "demo", "--out", str(cdir), f"cache.dtype={dtype}",
                                                      f"teacher.topk={ck}", *budget, *args.overrides])
            caches[(dtype, ck)] = time.time() - t0
        run_dir = out / "runs" / label.split(" (")[0].replace(" ", "-")
        shutil.rmtree(run_dir, ignore_errors=True)
        torchrun(args.nproc, "distill_gpt.py", ["--config", "demo", "teacher.source=cache", f"teacher.cache={cdir}",
                                                f"teacher.topk={k}", f"logging.dir={run_dir}", "checkpoint.dir=null",
                                                "logging.progress_bar=false", *budget, *args.overrides])
        manifest = json.loads((cdir / "manifest.json").read_text())
        tokens = manifest["num_samples"] * manifest["seq_length"]
        size = sum(f.stat().st_size for f in cdir.rglob("*") if f.is_file())
        rows.append({"label": label, "dtype": dtype, "k": k, "cached_k": ck, "bytes_per_token": size / tokens,
                     "valid_loss": final_valid(run_dir), "cache_s": caches[(dtype, ck)]})
    rows.append({"label": "scratch (no teacher)", "bytes_per_token": None, "valid_loss": final_valid(scratch)})
    for c in out.glob("cache-*"):
        shutil.rmtree(c)
    res = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "nproc": args.nproc, "steps": steps,
           "rows": rows}
    (out / "bench_cache_quality.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = ["# Teacher cache: bytes per token and KD quality per value dtype and k (demo pair)", "",
             f"{res['date']}; command: `{res['command']}`; configs/distill/demo.yaml ({steps} steps, global batch 16 x "
             "128 tokens, forward KL + 0.5 CE), student held-out loss at the end.", "",
             "| variant | bytes/token on disk | student held-out loss | vs online |", "| --- | ---: | ---: | ---: |"]
    ref = rows[0]["valid_loss"]
    for r in rows:
        b = "" if r["bytes_per_token"] is None else f"{r['bytes_per_token']:.1f}"
        lines.append(f"| {r['label']} | {b} | {r['valid_loss']:.4f} | {r['valid_loss'] - ref:+.4f} |")
    lines.append("")
    (out / "bench_cache_quality.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
