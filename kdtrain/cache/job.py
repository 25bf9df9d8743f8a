"""The cache job behind scripts/cache_teacher.py: run the teacher role alone over the first N
training samples of a distillation run and write its top-k payload to a sharded cache.

Every rank of the job is a teacher rank (any TP x PP x DP over the world). Shard ``i`` (a fixed
block of ``shard_samples`` samples) belongs to replica ``i % dp`` in a fresh job (a resumed one
deals the shards still to write round robin over the replicas: ``writer.plan_shards``); all
ranks of that replica run its micro-batches through the pipeline and the replica's last-stage
tensor-rank 0 encodes and writes the payloads (the top-k is identical on every tensor rank).
Micro-batches are the run's own (``training.micro_batch_size`` consecutive samples, aligned the
way the training loop cuts them), so each cached payload is what the live teacher computes for that micro-batch.

Before anyone writes, rank 0 checks the directory against the job and writes the draft manifest;
then every rank verifies a share of the shards already on disk (a resumed job) and all gather
which are complete. At the end rank 0 gathers the writers' shard checksums and commits the
manifest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..config.distill import DistillConfig
from ..config.loader import field_error
from ..parallel import RoleLayout, build_role_groups, init_distributed
from ..stream import PayloadSpec
from ..training.batches import make_microbatch, stack_rows
from ..training.idle_waits import IdleWaits
from ..training.resume import data_tokenizer
from ..training.pretrain import open_dataset, resolve_dtype
from ..training.teacher import Teacher
from .codec import RecordLayout, TargetRecordLayout, bytes_per_token, live_payload_bytes_per_token, shard_samples_for
from .manifest import Manifest, dataset_identity, teacher_identity, tokenizer_identity
from .writer import ShardWriter, finalize, plan_shards, prepare, verify_existing

SHARD_TARGET_BYTES = 256 << 20


@dataclass
class CacheJobConfig:
    """``cache.*`` options of scripts/cache_teacher.py."""

    out: Optional[str] = None  # cache directory (created; a killed job resumes in it)
    dtype: Literal["fp32", "bf16", "fp16", "fp8"] = "bf16"  # storage of the top-k logits
    samples: Optional[int] = None  # first N training samples; None = train_steps * global_batch_size
    shard_samples: int = 0  # samples per shard file; 0 = about 256 MiB per shard
    micro_batch: Optional[int] = None  # None = training.micro_batch_size (the run's micro-batches)
    # "all": the teacher's output at every position; "targets": only where the label is a target
    # (conversations: the replies; packed windows: not the padding), in variable-size records. A
    # run reads a "targets" cache only with the same corpora, masks and data.loss_mask.
    positions: Literal["all", "targets"] = "all"

    def check(self, where: str = "cache") -> None:
        if self.samples is not None and self.samples < 1:
            raise field_error(where, "samples", f"must be >= 1, got {self.samples}")
        if self.shard_samples < 0:
            raise field_error(where, "shard_samples", f"must be >= 0 (0 = automatic), got {self.shard_samples}")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise field_error(where, "micro_batch", f"must be >= 1, got {self.micro_batch}")

    def resolve(self, run: DistillConfig, record_bytes: int, dp: int = 1,
                recorded_shard: Optional[int] = None) -> tuple[int, int, int]:
        """(samples, shard_samples, micro_batch) with the run's defaults filled in and checked.
        Automatic shards hold about SHARD_TARGET_BYTES, and at most a replica's share of the
        samples (shard i is written by replica i % ``dp``: one shard for a small cache left every
        other replica idle); a resumed job keeps the shard size it started with
        (``recorded_shard``), whatever its ``dp`` now."""
        if not self.out:
            raise field_error("cache", "out", "no output directory given (--out DIR)")
        tr = run.training
        m = self.micro_batch or tr.micro_batch_size
        n = self.samples if self.samples is not None else tr.train_steps * tr.global_batch_size
        if n % m:
            raise field_error("cache", "samples", f"{n} is not a multiple of the micro-batch size {m}")
        shard = self.shard_samples or recorded_shard or min(shard_samples_for(SHARD_TARGET_BYTES, record_bytes, m),
                                                            -(-n // (dp * m)) * m)
        if shard % m:
            whence = "" if self.shard_samples or not recorded_shard else \
                f" (the size of the shards the cache in {self.out} was started with)"
            raise field_error("cache", "shard_samples", f"{shard}{whence} is not a multiple of the micro-batch size "
                              f"{m} (a micro-batch never spans two shards)")
        return n, shard, m


def build_manifest(run: DistillConfig, job: CacheJobConfig, dtype: torch.dtype, layout_info: dict) -> Manifest:
    """The new job's manifest (no shards yet). Hashes the teacher's weight files, unless a resumed
    job's manifest lists them unchanged (``teacher_weights``)."""
    sizes = (run.data.seq_length, run.teacher.topk, run.teacher.model.vocab_size, job.dtype)
    record = (TargetRecordLayout(*sizes).max_record_bytes if job.positions == "targets"
              else RecordLayout(*sizes).record_bytes)
    recorded = _recorded(job.out)
    n, shard, m = job.resolve(run, record, layout_info.get("dp", 1), recorded and recorded.shard_samples)
    targets = job.positions == "targets"
    return Manifest(
        teacher=teacher_identity(run.teacher.model, run.teacher.load, run.training.seed + 1,
                                 str(dtype).removeprefix("torch."), recorded=recorded and recorded.teacher),
        tokenizer=tokenizer_identity(run.data.tokenizer), dataset=dataset_identity(run.data, targets=targets),
        seq_length=run.data.seq_length, vocab_size=run.teacher.model.vocab_size, k=run.teacher.topk,
        tau=float(run.loss.tau), values_dtype=job.dtype, shard_samples=shard, num_samples=n,
        job={**layout_info, "micro_batch": m}, positions=job.positions)


