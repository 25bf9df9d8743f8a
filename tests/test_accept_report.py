"""benchmarks/accept_report.py on the last committed H100 reports, laid out as a run_h100.sh accept
batch leaves them: the ratios and verdicts it states are the ones the write-ups state for those
runs (1.27x and 1.39x TRL GKD, 1.93x cached/online: all three targets missed), and --install files
the reports where the write-ups expect them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def _batch(root: Path, with_cache: bool = True) -> Path:
    for preset in ("llama", "qwen"):
        (root / f"accept_{preset}").mkdir(parents=True)
        shutil.copy(RESULTS / "vs_trl_h100" / f"bench_{preset}.json", root / f"accept_{preset}")
    if with_cache:
        (root / "accept_cache").mkdir()
        shutil.copy(RESULTS / "online_vs_cached_h100" / "bench_online_vs_cached.json", root / "accept_cache")
    return root


def test_verdicts_match_the_committed_runs(tmp_path):
    import json

    sys.path.insert(0, str(REPO / "benchmarks"))
    from accept_report import verdict

    root = _batch(tmp_path / "batch")
    # A profiled kdtrain row (bench_vs_trl.py --profile) gets its line on where the step goes.
    f = root / "accept_llama" / "bench_llama.json"
    rep = json.loads(f.read_text())
    rep["results"][2]["profile"] = {"0": {"device": "cuda", "steps": 2, "wall_s_per_step": 0.5,
                                          "device_busy_s_per_step": 0.45, "device_busy_fraction": 0.9,
                                          "kernels_per_step": 12000.0,
                                          "by_category_s_per_step": {"matmul": 0.3, "other": 0.1, "kd_loss": 0.05}}}
    f.write_text(json.dumps(rep))
    text, met = verdict(root)
    assert ("- kdtrain-colocated: step 500 ms, device busy 450 ms (90%), 12000 kernels; busy ms by category: "
            "matmul 300, other 100, kd_loss 50") in text
    assert met == {"vs_trl_llama": False, "vs_trl_qwen": False, "cached_vs_online": False}
    assert "kdtrain-colocated | 60.64 | 1.27x | 11.3" in text and "| trl-gkd | 47.78 | 1.00x | 26.9" in text
    assert "1.39x TRL GKD (target 1.67x: missed by 0.28x" in text
    assert "1.93x (target 2.0x: missed by 0.07x)" in text
    text, met = verdict(_batch(tmp_path / "partial", with_cache=False))
    assert met["cached_vs_online"] is None and "Online vs cached: not measured" in text


def test_cli_writes_and_installs(tmp_path):
    root = _batch(tmp_path / "batch")
    dest = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "accept_report.py"), str(root), "--install",
                           str(dest)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (root / "accept_verdict.md").read_text() == (dest / "accept_h100" / "verdict.md").read_text()
    assert (dest / "vs_trl_h100" / "bench_qwen.json").read_bytes() == \
        (RESULTS / "vs_trl_h100" / "bench_qwen.json").read_bytes()
    assert (dest / "online_vs_cached_h100" / "bench_online_vs_cached.json").is_file()
    assert not (dest / "vs_trl_h100" / "bench_llama_tcompiled.json").exists()  # not in this batch
    bad = subprocess.run([sys.executable, str(REPO / "benchmarks" / "accept_report.py"), str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "is not a directory" in bad.stderr
