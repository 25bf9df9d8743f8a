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
