"""benchmarks/count_step_ops.py runs, and the optimizer update and gradient norm stay a handful of
operations per step whatever the number of parameters (86 tensors here), not a few per tensor."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_optimizer_and_norm_launches_do_not_scale_with_parameters(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "count_step_ops.py"), "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "step_ops_bf16.json").read_text())
    assert res["params"] > 50
    assert res["step"]["optimizer"]["non_view_ops"] <= 10, res["step"]["optimizer"]
    assert res["step"]["grad_norm"]["non_view_ops"] <= 6, res["step"]["grad_norm"]
    assert res["step"]["forward_backward"]["ops"] > 1000  # the counter does see the model's work
