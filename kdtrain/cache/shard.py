"""Shard files of the top-k cache: a 64-byte header, the sample records, then their tables.

    offset 0   magic     b"KDTCACH1"
           8   version   u32        shard format version (2; 1 = caches of manifest version 2)
          12   header    u32        header bytes (64)
          16   first     u64        global train-sample id of the first record
          24   count     u64        number of records
          32   record    u64        bytes per record (see codec.RecordLayout); 0 = variable size
          40   identity  16 bytes   first 16 bytes of the manifest's identity digest
          56   crc       u32        version 2: zlib.crc32 of the tables; version 1: of the whole body
          60   head_crc  u32        zlib.crc32 of bytes 0 .. 60

    64                     the records, in sample order
    [variable size only]   record offsets: count + 1 little-endian u64 (record j is body bytes
                           [t[j], t[j + 1]) after the header, t[0] = 0)
    [version 2 only]       record checksums: count little-endian u32, zlib.crc32 of each record

Shard ``i`` holds samples ``[i * shard_samples, min((i + 1) * shard_samples, num_samples))``, so
sample ``g`` lives in shard ``g // shard_samples``; with fixed-size records at byte
``64 + (g % shard_samples) * record``, an arithmetic index with no lookup table (``ShardIndex``),
with variable-size records (``cache.positions: targets``) where the offset table says.

A shard is self-verifying, and its integrity is checked in proportion to what is read. The header
carries its own checksum and the checksum of the tables; the tables carry one checksum per record.
So a reader that needs a few records of a large shard (a student replica reads a few samples per
step) checks the header, the expected size and the tables once (tens of bytes per record), then
each record it reads against its own checksum (:func:`open_shard`, :func:`check_record`), and never
reads the rest. :func:`verify_shard` checks everything (a resumed cache job trusts a complete shard
written before a crash without any other file; ``CacheReader.verify``). Version 1 shards have no
per-record checksums: their one checksum covers the whole body, so reading any record of one means
reading the whole shard first. A truncated or corrupted shard is a ``ValueError`` naming the file
(and, for a damaged record, the sample).
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

MAGIC = b"KDTCACH1"
VERSION = 2
VERSIONS = (1, 2)  # readable shard formats
HEADER = struct.Struct("<8sIIQQQ16sII")
HEADER_BYTES = HEADER.size
assert HEADER_BYTES == 64
_CRC_CHUNK = 16 << 20


def shard_name(index: int) -> str:
    return f"shard_{index:06d}.bin"


@dataclass(frozen=True)
class ShardInfo:
    """What the manifest records per shard (``crc32``: the header's checksum field)."""

    file: str
    first_sample: int
    num_samples: int
    bytes: int
    crc32: int

    def to_dict(self) -> dict:
        return {"file": self.file, "first_sample": self.first_sample, "num_samples": self.num_samples,
                "bytes": self.bytes, "crc32": self.crc32}

    @classmethod
    def from_dict(cls, d: dict) -> "ShardInfo":
        return cls(str(d["file"]), int(d["first_sample"]), int(d["num_samples"]), int(d["bytes"]), int(d["crc32"]))


@dataclass(frozen=True)
class ShardIndex:
    """Sample id -> (shard, byte offset), and each shard's sample range."""

    num_samples: int
    shard_samples: int
    record_bytes: int

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_samples)

    def samples_of(self, shard: int) -> range:
        start = shard * self.shard_samples
        return range(start, min(start + self.shard_samples, self.num_samples))

    def locate(self, sample: int) -> tuple[int, int]:
        if not 0 <= sample < self.num_samples:
            raise ValueError(f"sample {sample} is not cached (the cache holds samples [0, {self.num_samples}))")
        shard, i = divmod(sample, self.shard_samples)
        return shard, HEADER_BYTES + i * self.record_bytes


def table_bytes(count: int) -> int:
    """Bytes of the record offset table of a shard of variable-size records."""
    return 8 * (count + 1)


def tables_bytes(count: int, record_bytes: int, version: int = VERSION) -> int:
    """Bytes after the records: the offset table (variable-size records) and, from version 2, the
    per-record checksums."""
    return (table_bytes(count) if record_bytes == 0 else 0) + (4 * count if version >= 2 else 0)


