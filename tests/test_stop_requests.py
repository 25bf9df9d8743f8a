"""Stop requests (kdtrain/training/stop_requests.py): a signal or a time limit seen by some ranks,
at different steps, stops every rank after one agreed step, ``lag`` steps after the first sighting."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from conftest import run_spawn
from kdtrain.config.run import signal_number
from kdtrain.training.stop_requests import SIGNAL, StopRequests

STEPS = 12


def _agree(rank, world, lag, signal_at, slow_rank, out_dir, settle_at=None):
    """Every rank runs STEPS steps; rank 1 signals itself during step ``signal_at``; ``slow_rank``
    lags behind the others (its steps take longer). Each rank records the step it stopped after.
    ``settle_at``: rank 0 settles after that step (a profile window's end) and records whether
    every reduction it started had completed."""
    stops = StopRequests("SIGUSR1", None, time.monotonic(), lag, timeout_s=60)
    stops.install()
    stopped = None
    try:
        for step in range(1, STEPS + 1):
            if rank == slow_rank:
                time.sleep(0.05)
            if rank == 1 and step == signal_at:
                os.kill(os.getpid(), signal.SIGUSR1)
            why = stops.after_step()
            if rank == 0 and step == settle_at:
                stops.settle()
                done = [work.is_completed() for work, _ in stops._pending]
                with open(os.path.join(out_dir, "settled"), "w") as f:
                    f.write(f"{len(done)} {all(done)}")
            if why is not None:
                stopped = (step, why)
                break
        stops.finish()
    finally:
        stops.restore()
    with open(os.path.join(out_dir, f"rank{rank}"), "w") as f:
        f.write(f"{stopped[0]}|{stopped[1]}" if stopped else "none")


@pytest.mark.parametrize("lag", [1, 3])
def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(tmp_path, lag):
    """Rank 1 receives the signal in step 4 (rank 2 runs behind): every rank stops after step
    4 + lag, none earlier, each naming the signal."""
    run_spawn(3, _agree, lag, 4, 2, str(tmp_path), tmp_path=tmp_path)
    got = {(tmp_path / f"rank{r}").read_text() for r in range(3)}
    assert got == {f"{4 + lag}|training.exit_signal: SIGUSR1 received"}


def test_settling_waits_for_the_started_reductions_and_keeps_their_agreement(tmp_path):
    """Rank 0 runs ahead of rank 2 and settles after step 3 (lag 3: the reductions of steps 1-3
    in flight): all three have completed when settle returns, and the signal of step 4 still
    stops every rank after step 7."""
    run_spawn(3, _agree, 3, 4, 2, str(tmp_path), 3, tmp_path=tmp_path)
    assert (tmp_path / "settled").read_text() == "3 True"
    got = {(tmp_path / f"rank{r}").read_text() for r in range(3)}
    assert got == {"7|training.exit_signal: SIGUSR1 received"}


def _time_limit(rank, world, out_dir):
    """Rank 0's job started two minutes ago, rank 1's now: only rank 0's limit (one minute) has
    passed. Both stop after step 1 + lag (lag 2)."""
    started = time.monotonic() - (120.0 if rank == 0 else 0.0)
    stops = StopRequests(None, 1.0, started, lag=2, timeout_s=60)
    stopped = None
    for step in range(1, STEPS + 1):
        if (why := stops.after_step()) is not None:
            stopped = (step, why)
            break
    stops.finish()
    with open(os.path.join(out_dir, f"rank{rank}"), "w") as f:
        f.write(f"{stopped[0]}|{stopped[1]}" if stopped else "none")


def test_a_time_limit_passed_on_one_rank_stops_every_rank(tmp_path):
    run_spawn(2, _time_limit, str(tmp_path), tmp_path=tmp_path)
    got = {(tmp_path / f"rank{r}").read_text() for r in range(2)}
    assert got == {"3|training.exit_duration_min: 1 min passed since the job started"}


def test_one_process_stops_after_the_step_it_saw_the_request(world_of_one):
    stops = StopRequests("SIGUSR1", None, time.monotonic(), lag=3, timeout_s=60)
    stops.install()
    try:
        assert stops.after_step() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stops.after_step() == "training.exit_signal: SIGUSR1 received"
    finally:
        stops.restore()
    # Without any request set nothing is agreed on (no group) and nothing stops.
    idle = StopRequests(None, None, time.monotonic() - 1e6, lag=1, timeout_s=60)
    assert not idle.active and all(idle.after_step() is None for _ in range(3))


def test_later_signals_are_the_same_request_and_restore_gives_the_signal_back():
    """Under Slurm each worker gets the signal twice (from Slurm and from torchrun): the second
    must not end the run without its checkpoint."""
    seen = []
    before = signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(signum))
    try:
        stops = StopRequests("SIGUSR2", None, time.monotonic(), lag=1, timeout_s=60)
        stops.install()
        for _ in range(3):
            os.kill(os.getpid(), signal.SIGUSR2)
        assert seen == [] and stops._local() == SIGNAL
        stops.restore()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert seen == [signal.SIGUSR2]  # the handler found at install
        stops.install()  # again after restore
        stops.restore()
    finally:
        signal.signal(signal.SIGUSR2, before)


def test_the_signal_is_taken_only_in_the_main_thread():
    errors = []

    def install():
        try:
            StopRequests("SIGUSR2", None, time.monotonic(), lag=1, timeout_s=60).install()
        except ValueError as e:
            errors.append(str(e))

    t = threading.Thread(target=install)
    t.start()
    t.join()
    assert errors and errors[0].startswith("training.exit_signal: signal handlers can only be set in the main thread")


@pytest.mark.parametrize("name", ["SIGKILL", "SIGSEGV", "TERM", "SIGFOO", "sigterm"])
def test_signals_a_run_cannot_stop_on_are_refused(name):
    with pytest.raises(ValueError, match=rf"'{name}' is not a signal a run can stop on; one of .*SIGTERM"):
        signal_number(name)
    assert signal_number("SIGTERM") == signal.SIGTERM
