"""benchmarks/bench_features.py --cpu-tiny end to end: the three A/B pairs (recomputation,
attention within documents, logits at the targets only) run through the real entry points on the
corpora it writes, and the report holds each run's step time."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import run_bounded

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_cpu_tiny_runs_every_pair(tmp_path):
    proc = run_bounded([sys.executable, str(REPO / "benchmarks" / "bench_features.py"), "--cpu-tiny", "--steps", "4",
                        "--out", str(tmp_path)], 600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "bench_features.json").read_text())
    assert {k: sorted(v) for k, v in res["pairs"].items()} == {
        "recompute": ["training.recompute=false", "training.recompute=true"],
        "attention": ["data.attention=documents", "data.attention=window"],
        "targets": ["data.loss_mask=false", "data.loss_mask=true"]}
    for runs in res["pairs"].values():
        assert all(r["step_time_s"] > 0 and r["samples_per_s"] > 0 for r in runs.values())
    assert all("teacher_compute_s" in r for r in res["pairs"]["targets"].values())
    # The B runs ran with their option, on the corpora the benchmark wrote.
    for run, key, value in (("attention-documents", "attention", "documents"), ("targets-true", "loss_mask", True),
                            ("targets-false", "loss_mask", False)):
        data = json.loads((tmp_path / "logs" / run / "config.json").read_text())["data"]
        assert data[key] == value and data["packing"] == "best_fit" and not data["mock"], run
    assert "| targets | `data.loss_mask=true` |" in (tmp_path / "bench_features.md").read_text()
