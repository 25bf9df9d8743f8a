"""Run logging on the writer rank: progress bar, metrics.jsonl, TensorBoard and wandb.

wandb runs offline (files under the run dir, ``wandb sync`` later) unless a project is given and
an API key is available (``WANDB_API_KEY``, or ``wandb login``'s entry in ~/.netrc), in which case
it logs online; ``WANDB_MODE`` (online, offline, disabled), when set, decides.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Optional

from ..config import LoggingConfig
from ..parallel.groups import raise_together


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4f}"
    return str(v)


# Progress-bar postfix: metric -> (label, formatter). Step and ETA come from the bar itself.
_BAR_FIELDS = {
    "loss": ("loss", lambda v: f"{v:.4f}"),
    "lr": ("lr", lambda v: f"{v:.2e}"),
    "tokens_per_s": ("tok/s", lambda v: f"{v:,.0f}"),
    "tflops_per_device": ("TFLOP/s/dev", lambda v: f"{v:.3g}"),
    "mfu": ("MFU", lambda v: f"{100 * v:.1f}%"),
}


def _wandb_key_available() -> bool:
    """An API key in the environment or saved by ``wandb login`` (~/.netrc)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _drop_torn_line(path: Path) -> None:
    """Cut ``path`` back to its last complete line: a job killed mid-write (or on a full disk) left
    a partial one, which the resumed job's first line would have joined (invalid JSON for good)."""
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        tail = min(size, 1 << 20)  # a metrics line is far shorter
        f.seek(size - tail)
        end = f.read(tail).rfind(b"\n")
        f.truncate(size - tail + end + 1 if end >= 0 else (0 if tail == size else size))


class RunLogger:
    def __init__(self, cfg: LoggingConfig, enabled: bool, total_steps: int, start_step: int,
                 run_config: Optional[dict] = None, name: str = "run"):
        self.cfg = cfg
        self.enabled = enabled
        self.bar = self.tb = self.wandb = None
        self._jsonl = None
        if not enabled:
            return
        try:
            self._open(cfg, total_steps, start_step, run_config, name)
        except BaseException:  # a sink that fails to open (wandb.init): close the ones opened
            self.close(failed=True)
            raise

    def _open(self, cfg: LoggingConfig, total_steps: int, start_step: int, run_config: Optional[dict],
              name: str) -> None:
        self.dir = Path(cfg.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        metrics = self.dir / "metrics.jsonl"
        _drop_torn_line(metrics)
        self._jsonl = open(metrics, "a", buffering=1)
        if run_config is not None:
            (self.dir / "config.json").write_text(json.dumps(run_config, indent=1, default=str))
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(self.dir / "tensorboard"))
        if cfg.wandb:
            import wandb

            online = bool(cfg.wandb_project) and _wandb_key_available()
            # One wandb run per run directory: a job that resumes it (exit_interval, preemption)
            # continues the same run instead of starting a new one.
            id_file = self.dir / "wandb_run_id"
            run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
            id_file.write_text(run_id + "\n")
            self.wandb = wandb.init(project=cfg.wandb_project or "kdtrain", entity=cfg.wandb_entity,
                                    name=name, dir=str(self.dir),
                                    mode=os.environ.get("WANDB_MODE") or ("online" if online else "offline"),
                                    config=run_config, id=run_id, resume="allow")
        if cfg.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=name, dynamic_ncols=True,
                            file=sys.stdout, mininterval=0.5)

    def write(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def log(self, step: int, metrics: dict, kind: str = "train", advance: bool = True) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": time.time(), **metrics}
        self._jsonl.write(json.dumps(record) + "\n")
        numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if self.tb is not None:
            for k, v in numeric.items():
                self.tb.add_scalar(f"{kind}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"{kind}/{k}": v for k, v in numeric.items()}, step=step)
        if self.bar is not None and kind == "train":
            post = {label: fmt(metrics[k]) for k, (label, fmt) in _BAR_FIELDS.items() if k in metrics}
            self.bar.set_postfix(post, refresh=False)
            if advance and step > self.bar.n:
                self.bar.update(step - self.bar.n)
        elif self.bar is None or kind != "train":
            self.write(f"[{kind}] step {step} " + " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()))

    def close(self, failed: bool = False) -> None:
        """Flush and close every sink; ``failed``: the job raised (wandb marks the run failed)."""
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if failed else 0)
        if self._jsonl is not None:
            self._jsonl.close()

    def closer(self):
        """An ``ExitStack.push`` callback: close, failed when the block raised."""
        def close(exc_type, exc, tb) -> None:
            self.close(failed=exc_type is not None)
        return close


def start_logger(cfg: LoggingConfig, writer: bool, total_steps: int, start_step: int,
                 run_config: Optional[dict] = None, name: str = "run") -> RunLogger:
    """The run's logger, its sinks open on the ``writer`` rank; made by every rank of the world at
    the same point: a sink that fails to open there (wandb.init, a full disk) stops every rank,
    not the writer alone (the others waited in their next collective until the job's timeout)."""
    logger = error = None
    try:
        logger = RunLogger(cfg, writer, total_steps, start_step, run_config, name)
    except Exception as e:  # noqa: BLE001 - any failure: the other ranks must not wait for this one
        error = e
    raise_together(error, None, lambda rank, shown: f"rank {rank} could not open the run's logs in {cfg.dir}: {shown}")
    return logger