def pack_header(first: int, count: int, record_bytes: int, identity: bytes, crc: int, version: int = VERSION) -> bytes:
    head = HEADER.pack(MAGIC, version, HEADER_BYTES, first, count, record_bytes, identity[:16], crc, 0)
    return head[:60] + struct.pack("<I", zlib.crc32(head[:60]))


def crc32_of(buf, crc: int = 0) -> int:
    """crc32 of a bytes-like object or memory map, in chunks (bounded temporary memory)."""
    view = memoryview(buf).cast("B")
    for off in range(0, len(view), _CRC_CHUNK):
        crc = zlib.crc32(view[off:off + _CRC_CHUNK], crc)
    return crc


def pread_into(fd: int, buf, offset: int) -> None:
    """Fill the writable buffer ``buf`` with the file's bytes from ``offset`` (positional: no shared
    file position, so threads may read one descriptor at once)."""
    view = memoryview(buf).cast("B")
    while len(view):
        n = os.preadv(fd, [view], offset)
        if n <= 0:
            raise EOFError(offset)
        view, offset = view[n:], offset + n


def pread(fd: int, n: int, offset: int) -> np.ndarray:
    """``n`` bytes of the file at ``offset``, as uint8."""
    out = np.empty(n, dtype=np.uint8)
    pread_into(fd, out, offset)
    return out


@dataclass(frozen=True)
class ShardTables:
    """What :func:`open_shard` read of a shard: where each record is and what it must checksum to."""

    path: Path
    first: int
    count: int
    record_bytes: int
    offsets: Optional[np.ndarray]  # variable-size records: u64 [count + 1], body-relative; else None
    crcs: Optional[np.ndarray]  # u32 [count] per-record crc32 (version 2); None for version 1

    def span(self, j: int) -> tuple[int, int]:
        """File offset and size of record ``j``."""
        if self.offsets is None:
            return HEADER_BYTES + j * self.record_bytes, self.record_bytes
        return HEADER_BYTES + int(self.offsets[j]), int(self.offsets[j + 1] - self.offsets[j])


def _check_header(path: Path, head: bytes, first: int, count: int, record_bytes: int, identity: bytes,
                  crc: Optional[int], version: int) -> int:
    """Header fields against the expected ones; returns the header's checksum field."""
    magic, h_version, hbytes, h_first, h_count, h_record, h_ident, h_crc, head_crc = HEADER.unpack(head)
    if magic != MAGIC or zlib.crc32(head[:60]) != head_crc:
        raise ValueError(f"cache shard {path} has a corrupt header (not a kdtrain cache shard?)")
    if h_version != version or hbytes != HEADER_BYTES:
        raise ValueError(f"cache shard {path} has shard format version {h_version}, its manifest's cache format "
                         f"holds version {version} shards" + (
                             "" if h_version in VERSIONS else f" (this reader knows versions {list(VERSIONS)})"))
    if (h_first, h_count, h_record) != (first, count, record_bytes):
        raise ValueError(f"cache shard {path} holds samples [{h_first}, {h_first + h_count}) of {h_record}-byte "
                         f"records, expected [{first}, {first + count}) of {record_bytes}-byte records")
    if h_ident != identity[:16]:
        raise ValueError(f"cache shard {path} was written by a different cache job (teacher, data, k, tau or "
                         f"dtype differ from the manifest)")
    if crc is not None and crc != h_crc:
        raise ValueError(f"cache shard {path}: checksum {h_crc:#010x} in its header differs from "
                         f"{crc:#010x} in the manifest")
    return h_crc


