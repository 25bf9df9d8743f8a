"""The entry points' wrapper (``kdtrain.parallel.run_job``): what a failed job prints and returns,
and the teardown that ends every job."""

import gc
import os

import pytest
import torch


def test_teardown_ends_gloo_threads_of_a_group_an_error_still_holds(capsys):
    """An error agreed over a group (``raise_together``) keeps the group alive through its frames
    (a garbage cycle) after ``destroy_process_group``, and gloo's worker threads with it, until
    the interpreter's final collection: a thread releasing a finished collective's tensors then
    aborts the process (SIGABRT) after a job that ended normally. run_job's teardown ends them."""
    import torch.distributed as dist

    from kdtrain.parallel import run_job
    from kdtrain.parallel.groups import raise_together

    def threads() -> int:
        return len(os.listdir("/proc/self/task"))

    def job():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        group = dist.new_group([0])
        dist.all_reduce(torch.ones(3), group=group)
        assert threads() > before  # gloo's worker threads
        raise_together(ValueError("bad value"), group, lambda rank, shown: shown)

    before = threads()
    gc.disable()  # an automatic collection during the test would free the cycle by chance
    try:
        assert run_job(job) == 2
        assert threads() <= before
    finally:
        gc.enable()
    assert capsys.readouterr().err == "error: bad value\n"


def test_a_lost_peer_is_one_line_on_the_survivors(capsys, monkeypatch):
    """A rank whose collective failed because another rank died printed the transport's traceback
    (gloo's 'Connection closed by peer', a store's wait timeout), which names neither the peer nor
    the cause: it is one line, exit code 1, pointing at the rank that stopped first. Other runtime
    errors keep their traceback."""
    from kdtrain.parallel import run_job

    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")

    def lost():
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                           "[127.0.0.1]:36073\nmore detail")

    assert run_job(lost) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("[rank 3] error: lost another rank: a collective or transfer") \
        and "Connection closed by peer [127.0.0.1]:36073)" in err, err

    def bug():
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_job(bug)


def test_torchruns_summary_names_the_failure(tmp_path, monkeypatch):
    """torchrun's closing summary showed "error_file: <N/A>" and a link as the root cause, 30
    lines below a user error's one line: the failure is now in the error file torchrun reads,
    and a rank that only lost another is never shown in place of the one that failed first."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from kdtrain.parallel import run_job

    def failure(rank, job, rc):
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / f"error{rank}.json"))
        assert run_job(job) == rc
        return ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=rc, error_file=str(tmp_path / f"error{rank}.json"))

    def lost():
        raise RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:36073")

    def bad():
        raise ValueError("teacher.topk: 4 here, 16 in the checkpoint")

    # Both in one second (whole-second stamps: a clock passing a second between the two writes
    # would date them apart anyway), the survivor's file written first.
    with monkeypatch.context() as m:
        m.setattr("kdtrain.parallel.dist.time.time", lambda: 1_800_000_000.5)
        failures = {0: failure(0, lost, 1), 1: failure(1, bad, 2)}
    summary = ChildFailedError("scripts/distill_gpt.py", failures).format_msg()
    root_cause = summary[summary.index("Root Cause"):]
    assert "rank      : 1" in root_cause and "traceback : teacher.topk: 4 here, 16 in the checkpoint" in root_cause, \
        summary
    assert "lost another rank" in summary[:summary.index("Root Cause")]

    def bug():
        raise KeyError("layers.0.weight")

    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error2.json"))
    with pytest.raises(KeyError):
        run_job(bug)
    shown = ProcessFailure(local_rank=2, pid=102, exitcode=1, error_file=str(tmp_path / "error2.json"))
    summary = ChildFailedError("scripts/distill_gpt.py", {2: shown}).format_msg()
    assert "Traceback (most recent call last)" in summary and "KeyError: 'layers.0.weight'" in summary, summary
