"""logging.profile_steps: the step profiler records exactly its window, classifies time by
category, and the benchmark harness puts the summaries of the real entry points in its report."""

from __future__ import annotations

import gzip
import json
import os
import sys

import pytest
import torch

from conftest import REPO, run_bounded
from kdtrain.config import LoggingConfig
from kdtrain.training.profiling import StepProfiler, category


def test_categories_of_kernel_and_operator_names():
    assert category("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "matmul"
    assert category("nvjet_tst_128x256_64x4_2x1_v_bz_coopB_TNT") == "matmul"
    assert category("aten::addmm") == "matmul"
    assert category("flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>") == "attention"
    assert category("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert category("kd_loss_stats_kernel<__nv_bfloat16>") == "kd_loss"
    assert category("ncclDevKernel_AllReduce_Sum_f32_RING_LL") == "communication"
    assert category("aten::topk") == "topk"
    assert category("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>") == "other"
    assert category("aten::rms_norm") == "other"


def test_profiler_records_only_its_window(tmp_path):
    prof = StepProfiler((2, 3), str(tmp_path), rank=3, device=torch.device("cpu"))
    a = torch.randn(128, 128)
    summaries = []
    for step in range(1, 5):
        prof.begin(step)
        if step in (1, 4):
            torch.cumsum(a, 0)  # outside the window: must not be recorded
        for _ in range(step):
            a = torch.tanh(a @ a)
        out = prof.end(step)
        if out is not None:
            summaries.append((step, out))
    assert [s for s, _ in summaries] == [3]
    summary = summaries[0][1]
    assert summary == json.loads((tmp_path / "profile" / "rank3_summary.json").read_text())
    assert summary["device"] == "cpu" and summary["steps"] == 2
    names = {t["name"] for t in summary["top"]}
    assert "aten::mm" in names and "aten::cumsum" not in names
    mm = next(t for t in summary["top"] if t["name"] == "aten::mm")
    assert mm["count"] == 2 + 3  # steps 2 and 3 multiply twice and three times
    cats = summary["by_category_s_per_step"]
    assert cats["matmul"] > 0 and cats["other"] > 0
    assert 0 < summary["op_time_s_per_step"] <= summary["wall_s_per_step"]
    trace = json.loads(gzip.open(tmp_path / "profile" / "rank3_trace.json.gz").read())
    assert any(e.get("name") == "aten::mm" for e in trace["traceEvents"])
    assert "aten::mm" in (tmp_path / "profile" / "rank3_ops.txt").read_text()


def test_profile_window_is_checked():
    with pytest.raises(ValueError, match="logging.profile_steps"):
        LoggingConfig(profile_steps=(3, 2)).check()
    with pytest.raises(ValueError, match="logging.profile_steps"):
        LoggingConfig(profile_steps=(0, 2)).check()


@pytest.mark.slow
def test_bench_distill_reports_profiles_of_the_entry_points(tmp_path):
    """benchmarks/bench_distill.py --cpu-tiny --profile: pretrain_gpt.py and distill_gpt.py record
    the two extra steps, and the medians leave them out."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = run_bounded([sys.executable, str(REPO / "benchmarks" / "bench_distill.py"), "--cpu-tiny", "--profile",
                        "--steps", "4", "--out", str(tmp_path)], 600, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "bench_distill.json").read_text())
    assert set(res["profiles"]) == {"student_train", "teacher_train", "distill"}
    for name, p in res["profiles"].items():
        assert p["steps"] == 2, name
        assert p["by_category_s_per_step"]["matmul"] > 0, name
        assert res["runs"][name]["steps_timed"] == 4 - res["warmup"], name
    assert res["profiles"]["distill"]["by_category_s_per_step"].get("topk", 0) > 0  # the teacher's top-k
    assert "Profiled steps" in (tmp_path / "bench_distill.md").read_text()


def test_a_job_that_starts_or_stops_inside_the_window_writes_what_it_recorded(tmp_path):
    """A resumed job starting at step 3 of window [2, 5] records from 3; a job stopping after
    step 4 (training.exit_interval) writes steps 3-4 instead of never writing the profile."""
    prof = StepProfiler((2, 5), str(tmp_path), rank=0, device=torch.device("cpu"))
    a = torch.randn(64, 64)
    written = []
    for step in (3, 4):  # the job's steps: resumed after 2, stops after 4
        prof.begin(step)
        a = torch.tanh(a @ a)
        out = prof.end(step, stopping=step == 4)
        if out is not None:
            written.append((step, out["steps"]))
    assert written == [(4, 2)]
    summary = json.loads((tmp_path / "profile" / "rank0_summary.json").read_text())
    assert next(t for t in summary["top"] if t["name"] == "aten::mm")["count"] == 2


def test_a_job_that_raises_inside_the_window_stops_the_recording(tmp_path):
    prof = StepProfiler((2, 5), str(tmp_path), 0, torch.device("cpu"))
    prof.begin(2)
    assert torch.autograd.profiler._is_profiler_enabled
    prof.close()  # the job's exit (its ExitStack), not end(): nothing written
    assert not torch.autograd.profiler._is_profiler_enabled
    assert not (tmp_path / "profile").exists()
    prof.close()
