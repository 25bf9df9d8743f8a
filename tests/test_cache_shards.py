"""Teacher cache shards (format 3): integrity checks in proportion to what is read. Opening a
shard checks its header and tables; a record is read alone and checked against its own crc32; a
damaged record is found when it is read; caches of the previous format are read and verified
whole. On synthetic caches written by the cache writer (no teacher run)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kdtrain.cache import CacheReader, Manifest
from kdtrain.stream import PayloadSpec


def _synthetic_cache(root: Path, samples: int, shard_samples: int, positions: str = "all", S: int = 64,
                     k: int = 8, V: int = 32000) -> Path:
    """A complete cache of random (valid) records written through the job's writer, no teacher."""
    from kdtrain.cache.writer import ShardWriter, finalize, prepare

    m = Manifest(teacher={"model": {"name": "synthetic"}, "load": None, "weights_sha256": None,
                          "random_init_seed": 1, "dtype": "float32"},
                 tokenizer=None, dataset={"mock": True, "seed": 0}, seq_length=S, vocab_size=V, k=k, tau=1.0,
                 values_dtype="bf16", shard_samples=shard_samples, num_samples=samples, positions=positions)
    prepare(root, m)
    layout, index, identity = m.layout, m.index, bytes.fromhex(m.identity())
    g, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    infos = []
    for i in range(index.num_shards):
        s = index.samples_of(i)
        B = len(s)
        tokens = torch.randint(0, V, (B, S), generator=g)
        ids = torch.randint(0, V, (S, B, k), generator=g, dtype=torch.int32)
        vals = torch.randn(S, B, k, generator=g).sort(dim=-1, descending=True).values
        lse = torch.randn(S, B, generator=g)
        with ShardWriter(root, i, s.start, B, index.record_bytes, identity) as w:
            if positions == "targets":
                w.append(layout.encode(tokens, ids, vals, lse, rng.random((B, S)) < 0.5))
            else:
                w.append(layout.encode(tokens, ids, vals, lse))
            infos.append(w.commit())
    finalize(root, m, infos)
    return root


class _CountingFile:
    """A file object whose ``read`` calls are counted (everything else is the file's)."""

    def __init__(self, f, seen):
        self._f, self._seen = f, seen

    def read(self, *args):
        data = self._f.read(*args)
        self._seen["read"] += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _count_io(monkeypatch, root: Path) -> dict:
    """From now on: bytes passed through zlib.crc32, and bytes read from files under ``root`` by
    ``open(...).read``, ``os.pread`` and ``os.preadv`` (positional reads)."""
    import builtins
    import os
    import zlib

    seen = {"crc": 0, "read": 0}
    crc32, pread, preadv, open_ = zlib.crc32, os.pread, os.preadv, builtins.open

    def counting_crc32(data, value=0):
        seen["crc"] += memoryview(data).nbytes
        return crc32(data, value)

    def counting_pread(fd, n, offset):
        data = pread(fd, n, offset)
        seen["read"] += len(data)
        return data

    def counting_preadv(fd, buffers, offset, *args):
        n = preadv(fd, buffers, offset, *args)
        seen["read"] += n
        return n

    def counting_open(file, mode="r", *args, **kw):
        f = open_(file, mode, *args, **kw)
        inside = isinstance(file, (str, Path)) and Path(file).resolve().is_relative_to(root.resolve())
        return _CountingFile(f, seen) if inside and "r" in mode else f

    monkeypatch.setattr(zlib, "crc32", counting_crc32)
    monkeypatch.setattr(os, "pread", counting_pread)
    monkeypatch.setattr(os, "preadv", counting_preadv)
    monkeypatch.setattr(builtins, "open", counting_open)
    return seen


@pytest.mark.parametrize("positions", ["all", "targets"])
def test_reading_a_few_records_reads_and_checks_only_those(tmp_path, monkeypatch, positions):
    """A replica reads a few samples of a shard per step: verifying the whole shard first would
    read (and checksum) all of it. Reading 2 records of a 64-record shard reads and checksums those
    2 records, the shard's header and its tables (record offsets, per-record crc32s), no more."""
    from kdtrain.cache.shard import HEADER_BYTES

    n = 64
    path = _synthetic_cache(tmp_path / "cache", n, n, positions)
    shard = path / "shard_000000.bin"
    size = shard.stat().st_size
    with CacheReader(path) as reader:
        want = reader.records([10, 11])
    with CacheReader(path) as reader:  # a fresh reader: the shard is opened (and checked) under the count
        seen = _count_io(monkeypatch, path)
        got = reader.records([10, 11])
        reader.payload([20, 21], PayloadSpec(64, 2, 8, torch.bfloat16))
    records = 2 * 2 * (reader.layout.record_bytes if positions == "all" else reader.layout.max_record_bytes)
    tables = 4 * n + (8 * (n + 1) if positions == "targets" else 0)
    assert seen["crc"] <= records + HEADER_BYTES + tables < size / 4, (seen, size)
    assert seen["read"] <= records + HEADER_BYTES + tables, (seen, size)
    for a, b in zip(got, want):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("positions", ["all", "targets"])