def _recorded(root: str) -> Optional[Manifest]:
    """The manifest a resumed job finds in ``root`` (None: none readable; ``prepare`` then reports
    why)."""
    try:
        return Manifest.load(root)
    except (ValueError, OSError):
        return None


def run_cache_job(run: DistillConfig, job: CacheJobConfig,
                  on_shard: Optional[Callable[[int], None]] = None, log: Callable[[str], None] = print) -> dict:
    """Write (or complete) the cache; returns a summary. ``on_shard(i)`` runs after shard i is done
    on every rank of its replica (progress hooks; tests use it to simulate a crash)."""
    env = init_distributed(run.precision.device, run.distributed.backend, run.distributed.timeout_s)
    par = run.teacher.parallel.resolve(env.world_size, "teacher")
    run.teacher.model.check_layout(par.tp, par.pp, "teacher")
    run.teacher.check_weights()  # whatever teacher.source says: this job runs the teacher
    if run.data.seq_length > run.teacher.model.max_seq_length:
        raise field_error("data", "seq_length", f"{run.data.seq_length} exceeds max_seq_length="
                          f"{run.teacher.model.max_seq_length} of the teacher model {run.teacher.model.name!r}")
    if not run.data.path and not run.data.mock:
        raise field_error("data", "path", "no dataset given (list of indexed-dataset prefixes, or mock: true)")
    dtype = resolve_dtype(run.precision.dtype, env.device)
    layout = RoleLayout("teacher", 0, par.tp, par.pp, par.dp)
    groups = build_role_groups(layout, timeout_s=run.distributed.timeout_s)
    # The ranks wait for work one of them does alone (rank 0 hashing the teacher's weight files:
    # minutes for a large teacher), or a share of it (verifying a resumed job's shards, writing
    # the last shards: replicas may differ by one shard): under distributed.idle_timeout_s, not
    # distributed.timeout_s, which would end the job (NCCL's watchdog) for a slow read.
    idle = IdleWaits.create(run.distributed.idle_timeout_s)

    state: list = [None]
    if env.rank == 0:
        try:
            manifest = build_manifest(run, job, dtype, {"tp": par.tp, "pp": par.pp, "dp": par.dp})
            prepare(job.out, manifest)
            state = [(manifest, None)]
        except ValueError as e:
            state = [(None, str(e))]
    idle.wait("waiting while rank 0 hashes the teacher's weight files for the manifest")
    dist.broadcast_object_list(state, src=0)
    manifest, error = state[0]
    if error is not None:
        raise ValueError(error)
    # A resumed job's shards on disk: every rank verifies a share (rank 0 alone would keep the
    # others waiting in the gather for the whole read of a large cache, past the job's timeout).
    share = verify_existing(job.out, manifest, range(env.rank, manifest.index.num_shards, env.world_size))
    idle.wait("waiting while the other ranks verify their share of the shards on disk")
    shares: list = [None] * env.world_size
    dist.all_gather_object(shares, share)
    done = {i: info for share in shares for i, info in share.items()}

    rec = manifest.layout
    index = manifest.index
    m = manifest.job["micro_batch"]
    spec = PayloadSpec(manifest.seq_length, m, manifest.k, torch.float32)
    dataset = open_dataset(run.data, run.teacher.model)
    if job.positions == "targets" and not dataset.has_loss_mask:
        raise field_error("cache", "positions", "targets: every label of this corpus is a target (no loss mask, "
                          "windows not packed by documents); use positions: all")
    teacher = Teacher(run.teacher.model, groups, spec, run.loss.tau, run.teacher.load, env.device, dtype,
                      run.training.seed + 1, compile=run.precision.compile, tokenizer=data_tokenizer(run.data))
    identity = bytes.fromhex(manifest.identity())
    writes = groups.is_last_stage and groups.tp_rank == 0
    todo = plan_shards(index.num_shards, par.dp, groups.dp_rank, set(done))
    targets = manifest.positions == "targets"
    if env.rank == 0:
        per_token = (f"at most {rec.max_record_bytes / manifest.seq_length:.1f} bytes/token (targets only)" if targets
                     else f"{rec.record_bytes / manifest.seq_length:.1f} bytes/token")
        log(f"kdtrain cache: {run.teacher.model.name} (tp={par.tp} pp={par.pp} dp={par.dp}) -> {job.out}: "
            f"{index.num_samples} samples in {index.num_shards} shards of {index.shard_samples}, top-{manifest.k} "
            f"{manifest.values_dtype}, {per_token}; {len(done)} shards already complete")

    written = []
    t0 = time.perf_counter()
    samples_done = 0
    for n_done, i in enumerate(todo, 1):
        samples = index.samples_of(i)
        writer = ShardWriter(job.out, i, samples.start, len(samples), index.record_bytes, identity) if writes else None
        try:
            for s0 in range(samples.start, samples.stop, m):
                batch = range(s0, s0 + m)
                windows = np.stack([dataset.train_sample(g) for g in batch])
                # Targets only: the teacher computes the targets' logits alone (Teacher.serve).
                flags = np.stack([dataset.train_loss_mask(g) for g in batch]) if targets else None
                mb = make_microbatch(windows, env.device, flags, stack_rows(dataset.train_positions, batch))
                payload = teacher.serve(mb)
                if writer is not None and targets:
                    writer.append(rec.encode(mb.tokens, payload.ids, payload.values, payload.tail_lse, flags))
                elif writer is not None:
                    writer.append(rec.encode(mb.tokens, payload.ids, payload.values, payload.tail_lse))
            if writer is not None:
                written.append(writer.commit())
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        samples_done += len(samples)
        if on_shard is not None:
            on_shard(i)
        if env.rank == 0:
            rate = samples_done / max(time.perf_counter() - t0, 1e-9)
            log(f"shard {i} written: {n_done}/{len(todo)} of replica 0's shards, {rate * par.dp:.1f} samples/s over "
                f"{par.dp} replica(s)")
    elapsed = time.perf_counter() - t0

    idle.wait("waiting for the replicas still writing their last shard")
    gathered: list = [None] * env.world_size
    dist.all_gather_object(gathered, written)
    summary = {"out": job.out, "num_samples": index.num_samples, "shards": index.num_shards,
               "shards_written": sum(len(g) for g in gathered), "shards_reused": len(done),
               "seconds": elapsed, "positions": manifest.positions,
               "record_bytes": "variable" if targets else rec.record_bytes,
               "bytes_per_token": None if targets else bytes_per_token(manifest.vocab_size, manifest.k,
                                                                       manifest.values_dtype, manifest.seq_length),
               "live_bytes_per_token": live_payload_bytes_per_token(manifest.k, run.teacher.values_dtype)}
    status: list = [None]
    if env.rank == 0:
        try:
            infos = list(done.values()) + [s for g in gathered for s in g]
            final = finalize(job.out, manifest, infos)
            total = sum(s.bytes for s in final.shards)
            summary["bytes"] = total
            summary["stored_bytes_per_token"] = total / (index.num_samples * manifest.seq_length)
            log(f"kdtrain cache: {job.out} complete: {index.num_samples} samples, {total / 2**20:.1f} MiB, "
                f"{summary['shards_written']} shards written and {len(done)} reused in {elapsed:.1f} s")
        except ValueError as e:
            status = [str(e)]
    dist.broadcast_object_list(status, src=0)  # every rank fails with rank 0's error, none hangs
    if status[0] is not None:
        raise ValueError(status[0])
    return summary


def load_cache_job_config(overrides=(), **fields) -> CacheJobConfig:
    """``cache.*`` overrides (``dtype=bf16``, ``samples=1024``, ...) plus explicit fields (CLI flags win)."""
    from ..config.loader import apply_overrides, from_dict

    raw: dict = {}
    apply_overrides(raw, overrides)
    section = raw.get("cache", {})
    if not isinstance(section, dict):
        raise ValueError("cache: expected a section (cache.dtype=..., cache.samples=...)")
    section.update({k: v for k, v in fields.items() if v is not None})
    return from_dict(CacheJobConfig, section, "cache")


__all__ = ["CacheJobConfig", "build_manifest", "load_cache_job_config", "run_cache_job"]