def _read_tables(path: Path, fd: int, size: int, first: int, count: int, record_bytes: int, identity: bytes,
                 crc: Optional[int], version: int) -> tuple[ShardTables, int]:
    """Header, size and tables of an open shard, checked (reads the header and the tables only).
    Returns the tables and the header's checksum field."""
    tables = tables_bytes(count, record_bytes, version)
    expected = HEADER_BYTES + count * record_bytes + tables if record_bytes else None
    if (expected is not None and size != expected) or size < HEADER_BYTES + tables:
        raise ValueError(f"cache shard {path} is truncated or oversized: {size} bytes, expected "
                         + (f"{expected} ({count} records of {record_bytes} bytes + {HEADER_BYTES}-byte header"
                            + (f" + {tables}-byte checksum table)" if tables else ")")
                            if expected is not None else f"at least {HEADER_BYTES + tables} (header and tables)"))
    h_crc = _check_header(path, pread(fd, HEADER_BYTES, 0).tobytes(), first, count, record_bytes, identity, crc,
                          version)
    offsets = crcs = None
    if version >= 2:  # the tables' checksum is in the (checked) header: the tables are then trusted
        raw = pread(fd, tables, size - tables)
        if zlib.crc32(raw) != h_crc:
            raise ValueError(f"cache shard {path} is corrupted: its record tables fail their checksum "
                             f"(truncated, or damaged at the end?)")
        crcs = raw[tables - 4 * count:].view("<u4")
        if record_bytes == 0:
            offsets = raw[:table_bytes(count)].view("<u8")
    elif record_bytes == 0:  # version 1: the offsets are covered by the whole-body checksum only
        offsets = pread(fd, table_bytes(count), size - tables).view("<u8")
    if offsets is not None and (offsets[0] != 0 or np.any(np.diff(offsets.astype(np.int64)) < 0)
                                or int(offsets[-1]) != size - HEADER_BYTES - tables):
        raise ValueError(f"cache shard {path} is truncated or corrupted: its record offset table does not "
                         f"match its {size} bytes")
    return ShardTables(path, first, count, record_bytes, offsets, crcs), h_crc


def open_shard(path: Path, fd: int, first: int, count: int, record_bytes: int, identity: bytes,
               crc: Optional[int], version: int = VERSION) -> ShardTables:
    """The cheap checks of an open shard (size, header, tables; for version 1 shards the tables are
    not covered by a checksum of their own: verify those whole with :func:`verify_shard`)."""
    return _read_tables(Path(path), fd, os.fstat(fd).st_size, first, count, record_bytes, identity, crc, version)[0]


def check_record(tables: ShardTables, j: int, record: np.ndarray) -> None:
    """ValueError naming the shard and the sample when record ``j`` (as read) fails its checksum."""
    if tables.crcs is None:  # version 1: verified with the whole shard
        return
    actual, want = zlib.crc32(record), int(tables.crcs[j])
    if actual != want:
        raise ValueError(f"cache shard {tables.path}: the record of sample {tables.first + j} is corrupted "
                         f"(checksum {actual:#010x}, expected {want:#010x})")


def verify_shard(path: Path, first: int, count: int, record_bytes: int, identity: bytes,
                 crc: int | None = None, version: int = VERSION) -> ShardInfo:
    """Check a complete shard file end to end; ValueError naming the file and what is wrong.

    ``crc`` (from the manifest), when given, must also equal the checksum in the header."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"cache shard {path} is missing")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        tables, h_crc = _read_tables(path, f.fileno(), size, first, count, record_bytes, identity, crc, version)
        f.seek(HEADER_BYTES)
        if version == 1:  # one checksum over records and offset table
            actual = 0
            while chunk := f.read(_CRC_CHUNK):
                actual = zlib.crc32(chunk, actual)
            if actual != h_crc:
                raise ValueError(f"cache shard {path} is corrupted: checksum {actual:#010x}, expected {h_crc:#010x}")
        else:  # every record against its checksum, in file order (records are contiguous)
            for j in range(count):
                _, n = tables.span(j)
                actual = 0
                while n:
                    chunk = f.read(min(n, _CRC_CHUNK))
                    if not chunk:
                        raise ValueError(f"cache shard {path} is truncated")
                    actual, n = zlib.crc32(chunk, actual), n - len(chunk)
                if actual != int(tables.crcs[j]):
                    raise ValueError(f"cache shard {path}: the record of sample {first + j} is corrupted (checksum "
                                     f"{actual:#010x}, expected {int(tables.crcs[j]):#010x})")
    return ShardInfo(path.name, first, count, size, h_crc)