def test_a_corrupted_record_is_found_when_it_is_read(tmp_path, positions):
    """One flipped byte in record 5 of a shard: the other records still read; reading record 5
    (directly or through the prefetch thread) is a ValueError naming the shard and the sample, and
    so is verifying the shard; a damaged crc table or header is found when the shard is opened."""
    from kdtrain.cache.shard import HEADER_BYTES

    path = _synthetic_cache(tmp_path / "cache", 32, 16, positions)
    shard = path / "shard_000001.bin"
    data = bytearray(shard.read_bytes())
    with CacheReader(path) as reader:
        start = HEADER_BYTES + sum(len(r) for r in reader.records(range(16, 21)))
    data[start + 3] ^= 0x10  # record 5 of shard 1: sample 21
    shard.write_bytes(bytes(data))
    spec = PayloadSpec(64, 2, 8, torch.bfloat16)
    with CacheReader(path) as reader:
        reader.payload([0, 1], spec)
        reader.payload([18, 19], spec)
        reader.payload([22, 23], spec)  # the shard is in use; its damaged record is not read
        with pytest.raises(ValueError, match=rf"{re.escape(str(shard))}.*sample 21"):
            reader.payload([20, 21], spec)
        reader.prefetch([[16, 17], [20, 21]], spec)
        reader.payload([16, 17], spec)
        with pytest.raises(ValueError, match=rf"{re.escape(str(shard))}.*sample 21"):
            reader.payload([20, 21], spec)
        with pytest.raises(ValueError, match=rf"{re.escape(str(shard))}.*sample 21"):
            reader.verify()
    data[start + 3] ^= 0x10
    data[-3] ^= 0x01  # the per-record crc table
    shard.write_bytes(bytes(data))
    with CacheReader(path) as reader:
        reader.payload([0, 1], spec)
        with pytest.raises(ValueError, match=rf"{re.escape(str(shard))} is corrupted"):
            reader.payload([18, 19], spec)


def _as_previous_version(path: Path) -> None:
    """Rewrite the cache at ``path`` as the previous release wrote it: manifest version 2, shard
    format 1 (no per-record checksum table; the header's checksum covers the whole body)."""
    import zlib

    from kdtrain.cache.shard import HEADER_BYTES, ShardInfo, pack_header

    m = Manifest.load(path)
    old = Manifest(**{**m.__dict__, "version": 2})
    identity, shards = bytes.fromhex(old.identity()), []
    for s in m.shards:
        data = (path / s.file).read_bytes()
        body = data[HEADER_BYTES:len(data) - 4 * s.num_samples]  # records [+ offset table]
        crc = zlib.crc32(body)
        (path / s.file).write_bytes(pack_header(s.first_sample, s.num_samples, m.index.record_bytes, identity, crc,
                                                version=1) + body)
        shards.append(ShardInfo(s.file, s.first_sample, s.num_samples, HEADER_BYTES + len(body), crc))
    Manifest(**{**old.__dict__, "shards": shards}).save(path)


@pytest.mark.parametrize("positions", ["all", "targets"])
def test_a_cache_of_the_previous_format_is_read_and_verified_whole(tmp_path, monkeypatch, positions):
    """Caches written before per-record checksums (format version 2) read as they did: the same
    records, each shard verified whole on first use (a damaged byte anywhere in it is an error
    naming the file); a cache job refuses to extend one."""
    from kdtrain.cache.writer import prepare

    new, old = tmp_path / "new", tmp_path / "old"
    _synthetic_cache(new, 32, 16, positions)
    shutil.copytree(new, old)
    _as_previous_version(old)
    assert Manifest.load(old).version == 2 and Manifest.load(new).version == 3
    spec = PayloadSpec(64, 2, 8, torch.bfloat16)
    with CacheReader(new) as a, CacheReader(old) as b:
        for g in range(0, 32, 2):
            pa, pb = a.payload([g, g + 1], spec), b.payload([g, g + 1], spec)
            assert torch.equal(pa.buffer, pb.buffer), g
        b.verify()
    with CacheReader(old) as reader:
        seen = _count_io(monkeypatch, old)
        reader.records([3])
        monkeypatch.undo()
    assert seen["crc"] >= (old / "shard_000000.bin").stat().st_size - 64  # the whole shard
    data = bytearray((old / "shard_000001.bin").read_bytes())
    data[len(data) - (8 * 17 if positions == "targets" else 0) - 20] ^= 0x04  # in the last record
    (old / "shard_000001.bin").write_bytes(bytes(data))
    with CacheReader(old) as reader:
        reader.payload([0, 1], spec)
        with pytest.raises(ValueError, match=rf"{re.escape(str(old / 'shard_000001.bin'))} is corrupted"):
            reader.payload([16, 17], spec)
    with pytest.raises(ValueError, match="holds a cache of format version 2.*stays readable"):
        prepare(old, Manifest.load(new))


def test_cached_payloads_announce_a_step_once_without_rescanning_it():
    """The loop announces what is left of the step before each micro-batch: the first call
    announces everything, in order; the later ones (suffixes) cost O(1), not a scan of the rest
    (quadratic in the step's micro-batches: ~50 ms per step at 1024)."""
    from kdtrain.cache.source import CachedPayloads

    class Counting(set):
        lookups = 0

        def __contains__(self, o):
            Counting.lookups += 1
            return super().__contains__(o)

    class Reader:
        announced: list = []

        def prefetch(self, ids, spec, device):
            self.announced.append(list(ids))

    n = 1024
    source = CachedPayloads(Reader(), spec=None, pairing=None, device=torch.device("cpu"))
    source._posted = Counting()
    work = list(range(7, 7 + n))
    source.start_step({o: (o, o + 1) for o in work})
    for i in range(n):
        source.post(work[i:])
    assert Reader.announced == [[(o, o + 1) for o in work]]
    assert Counting.lookups <= 2 * n, Counting.lookups
    source.start_step({o: (o,) for o in work})  # the next step is announced again
    source.post(work)
    assert len(Reader.announced) == 2
