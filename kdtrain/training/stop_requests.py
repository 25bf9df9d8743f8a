"""Stopping a run early on a signal or a time limit, after the same step on every rank.

``training.exit_signal`` (a signal's name: SIGTERM, SIGUSR1, ...) and ``training.exit_duration_min``
(minutes since the job started) ask a run to stop with a checkpoint, as ``training.exit_interval``
does, so that the same command resumes it. Unlike a step count they do not reach the ranks
together: a signal may reach one rank, or each at another step, and each rank's clock started at
its own time. Yet every rank must stop after the same step: the checkpoint is written by all of
them, and a disaggregated teacher must not serve a step the students will not train.

Agreement. At the end of each step every rank starts a MAX all-reduce of its own request (0 none,
1 the time limit, 2 the signal) over a world gloo group (the run's idle-wait group where it has
one, else one of its own), without waiting for it, and reads the one it started ``lag`` steps
earlier. Every rank starts and reads the same reductions at the same steps, so all read the same
value after the same step and stop there. The read waits only for ranks more than ``lag`` steps
behind:

- pretraining and colocated distillation: ``lag`` 1. The ranks move in lock step (each step's
  gradient reduction), so the reduction started a step ago is complete.
- disaggregated distillation: ``lag`` = ``split.depth`` + 1. A student posts the receives of its
  current step only, and a teacher rank keeps at most ``split.depth`` sends (micro-batches) in
  flight: when the teacher ends step t, the students it serves are in step t - depth or later,
  so they ended step t - depth - 1 and started its reduction; the other students move with them
  (their gradient reduction). The teacher has served no step after the one they stop at. (An
  NCCL send can complete into the peer's buffer before the receive is posted: the teacher may
  then be a payload further ahead and its read waits briefly; it never deadlocks, as every rank
  only needs the others to reach the end of an earlier step.)

The reductions are host int32 tensors in gloo's threads: nothing waits for the GPU. A request
thus ends the run ``lag`` steps after the step in which the first rank saw it, plus the save.
A one-process run stops after the step in which it saw it.

Deliveries after the first change nothing: under Slurm the signal reaches each worker twice (from
Slurm, which signals every process of the job step, and from torchrun, which passes on the
SIGTERM, SIGINT, SIGHUP or SIGQUIT it receives), and both are one request. torchrun kills its
workers 30 s after it passed a signal on: ``lag`` steps and a save must fit in that (else use
``exit_duration_min``, which needs no signal). A rank blocked in a collective runs the handler
when the collective returns.
"""

from __future__ import annotations

import collections
import contextlib
import signal
import threading
import time
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from ..config.run import TrainingConfig, signal_number

NONE, TIME, SIGNAL = 0, 1, 2


class StopRequests:
    """This rank's requests to stop (a signal received, the time limit passed) and the ranks'
    agreement on them (module docstring). Build it on every rank at the same point of the start-up
    (world-collective when a request can arrive and there are several ranks); call
    :meth:`after_step` at the end of every step and :meth:`finish` after the last."""

    def __init__(self, exit_signal: Optional[str], exit_duration_min: Optional[float], started: float, lag: int,
                 timeout_s: float, group: Optional[dist.ProcessGroup] = None):
        assert lag >= 1, lag
        self.exit_signal, self.exit_duration_min, self.lag = exit_signal, exit_duration_min, lag
        self._started = started  # time.monotonic() at the job's start
        self._received = False
        self._previous, self._installed = None, False
        self._pending: collections.deque = collections.deque()
        active = exit_signal is not None or exit_duration_min is not None
        self._group = None
        if active and dist.is_initialized() and dist.get_world_size() > 1:
            # ``group``: a world gloo group the run has (its collectives are issued in the same
            # order on every rank, so these can share it): each world gloo group connects every
            # pair of ranks, N - 1 sockets per process.
            self._group = group or dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s),
                                                  group_desc="stop_requests")
        self.active = active

    def install(self) -> None:
        """Take the signal (from here on a delivery asks for a stop); :meth:`restore` gives it back."""
        if self.exit_signal is None:
            return
        if threading.current_thread() is not threading.main_thread():
            raise ValueError("training.exit_signal: signal handlers can only be set in the main thread (run the "
                             "job from a script's main thread, as torchrun does)")
        assert not self._installed, "install() twice without restore()"
        self._previous = signal.signal(signal_number(self.exit_signal), self._on_signal)
        self._installed = True

    def restore(self) -> None:
        if self._installed:  # None: a handler not set from Python, given back as the default
            signal.signal(signal_number(self.exit_signal), self._previous or signal.SIG_DFL)
            self._previous, self._installed = None, False

    def _on_signal(self, signum, frame) -> None:
        self._received = True  # only a flag: the step in progress ends as it would; later ones too

    def _local(self) -> int:
        if self._received:
            return SIGNAL
        if self.exit_duration_min is not None and time.monotonic() - self._started >= 60.0 * self.exit_duration_min:
            return TIME
        return NONE

    def after_step(self) -> Optional[str]:
        """Called by every rank at the end of every step: why the run stops after this step (the
        same on every rank), or None to go on."""
        if not self.active:
            return None
        if self._group is None:
            agreed = self._local()
        else:
            request = torch.tensor([self._local()], dtype=torch.int32)
            self._pending.append((dist.all_reduce(request, op=dist.ReduceOp.MAX, group=self._group,
                                                  async_op=True), request))
            if len(self._pending) <= self.lag:
                return None
            work, request = self._pending.popleft()
            work.wait()
            agreed = int(request.item())
        if agreed == SIGNAL:
            return f"training.exit_signal: {self.exit_signal} received"
        if agreed == TIME:
            return f"training.exit_duration_min: {self.exit_duration_min:g} min passed since the job started"
        return None

    def settle(self) -> None:
        """Wait for the reductions started so far, keeping their results for the lagged reads of
        :meth:`after_step`. A profile window's end calls it (StepProfiler's ``settle``): torch's
        profiler follows a gloo collective into the worker thread that runs it, and one still
        running when the recording stops corrupts the profiler's memory (a disaggregated teacher's
        reductions wait for the students, steps behind). Waits only for ranks to end the steps
        this rank ended."""
        for work, _ in self._pending:
            work.wait()

    def finish(self) -> None:
        """After the last step (on every rank): wait for the reductions still running, which every
        rank started, before the group goes down."""
        while self._pending:
            work, _ = self._pending.popleft()
            work.wait()


def start_stops(t: TrainingConfig, started: float, lag: int, timeout_s: float, closing: contextlib.ExitStack,
                group: Optional[dist.ProcessGroup] = None) -> StopRequests:
    """The run's stop requests (``training.exit_signal``, ``training.exit_duration_min``), taking the
    signal until ``closing`` ends; ``started``: the job's start (``time.monotonic``); ``group``: a
    world gloo group to share. World-collective where a request can arrive."""
    stops = StopRequests(t.exit_signal, t.exit_duration_min, started, lag, timeout_s, group)
    stops.install()
    closing.callback(stops.restore)
    return stops


def stop_reason(step: int, start_step: int, t: TrainingConfig, stops: StopRequests) -> Optional[str]:
    """Why the job stops after ``step`` (the same on every rank), or None: ``training.exit_interval``
    steps ran in this job, or the ranks agreed on a stop request. Every rank calls it after every
    step (the requests' agreement is collective)."""
    requested = stops.after_step()
    if t.exit_interval is not None and step - start_step >= t.exit_interval:
        return "exit_interval reached"
    return requested
