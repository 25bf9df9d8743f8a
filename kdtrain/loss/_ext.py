"""Loading the fused KD-loss CUDA kernels (``csrc/``).

Order: the prebuilt extension ``kdtrain._C`` (``pip install --no-build-isolation -e .`` on a CUDA
machine), else a just-in-time build with ``torch.utils.cpp_extension.load`` from the source tree's
``csrc/`` (CUDA available, the sources present, ``KDTRAIN_NO_JIT`` unset), else nothing: the
caller falls back to the reference. The outcome is cached per process; :func:`extension_status`
says what happened (for logs and the benchmark).

A build killed midway (a sibling rank failed, preemption) leaves torch's build lock behind, and
torch waits for it without a bound: every later job would hang in its first loss. So the lock is
waited for here, at most ``KDTRAIN_JIT_LOCK_WAIT_S`` seconds (default 900: other ranks of this
node building), and then it is an error naming the file.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

CSRC = Path(__file__).resolve().parents[2] / "csrc"
JIT_NAME = "kdtrain_kd_loss_jit"
_REQUIRED = ("kd_pass1", "kd_pass2", "kd_scale_grad_")
_state: dict = {"tried": False, "module": None, "status": "not loaded yet"}


def _usable(mod) -> bool:
    return all(hasattr(mod, name) for name in _REQUIRED)


def _jit_build():
    from torch.utils.cpp_extension import load

    sources = sorted(str(p) for p in CSRC.glob("*.cu")) + sorted(str(p) for p in CSRC.glob("*.cpp"))
    if not sources:
        raise RuntimeError(f"no CUDA sources under {CSRC}")
    return load(name=JIT_NAME, sources=sources, extra_include_paths=[str(CSRC)],
                extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "--use_fast_math", "-lineinfo"], verbose=False)


def wait_for_build_lock(timeout_s: Optional[float] = None, poll_s: float = 1.0) -> None:
    """Return once no just-in-time build holds torch's lock for it; raise RuntimeError naming the
    lock file if it stays longer than ``timeout_s`` (a killed build's leftover)."""
    from torch.utils.cpp_extension import _get_build_directory

    if timeout_s is None:
        timeout_s = float(os.environ.get("KDTRAIN_JIT_LOCK_WAIT_S", "900"))
    lock = Path(_get_build_directory(JIT_NAME, False)) / "lock"
    start = time.monotonic()
    while lock.exists():
        if time.monotonic() - start > timeout_s:
            raise RuntimeError(f"the KD-loss kernels' just-in-time build lock {lock} has been held for over "
                               f"{timeout_s:.0f} s: a build killed midway left it. Delete it (no build running), "
                               "or build once with `pip install --no-build-isolation -e .`, or set "
                               "KDTRAIN_NO_JIT=1 for the reference loss")
        time.sleep(poll_s)


def load_kernels(jit: Optional[bool] = None):
    """The kernel module, or None (see :func:`extension_status` for why)."""
    if _state["tried"]:
        return _state["module"]
    _state["tried"] = True
    try:
        from kdtrain import _C  # noqa: F401  (built by setup.py on CUDA machines)

        if _usable(_C):
            _state.update(module=_C, status="prebuilt extension kdtrain._C")
            return _C
        _state["status"] = "kdtrain._C lacks the KD-loss ops (rebuild with pip install -e .)"
    except ImportError as e:
        _state["status"] = f"kdtrain._C not built ({e})"
    if jit is None:
        jit = os.environ.get("KDTRAIN_NO_JIT", "0") != "1"
    if not jit:
        # KDTRAIN_NO_JIT_REASON: why a launcher set KDTRAIN_NO_JIT (e.g. benchmarks/run_h100.sh after
        # a failed build), carried into this status so that the reports built on it say why.
        why = os.environ.get("KDTRAIN_NO_JIT_REASON", "").strip()
        _state["status"] += "; just-in-time build disabled (KDTRAIN_NO_JIT=1" + (f": {why[:500]}" if why else "") + ")"
        return None
    if not torch.cuda.is_available():
        _state["status"] += "; no CUDA device for a just-in-time build"
        return None
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        _state["status"] += "; nvcc not found for a just-in-time build"
        return None
    wait_for_build_lock()  # outside the try: a stale lock is an error, not a silent fallback
    try:
        mod = _jit_build()
    except Exception as e:  # a failed build must not stop training: the reference still works
        _state["status"] += f"; just-in-time build failed: {type(e).__name__}: {str(e)[-2000:]}"
        return None
    if not _usable(mod):
        _state["status"] += "; just-in-time module lacks the KD-loss ops"
        return None
    _state.update(module=mod, status="just-in-time build of csrc/")
    return mod


def extension_status() -> str:
    return _state["status"]


def _reset_for_tests() -> None:
    _state.update(tried=False, module=None, status="not loaded yet")
