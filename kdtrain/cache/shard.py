"""Shard files of the top-k cache: a 64-byte header, then fixed-size sample records.

    offset 0   magic     b"KDTCACH1"
           8   version   u32        format version (1)
          12   header    u32        header bytes (64)
          16   first     u64        global train-sample id of the first record
          24   count     u64        number of records
          32   record    u64        bytes per record (see codec.RecordLayout)
          40   identity  16 bytes   first 16 bytes of the manifest's identity digest
          56   body_crc  u32        zlib.crc32 of the records (bytes 64 .. end)
          60   head_crc  u32        zlib.crc32 of bytes 0 .. 60

Shard ``i`` holds samples ``[i * shard_samples, min((i + 1) * shard_samples, num_samples))``, so
sample ``g`` lives in shard ``g // shard_samples`` at byte ``64 + (g % shard_samples) * record``:
the index is arithmetic and needs no lookup table (``ShardIndex``).

Variable-size records (``cache.positions: targets``, codec.TargetRecordLayout) have ``record`` 0
in the header and end the file with a table of ``count + 1`` little-endian u64 offsets (record j
is body bytes ``[t[j], t[j + 1])``, ``t[0] = 0``); the body checksum covers records and table.

A shard is self-verifying: header checksum, expected size and body checksum. That lets a resumed
cache job trust a complete shard written before a crash without any other file, and lets the
reader detect a truncated or corrupted shard on first use (a ``ValueError`` naming the file).
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"KDTCACH1"
VERSION = 1
HEADER = struct.Struct("<8sIIQQQ16sII")
HEADER_BYTES = HEADER.size
assert HEADER_BYTES == 64
_CRC_CHUNK = 16 << 20


def shard_name(index: int) -> str:
    return f"shard_{index:06d}.bin"


@dataclass(frozen=True)
class ShardInfo:
    """What the manifest records per shard."""

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
    """Bytes of the record offset table that ends a shard of variable-size records."""
    return 8 * (count + 1)


def record_offsets(shard: np.ndarray, count: int) -> np.ndarray:
    """The offset table (u64 [count + 1], body-relative) of a mapped shard of variable-size records."""
    return shard[shard.shape[0] - table_bytes(count):].view("<u8")


def pack_header(first: int, count: int, record_bytes: int, identity: bytes, body_crc: int) -> bytes:
    head = HEADER.pack(MAGIC, VERSION, HEADER_BYTES, first, count, record_bytes, identity[:16], body_crc, 0)
    return head[:60] + struct.pack("<I", zlib.crc32(head[:60]))


def crc32_of(buf, crc: int = 0) -> int:
    """crc32 of a bytes-like object or memory map, in chunks (bounded temporary memory)."""
    view = memoryview(buf).cast("B")
    for off in range(0, len(view), _CRC_CHUNK):
        crc = zlib.crc32(view[off:off + _CRC_CHUNK], crc)
    return crc


def verify_shard(path: Path, first: int, count: int, record_bytes: int, identity: bytes,
                 crc: int | None = None) -> ShardInfo:
    """Check a complete shard file end to end; ValueError naming the file and what is wrong.

    ``crc`` (from the manifest), when given, must also equal the body checksum in the header."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"cache shard {path} is missing")
    size = path.stat().st_size
    table = table_bytes(count) if record_bytes == 0 else 0
    expected = HEADER_BYTES + count * record_bytes if record_bytes else None
    if (expected is not None and size != expected) or size < HEADER_BYTES + table:
        raise ValueError(f"cache shard {path} is truncated or oversized: {size} bytes, expected "
                         + (f"{expected} ({count} records of {record_bytes} bytes + {HEADER_BYTES}-byte header)"
                            if expected is not None else f"at least {HEADER_BYTES + table} (header and offset table)"))
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
        magic, version, hbytes, h_first, h_count, h_record, h_ident, body_crc, head_crc = HEADER.unpack(head)
        if magic != MAGIC or zlib.crc32(head[:60]) != head_crc:
            raise ValueError(f"cache shard {path} has a corrupt header (not a kdtrain cache shard?)")
        if version != VERSION or hbytes != HEADER_BYTES:
            raise ValueError(f"cache shard {path} has format version {version}, this reader knows {VERSION}")
        if (h_first, h_count, h_record) != (first, count, record_bytes):
            raise ValueError(f"cache shard {path} holds samples [{h_first}, {h_first + h_count}) of {h_record}-byte "
                             f"records, expected [{first}, {first + count}) of {record_bytes}-byte records")
        if h_ident != identity[:16]:
            raise ValueError(f"cache shard {path} was written by a different cache job (teacher, data, k, tau or "
                             f"dtype differ from the manifest)")
        if crc is not None and crc != body_crc:
            raise ValueError(f"cache shard {path}: checksum {body_crc:#010x} in its header differs from "
                             f"{crc:#010x} in the manifest")
        if record_bytes == 0:
            f.seek(size - table)
            offsets = np.frombuffer(f.read(table), dtype="<u8")
            if offsets[0] != 0 or np.any(np.diff(offsets.astype(np.int64)) < 0) or \
                    int(offsets[-1]) != size - HEADER_BYTES - table:
                raise ValueError(f"cache shard {path} is truncated or corrupted: its record offset table does not "
                                 f"match its {size} bytes")
            f.seek(HEADER_BYTES)
        actual = 0
        while chunk := f.read(_CRC_CHUNK):
            actual = zlib.crc32(chunk, actual)
    if actual != body_crc:
        raise ValueError(f"cache shard {path} is corrupted: checksum {actual:#010x}, expected {body_crc:#010x}")
    return ShardInfo(path.name, first, count, size, body_crc)


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
