"""Where a distillation run's teacher payloads come from (``teacher.source``): the live teacher
every step (online), its cache (cache), or the cache with a fraction of the steps, and every step
it does not cover, from the live teacher (mixed). The cache is checked against the run when it is
opened, and its teacher recorded in the run's checkpoints so that a resume keeps it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..cache.manifest import weights_hash_rule
from ..config import to_dict
from ..config.distill import DistillConfig
from .idle_waits import IdleWaits
from .onpolicy import spread_step


def live_teacher_step(step: int, cfg: DistillConfig, reader) -> bool:
    """Whether the live teacher serves ``step`` (the same answer on every rank).

    online: always. cache: never (``open_cache`` refused a cache short of the run). mixed: on a
    ``live_fraction`` of the steps, spread evenly (step t is live when floor((t+1) f) > floor(t f)),
    and on every step the cache does not cover."""
    t = cfg.teacher
    if t.source == "online":
        return True
    G = cfg.training.global_batch_size
    covered = reader.covers(range(step * G, (step + 1) * G))
    if t.source == "cache":
        assert covered, (step, reader.num_samples)
        return False
    return not covered or spread_step(step, t.live_fraction)


def cache_steps(cfg: DistillConfig, reader) -> int:
    """The steps of the run its cache covers, from the first."""
    return min(reader.num_samples // cfg.training.global_batch_size, cfg.training.train_steps)


def open_cache(cfg: DistillConfig, rank: int, dtype: torch.dtype, idle: Optional[IdleWaits]):
    """The teacher cache of a cache/mixed run, checked against the run (None when online).

    The cheap checks run on every rank (they agree); a mixed run also checks that the live teacher
    (computing in ``dtype``) is the cache's: the same precision, and the same weights (hashing its
    checkpoint once on rank 0, while the others wait under ``idle``'s bound); every rank raises on
    a mismatch."""
    if cfg.teacher.source == "online":
        return None
    from ..cache import CacheReader

    reader = CacheReader(cfg.teacher.cache)
    try:
        _check_cache(cfg, reader, rank, dtype, idle)
    except BaseException:
        reader.close()
        raise
    return reader


def _check_cache(cfg: DistillConfig, reader, rank: int, dtype: torch.dtype, idle: Optional[IdleWaits]) -> None:
    reader.check(cfg)
    # Found now, not after hours of training (a cache run samples no steps on-policy: validate).
    steps = cfg.training.train_steps
    if cfg.teacher.source == "cache" and cache_steps(cfg, reader) < steps:
        raise ValueError(f"teacher.cache {cfg.teacher.cache} holds {reader.num_samples} samples but step {steps} "
                         f"needs samples up to {steps * cfg.training.global_batch_size - 1}: write a larger cache "
                         f"(--samples) or use teacher.source: mixed")
    if cfg.teacher.source == "mixed":
        error = [None]
        if rank == 0:
            try:
                reader.check(cfg, live_teacher_dtype=str(dtype).removeprefix("torch."))
            except ValueError as e:
                error = [str(e)]
        if dist.get_world_size() > 1:
            idle.wait("waiting while rank 0 hashes the live teacher's weight files to compare them with the cache's")
            dist.broadcast_object_list(error, src=0)
        if error[0] is not None:
            raise ValueError(error[0])


def teacher_record(t, reader) -> dict:
    """What a run's checkpoints record of its teacher section ``t`` (``check_resume``): the model,
    the checkpoint the payloads come from (a cache's is in its manifest, with the hash of its
    weights), where the payloads come from and their precision."""
    rec = {"teacher": to_dict(t.model), "teacher_load": t.load, "teacher_weights_sha256": None,
           "teacher_source": t.source, "teacher_values_dtype": t.values_dtype}
    if reader is not None:
        written_by = reader.manifest.teacher
        rec["teacher_weights_sha256"] = written_by.get("weights_sha256")
        rec["teacher_weights_hash"] = weights_hash_rule(written_by)  # how the digest was made
        if t.source == "cache":
            rec["teacher_load"] = written_by.get("load")
            rec["teacher_values_dtype"] = reader.manifest.values_dtype
        else:
            rec["teacher_values_dtype"] = f"{reader.manifest.values_dtype} cached, {t.values_dtype} live"
    return rec
