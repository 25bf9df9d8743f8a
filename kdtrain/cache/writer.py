"""Writing a cache: one shard at a time, atomically, and resuming a job that was killed.

Atomicity. A shard is written to ``.shard_NNNNNN.bin.tmp`` (hidden name, one writer per shard):
a header placeholder, the records in order (each record's checksum is taken as it goes), the
tables (record offsets if variable-size, the records' checksums), then the real header (holding
the tables' checksum); ``fsync`` the file, ``rename`` it to ``shard_NNNNNN.bin`` and ``fsync`` the
directory. A rename is atomic, so a final name only ever holds a complete shard whose bytes were
on disk before the name existed; a crash at any point leaves either the old state or a temp file.

Resuming. Before any writer starts, rank 0 of the job removes temp files (:func:`prepare`), then
the ranks verify the existing final shards of the plan, a share each (:func:`verify_existing`:
header, size, tables, every record's checksum, identity stamp, sample range): verified shards are
kept, anything else is rewritten. Shard bytes depend only on the teacher and the samples, never on which job
wrote them, so a resumed cache is byte-identical to one written in one go. A manifest whose identity (teacher, data, tokenizer, k, tau, dtype, shard size)
differs from the new job's is an error: the directory holds another cache.

The manifest is written first with ``complete: false`` (a reader refuses it) and rewritten with
the shard list and ``complete: true`` once every shard exists.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from ..durable import fsync_dir
from .manifest import MANIFEST, Manifest
from .shard import HEADER_BYTES, ShardInfo, crc32_of, pack_header, shard_name, verify_shard


def _tmp_name(index: int) -> str:
    return f".{shard_name(index)}.tmp"


class ShardWriter:
    """One shard (the current shard format, shard.py): ``append`` records in sample order, then
    ``commit`` (or ``abort``). ``record_bytes`` 0: variable-size records, appended as a list of
    uint8 arrays; ``commit`` writes their offset table at the end, before the records' checksums."""

    def __init__(self, root: str | os.PathLike, index: int, first: int, count: int, record_bytes: int,
                 identity: bytes):
        self.root, self.index = Path(root), index
        self.first, self.count, self.record_bytes, self.identity = first, count, record_bytes, identity
        self.tmp, self.final = self.root / _tmp_name(index), self.root / shard_name(index)
        self._f = open(self.tmp, "wb")
        self._f.write(b"\0" * HEADER_BYTES)  # placeholder until the tables' checksum is known
        self._written = 0
        self._offsets = [0]
        self._crcs: list[int] = []  # of each record, in order

    def append(self, records) -> None:
        if self.record_bytes == 0:
            assert all(r.dtype == np.uint8 and r.ndim == 1 for r in records)
            for r in records:
                self._offsets.append(self._offsets[-1] + r.shape[0])
            buf = np.concatenate(records) if len(records) else np.zeros(0, dtype=np.uint8)
            n = len(records)
            self._crcs += [crc32_of(np.ascontiguousarray(r)) for r in records]
        else:
            assert records.dtype == np.uint8 and records.ndim == 2 and records.shape[1] == self.record_bytes, \
                records.shape
            buf, n = np.ascontiguousarray(records), records.shape[0]
            self._crcs += [crc32_of(row) for row in buf]
        assert self._written + n <= self.count, "more records than the shard holds"
        self._f.write(memoryview(buf).cast("B"))
        self._written += n

    def commit(self) -> ShardInfo:
        assert self._written == self.count, f"shard {self.index}: {self._written} of {self.count} records written"
        body = self._offsets[-1] if self.record_bytes == 0 else self.count * self.record_bytes
        tables = ([np.asarray(self._offsets, dtype="<u8")] if self.record_bytes == 0 else []) + \
            [np.asarray(self._crcs, dtype="<u4")]
        crc = 0
        for t in tables:
            crc = crc32_of(t, crc)
            self._f.write(memoryview(t).cast("B"))
        size = HEADER_BYTES + body + sum(t.nbytes for t in tables)
        self._f.seek(0)
        self._f.write(pack_header(self.first, self.count, self.record_bytes, self.identity, crc))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.final)
        fsync_dir(self.root)
        return ShardInfo(self.final.name, self.first, self.count, size, crc)

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def prepare(root: str | os.PathLike, manifest: Manifest) -> None:
    """Single-process start of a (possibly resumed) job: creates ``root``; refuses a directory
    holding a different cache; removes temp files; writes ``manifest`` as incomplete. Call before
    any shard writer starts (the job's rank 0, then a broadcast), then :func:`verify_existing`."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, no permission
        raise ValueError(f"cache.out: cannot create the directory {root}: {e.strerror}") from None
    if (root / MANIFEST).is_dir():
        raise ValueError(f"cache.out: {root / MANIFEST} is a directory; remove it or choose another directory")
    if (root / MANIFEST).is_file():
        try:
            old = Manifest.load(root)
        except ValueError as e:
            raise ValueError(f"cache.out: {root} holds an unreadable cache manifest ({e}); remove it or choose "
                             f"another directory") from None
        if old.version != manifest.version:  # one cache holds shards of one format
            raise ValueError(f"cache.out: {root} holds a cache of format version {old.version}, written by an earlier "
                             f"kdtrain release; this job writes version {manifest.version}. The cache stays "
                             f"readable as it is; to complete or extend it, remove it (or choose another "
                             f"directory) and write it again")
        field = old.mismatch(manifest)
        if field is not None:
            raise ValueError(f"cache.out: {root} holds a cache of a different job ({field} differs: "
                             f"{old.to_dict()[field]!r} there, {manifest.to_dict()[field]!r} now); remove it "
                             f"or choose another directory")
        if old.num_samples > manifest.num_samples:  # a rerun without its --samples: the rest would go
            raise ValueError(f"cache.out: {root} holds a cache of {old.num_samples} samples and this job writes "
                             f"{manifest.num_samples}: it would delete the samples beyond; pass cache.samples="
                             f"{old.num_samples} (or more) to resume or extend it, or choose another directory")
    elif any(root.glob("shard_*.bin")):
        raise ValueError(f"cache.out: {root} holds shard files but no {MANIFEST}; remove them or choose another "
                         f"directory")
    elif others := sorted(p.name for p in root.iterdir() if not p.name.startswith((".shard_", f".{MANIFEST}"))):
        # Another tool's output (a checkpoint directory, a corpus): the cache would mix with it.
        raise ValueError(f"cache.out: {root} is not empty and holds no cache ({', '.join(others[:3])}"
                         f"{', ...' if len(others) > 3 else ''}); choose an empty or new directory")
    for tmp in root.glob(".shard_*.bin.tmp"):  # left by a killed writer: never trusted
        tmp.unlink()
    draft = Manifest(**{**manifest.__dict__, "shards": [], "complete": False})
    draft.save(root)


def verify_existing(root: str | os.PathLike, manifest: Manifest, shards: Iterable[int]) -> dict[int, ShardInfo]:
    """The complete, verified shard files among ``shards`` (indices of the plan) under ``root``
    (after :func:`prepare`, before any writer starts). Ranks of a resumed job each verify a share
    and gather the results: reading a large cache back is the slow part of a resume."""
    root = Path(root)
    identity = bytes.fromhex(manifest.identity())
    index = manifest.index
    done: dict[int, ShardInfo] = {}
    for i in shards:
        samples = index.samples_of(i)
        path = root / shard_name(i)
        if not path.exists():
            continue
        try:
            done[i] = verify_shard(path, samples.start, len(samples), index.record_bytes, identity,
                                   version=manifest.shard_version)
        except ValueError:
            pass  # partial, stale or corrupt: rewritten by the job (atomically replaces the file)
    return done


def finalize(root: str | os.PathLike, manifest: Manifest, shards: list[ShardInfo]) -> Manifest:
    """Record every shard and mark the cache complete; drop shard files outside the plan."""
    root = Path(root)
    index = manifest.index
    by_file = {s.file: s for s in shards}
    expected = [shard_name(i) for i in range(index.num_shards)]
    missing = [f for f in expected if f not in by_file]
    if missing:
        raise ValueError(f"cache {root}: shards {missing[:3]} were not written (a writer rank failed?)")
    for stale in root.glob("shard_*.bin"):
        if stale.name not in by_file:
            stale.unlink()
    final = Manifest(**{**manifest.__dict__, "shards": [by_file[f] for f in expected], "complete": True})
    final.save(root)
    return final


def plan_shards(num_shards: int, dp_size: int, dp_rank: int, done: Optional[set] = None) -> list[int]:
    """Shards replica ``dp_rank`` of ``dp_size`` writes: the shards not complete yet, dealt round
    robin (a resumed job whose complete shards were one replica's spreads the rest over all of
    them, not over the others alone). ``done`` is the same on every rank."""
    todo = [i for i in range(num_shards) if i not in (done or set())]
    return todo[dp_rank::dp_size]
