"""benchmarks/bench_vs_trl.py --cpu-tiny end to end: every system either ran or says why it was
skipped, the losses and the common evaluation are finite and consistent, and the report records
the TRL version and the flags that make the comparison like for like."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_bounded

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SYSTEMS = ("trl-gkd", "trl-gkd-liger", "kdtrain-colocated", "kdtrain-disaggregated")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_vs_trl")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # --profile, as run_h100.sh's acceptance run: its extra profiled steps follow the timed ones.
    proc = run_bounded([sys.executable, str(REPO / "benchmarks" / "bench_vs_trl.py"), "--cpu-tiny", "--profile",
                        "--out", str(out)], 300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, json.loads((out / "bench_cpu-tiny.json").read_text())


def test_every_system_ran_or_says_why_not(report):
    out, r = report
    by = {x["system"]: x for x in r["results"]}
    assert set(by) == set(SYSTEMS)
    for name, x in by.items():
        assert x["status"] in ("ok", "skipped"), (name, x["reason"])
        if x["status"] == "skipped":
            assert x["reason"], name
    # What can run on CPU must run: kdtrain in both splits, and TRL when it is installed.
    assert by["kdtrain-colocated"]["status"] == by["kdtrain-disaggregated"]["status"] == "ok"
    import importlib.util

    if importlib.util.find_spec("trl") is not None:
        assert by["trl-gkd"]["status"] == "ok"
    assert (out / "bench_cpu-tiny.png").stat().st_size > 0
    assert not (out / "work" / "cpu-tiny" / "models").exists()  # heavy files are cleaned up


def test_losses_rates_and_evaluation(report):
    _, r = report
    steps = r["settings"]["steps"]
    init = r["eval_full_vocab_jsd_init"]
    assert math.isfinite(init) and init > 0
    assert 0 < r["teacher_eval"]["teacher_topk_mass"] < 1 and r["teacher_eval"]["teacher_entropy"] > 0
    ok = [x for x in r["results"] if x["status"] == "ok"]
    for x in ok:
        trained = steps + (2 if x.get("profile") else 0)  # the profiled steps train too
        assert len(x["losses"]) == trained and all(math.isfinite(v) and v > 0 for v in x["losses"]), x["system"]
        assert x["final_loss"] == x["losses"][-1]
        assert x["samples_per_s"] > 0 and x["tokens_per_s"] == pytest.approx(x["samples_per_s"] * r["settings"]["seq_length"])
        assert x["peak_memory_gib"] > 0 and len(x["peak_memory_per_device_gib"]) == x["num_devices"]
        # A few small steps barely move the student: the common score stays near the untrained one
        # (an export of scrambled weights would not), and below it (an export of the untrained
        # weights scores exactly `init`; CPU: 0.2% below for kdtrain, 0.6% for TRL).
        assert x["eval_full_vocab_jsd"] == pytest.approx(init, rel=0.05), x["system"]
        assert x["eval_full_vocab_jsd"] < init, x["system"]
    by = {x["system"]: x for x in ok}
    # Same math, same data, same seeds: the two kdtrain splits agree step by step.
    assert by["kdtrain-colocated"]["losses"] == pytest.approx(by["kdtrain-disaggregated"]["losses"], rel=1e-4)
    if "trl-gkd" in by:
        # TRL's loss is the full-vocabulary JSD on the training windows: at step 1 the same quantity
        # as the untrained score on held-out windows, up to the sample.
        assert by["trl-gkd"]["first_loss"] == pytest.approx(init, rel=0.1)


def test_report_records_versions_and_like_for_like_flags(report):
    _, r = report
    s = r["settings"]
    assert {"seq_length", "micro_batch", "global_batch", "precision", "beta", "topk"} <= set(s)
    assert "torch" in r["versions"] and "trl" in r["versions"]
    assert r["complete"] is True and r["created"]  # written after each system; final once all ran
    by = {x["system"]: x for x in r["results"] if x["status"] == "ok"}
    kd = by["kdtrain-colocated"]["flags"]
    assert kd["loss"] == {"divergence": "jsd", "beta": s["beta"], "tau": 1.0, "alpha": 0.0}
    assert kd["teacher"]["topk"] == s["topk"]
    assert (kd["training"]["micro_batch_size"], kd["training"]["global_batch_size"]) == (s["micro_batch"], s["global_batch"])
    if "trl-gkd" in by:
        assert r["versions"]["trl"]
        f = by["trl-gkd"]["flags"]
        assert f["lmbda"] == 0.0 and f["beta"] == s["beta"] and f["seq_kd"] is False and f["use_liger_kernel"] is False
        assert f["per_device_train_batch_size"] * f["gradient_accumulation_steps"] == s["global_batch"]


def test_your_own_hugging_face_pair(tmp_path):
    """--teacher-hf/--student-hf: the user's own model directories (their weights) with the given
    sequence length and batch; both systems run, the report names the directories, and the
    directories are left as they were. A pair with two vocabularies is refused."""
    import torch
    import transformers

    torch.manual_seed(0)
    dirs = {}
    for role, hidden, layers in (("teacher", 64, 2), ("student", 32, 1)):
        cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=hidden, intermediate_size=2 * hidden,
                                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=64)
        dirs[role] = tmp_path / f"my-{role}"
        transformers.LlamaForCausalLM(cfg).save_pretrained(dirs[role])
    before = {role: sorted(p.name for p in d.iterdir()) for role, d in dirs.items()}
    out = tmp_path / "out"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    bench = [sys.executable, str(REPO / "benchmarks" / "bench_vs_trl.py")]
    proc = run_bounded([*bench, "--teacher-hf", str(dirs["teacher"]), "--student-hf", str(dirs["student"]),
                        "--seq-length", "32", "--micro-batch", "2", "--global-batch", "4", "--steps", "3",
                        "--warmup", "1", "--systems", "trl-gkd,kdtrain-colocated", "--out", str(out)],
                       300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r = json.loads((out / "bench_custom.json").read_text())
    assert r["complete"] and all(x["status"] == "ok" for x in r["results"]), [x["reason"] for x in r["results"]]
    assert (r["settings"]["seq_length"], r["settings"]["micro_batch"], r["settings"]["global_batch"]) == (32, 2, 4)
    assert r["models"]["teacher"]["dir"] == str(dirs["teacher"].resolve())
    assert r["models"]["student"]["hf_config"]["hidden_size"] == 32 and r["settings"]["vocab_size"] == 300
    assert {role: sorted(p.name for p in d.iterdir()) for role, d in dirs.items()} == before

    cfg = json.loads((dirs["student"] / "config.json").read_text())
    (dirs["student"] / "config.json").write_text(json.dumps({**cfg, "vocab_size": 256}))
    bad = subprocess.run([*bench, "--teacher-hf", str(dirs["teacher"]), "--student-hf", str(dirs["student"]),
                          "--out", str(tmp_path / "bad")], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "error: --teacher-hf has vocab_size 300 but --student-hf 256" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_profiled_systems_report_where_the_step_goes(report):
    """--profile (used by run_h100.sh accept): every framework runs its extra profiled steps and
    reports a per-step summary, and the timed steps stay the same count."""
    _, r = report
    for x in (x for x in r["results"] if x["status"] == "ok"):
        prof = x["profile"]["0"]
        assert prof["steps"] == 2 and prof["wall_s_per_step"] > 0 and prof["by_category_s_per_step"], x["system"]
        assert len(x["step_times_s"]) == r["settings"]["steps"] + 2  # timed + profiled


def _fake_job(tmp_path) -> dict:
    return {"work": str(tmp_path), "teacher_yaml": "t.yaml", "teacher_ckpt": "t", "student_yaml": "s.yaml",
            "student_ckpt": "s", "topk": 4, "seq_length": 8, "data_seed": 1, "beta": 0.5, "micro_batch": 1,
            "global_batch": 2, "steps": 3, "warmup": 1, "seed": 1, "lr": 1e-4, "weight_decay": 0.0,
            "adam_betas": [0.9, 0.95], "adam_eps": 1e-8, "clip_grad": 1.0, "device": "cpu", "precision": "fp32"}


def test_a_row_outlives_a_cut_evaluation(tmp_path, monkeypatch):
    """A system whose training finished but whose export/evaluation was cut off (a time limit)
    keeps its row: its timings are published as soon as the training ends (on_trained), and the
    final row says why the held-out score is missing. A system with nothing trained fails, and
    one that cannot start within --budget is skipped with the reason."""
    import argparse
    import time

    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_vs_trl as B

    job = _fake_job(tmp_path)
    args = argparse.Namespace(force_disaggregated=False, deadline=None, budget=None, timeout=60.0)

    def trained_then_cut(job_file, system, timeout, nproc, log_path, poll=None):
        run = tmp_path / system
        if system.startswith("kdtrain"):
            (run / "metrics.jsonl").write_text("".join(json.dumps({"kind": "train", "step": s, "loss": 1.0 / s,
                                                                   "step_time_s": 0.5}) + "\n" for s in (1, 2, 3)))
            (run / "rank0.json").write_text(json.dumps({"peak_memory_gib": 1.0, "peak_reserved_gib": None,
                                                        "peak_memory_kind": "cpu_max_rss",
                                                        "phases_s": {"distill": 2.0}, "phase": "trained"}))
        else:
            (tmp_path / f"{system}.trained.json").write_text(json.dumps({
                "samples_per_s": 4.0, "peak_memory_gib": 2.0, "eval_full_vocab_jsd": None, "losses": [1.0]}))
        assert poll() is True
        return 124, "timed out after 60 s; log"

    for system in ("kdtrain-colocated", "trl-gkd"):
        published = []
        monkeypatch.setattr(B, "_run_worker", trained_then_cut)
        row = B._run_system(system, job, tmp_path / "job.json", 1, args, "fake", on_trained=published.append)
        assert row["status"] == "ok" and row["eval_full_vocab_jsd"] is None, row
        assert row["eval_status"].startswith("not finished: exit code 124"), row["eval_status"]
        assert row["samples_per_s"] == 4.0  # TRL: as written; kdtrain: 2 samples / 0.5 s
        assert len(published) == 1 and published[0]["eval_status"].startswith("pending"), published

    monkeypatch.setattr(B, "_run_worker", lambda *a, **k: (1, "log: Traceback"))
    row = B._run_system("kdtrain-colocated", job, tmp_path / "job.json", 1, args, "fake")
    assert row["status"] == "failed" and row["reason"].startswith("exit code 1"), row

    args.deadline, args.budget = time.monotonic() + 10.0, 100.0
    row = B._run_system("trl-gkd", job, tmp_path / "job.json", 1, args, "fake")
    assert row["status"] == "skipped" and row["reason"].startswith("no time left"), row


def test_worker_timeout_stops_the_whole_process_group(tmp_path):
    """A worker past its time limit is stopped with every process it started (torchrun's ranks
    would otherwise stay on the GPU through the next system's run)."""
    import time

    sys.path.insert(0, str(REPO / "benchmarks"))
    from entry_runs import stop_group

    pid_file = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    for _ in range(100):
        if pid_file.is_file() and pid_file.read_text():
            break
        time.sleep(0.1)
    grandchild = int(pid_file.read_text())
    stop_group(proc, grace_s=2.0)
    assert proc.poll() is not None

    def alive() -> bool:
        try:
            return Path(f"/proc/{grandchild}/stat").read_text().split()[2] != "Z"  # a zombie is gone
        except (FileNotFoundError, ProcessLookupError):
            return False

    # The signal is sent; the process ends when the kernel gets to it (bounded wait, not a sleep).
    deadline = time.monotonic() + 10.0
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive()
