"""Helpers of benchmarks/run_h100.sh (standard library only, so they run in any Python):

    python benchmarks/batch_tools.py pack WORK OUT        # OUT/results.tgz (+ OUT/traces.tgz) from WORK
    python benchmarks/batch_tools.py gate JUNIT.xml       # exit 0 iff the tests ran and all passed
    python benchmarks/batch_tools.py row-status REPORT.json SYSTEM   # ok / failed / skipped / missing

``pack`` writes what a batch has so far, safe to run at any time (after every stage, and every
few seconds during one): the archive is written under a temporary name and renamed, so
``results.tgz`` is always a whole archive. What can never be returned or is not a result stays
out: weights and checkpoints (*.pt, *.distcp, *.safetensors, *.bin), partial files (*.tmp,
*.part: e.g. the ``.shard_NNNNNN.bin.tmp`` a killed cache pass leaves, up to 256 MB), teacher
caches (a directory with the cache's manifest.json beside its shards), and profiler traces (up to
two of kdtrain's go to traces.tgz). Results come back as files of at most 16 MiB: when the
archive would be larger, files over 1 MiB are dropped (largest first), and if that is not enough
only the reports are kept (JSON, markdown, text, PNG, the tails of logs); what was dropped is
listed in PACKING.txt inside the archive, so a batch never loses everything to one big file.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

LIMIT = 15 * 2**20  # below the 16 MiB a returned file may have
BIG = 2**20  # files dropped first when the archive is too large
TRACE_LIMIT = 7 * 2**20  # per trace; two of them fit the limit
SKIP_SUFFIXES = (".pt", ".distcp", ".safetensors", ".bin", ".tmp", ".part", ".pyc", ".npy", ".idx")
REPORT_SUFFIXES = (".json", ".md", ".txt", ".png", ".yaml", ".csv")
LOG_TAIL = 64 * 1024


def _is_teacher_cache(d: Path) -> bool:
    """A kdtrain teacher cache (scripts/cache_teacher.py --out): manifest.json beside shard files."""
    if not (d / "manifest.json").is_file():
        return False
    return any(p.name.startswith(("shard", ".shard")) or p.suffix in (".bin", ".tmp") for p in d.iterdir())


def collect(work: Path) -> tuple[list[Path], list[Path]]:
    """(files for results.tgz, kdtrain traces) under ``work``, as paths relative to it."""
    files, traces = [], []
    for dirpath, dirnames, filenames in os.walk(work):
        d = Path(dirpath)
        if d != work and _is_teacher_cache(d):
            dirnames[:] = []
            continue
        dirnames[:] = sorted(n for n in dirnames if n != "__pycache__")
        for name in sorted(filenames):
            rel = (d / name).relative_to(work)
            if "_trace.json" in name:
                if "kdtrain-colocated" in str(rel) and name == "rank0_trace.json.gz":
                    traces.append(rel)
                continue
            if name.endswith(SKIP_SUFFIXES) or ".bin." in name or name.startswith("."):
                continue
            files.append(rel)
    return files, traces


def _size(work: Path, rel: Path) -> int:
    try:
        return (work / rel).stat().st_size
    except OSError:
        return 0


def _tar(work: Path, members: list[Path], dropped: list[str], tails: bool, dest: Path) -> int:
    """Write ``dest`` (gzip tar of ``members`` under ``work``, plus PACKING.txt when something was
    dropped); returns its size."""
    with tarfile.open(dest, "w:gz", compresslevel=6) as tar:
        for rel in members:
            path = work / rel
            try:
                if tails and path.suffix == ".log" and path.stat().st_size > LOG_TAIL:
                    with open(path, "rb") as f:
                        f.seek(-LOG_TAIL, os.SEEK_END)
                        data = b"[... only the last 64 KiB kept: the archive was over its size limit]\n" + f.read()
                    info = tarfile.TarInfo(str(rel))
                    info.size, info.mtime = len(data), int(path.stat().st_mtime)
                    tar.addfile(info, io.BytesIO(data))
                else:
                    tar.add(path, arcname=str(rel), recursive=False)
            except (OSError, tarfile.TarError):  # a file that vanished or changed while being read
                continue
        if dropped:
            data = ("Left out of this archive to keep it under 16 MiB per returned file:\n"
                    + "".join(f"{line}\n" for line in dropped)).encode()
            info = tarfile.TarInfo("PACKING.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return dest.stat().st_size


def pack(work: Path, out: Path, limit: int = LIMIT) -> dict:
    """Write ``out/results.tgz`` (and ``out/traces.tgz`` when kdtrain traces exist); returns what
    was done: {"tier": 1..3, "bytes": n, "dropped": [...], "traces": [...]}."""
    work, out = Path(work), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files, traces = collect(work)
    tmp = out / f".results.{os.getpid()}.part"
    try:
        tiers = [(files, [], False)]
        big = sorted((f for f in files if _size(work, f) > BIG), key=lambda f: -_size(work, f))
        if big:
            tiers.append(([f for f in files if f not in set(big)],
                          [f"{f} ({_size(work, f) / 2**20:.1f} MiB)" for f in big], False))
        reports = [f for f in files if f.suffix in REPORT_SUFFIXES + (".log",) and
                   (f.suffix == ".log" or _size(work, f) <= BIG)]
        tiers.append((reports, [f"{f} ({_size(work, f) / 2**20:.2f} MiB)" for f in files if f not in set(reports)]
                      + ["(logs: the last 64 KiB of each)"], True))
        for tier, (members, dropped, tails) in enumerate(tiers, 1):
            size = _tar(work, members, dropped, tails, tmp)
            if size <= limit or tier == len(tiers):
                break
        os.replace(tmp, out / "results.tgz")
    finally:
        tmp.unlink(missing_ok=True)
    done = {"tier": tier, "bytes": size, "dropped": dropped, "traces": []}
    picked = [t for t in traces if _size(work, t) < TRACE_LIMIT][:2]
    if picked:
        ttmp = out / f".traces.{os.getpid()}.part"
        try:
            with tarfile.open(ttmp, "w:gz", compresslevel=1) as tar:
                for rel in picked:
                    try:
                        tar.add(work / rel, arcname=str(rel))
                    except OSError:
                        continue
            os.replace(ttmp, out / "traces.tgz")
        finally:
            ttmp.unlink(missing_ok=True)
        done["traces"] = [str(t) for t in picked]
    return done


def gate(xml_path: Path) -> tuple[bool, str]:
    """Whether a pytest --junitxml report shows at least one test run and every test passed
    (a skipped test, e.g. for want of CUDA, is not a pass)."""
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError) as e:
        return False, f"no test report ({e})"
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    ok = n["tests"] > 0 and n["failures"] == n["errors"] == n["skipped"] == 0
    return ok, (f"{n['tests']} tests, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped")


def row_status(report: Path, system: str) -> str:
    """The status of ``system``'s last row in a bench_vs_trl report (``missing`` if none)."""
    try:
        rows = json.loads(Path(report).read_text())["results"]
    except (OSError, ValueError, KeyError):
        return "missing"
    status = [r["status"] for r in rows if r.get("system") == system]
    return status[-1] if status else "missing"


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "pack":
        done = pack(Path(argv[1]), Path(argv[2]))
        note = f"; dropped {len(done['dropped'])} (see PACKING.txt)" if done["dropped"] else ""
        print(f"packed {done['bytes'] / 2**20:.2f} MiB{note}; traces: {len(done['traces'])}")
        return 0
    if len(argv) == 2 and argv[0] == "gate":
        ok, what = gate(Path(argv[1]))
        print(("passed: " if ok else "not passed: ") + what)
        return 0 if ok else 1
    if len(argv) == 3 and argv[0] == "row-status":
        print(row_status(Path(argv[1]), argv[2]))
        return 0
    print(__doc__.split("\n\n")[0], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
