"""Offline teacher cache: the teacher's top-k payload computed once, stored in checksummed shards,
read back (memory-mapped, prefetched) as the same ``Payload`` a live teacher streams.

codec (record encoding, bit-packed ids, value dtypes) -> shard (file format, index) -> manifest
(provenance, checks against a run) -> writer (atomic, resumable) / reader (CacheReader) -> job
(the torchrun cache pass, scripts/cache_teacher.py). See docs/offline-cache.md.
"""

from .codec import VALUE_DTYPES, RecordLayout, bytes_per_token, id_bits
from .manifest import Manifest
from .reader import CacheReader

__all__ = ["VALUE_DTYPES", "CacheReader", "Manifest", "RecordLayout", "bytes_per_token", "id_bits"]
