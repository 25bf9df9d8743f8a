"""scripts/distill_gpt.py under torchrun (CPU, gloo): every split and layout reproduces the
single-process distillation run (same seeds, data and weights) step for step.

The single-process run computes the teacher's top-k and the student's loss and gradients with
TP = PP = DP = 1 on one rank; the multi-rank runs move the payload between roles and reduce over
their groups. fp32 on CPU: they differ only in reduction order (relative tolerance 1e-5, absolute
1e-7, on the loss and on the global gradient norm, which sums the squares of every student gradient).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import read_metrics, run_torchrun
from kdtrain.stream import PayloadSpec

pytestmark = pytest.mark.slow
RTOL, ATOL = 1e-5, 1e-7


def _args(corpus: dict, run_dir: Path, *extra: str) -> list[str]:
    return ["--config", "tiny", f"data.path=[{corpus['prefix']}]", f"data.tokenizer={corpus['tokenizer']}",
            f"logging.dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def reference(tiny_corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("distill-ref")
    run_torchrun(1, "distill_gpt.py", _args(tiny_corpus, run_dir))
    return read_metrics(run_dir)


# (ranks, overrides, payloads that cross ranks per step). The tiny run has 4 micro-batches a step.
# Colocated TP=2 with identical layouts hands payloads over in place (zero copies); colocated
# teacher PP=2 on ranks 0-1 serves the student replica on rank 1 locally and sends to rank 0.
LAYOUTS = {
    "disagg-tTP2-sDP2": (4, ["split.mode=disaggregated", "split.teacher_ranks=2", "teacher.tp=2", "student.dp=2"], 4),
    "coloc-TP2": (2, ["teacher.tp=2", "student.tp=2"], 0),
    "disagg-tPP2-sPP2": (4, ["split.mode=disaggregated", "split.teacher_ranks=2", "teacher.pp=2", "student.pp=2"], 4),
    "coloc-tPP2-sDP2": (2, ["teacher.pp=2", "student.dp=2"], 2),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_split_and_layout_reproduce_single_process(reference, tiny_corpus, tmp_path, layout):
    nproc, extra, sent_per_step = LAYOUTS[layout]
    run_torchrun(nproc, "distill_gpt.py", _args(tiny_corpus, tmp_path, *extra))
    got = read_metrics(tmp_path)
    assert sorted(got) == sorted(reference)
    for s in sorted(reference):
        for k in ("loss", "kd_loss", "grad_norm"):
            assert got[s][k] == pytest.approx(reference[s][k], rel=RTOL, abs=ATOL), f"step {s} {k}: {got[s][k]} vs {reference[s][k]}"
        # Teacher-side metrics reach the student's log in every split.
        assert got[s]["teacher_compute_s"] > 0 and 0 < got[s]["teacher_busy"]
        assert got[s]["student_wait_s"] >= 0 and got[s]["teacher_wait_s"] >= 0
        assert got[s]["payload_bytes_per_step"] == sent_per_step * PayloadSpec(32, 2, 16, torch.float32).nbytes


def test_mismatched_vocab_is_a_clear_error(tiny_corpus, tmp_path):
    proc = run_torchrun(2, "distill_gpt.py", _args(tiny_corpus, tmp_path, "student.model=demo-student"),
                        check=False, timeout=120)
    assert proc.returncode != 0
    assert "vocab_size 4096 of student 'demo-student' differs" in proc.stderr, proc.stderr[-2000:]


@pytest.fixture(scope="module")
def fp32_cache(tiny_corpus, tmp_path_factory):
    """The tiny teacher's payload for every sample the tiny run consumes, values in fp32."""
    out = tmp_path_factory.mktemp("teacher-cache")
    run_torchrun(1, "cache_teacher.py", ["--config", "tiny", "--out", str(out), f"data.path=[{tiny_corpus['prefix']}]",
                                         f"data.tokenizer={tiny_corpus['tokenizer']}", "cache.dtype=fp32"])
    return out


# A student trained from an fp32 cache sees bitwise the live teacher's payloads (tests/test_cache.py),
# so its loss curve is the online run's (same seeds and data) up to reduction order in the student.
@pytest.mark.parametrize("nproc,source", [(1, "cache"), (2, "cache"), (1, "mixed")])
def test_student_from_the_cache_follows_the_online_loss_curve(reference, tiny_corpus, fp32_cache, tmp_path, nproc,
                                                              source):
    extra = [f"teacher.source={source}", f"teacher.cache={fp32_cache}"]
    if source == "mixed":
        extra.append("teacher.live_fraction=0.5")
    if nproc == 2:
        extra.append("student.dp=2")
    run_torchrun(nproc, "distill_gpt.py", _args(tiny_corpus, tmp_path, *extra))
    got = read_metrics(tmp_path)
    assert sorted(got) == sorted(reference)
    for s in sorted(reference):
        for k in ("loss", "kd_loss", "grad_norm"):
            assert got[s][k] == pytest.approx(reference[s][k], rel=RTOL, abs=ATOL), f"step {s} {k}"
    live = [got[s]["teacher_live"] for s in sorted(got)]
    assert live == ([0] * len(live) if source == "cache" else [0, 1, 0, 1]), live


def test_cache_that_does_not_match_the_run_is_refused(tiny_corpus, fp32_cache, tmp_path):
    extra = ["teacher.source=cache", f"teacher.cache={fp32_cache}", "teacher.topk=32"]  # cached k is 16
    proc = run_torchrun(1, "distill_gpt.py", _args(tiny_corpus, tmp_path, *extra), check=False, timeout=120)
    assert proc.returncode != 0
    assert "topk" in proc.stderr and str(fp32_cache) in proc.stderr, proc.stderr[-2000:]
    proc = run_torchrun(2, "distill_gpt.py", _args(tiny_corpus, tmp_path, "teacher.source=cache",
                                                   f"teacher.cache={fp32_cache}", "split.mode=disaggregated",
                                                   "split.teacher_ranks=1"), check=False, timeout=120)
    assert proc.returncode != 0 and "split.mode" in proc.stderr, proc.stderr[-2000:]


def test_split_auto_runs_the_planners_plan(reference, tiny_corpus, tmp_path):
    """split.mode=auto: the planner's layout is logged and, like every layout, reproduces the
    single-process run."""
    proc = run_torchrun(2, "distill_gpt.py", _args(tiny_corpus, tmp_path, "split.mode=auto"))
    assert "split auto (2 ranks" in proc.stdout and "runner-up:" in proc.stdout, proc.stdout[-2000:]
    got = read_metrics(tmp_path)
    for s in sorted(reference):
        assert got[s]["loss"] == pytest.approx(reference[s]["loss"], rel=RTOL, abs=ATOL), f"step {s}"
