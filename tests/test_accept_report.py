"""benchmarks/accept_report.py on the last committed H100 reports, laid out as a run_h100.sh accept
batch leaves them: the ratios and verdicts it states are the ones the write-ups state for those
runs (1.27x and 1.39x TRL GKD, 1.93x cached/online: all three targets missed), its stated rules
(speed, memory by peak reserved, loss comparability) decide each row and the summary line and the
Targets list agree, a batch from another device is named and filed under that device, and
--install refuses an incomplete or failed batch unless --force. Also benchmarks/batch_tools.py,
run_h100.sh's packing (size guard, what is never packed) and its gate on a pytest report."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO / "benchmarks"))

import accept_report  # noqa: E402
import batch_tools  # noqa: E402
from accept_report import verdict  # noqa: E402


def _batch(root: Path, with_cache: bool = True) -> Path:
    for preset in ("llama", "qwen"):
        (root / f"accept_{preset}").mkdir(parents=True)
        shutil.copy(RESULTS / "vs_trl_h100" / f"bench_{preset}.json", root / f"accept_{preset}")
    if with_cache:
        (root / "accept_cache").mkdir()
        shutil.copy(RESULTS / "online_vs_cached_h100" / "bench_online_vs_cached.json", root / "accept_cache")
    return root


def _edit(path: Path, fn) -> None:
    rep = json.loads(path.read_text())
    fn(rep)
    path.write_text(json.dumps(rep))


def _row(system: str, sps: float, reserved: float, jsd, allocated=None, status="ok") -> dict:
    return {"system": system, "status": status, "reason": None if status == "ok" else "boom",
            "samples_per_s": sps, "peak_memory_gib": reserved - 1.0 if allocated is None else allocated,
            "peak_reserved_gib": reserved, "eval_full_vocab_jsd": jsd}


def _pair(root: Path, preset: str, rows: list[dict], init: float = 0.20, device="NVIDIA H100 80GB HBM3") -> None:
    d = root / f"accept_{preset}"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"bench_{preset}.json").write_text(json.dumps({
        "device": device, "created": "now", "command": "bench", "complete": True, "results": rows,
        "eval_full_vocab_jsd_init": init, "kernel": {"status": "just-in-time build of csrc/", "loaded": True}}))


def _cache(root: Path, ratio: float, device="NVIDIA H100 80GB HBM3") -> None:
    (root / "accept_cache").mkdir(parents=True, exist_ok=True)
    run = {"samples_per_s": 50.0, "valid_loss": 10.0}
    (root / "accept_cache" / "bench_online_vs_cached.json").write_text(json.dumps({
        "device": device, "date": "today", "command": "bench", "teacher": "t", "student": "s", "complete": True,
        "runs": {"online": run, "cached": {**run, "samples_per_s": 50.0 * ratio}},
        "cached_vs_online_student_samples_per_s": ratio, "kernel": {"status": "x", "loaded": True}}))


def test_verdicts_match_the_committed_runs(tmp_path):
    root = _batch(tmp_path / "batch")
    # A profiled kdtrain row (bench_vs_trl.py --profile) gets its line on where the step goes.
    _edit(root / "accept_llama" / "bench_llama.json", lambda rep: rep["results"][2].update(profile={"0": {
        "device": "cuda", "steps": 2, "wall_s_per_step": 0.5, "device_busy_s_per_step": 0.45,
        "device_busy_fraction": 0.9, "kernels_per_step": 12000.0,
        "by_category_s_per_step": {"matmul": 0.3, "other": 0.1, "kd_loss": 0.05}}}))
    text, met = verdict(root)
    assert ("- kdtrain-colocated: step 500 ms, device busy 450 ms (90%), 12000 kernels; busy ms by category: "
            "matmul 300, other 100, kd_loss 50") in text
    assert met == {"vs_trl_llama": False, "vs_trl_qwen": False, "cached_vs_online": False}
    # Memory by peak reserved (27.9 / 12.0 GiB), max allocated beside it (26.9 / 11.3).
    assert "| kdtrain-colocated | 60.64 | 1.27x | 12.0 | 11.3 | 0.1131 | missed | met | missed | missed |" in text
    assert "| trl-gkd | 47.78 | 1.00x | 27.9 | 26.9 | 0.0992 |" in text
    assert "speed 1.39x TRL GKD (target 1.67x: missed by 0.28x" in text
    assert "1.93x (target 2.0x: missed by 0.07x)" in text
    assert "Loss: comparable when kdtrain's student improves" in text and "peak reserved" in text
    assert "Device: NVIDIA H100 80GB HBM3" in text and "Not an H100" not in text
    text, met = verdict(_batch(tmp_path / "partial", with_cache=False))
    assert met["cached_vs_online"] is None and "Online vs cached: not measured" in text


def test_target_needs_speed_memory_and_loss_and_the_summary_agrees(tmp_path):
    trl = _row("trl-gkd", 10.0, 30.0, 0.10)  # improves 0.20 -> 0.10
    cases = {
        "all": (_row("kdtrain-colocated-graphs", 17.0, 12.0, 0.11), True),  # 90% of TRL's improvement
        "slow": (_row("kdtrain-colocated-graphs", 16.0, 12.0, 0.11), False),
        "memory": (_row("kdtrain-colocated-graphs", 20.0, 31.0, 0.11), False),
        "loss": (_row("kdtrain-colocated-graphs", 20.0, 12.0, 0.13), False),  # 70% < 80%
        "unscored": (_row("kdtrain-colocated-graphs", 20.0, 12.0, None), None),
    }
    for name, (ours, want) in cases.items():
        root = tmp_path / name
        _pair(root, "llama", [trl, ours])
        text, met = verdict(root)
        assert met["vs_trl_llama"] is want, (name, text)
        summary = next(line for line in text.splitlines() if line.startswith("Best:"))
        target = next(line for line in text.splitlines() if line.startswith("- vs_trl_llama"))
        word = {True: "met", False: "missed", None: "not decided"}[want]
        assert summary.endswith(f"**{word}**."), (name, summary)
        assert target.endswith(word), (name, target)
    # The loss rule's arithmetic: 0.2 -> 0.11 is 90% of TRL's 0.2 -> 0.10.
    ok, words = accept_report.loss_verdict({"eval_full_vocab_jsd": 0.11}, {"eval_full_vocab_jsd": 0.10}, 0.20)
    assert ok and "90% of TRL GKD's" in words
    # A student that did not improve is never comparable, even next to a TRL student that did not.
    assert accept_report.loss_verdict({"eval_full_vocab_jsd": 0.21}, {"eval_full_vocab_jsd": 0.22}, 0.20)[0] is False
    # The pair is met by any kdtrain row that meets everything (e.g. the eager fallback).
    root = tmp_path / "fallback"
    _pair(root, "llama", [trl, _row("kdtrain-colocated-graphs", 0, 0, None, status="failed"),
                          _row("kdtrain-colocated", 18.0, 12.0, 0.105)])
    text, met = verdict(root)
    assert met["vs_trl_llama"] is True and "kdtrain-colocated-graphs failed: boom" in text


def test_memory_is_compared_like_for_like(tmp_path):
    """A graphed kdtrain run's max allocated (8 GiB) is under TRL's, its peak reserved (graph pools,
    40 GiB) is not: the verdict uses peak reserved for both."""
    root = tmp_path / "b"
    _pair(root, "llama", [_row("trl-gkd", 10.0, 30.0, 0.10, allocated=29.0),
                          _row("kdtrain-colocated-graphs", 20.0, 40.0, 0.10, allocated=8.0)])
    text, met = verdict(root)
    assert met["vs_trl_llama"] is False
    assert "memory 40.0 vs 30.0 GiB peak reserved (1.33x TRL's: missed)" in text


def test_device_is_named_and_an_h200_batch_is_not_filed_as_h100(tmp_path):
    assert accept_report.device_tag("NVIDIA H100 80GB HBM3") == "h100"
    assert accept_report.device_tag("NVIDIA H200") == "h200"
    assert accept_report.device_tag("NVIDIA A100-SXM4-80GB") == "a100"
    assert accept_report.device_tag("cpu (2 cores)") == "cpu"
    root = tmp_path / "h200"
    rows = [_row("trl-gkd", 10.0, 30.0, 0.10), _row("kdtrain-colocated-graphs", 17.0, 12.0, 0.105)]
    for preset in ("llama", "qwen"):
        _pair(root, preset, rows, device="NVIDIA H200")
    _cache(root, 2.1, device="NVIDIA H200")
    text, met = verdict(root)
    assert "Device: NVIDIA H200" in text and "**Not an H100 batch** (h200)" in text
    assert "## Targets (on NVIDIA H200, not an H100)" in text
    dest = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "accept_report.py"), str(root), "--install",
                           str(dest)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in dest.iterdir()) == ["accept_h200", "online_vs_cached_h200", "vs_trl_h200"]


def test_cli_writes_and_installs(tmp_path):
    root = _batch(tmp_path / "batch")
    dest = tmp_path / "results"
    cmd = [sys.executable, str(REPO / "benchmarks" / "accept_report.py"), str(root), "--install", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (root / "accept_verdict.md").read_text() == (dest / "accept_h100" / "verdict.md").read_text()
    assert (dest / "vs_trl_h100" / "bench_qwen.json").read_bytes() == \
        (RESULTS / "vs_trl_h100" / "bench_qwen.json").read_bytes()
    assert (dest / "online_vs_cached_h100" / "bench_online_vs_cached.json").is_file()
    assert not (dest / "vs_trl_h100" / "bench_llama_tcompiled.json").exists()  # not in this batch
    bad = subprocess.run([sys.executable, str(REPO / "benchmarks" / "accept_report.py"), str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "is not a directory" in bad.stderr


def test_a_graphed_row_whose_eager_fallback_ran_does_not_block_the_install(tmp_path):
    root = _batch(tmp_path / "batch")
    _edit(root / "accept_llama" / "bench_llama.json",
          lambda r: r["results"].append(_row("kdtrain-colocated-graphs", 0, 0, None, status="failed")))
    from accept_report import batch_problems

    assert batch_problems(root) == []
    _edit(root / "accept_llama" / "bench_llama.json",
          lambda r: r["results"][2].update(status="failed"))  # and the eager one too
    assert any("kdtrain-colocated" in p for p in batch_problems(root))


@pytest.mark.parametrize("spoil", ["no_cache", "failed_row", "incomplete", "unscored", "kernel", "mixed_devices"])
def test_install_refuses_an_incomplete_batch_unless_forced(tmp_path, spoil):
    root = _batch(tmp_path / "batch", with_cache=spoil != "no_cache")
    llama = root / "accept_llama" / "bench_llama.json"
    if spoil == "failed_row":
        _edit(llama, lambda r: r["results"][1].update(status="failed"))  # TRL with Liger
    elif spoil == "incomplete":
        _edit(llama, lambda r: r.update(complete=False))
    elif spoil == "unscored":
        _edit(llama, lambda r: r["results"][2].update(eval_full_vocab_jsd=None, eval_status="not finished: timeout"))
    elif spoil == "kernel":
        _edit(llama, lambda r: r.update(kernel={"status": "kdtrain._C not built; build failed", "loaded": False}))
    elif spoil == "mixed_devices":
        _edit(llama, lambda r: r.update(device="NVIDIA H200"))
    dest = tmp_path / "results"
    cmd = [sys.executable, str(REPO / "benchmarks" / "accept_report.py"), str(root), "--install", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and "not installing" in proc.stderr and not dest.exists(), proc.stderr
    assert "## Not a complete batch" in (root / "accept_verdict.md").read_text()
    forced = subprocess.run([*cmd, "--force"], capture_output=True, text=True, timeout=60)
    assert forced.returncode == 0 and (dest / ("accept_unknown-device" if spoil == "mixed_devices" else "accept_h100")
                                       / "verdict.md").is_file(), forced.stderr


# ---- benchmarks/batch_tools.py ---------------------------------------------------------------------
def _members(tgz: Path) -> set[str]:
    with tarfile.open(tgz) as t:
        return {m.name for m in t.getmembers() if m.isfile()}


def test_pack_leaves_out_what_cannot_return_and_guards_the_size(tmp_path):
    import os

    work, out = tmp_path / "work", tmp_path / "out"
    (work / "accept_llama" / "work" / "llama" / "kdtrain-colocated" / "profile").mkdir(parents=True)
    (work / "accept_llama" / "bench_llama.json").write_text('{"results": []}')
    (work / "accept_llama.log").write_text("log\n")
    (work / "accept_llama" / "work" / "llama" / "kdtrain-colocated" / "profile" / "rank0_trace.json.gz").write_bytes(b"x" * 100)
    (work / "accept_llama" / "work" / "llama" / "trl-gkd.trained.json.part").write_text("{")
    cache = work / "accept_cache" / "cache"  # a teacher cache left by a killed pass
    cache.mkdir(parents=True)
    (cache / "manifest.json").write_text("{}")
    (cache / ".shard_000001.bin.tmp").write_bytes(b"\0" * 1000)
    (cache / "shard_000000.bin").write_bytes(b"\0" * 1000)
    (work / "accept_cache" / "bench_online_vs_cached.json").write_text("{}")
    (work / "accept_cache" / "model.safetensors").write_bytes(b"\0" * 1000)
    (work / "cache").mkdir()  # a stage's own output directory named cache (no teacher cache in it)
    (work / "cache" / "bench_online_vs_cached.json").write_text("{}")
    done = batch_tools.pack(work, out)
    names = _members(out / "results.tgz")
    assert names == {"accept_llama/bench_llama.json", "accept_llama.log", "accept_cache/bench_online_vs_cached.json",
                     "cache/bench_online_vs_cached.json"}, names
    assert done["tier"] == 1 and not done["dropped"]
    assert _members(out / "traces.tgz") == {"accept_llama/work/llama/kdtrain-colocated/profile/rank0_trace.json.gz"}
    assert sorted(p.name for p in out.iterdir()) == ["results.tgz", "traces.tgz"]  # no temporary files left
    # Too big for the limit: files over 1 MiB go (largest first), listed in PACKING.txt.
    (work / "accept_llama" / "huge.log").write_bytes(os.urandom(3 * 2**20))
    done = batch_tools.pack(work, out, limit=2**20)
    names = _members(out / "results.tgz")
    assert "accept_llama/huge.log" not in names and "PACKING.txt" in names and done["tier"] == 2
    assert "accept_llama/bench_llama.json" in names
    with tarfile.open(out / "results.tgz") as t:
        assert "accept_llama/huge.log (3.0 MiB)" in t.extractfile("PACKING.txt").read().decode()
    # Still too big (many mid-size files): only the reports, and the tails of logs.
    for i in range(4):
        (work / f"blob{i}.dat").write_bytes(os.urandom(900 * 1024))
    done = batch_tools.pack(work, out, limit=2**20)
    names = _members(out / "results.tgz")
    assert done["tier"] == 3 and not any(n.startswith("blob") for n in names)
    assert {"accept_llama/bench_llama.json", "accept_llama/huge.log", "PACKING.txt"} <= names
    with tarfile.open(out / "results.tgz") as t:
        assert len(t.extractfile("accept_llama/huge.log").read()) < 70 * 1024


def test_gate_needs_passed_tests_not_skipped_ones(tmp_path):
    def junit(**counts):
        attrs = " ".join(f'{k}="{v}"' for k, v in counts.items())
        path = tmp_path / "r.xml"
        path.write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest" {attrs}></testsuite></testsuites>')
        return path

    assert batch_tools.gate(junit(tests=2, failures=0, errors=0, skipped=0))[0]
    assert not batch_tools.gate(junit(tests=2, failures=0, errors=0, skipped=2))[0]  # no CUDA: skipped
    assert not batch_tools.gate(junit(tests=2, failures=1, errors=0, skipped=0))[0]
    assert not batch_tools.gate(junit(tests=0, failures=0, errors=0, skipped=0))[0]
    assert not batch_tools.gate(tmp_path / "missing.xml")[0]  # killed before it wrote its report
    rep = tmp_path / "bench.json"
    rep.write_text(json.dumps({"results": [{"system": "kdtrain-colocated-graphs", "status": "failed"}]}))
    assert batch_tools.row_status(rep, "kdtrain-colocated-graphs") == "failed"
    assert batch_tools.row_status(rep, "trl-gkd") == "missing"
    assert batch_tools.row_status(tmp_path / "none.json", "trl-gkd") == "missing"


def test_real_pytest_skips_fail_the_gate(tmp_path):
    """What run_h100.sh's accept_gate runs, on a machine without CUDA: both tests skip, and the gate
    says not passed (it passed the stage before)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    xml = tmp_path / "gate.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_cuda_graphs_gpu.py", "-k",
                    "train_like_eager", "-p", "no:cacheprovider", f"--junitxml={xml}"], cwd=REPO,
                   capture_output=True, text=True, timeout=300)
    ok, what = batch_tools.gate(xml)
    assert not ok and "2 skipped" in what, what
