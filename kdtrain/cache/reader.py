"""Reading the teacher cache: shard records -> the same ``Payload`` a live teacher sends.

Contract with the distillation loop (``teacher.source: cache`` or ``mixed``):

* Open on every rank of the run (each asks ``covers()`` which steps the cache serves); only the
  student's last-stage ranks decode payloads::

      reader = CacheReader(cfg_cache_path)
      reader.check(run_cfg)          # ValueError naming vocab_size / seq_length / k / tau / dataset /
                                     # tokenizer / teacher when the cache does not fit the run

* At the start of a step, announce this replica's micro-batches in the order they will be consumed
  (the sample ids of micro-batch j are ``replica_sample_ids(first, G, dp_rank, dp)[j*m:(j+1)*m]``)::

      reader.prefetch([ids_mb0, ids_mb1, ...], spec, device)

  A background thread decodes them ahead, at most ``depth`` payloads at a time (bounded memory).

* In the loss function of micro-batch j::

      payload = reader.payload(ids_mbj, spec, device)
      # exactly like a live payload: compare payload.checksum with token_checksum(mb.tokens)

  ``payload`` returns the prefetched result when ``ids_mbj`` was announced (waiting only if the
  thread is still on it), otherwise decodes synchronously. Announced micro-batches that are skipped
  are dropped when a later one is requested, so consumption must follow announcement order for the
  prefetch to help; a payload is never wrong, only possibly late. ``payload.ids`` is int32
  [S, B, k], ``payload.values`` in ``spec.values_dtype`` (bitwise equal to the live teacher's for
  an fp32 cache, and for a bf16 cache read with a bf16 spec), ``payload.tail_lse`` fp32 [S, B],
  ``payload.checksum`` = ``token_checksum`` of the cached input tokens laid out [B, S] like
  ``MicroBatch.tokens``. ``spec.k`` may be smaller than the cached k (the top-k prefix, the others
  folded into the tail).
  ``reader.covers(ids)`` tells whether samples are cached (mixed mode falls back to the teacher).

* ``reader.close()`` (or ``with CacheReader(...) as reader``) stops the thread.

Integrity, in proportion to what is read (a replica reads a few samples of a shard per step): when
a shard is opened, its size, header (the manifest's identity stamp and checksum) and tables (record
offsets and per-record crc32s, under the header's checksum) are checked; each record is checked
against its crc32 when it is read, in the prefetch thread for announced micro-batches; each decoded
sample's tokens against the record's token checksum. Nothing else of the shard is read. Truncated,
corrupted or missing shards raise ``ValueError`` naming the file (and the sample, for a damaged
record). Caches of format version 2 have no per-record checksums: each of their shards is verified
whole on first use. ``verify()`` checks every byte of every shard. An incomplete cache (the job was
killed) is refused at open.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict, deque
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..stream import Payload, PayloadSpec, token_checksum
from .manifest import Manifest
from .shard import ShardTables, check_record, open_shard, pread_into, verify_shard


class CacheReader:
    """A complete cache directory, opened read-only (see the module docstring for the contract)."""

    def __init__(self, path: str | os.PathLike, depth: int = 4, max_open_shards: int = 64):
        self.path = Path(path)
        self.manifest = Manifest.load(self.path)
        if not self.manifest.complete:
            raise ValueError(f"cache {self.path} is incomplete (its cache job did not finish); rerun "
                             f"scripts/cache_teacher.py with the same arguments to complete it")
        self.layout = self.manifest.layout
        self.index = self.manifest.index
        if len(self.manifest.shards) != self.index.num_shards:
            raise ValueError(f"cache manifest {self.path}/manifest.json lists {len(self.manifest.shards)} shards, "
                             f"its sample count needs {self.index.num_shards}")
        self._identity = bytes.fromhex(self.manifest.identity())
        # Open shards, least recently used first: (file, checked tables). A file object closes its
        # descriptor when the last reference goes, so a thread still reading a shard that was just
        # evicted reads on safely. Shards of a version 2 cache stay verified after they are closed.
        self._open: OrderedDict[int, tuple[object, ShardTables]] = OrderedDict()
        self._verified: set[int] = set()
        self._open_lock = threading.Lock()
        self.max_open_shards = max(1, max_open_shards)
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self.depth = depth
        # Prefetch state, guarded by _cv: announced (seq, key, ids, spec) not yet started, finished
        # results by seq, and the announced order of keys not yet consumed.
        self._cv = threading.Condition()
        self._todo: deque = deque()
        self._done: dict[int, object] = {}
        self._order: deque = deque()  # (seq, key)
        self._busy: Optional[int] = None
        self._discard: set[int] = set()
        self._seq = 0
        self._thread: Optional[threading.Thread] = None
        self._closed = False

    # -- facts ----------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return self.manifest.num_samples

    @property
    def k(self) -> int:
        return self.manifest.k

    @property
    def seq_length(self) -> int:
        return self.manifest.seq_length

    def covers(self, sample_ids: Sequence[int]) -> bool:
        return all(0 <= int(g) < self.num_samples for g in sample_ids)

    def check(self, run, live_teacher_dtype: Optional[str] = None) -> None:
        """ValueError naming the field where run config ``run`` (DistillConfig) and the cache disagree;
        with ``live_teacher_dtype`` (a mixed run's live teacher) also its precision and weights."""
        self.manifest.check_against(run, where=f"cache {self.path}", live_teacher_dtype=live_teacher_dtype)

    # -- shards -----------------------------------------------------------------------------------
    def _shard(self, i: int) -> tuple[object, ShardTables]:
        """Shard ``i``'s open file and its checked tables (size, header and tables are checked when
        it is opened; a version 2 cache's shard is verified whole the first time)."""
        with self._open_lock:
            entry = self._open.get(i)
            if entry is not None:
                self._open.move_to_end(i)
                return entry
            info = self.manifest.shards[i]
            file = self.path / info.file
            samples = self.index.samples_of(i)
            args = (samples.start, len(samples), self.index.record_bytes, self._identity)
            version = self.manifest.shard_version
            if version == 1 and i not in self._verified:
                verify_shard(file, *args, crc=info.crc32, version=version)
                self._verified.add(i)
            try:
                f = open(file, "rb", buffering=0)
            except FileNotFoundError:
                raise ValueError(f"cache shard {file} is missing") from None
            try:
                size = os.fstat(f.fileno()).st_size
                if size != info.bytes:
                    raise ValueError(f"cache shard {file} is truncated or oversized: {size} bytes, its manifest "
                                     f"records {info.bytes}" + (" (changed since it was verified)" if version == 1
                                                                else ""))
                tables = open_shard(file, f.fileno(), *args, crc=info.crc32, version=version)
            except BaseException:
                f.close()
                raise
            entry = self._open[i] = (f, tables)
            while len(self._open) > self.max_open_shards:
                self._open.popitem(last=False)
            return entry

    def verify(self) -> None:
        """Verify every byte of every shard now (otherwise each record is checked when it is read)."""
        version = self.manifest.shard_version
        for i, info in enumerate(self.manifest.shards):
            samples = self.index.samples_of(i)
            verify_shard(self.path / info.file, samples.start, len(samples), self.index.record_bytes,
                         self._identity, crc=info.crc32, version=version)
            if version == 1:
                self._verified.add(i)

    def records(self, sample_ids: Sequence[int]):
        """Raw records of the given samples, read from their shards and checked against their
        checksums: uint8 [B, record_bytes], or for variable-size records (``positions: targets``) a
        list of B uint8 arrays."""
        R = self.index.record_bytes
        out = [] if R == 0 else np.empty((len(sample_ids), R), dtype=np.uint8)
        for b, g in enumerate(sample_ids):
            shard, _ = self.index.locate(int(g))
            f, tables = self._shard(shard)
            j = int(g) - tables.first
            offset, size = tables.span(j)
            rec = np.empty(size, dtype=np.uint8) if R == 0 else out[b]
            try:
                pread_into(f.fileno(), rec, offset)  # holding f: its descriptor stays open
            except EOFError:
                raise ValueError(f"cache shard {tables.path} was truncated while in use (sample {g})") from None
            check_record(tables, j, rec)
            if R == 0:
                out.append(rec)
        return out

    # -- decoding -------------------------------------------------------------------------------
    def _check_spec(self, sample_ids: Sequence[int], spec: PayloadSpec) -> None:
        if len(sample_ids) != spec.micro_batch:
            raise ValueError(f"cache {self.path}: {len(sample_ids)} sample ids for a micro-batch of {spec.micro_batch}")
        if spec.seq_length != self.seq_length:
            raise ValueError(f"cache {self.path}: seq_length {spec.seq_length} requested, the cache holds "
                             f"{self.seq_length}-token samples")
        if spec.k > self.k:
            raise ValueError(f"cache {self.path}: top-{spec.k} requested, the cache holds top-{self.k}")

    def decode(self, sample_ids: Sequence[int], spec: PayloadSpec, pin: bool = False) -> Payload:
        """A CPU payload for ``sample_ids`` (one micro-batch, in order); synchronous."""
        self._check_spec(sample_ids, spec)
        rec = self.records(sample_ids)
        try:
            d = self.layout.decode(rec, k=spec.k, tau=self.manifest.tau)
        except ValueError as e:
            raise ValueError(f"cache {self.path}: samples {list(sample_ids)}: {e}") from None
        tokens = d["tokens"]
        for b, g in enumerate(sample_ids):  # guards the index arithmetic and the codec
            if int(token_checksum(tokens[b])) != int(d["checksum"][b]):
                shard, _ = self.index.locate(int(g))
                raise ValueError(f"cache shard {self.path / self.manifest.shards[shard].file}: record of sample "
                                 f"{g} fails its token checksum")
        buf = torch.empty(spec.nbytes, dtype=torch.uint8, pin_memory=pin)
        p = Payload(spec, buf)
        p.ids.copy_(d["ids"])
        p.values.copy_(d["values"])
        p.tail_lse.copy_(d["tail_lse"])
        p.checksum.copy_(token_checksum(tokens))
        return p

    def tokens(self, sample_ids: Sequence[int]) -> torch.Tensor:
        """Cached input tokens [B, S] int64 of the given samples."""
        return self.layout.decode(self.records(sample_ids), k=1, tau=self.manifest.tau)["tokens"]

    def payload(self, sample_ids: Sequence[int], spec: PayloadSpec,
                device: Optional[torch.device] = None) -> Payload:
        """The payload of one micro-batch on ``device`` (default CPU), prefetched when announced."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        key = (tuple(int(g) for g in sample_ids), spec)
        p = self._take(key)
        if p is None:
            p = self.decode(key[0], spec, pin=device.type == "cuda")
        if device.type == "cpu":
            return p
        return Payload(spec, p.buffer.to(device, non_blocking=True))

    # -- prefetch -------------------------------------------------------------------------------
    def prefetch(self, sample_id_lists: Sequence[Sequence[int]], spec: PayloadSpec,
                 device: Optional[torch.device] = None) -> None:
        """Announce micro-batches (in consumption order) to decode in the background.

        ``device``: where ``payload`` will put them; a CUDA device makes the thread decode into
        pinned host memory so the copy in ``payload`` is asynchronous."""
        pin = device is not None and torch.device(device).type == "cuda"
        for ids in sample_id_lists:
            self._check_spec(ids, spec)
        with self._cv:
            if self._closed:
                raise RuntimeError(f"cache reader {self.path} is closed")
            for ids in sample_id_lists:
                key = (tuple(int(g) for g in ids), spec)
                self._todo.append((self._seq, key, pin))
                self._order.append((self._seq, key))
                self._seq += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._worker, name=f"cache-prefetch:{self.path.name}",
                                                daemon=True)
                self._thread.start()
            self._cv.notify_all()

    def pending(self) -> int:
        """Announced micro-batches not yet consumed."""
        with self._cv:
            return len(self._order)

    def _worker(self) -> None:
        while True:
            with self._cv:
                while not self._closed and (not self._todo or len(self._done) >= self.depth):
                    self._cv.wait()
                if self._closed:
                    return
                seq, key, pin = self._todo.popleft()
                self._busy = seq
            try:
                result: object = self.decode(key[0], key[1], pin=pin)
            except BaseException as e:  # handed to the consumer, raised there
                result = e
            with self._cv:
                self._busy = None
                if seq in self._discard:
                    self._discard.discard(seq)
                else:
                    self._done[seq] = result
                self._cv.notify_all()

    def _take(self, key) -> Optional[Payload]:
        """The announced result for ``key``, dropping announced ones before it; None if not announced."""
        with self._cv:
            pos = next((i for i, (_, k) in enumerate(self._order) if k == key), None)
            if pos is None:
                return None
            for _ in range(pos):  # skipped by the consumer: forget them
                seq, _ = self._order.popleft()
                self._drop(seq)
            self._cv.notify_all()  # dropped results free room: a worker waiting on depth goes on
            seq, _ = self._order.popleft()
            while seq not in self._done:
                if self._closed:
                    raise RuntimeError(f"cache reader {self.path} was closed while waiting for a payload")
                self._cv.wait()
            result = self._done.pop(seq)
            self._cv.notify_all()
        if isinstance(result, BaseException):
            raise result
        return result

    def _drop(self, seq: int) -> None:
        # Caller holds _cv.
        if self._done.pop(seq, None) is not None:
            return
        if self._busy == seq:
            self._discard.add(seq)
            return
        for i, item in enumerate(self._todo):
            if item[0] == seq:
                del self._todo[i]
                return

    def cancel(self) -> None:
        """Forget every announced micro-batch (e.g. when a step is abandoned)."""
        with self._cv:
            while self._order:
                self._drop(self._order.popleft()[0])
            self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._open_lock:
            self._open.clear()

    def __enter__(self) -> "CacheReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
