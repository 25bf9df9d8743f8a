"""Ranks that idle while others work alone (an on-policy step's sampling, the students' checkpoint
saves) wait under ``distributed.idle_timeout_s``, not under ``distributed.timeout_s``, which stays
short to catch hung collectives; a wait that still runs out names itself and the key to raise, and
a run whose sampling the planner estimates longer than that bound is refused at start.

The run tests are two gloo ranks, disaggregated (teacher rank 0, student rank 1), tiny models on
mock data, with the world group's timeout set to ``distributed.timeout_s`` as torchrun's
``init_distributed`` sets it, and the student made slow where it works alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import read_metrics, run_spawn

pytestmark = pytest.mark.slow
SLOW_S = 7.0  # the student's work alone: longer than the short bounds below
SHORT_S = 4  # distributed.timeout_s and split.timeout_s of the runs


def _distill_with_a_slow_student(rank, world, root, what, overrides, runs, slow_from):
    """``runs`` distillations in a row (their log dirs ``root/run<i>``), the student's sampling or
    saves (``what``) taking SLOW_S longer from run ``slow_from`` on; writes this rank's outcome of
    each (up to the first error)."""
    import time
    from datetime import timedelta

    import torch.distributed as dist

    import kdtrain.models.generate as generate
    import kdtrain.training.distill as loop
    from kdtrain.config.distill import load_distill_config

    args = ["data.mock=true", "split.mode=disaggregated", "split.teacher_ranks=1", "training.train_steps=2",
            "training.eval_batches=0", f"distributed.timeout_s={SHORT_S}", f"split.timeout_s={SHORT_S}", *overrides]
    cfg = load_distill_config("tiny", args)
    dist.destroy_process_group()  # the world group with distributed.timeout_s, as init_distributed makes it
    dist.init_process_group("gloo", init_method=f"file://{root}/world", rank=rank, world_size=world,
                            timeout=timedelta(seconds=cfg.distributed.timeout_s))
    real_sample, real_save = generate.sample_replies, loop.save_role

    def slow(real):
        def call(*a, **kw):
            time.sleep(SLOW_S)
            return real(*a, **kw)
        return call

    outcomes = []
    for i in range(runs):
        if i == slow_from:
            if what == "sampling":  # sampled_windows imports it at each call
                generate.sample_replies = slow(real_sample)
            else:
                loop.save_role = slow(real_save)
        run_cfg = load_distill_config("tiny", args + [f"logging.dir={root}/run{i}", f"checkpoint.dir={root}/ck{i}"])
        try:
            outcomes.append({"step": loop.distill(run_cfg)["step"]})
        except Exception as e:  # noqa: BLE001 - the test reads the type and the message
            outcomes.append({"error": type(e).__name__, "message": str(e)})
            break
    Path(f"{root}/rank{rank}.json").write_text(json.dumps(outcomes))


def _outcomes(tmp_path: Path) -> list[list[dict]]:
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


ONPOLICY = ["onpolicy.fraction=1", "onpolicy.prompt_length=8"]


@pytest.mark.parametrize("what,overrides", [("sampling", ONPOLICY), ("saves", ["checkpoint.save_interval=1"])])
def test_a_teacher_waits_through_the_students_slow_work_and_trains_the_same(tmp_path, what, overrides):
    """The teacher waits for the student's sampling on every (on-policy) step, or for its saves
    after every step, each SLOW_S, longer than distributed.timeout_s: the run completes, with the
    losses of the same run without the delay, bit for bit."""
    run_spawn(2, _distill_with_a_slow_student, str(tmp_path), what, overrides, 2, 1, tmp_path=tmp_path)
    assert _outcomes(tmp_path) == [[{"step": 2}] * 2] * 2
    fast, slow = (read_metrics(tmp_path / f"run{i}") for i in range(2))
    assert sorted(fast) == sorted(slow) == [1, 2]
    if what == "sampling":
        assert all(slow[s]["onpolicy"] == 1 and slow[s]["sample_s"] > SLOW_S for s in slow)
    else:
        assert (tmp_path / "ck1" / "latest").read_text().strip() == "step_0000002"
    for key in ("loss", "grad_norm"):
        assert [fast[s][key] for s in (1, 2)] == [slow[s][key] for s in (1, 2)]


@pytest.mark.parametrize("what,overrides,named", [
    ("sampling", ONPOLICY, "the on-policy hand-off of step 1"),
    ("saves", ["checkpoint.save_interval=1"], "waiting while the students save the step-1 checkpoint"),
])
def test_an_idle_wait_that_runs_out_names_itself_and_the_key(tmp_path, what, overrides, named):
    """distributed.idle_timeout_s shorter than the student's work alone: the teacher gives up
    waiting with an error naming the wait and the key (not gloo's bare timeout), and the student,
    arriving after it left, reports the same wait."""
    run_spawn(2, _distill_with_a_slow_student, str(tmp_path), what, [*overrides, "distributed.idle_timeout_s=1"], 1, 0,
              tmp_path=tmp_path)
    (teacher,), (student,) = _outcomes(tmp_path)
    for side in (teacher, student):
        assert side["error"] == "IdleWaitTimeout", side
        assert named in side["message"] and "distributed.idle_timeout_s = 1 s" in side["message"], side
        assert "raise distributed.idle_timeout_s" in side["message"], side
    assert teacher["message"].startswith("rank 0: ") and student["message"].startswith("rank 1: ")
    # The teacher ran out of time; the student found it gone, which its message says (not a
    # timeout of its own).
    assert "the ranks did not all arrive within" in teacher["message"], teacher
    assert "another rank left the run while this one waited" in student["message"], student


def test_a_run_whose_sampling_outlasts_the_idle_bound_is_refused_at_start(tmp_path):
    """The planner's estimate of the tiny student's sampling on this CPU (its ``cpu`` profile) is
    milliseconds: a bound of 0.1 ms refuses the run on both ranks before any group is built."""
    run_spawn(2, _distill_with_a_slow_student, str(tmp_path), "sampling",
              [*ONPOLICY, "distributed.idle_timeout_s=0.0001"], 1, 0, tmp_path=tmp_path)
    for (side,) in _outcomes(tmp_path):
        assert side["error"] == "ValueError", side
        assert side["message"].startswith("distributed.idle_timeout_s: 0.0001 s is shorter than an on-policy step's "
                                          "sampling"), side
        assert "profile cpu" in side["message"], side


def _shipped(*overrides: str):
    from kdtrain.config.distill import load_distill_config

    cfg = load_distill_config("llama-3.1-8b-to-3.2-1b-8xh100", ["onpolicy.fraction=0.25",
                                                                "onpolicy.prompt_length=128", *overrides])
    return cfg, cfg.validate(8).student


DISAGG = ["split.mode=disaggregated", "split.teacher_ranks=4", "teacher.dp=4", "student.dp=4"]


def test_the_idle_bound_is_checked_against_the_planners_sampling_estimate():
    """Llama-3.1-8B -> 3.2-1B on 8 H100s, disaggregated 4 + 4, seq 4096: the planner's estimate of
    a step's sampling (24 rows per student replica) against distributed.idle_timeout_s."""
    import re

    from kdtrain.planner.memory import ModelShape
    from kdtrain.planner.profiles import get_profile
    from kdtrain.planner.timing import sampling_time
    from kdtrain.training.onpolicy import check_sampling_time

    estimate = sampling_time(ModelShape.of(_shipped()[0].student.model), 1, 1, 4096, 24, 1, 128, get_profile("h100"))
    assert 60 < estimate < 10800
    cfg, student = _shipped(*DISAGG, "distributed.idle_timeout_s=60")
    with pytest.raises(ValueError, match=r"^distributed\.idle_timeout_s: 60 s is shorter") as err:
        check_sampling_time(cfg, student, "h100", fp32=False)
    assert re.search(rf"estimates {estimate:.0f} s \(1 call\(s\) of 24 rows per student replica", str(err.value))
    assert "profile h100-80gb" in str(err.value)
    check_sampling_time(*_shipped(*DISAGG, f"distributed.idle_timeout_s={estimate * 1.01}"), "h100", fp32=False)
    check_sampling_time(*_shipped(*DISAGG), "h100", fp32=False)  # the default (3 h)
    # Colocated with one student replica on every rank: every rank samples and none waits.
    check_sampling_time(*_shipped("student.dp=1", "student.tp=8", "distributed.idle_timeout_s=1"), "h100", fp32=False)
    # Colocated replicas that finish first wait for the slowest.
    with pytest.raises(ValueError, match=r"distributed\.idle_timeout_s: 1 s"):
        check_sampling_time(*_shipped("distributed.idle_timeout_s=1"), "h100", fp32=False)
    # No on-policy steps: nothing to check.
    check_sampling_time(*_shipped(*DISAGG, "onpolicy.fraction=0", "distributed.idle_timeout_s=1"), "h100", fp32=False)


@pytest.mark.parametrize("value", ["0", "-5", "inf", "nan"])
def test_the_idle_bound_must_be_a_positive_number_of_seconds(value):
    from kdtrain.config.distill import load_distill_config

    with pytest.raises(ValueError, match=r"^distributed\.idle_timeout_s: (must be a positive number of seconds|"
                                         r"expected a finite number)"):
        load_distill_config("tiny", [f"distributed.idle_timeout_s={value}"])


def _check_on_other_gpus(rank, world, bound):
    from kdtrain.training.onpolicy import check_sampling_time

    cfg, student = _shipped(*DISAGG, f"distributed.idle_timeout_s={bound}")
    # Rank 1 sees a slower GPU than rank 0 (no split.profile: each rank takes its device's).
    with pytest.raises(ValueError, match=r"distributed\.idle_timeout_s: .* s is shorter"):
        check_sampling_time(cfg, student, "h100" if rank == 0 else "a100", fp32=False)


def test_every_rank_refuses_when_one_ranks_estimate_exceeds_the_bound(tmp_path):
    """Ranks whose devices differ estimate the sampling apart: one refusing alone would leave the
    others waiting in the next collective; every rank raises."""
    from kdtrain.planner.memory import ModelShape
    from kdtrain.planner.profiles import get_profile
    from kdtrain.planner.timing import sampling_time

    shape = ModelShape.of(_shipped()[0].student.model)
    fast, slow = (sampling_time(shape, 1, 1, 4096, 24, 1, 128, get_profile(p)) for p in ("h100", "a100"))
    assert fast < slow
    run_spawn(2, _check_on_other_gpus, (fast + slow) / 2, tmp_path=tmp_path)


def _mixed_with_slow_cached_steps(rank, world, root):
    """A cache of the tiny teacher's first 3 steps, then a mixed run, disaggregated, with the live
    teacher on step 2 only (live_fraction 0.5) and the student's cached steps each SLOW_S slow;
    writes this rank's outcome."""
    import time
    from datetime import timedelta

    import torch.distributed as dist

    import kdtrain.cache.source as source
    import kdtrain.training.distill as loop
    from kdtrain.cache.job import CacheJobConfig, run_cache_job
    from kdtrain.config.distill import load_distill_config

    args = ["data.mock=true", "training.train_steps=3", "training.eval_batches=0", "precision.dtype=fp32",
            f"distributed.timeout_s={SHORT_S}", f"split.timeout_s={SHORT_S}"]
    dist.destroy_process_group()  # the world group with distributed.timeout_s, as init_distributed makes it
    dist.init_process_group("gloo", init_method=f"file://{root}/world", rank=rank, world_size=world,
                            timeout=timedelta(seconds=SHORT_S))
    run_cache_job(load_distill_config("tiny", args), CacheJobConfig(out=f"{root}/cache", dtype="fp32"),
                  log=lambda msg: None)
    real = source.CachedPayloads.start_step

    def slow_start(self, *a, **kw):  # the student's every cached step
        time.sleep(SLOW_S)
        return real(self, *a, **kw)

    source.CachedPayloads.start_step = slow_start
    cfg = load_distill_config("tiny", args + [
        "split.mode=disaggregated", "split.teacher_ranks=1", "teacher.source=mixed", f"teacher.cache={root}/cache",
        "teacher.live_fraction=0.5", f"logging.dir={root}/run", f"checkpoint.dir={root}/ck"])
    try:
        outcome = {"step": loop.distill(cfg)["step"]}
    except Exception as e:  # noqa: BLE001 - the test reads the type and the message
        outcome = {"error": type(e).__name__, "message": str(e)}
    Path(f"{root}/rank{rank}.json").write_text(json.dumps([outcome]))


def test_a_mixed_runs_teacher_waits_through_the_students_cached_steps(tmp_path):
    """Mixed source, disaggregated: the teacher has nothing to do on cached steps and reaches the
    next live step first; it waits there for the students (idle bound), not in its sends, whose
    bound split.timeout_s (here shorter than a cached step) is meant for a dead peer."""
    run_spawn(2, _mixed_with_slow_cached_steps, str(tmp_path), tmp_path=tmp_path)
    assert _outcomes(tmp_path) == [[{"step": 3}]] * 2
    metrics = read_metrics(tmp_path / "run")
    assert [metrics[s]["teacher_live"] for s in (1, 2, 3)] == [0, 1, 0]
