"""torch.distributed start-up: torchrun environment, device and backend selection."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("precision.device: cuda requested but CUDA is not available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def free_memory_bytes(device: torch.device) -> Optional[int]:
    """Bytes free on ``device``: the GPU's free memory, with what torch's allocator holds cached
    but unused (a model deleted before the next is loaded), or the host's available memory
    (Linux's MemAvailable) for the CPU; None where it cannot be read."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0]) + int(cached)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def init_distributed(device: str = "auto", backend: str = "auto", timeout_s: float = 600.0) -> DistEnv:
    """Join the torchrun job (or start a one-process world when launched with plain ``python``).

    gloo on CPU, NCCL on CUDA unless ``backend`` says otherwise. The timeout bounds every
    collective and point-to-point wait, so a dead peer ends the job instead of hanging it.
    """
    dev = pick_device(device)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise ValueError("distributed.backend: nccl needs CUDA devices; use gloo on CPU")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        rendezvous = {}
        if "RANK" not in os.environ:
            # Plain `python script.py`: a world of one, whose rendezvous is an in-process store (no
            # port to pick, so nothing another process could take between picking and binding it).
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
            rendezvous = dict(store=dist.HashStore(), rank=0, world_size=1)
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s),
                                device_id=dev if dev.type == "cuda" else None, **rendezvous)
    return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), dev, backend)


def shutdown_distributed() -> None:
    """Tear down every process group, and with them gloo's worker threads, while the interpreter
    is still alive.

    ``destroy_process_group`` drops torch's own references to the groups, but a group still
    reachable from a garbage cycle lives on: an exception raised inside a collective's agreement
    keeps its frames, which hold the group. gloo's worker threads then outlive the job until the
    interpreter's final collection, and one that releases a finished collective's tensors at that
    moment must take the GIL of an interpreter that is shutting down: the process aborts ("terminate
    called without an active exception", SIGABRT) after a job that succeeded. Collecting here frees
    such groups; a group's destructor joins its worker threads (it releases the GIL to do so)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


@contextlib.contextmanager
def one_process_world(device: str = "auto"):
    """A one-process world for tools that hold a whole model on one device (megatron's parallel
    layers need a process group); taken down again, with the environment it set, when this made
    it, so a caller's own process group or environment is left as it was. Yields the DistEnv."""
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    saved = {k: os.environ.get(k) for k in keys}
    created = not dist.is_initialized()
    env = init_distributed(device)
    try:
        yield env
    finally:
        if created:
            shutdown_distributed()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


# What the transports (gloo, NCCL, the store) say when a peer process is gone or stopped answering.
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting", "wait timeout",
              "Socket Timeout", "communicator was aborted", "Broken pipe")


def _peer_lost(e: BaseException) -> bool:
    return isinstance(e, RuntimeError) and any(sign in str(e) for sign in _PEER_LOST)


def run_job(job, errors: tuple = (ValueError,)) -> int:
    """Entry-point wrapper for the torchrun scripts: run ``job()``; a user error (``errors``) is one
    line on stderr, prefixed with the rank when there are several, and exit code 2, not a stack
    trace. So is, with exit code 1, a collective or transfer that failed because another rank died
    or stopped answering (that rank's own output names the cause: the survivors' tracebacks from
    inside the transport said nothing more). Any failure is also told to torchrun
    (``record_failure``), whose closing summary then shows it. The process group is torn down
    either way."""
    prefix = f"[rank {os.environ.get('RANK', 0)}] " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""

    def say(line: str) -> None:
        sys.stderr.write(f"{prefix}error: {line}\n")  # one write: ranks' lines do not run into each other
        sys.stderr.flush()

    try:
        job()
    except errors as e:
        say(str(e))
        record_failure(str(e))
        return 2
    except Exception as e:
        if not _peer_lost(e):
            record_failure(f"{type(e).__name__}: {e}", traceback.format_exc())
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        line = (f"lost another rank: a collective or transfer with it failed ({first[:300]}); the rank that "
                "stopped first says why in its own output")
        say(line)
        record_failure(line, after_peers=True)
        return 1
    finally:
        shutdown_distributed()
    return 0


def record_failure(message: str, callstack: Optional[str] = None, after_peers: bool = False) -> None:
    """Tell torchrun why this worker fails, in the error file it names in TORCHELASTIC_ERROR_FILE
    (nothing outside torchrun). Its closing summary shows the earliest failure's file as the
    "Root Cause" ("<N/A>" and a link without one, far below a user error's one line): ``callstack``
    where given, else ``message``. The summary orders failures by their whole-second timestamps;
    ``after_peers`` (a rank that only lost another) dates this one a second later, so the rank that
    failed first, in the same second, is the one shown."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    stamp = int(time.time()) + (1 if after_peers else 0)
    data = {"message": {"message": message, "extraInfo": {"py_callstack": callstack or message,
                                                          "timestamp": str(stamp)}}}
    try:
        Path(path).write_text(json.dumps(data))
    except OSError:  # the failure itself is on stderr already
        pass
