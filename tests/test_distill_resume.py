"""Stopping a distillation run and resuming it continues the uninterrupted run's curve.

The first job stops after step 4 (a checkpoint is written there on every rank's role: the student's
weights, optimizer state and RNG; the teacher is rebuilt from its own weights), and the same command
resumes from it. The disaggregated layout stops on a time limit every rank passes in step 1
(``training.exit_duration_min``): the ranks agree on it split.depth + 1 = 3 steps later
(kdtrain/training/stop_requests.py); the colocated one after ``training.exit_interval=4`` steps. The
student's later steps, its held-out losses and the teacher's payloads must be those of the run that
never stopped (fp32 on CPU: 1e-6). Two 2-rank layouts, each with half the steps on the student's own
samples (keyed by sample id, so the samples must repeat exactly): a disaggregated split (the
teacher's rank runs ahead of the student and must stop at the same step), and a colocated one with
two student replicas under ZeRO-1 (each rank writes its optimizer shard) whose data steps come from
a teacher cache with half of them live (the cache reader and its prefetcher restart mid-run).
"""

from __future__ import annotations

import json

import pytest

from conftest import read_metrics, run_entries

pytestmark = pytest.mark.slow
STEPS, STOP = 8, 4
ONPOLICY = ["onpolicy.fraction=0.5", "onpolicy.prompt_length=8"]
LAYOUTS = {
    # Saves at steps 3 and 6 written in the background (the teacher rank waits for their
    # publication a step later; step 3's is published just before the stop's save at step 4).
    "disagg": ["split.mode=disaggregated", "split.teacher_ranks=1", "checkpoint.save_interval=3",
               "checkpoint.async_save=true", "checkpoint.keep=4"],
    "zero1-mixed": ["student.dp=2", "optimizer.distributed=true", "teacher.source=mixed", "teacher.live_fraction=0.5"],
}
# How each layout's first job stops after step STOP, and the line it writes then.
STOPS = {"disagg": ("training.exit_duration_min=1e-6",
                    "training.exit_duration_min: 1e-06 min passed since the job started"),
         "zero1-mixed": (f"training.exit_interval={STOP}", "exit_interval reached")}


@pytest.fixture(scope="module")
def resumed(tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("distill-resume")
    data = [f"data.path=[{tiny_corpus['prefix']}]", f"data.tokenizer={tiny_corpus['tokenizer']}"]
    cache = root / "cache"
    jobs = [("cache_teacher.py", ["--config", "tiny", "--out", str(cache), *data, "cache.dtype=fp32",
                                  f"training.train_steps={STEPS}"])]
    for name, layout in LAYOUTS.items():
        common = ["--config", "tiny", *data, *ONPOLICY, *layout, f"training.train_steps={STEPS}",
                  "training.eval_interval=2", "logging.interval=1"]
        if "teacher.source=mixed" in layout:
            common.append(f"teacher.cache={cache}")
        jobs.append(("distill_gpt.py", [*common, f"logging.dir={root / name / 'ref'}"]))
        stopped = [*common, f"logging.dir={root / name / 'run'}", f"checkpoint.dir={root / name / 'ckpt'}"]
        jobs.append(("distill_gpt.py", [*stopped, STOPS[name][0]]))
        jobs.append(("distill_gpt.py", stopped))
    jobs.append(("distill_gpt.py", stopped))  # the finished command again: nothing left to train
    outputs = run_entries(2, jobs, root / "launch")
    return root, outputs


def test_rerunning_a_finished_command_says_there_is_nothing_to_train(resumed):
    root, outputs = resumed
    assert f"resumed from step {STEPS} of" in outputs[-1]["stdout"]
    assert f"training.train_steps={STEPS} already reached: nothing to train" in outputs[-1]["stdout"]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_resumed_run_continues_the_uninterrupted_curve(resumed, name):
    root, outputs = resumed
    ref = read_metrics(root / name / "ref")
    got = read_metrics(root / name / "run")
    assert sorted(ref) == sorted(got) == list(range(1, STEPS + 1))
    assert {s for s in ref if ref[s].get("onpolicy")} == {2, 4, 6, 8}  # sampled steps on both sides of the stop
    assert (root / name / "ckpt" / f"step_{STOP:07d}").is_dir()  # written by the stop
    if "checkpoint.async_save=true" in LAYOUTS[name]:
        assert sorted(p.name for p in (root / name / "ckpt").glob("step_*")) == [
            f"step_{s:07d}" for s in (3, STOP, 6, STEPS)]
    for s in range(1, STEPS + 1):
        for key in ("loss", "kd_loss", "grad_norm"):
            assert got[s][key] == pytest.approx(ref[s][key], rel=1e-6, abs=1e-9), (name, s, key)
        if "sampled_tokens" in ref[s]:
            assert got[s]["sampled_tokens"] == ref[s]["sampled_tokens"], (name, s)
    ref_valid, got_valid = read_metrics(root / name / "ref", "valid"), read_metrics(root / name / "run", "valid")
    assert sorted(ref_valid) == sorted(got_valid) == [2, 4, 6, 8]
    for s in ref_valid:
        for key in ("valid_loss", "valid_kd_loss"):
            assert got_valid[s][key] == pytest.approx(ref_valid[s][key], rel=1e-6), (name, s, key)
    first_half, second_half = (outputs[1 + 3 * list(LAYOUTS).index(name) + i]["stdout"] for i in (1, 2))
    assert f"{STOPS[name][1]}: stopping after step {STOP}" in first_half
    assert f"resumed from step {STOP} of {root / name / 'ckpt'}" in second_half
    # The second job resumed at step 5: each step was trained (and logged) once in the two jobs.
    logged = [json.loads(line)["step"] for line in (root / name / "run" / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "train"]
    assert logged == list(range(1, STEPS + 1)), logged


def test_a_resume_with_other_settings_is_reported_once_or_refused(tmp_path):
    """A resumed job that extends the run or changes the optimizer goes on, the changes reported
    once in the run's log (written by the student's first rank, after a disaggregated teacher
    rank); another top-k (or teacher, loss, dtype: tests/test_checkpoint.py) is refused, naming
    the field."""
    common = ["--config", "tiny", "data.mock=true", *LAYOUTS["disagg"], f"checkpoint.dir={tmp_path / 'ckpt'}",
              "training.exit_interval=2", "training.eval_batches=0"]
    jobs = [("distill_gpt.py", [*common, "training.train_steps=4", f"logging.dir={tmp_path / 'a'}"]),
            ("distill_gpt.py", [*common, "training.train_steps=6", "optimizer.lr=1e-2",
                                f"logging.dir={tmp_path / 'b'}"]),
            ("distill_gpt.py", [*common, "training.train_steps=6", "teacher.topk=4", f"logging.dir={tmp_path / 'c'}"])]
    outputs = run_entries(2, jobs, tmp_path / "launch", last_fails=True)
    extended = outputs[1]
    assert extended["stdout"].count("resumed from step 2 of") == 1, extended["stdout"]
    assert ("(checkpoint.resume) with other settings than it records (optimizer.lr: 0.003 -> 0.01; "
            "training.train_steps: 4 -> 6): the run goes on with the new values; the learning rate from step 3 on "
            "follows the new schedule") in extended["stdout"], extended["stdout"]
    refused = outputs[2]
    assert refused["returncode"] != 0
    assert "error: teacher.topk: 4 here, 16 in" in refused["stderr"], refused["stderr"][-3000:]
    # ... and torchrun's closing summary shows it as the root cause (not "<N/A>" and a link).
    assert "traceback : teacher.topk: 4 here, 16 in" in refused["stderr"], refused["stderr"][-3000:]
