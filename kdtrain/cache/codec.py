"""Encoding of one cached sample: packed top-k ids, top-k values, the tail's log-mass, input tokens.

A *record* holds everything the student needs for one dataset sample of ``S`` tokens: the
teacher's top-k ids and values per token, the log-mass of the rest ``tail_lse`` (for the exact
tail mass: logsumexp of ``logits / tau`` over the ids outside the top-k),
the ``S`` input tokens (so the reader can rebuild the micro-batch checksum that the student
compares with its own tokens, exactly as for a live payload) and an int64 checksum of those
tokens (catches a reader that maps the wrong record). These records have a fixed size, so a
sample's place in a shard is arithmetic (a ``cache.positions: targets`` cache's records,
``TargetRecordLayout`` below, vary in size and are found through the shard's offset table).
Fields, each starting at a multiple of its element size::

    checksum int64 (1) | tail_lse fp32 (S) | [fp8 only: offset fp32 (S), scale fp32 (S)]
    | values (S*k, 4/2/2/1 bytes) | ids packed (S*k x b bits) | tokens packed (S x b bits) | pad to 8

Ids and tokens use ``b = ceil(log2 V)`` bits each (15 bits for V = 32000, 18 for 151936 and
262144), little-endian bit order, in blocks of 8 values = ``b`` bytes (see ``pack_bits``).

Values (the teacher's raw top-k logits, sorted descending; ``tail_lse`` is of ``logits / tau``).
A cache of top-K read at k < K keeps the first k and folds the other K - k into the tail
(``fold_tail``), so it gives the tail a live teacher at top-k sends:

* ``fp32``: exact.  ``bf16``: round-to-nearest-even of the fp32 logits, i.e. bitwise what a live
  teacher with ``values_dtype: bf16`` sends.  ``fp16``: relative error <= 2^-11, |logit| < 65504.
* ``fp8`` (e4m3fn) with a per-row offset and scale: a row (one token's k values) stores its top
  logit ``m`` exactly (fp32), and ``d_i = m - v_i >= 0`` as e4m3 of ``d_i / s`` with
  ``s = max_i d_i / 448``. Decoded ``v_i = m - e4m3(d_i / s) * s`` with
  ``|error| <= 2^-4 * d_i + 2^-10 * s`` (3 mantissa bits; the second term is the subnormal
  spacing), plus fp32 rounding. The top-1 logit is exact, and the error grows with the distance
  from it, i.e. where the teacher's probability ``exp(-d_i / tau)`` is small. A plain per-row
  scale of ``v`` itself would put an error of 2^-4 * |logit| (often > 1 nat) on every entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from ..stream import token_checksum

VALUE_DTYPES = ("fp32", "bf16", "fp16", "fp8")
_VALUE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
_FP8_MAX = 448.0  # largest finite float8_e4m3fn
_FP16_MAX = 65504.0
MAX_ID_BITS = 31  # ids are int32 in the payload


def id_bits(vocab_size: int) -> int:
    """Fewest bits that hold every id in [0, vocab_size): ceil(log2 V), at least 1."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    bits = max(1, (vocab_size - 1).bit_length())
    if bits > MAX_ID_BITS:
        raise ValueError(f"vocab_size {vocab_size} needs {bits}-bit ids; the cache supports up to {MAX_ID_BITS}")
    return bits


def packed_bytes(n: int, bits: int) -> int:
    """Bytes of ``n`` values packed at ``bits`` each: whole blocks of 8 values (= ``bits`` bytes)."""
    return -(-n // 8) * bits


# -- bit packing --------------------------------------------------------------------------------
# Eight b-bit values fill exactly b bytes, so the stream is cut into independent 8-value blocks
# and every block has the same bit layout: value j starts at bit j*b of its block, i.e. in byte
# (j*b) >> 3 at bit offset (j*b) & 7, and spans at most ceil((7 + b) / 8) <= 5 bytes (b <= 31,
# so a shifted value fits a uint64). Packing and unpacking are then 8 static column operations
# over all blocks at once (vectorised numpy), instead of a loop over values or a b-fold
# expansion into single bits. For b in {8, 16} the layout is the plain little-endian array.

def _block_plan(bits: int):
    """Per value j of a block: (first byte, bit shift, number of bytes touched)."""
    plan = []
    for j in range(8):
        pos = j * bits
        shift = pos & 7
        plan.append((pos >> 3, shift, (shift + bits + 7) // 8))
    return plan


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis of non-negative integers ``values`` [..., n] (each < 2^bits) into
    uint8 [..., packed_bytes(n, bits)]. Leading axes are independent records."""
    v = np.asarray(values)
    lead, n = v.shape[:-1], v.shape[-1]
    nblocks = -(-n // 8)
    if n and (v.min() < 0 or int(v.max()) >> bits):
        raise ValueError(f"values out of range for {bits}-bit packing: [{v.min()}, {v.max()}]")
    flat = np.zeros(lead + (nblocks * 8,), dtype=np.uint64)
    flat[..., :n] = v
    if bits in (8, 16):  # the block layout is the little-endian array
        return flat.astype(f"<u{bits // 8}").view(np.uint8).reshape(lead + (nblocks * bits,))
    blocks = flat.reshape(-1, 8)
    out = np.zeros((blocks.shape[0], bits), dtype=np.uint8)
    for j, (byte0, shift, nbytes) in enumerate(_block_plan(bits)):
        w = blocks[:, j] << np.uint64(shift)
        for t in range(nbytes):
            out[:, byte0 + t] |= ((w >> np.uint64(8 * t)) & np.uint64(0xFF)).astype(np.uint8)
    return out.reshape(lead + (nblocks * bits,))


def unpack_bits(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of ``pack_bits``: uint8 [..., packed_bytes(n, bits)] -> int64 [..., n]."""
    p = np.ascontiguousarray(packed)
    lead = p.shape[:-1]
    nblocks = -(-n // 8)
    assert p.shape[-1] == nblocks * bits, (p.shape, n, bits)
    if bits in (8, 16):
        vals = p.view(f"<u{bits // 8}").astype(np.int64)
        return vals.reshape(lead + (nblocks * 8,))[..., :n]
    blocks = p.reshape(-1, bits)
    out = np.empty((blocks.shape[0], 8), dtype=np.int64)
    mask = np.uint64((1 << bits) - 1)
    for j, (byte0, shift, nbytes) in enumerate(_block_plan(bits)):
        w = blocks[:, byte0].astype(np.uint64)
        for t in range(1, nbytes):
            w |= blocks[:, byte0 + t].astype(np.uint64) << np.uint64(8 * t)
        out[:, j] = ((w >> np.uint64(shift)) & mask).astype(np.int64)
    return out.reshape(lead + (nblocks * 8,))[..., :n]


# -- values ---------------------------------------------------------------------------------------

def encode_values(values: torch.Tensor, dtype: str) -> dict[str, np.ndarray]:
    """fp32 values [..., k] -> the stored arrays (``values`` as raw bits; fp8 adds offset/scale)."""
    v = values.detach().to(torch.float32).cpu()
    if dtype == "fp32":
        return {"values": v.numpy().view(np.uint32)}
    if dtype == "bf16":
        return {"values": v.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)}
    if dtype == "fp16":
        if v.numel() and float(v.abs().max()) > _FP16_MAX:
            raise ValueError(f"cache.dtype=fp16: a teacher logit of magnitude {float(v.abs().max()):.4g} "
                             f"exceeds the fp16 range ({_FP16_MAX}); use bf16 or fp32")
        return {"values": v.to(torch.float16).view(torch.int16).numpy().view(np.uint16)}
    if dtype == "fp8":
        if v.numel() and not bool(torch.isfinite(v).all()):
            raise ValueError("cache.dtype=fp8: the teacher produced non-finite logits")
        offset = v.amax(dim=-1)
        d = offset.unsqueeze(-1) - v  # >= 0, exact 0 at the row maximum
        scale = d.amax(dim=-1) / _FP8_MAX
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant row: any scale
        q = (d / scale.unsqueeze(-1)).clamp_(max=_FP8_MAX).to(torch.float8_e4m3fn)
        return {"values": q.view(torch.uint8).numpy(), "offset": offset.numpy().view(np.uint32),
                "scale": scale.numpy().view(np.uint32)}
    raise ValueError(f"cache.dtype: {dtype!r} is not one of {list(VALUE_DTYPES)}")


def decode_values(fields: dict[str, np.ndarray], dtype: str) -> torch.Tensor:
    """Stored arrays -> torch values (fp32, bf16 or fp16 as stored; fp8 decodes to fp32)."""
    raw = np.ascontiguousarray(fields["values"])
    if dtype == "fp32":
        return torch.from_numpy(raw.view(np.float32))
    if dtype in ("bf16", "fp16"):
        return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16 if dtype == "bf16" else torch.float16)
    if dtype == "fp8":
        q = torch.from_numpy(raw).view(torch.float8_e4m3fn).to(torch.float32)
        offset = torch.from_numpy(np.ascontiguousarray(fields["offset"]).view(np.float32))
        scale = torch.from_numpy(np.ascontiguousarray(fields["scale"]).view(np.float32))
        return offset.unsqueeze(-1) - q * scale.unsqueeze(-1)
    raise ValueError(f"cache.dtype: {dtype!r} is not one of {list(VALUE_DTYPES)}")


def fold_tail(values: torch.Tensor, tail_lse: torch.Tensor, k: int, tau: Optional[float]
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``k`` of the stored top-K ``values`` [..., K] and the tail of that top-k: the
    stored tail with the other K - k values folded in, ``logaddexp(tail, logsumexp(v[k:] / tau))``
    (the tail a live teacher sends at top-k)."""
    if k == values.shape[-1]:
        return values, tail_lse
    assert tau is not None and tau > 0, "reading fewer than the stored top-K needs the cache's tau"
    dropped = torch.logsumexp(values[..., k:].to(torch.float32) / tau, dim=-1)
    return values[..., :k], torch.logaddexp(tail_lse, dropped)


def fp8_error_bound(values: torch.Tensor) -> torch.Tensor:
    """Documented worst-case |decoded - original| of the fp8 codec for fp32 ``values`` [..., k]."""
    v = values.to(torch.float32)
    d = v.amax(dim=-1, keepdim=True) - v
    scale = d.amax(dim=-1, keepdim=True) / _FP8_MAX
    return 2.0**-4 * d + 2.0**-10 * scale + 2.0**-22 * (v.abs() + d)


# -- records ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RecordLayout:
    """Byte layout of one sample's record (fixed size) for a cache's seq length, k, vocab, dtype."""

    seq_length: int
    k: int
    vocab_size: int
    values_dtype: str

    def __post_init__(self):
        if self.values_dtype not in VALUE_DTYPES:
            raise ValueError(f"cache.dtype: {self.values_dtype!r} is not one of {list(VALUE_DTYPES)}")
        if self.seq_length < 1 or self.k < 1:
            raise ValueError(f"seq_length and k must be >= 1, got {self.seq_length}, {self.k}")

    @property
    def bits(self) -> int:
        return id_bits(self.vocab_size)

    def fields(self) -> list[tuple[str, int, int]]:
        """(name, byte offset, byte size) of each field, in record order."""
        S, nk, vb = self.seq_length, self.seq_length * self.k, _VALUE_BYTES[self.values_dtype]
        sizes = [("checksum", 8), ("tail_lse", 4 * S)]
        if self.values_dtype == "fp8":
            sizes += [("offset", 4 * S), ("scale", 4 * S)]
        sizes += [("values", nk * vb), ("ids", packed_bytes(nk, self.bits)), ("tokens", packed_bytes(S, self.bits))]
        out, off = [], 0
        for name, size in sizes:
            out.append((name, off, size))
            off += size
        return out

    @property
    def record_bytes(self) -> int:
        _, off, size = self.fields()[-1]
        return -(-(off + size) // 8) * 8  # keeps every record's int64 / fp32 fields aligned

    def to_dict(self) -> dict:
        return {"record_bytes": self.record_bytes, "id_bits": self.bits,
                "fields": {name: [off, size] for name, off, size in self.fields()}}

    def encode(self, tokens_BS: torch.Tensor, ids_SBK: torch.Tensor, values_SBK: torch.Tensor,
               tail_lse_SB: torch.Tensor) -> np.ndarray:
        """One micro-batch of the teacher's output -> uint8 [B, record_bytes], one record per sample."""
        B, S = tokens_BS.shape
        assert S == self.seq_length and ids_SBK.shape == (S, B, self.k), (tokens_BS.shape, ids_SBK.shape)
        out = np.zeros((B, self.record_bytes), dtype=np.uint8)
        tokens = tokens_BS.detach().cpu().to(torch.int64)
        arrays = {
            "checksum": np.array([int(token_checksum(tokens[b])) for b in range(B)], dtype=np.int64).view(np.uint8),
            "tail_lse": tail_lse_SB.detach().to(torch.float32).cpu().t().contiguous().numpy(),
            "ids": pack_bits(ids_SBK.detach().cpu().permute(1, 0, 2).reshape(B, -1).numpy(), self.bits),
            "tokens": pack_bits(tokens.numpy(), self.bits),
        }
        vals = encode_values(values_SBK.detach().cpu().permute(1, 0, 2).contiguous(), self.values_dtype)
        arrays.update(vals)
        for name, off, size in self.fields():
            out[:, off:off + size] = np.ascontiguousarray(arrays[name]).reshape(B, -1).view(np.uint8)
        return out

    def decode(self, records: np.ndarray, k: int | None = None, tau: Optional[float] = None
               ) -> dict[str, torch.Tensor]:
        """uint8 [B, record_bytes] -> tokens [B, S] int64, ids [S, B, k] int32, values [S, B, k]
        (stored dtype; fp8 -> fp32), tail_lse [S, B] fp32, checksum [B] int64 (of each sample's tokens).

        ``k`` <= the stored k keeps the first k entries (the top-k prefix: ids are sorted by
        descending logit) and folds the others into the tail (``tau``: the cache's temperature)."""
        k = self.k if k is None else k
        assert 1 <= k <= self.k
        B, S = records.shape[0], self.seq_length
        assert records.shape[1] == self.record_bytes, records.shape
        f = {name: records[:, off:off + size] for name, off, size in self.fields()}
        ids = unpack_bits(f["ids"], self.bits, S * self.k).reshape(B, S, self.k)[..., :k]
        tokens = unpack_bits(f["tokens"], self.bits, S)
        per_row = {name: np.ascontiguousarray(a).view(np.uint8).reshape(B, S, -1)
                   for name, a in f.items() if name in ("values", "offset", "scale")}
        per_row["values"] = per_row["values"].view(
            {"fp32": np.uint32, "bf16": np.uint16, "fp16": np.uint16, "fp8": np.uint8}[self.values_dtype])
        for name in ("offset", "scale"):
            if name in per_row:
                per_row[name] = per_row[name].view(np.uint32)[..., 0]
        values = decode_values(per_row, self.values_dtype)  # [B, S, K]
        tail_lse = torch.from_numpy(np.ascontiguousarray(f["tail_lse"]).view(np.float32).reshape(B, S))
        values, tail_lse = fold_tail(values, tail_lse, k, tau)
        return {"tokens": torch.from_numpy(tokens),
                "ids": torch.from_numpy(ids.astype(np.int32)).permute(1, 0, 2),
                "values": values.permute(1, 0, 2),
                "tail_lse": tail_lse.t(),
                "checksum": torch.from_numpy(np.ascontiguousarray(f["checksum"]).view(np.int64).reshape(B))}


def _pad8(n: int) -> int:
    return -(-n // 8) * 8


@dataclass(frozen=True)
class TargetRecordLayout:
    """A variable-size record holding the teacher's output only where the label is a target
    (``cache.positions: targets``; conversations: the replies). Fields, 8-byte aligned where noted::

        checksum int64 | n u32 | pad u32 | tokens packed (S x b bits, to 8) | targets bitmap (S bits, to 8)
        | tail_lse fp32 (n) | [fp8 only: offset fp32 (n), scale fp32 (n)] | values (n*k) | ids packed (n*k x b bits)
        | pad to 8

    ``n`` is the number of targets of the sample; the rows are the target positions in order.
    Decoding gives the full [S, B, k] payload, the other positions a placeholder that no loss
    reads (ids 0..k-1, values 0, tail log-mass log V: finite), since their loss weight is 0."""

    seq_length: int
    k: int
    vocab_size: int
    values_dtype: str

    def __post_init__(self):
        RecordLayout(self.seq_length, self.k, self.vocab_size, self.values_dtype)  # the same checks

    @property
    def bits(self) -> int:
        return id_bits(self.vocab_size)

    @property
    def head_bytes(self) -> int:
        return 16 + _pad8(packed_bytes(self.seq_length, self.bits)) + _pad8(-(-self.seq_length // 8))

    def fields(self, n: int) -> list[tuple[str, int, int]]:
        """(name, byte offset, byte size) of the per-target fields of a record with ``n`` targets."""
        nk, vb = n * self.k, _VALUE_BYTES[self.values_dtype]
        sizes = [("tail_lse", 4 * n)]
        if self.values_dtype == "fp8":
            sizes += [("offset", 4 * n), ("scale", 4 * n)]
        sizes += [("values", nk * vb), ("ids", packed_bytes(nk, self.bits))]
        out, off = [], self.head_bytes
        for name, size in sizes:
            out.append((name, off, size))
            off += size
        return out

    def record_bytes(self, n: int) -> int:
        _, off, size = self.fields(n)[-1]
        return _pad8(off + size)

    @property
    def max_record_bytes(self) -> int:
        return self.record_bytes(self.seq_length)

    def to_dict(self) -> dict:
        return {"record_bytes": "variable", "max_record_bytes": self.max_record_bytes, "id_bits": self.bits,
                "head_bytes": self.head_bytes}

    def encode(self, tokens_BS: torch.Tensor, ids_SBK: torch.Tensor, values_SBK: torch.Tensor,
               tail_lse_SB: torch.Tensor, targets_BS: np.ndarray) -> list[np.ndarray]:
        """One micro-batch of the teacher's output and the label flags [B, S] -> one uint8 record
        per sample, holding the flagged positions only."""
        B, S = tokens_BS.shape
        assert S == self.seq_length and ids_SBK.shape == (S, B, self.k) and targets_BS.shape == (B, S)
        tokens = tokens_BS.detach().cpu().to(torch.int64)
        ids = ids_SBK.detach().cpu().permute(1, 0, 2)  # [B, S, k]
        values = values_SBK.detach().cpu().permute(1, 0, 2)
        tail_lse = tail_lse_SB.detach().to(torch.float32).cpu().t()
        tbits, mbits = packed_bytes(S, self.bits), -(-S // 8)
        out = []
        for b in range(B):
            rows = np.flatnonzero(targets_BS[b])
            n = len(rows)
            rec = np.zeros(self.record_bytes(n), dtype=np.uint8)
            rec[0:8] = np.array([int(token_checksum(tokens[b]))], dtype=np.int64).view(np.uint8)
            rec[8:12] = np.array([n], dtype=np.uint32).view(np.uint8)
            rec[16:16 + tbits] = pack_bits(tokens[b].numpy()[None], self.bits)[0]
            at = 16 + _pad8(tbits)
            rec[at:at + mbits] = np.packbits(targets_BS[b].astype(bool), bitorder="little")
            idx = torch.from_numpy(rows)
            arrays = {"tail_lse": tail_lse[b, idx].contiguous().numpy(),
                      "ids": pack_bits(ids[b, idx].reshape(1, -1).numpy(), self.bits)[0]}
            arrays.update(encode_values(values[b, idx].contiguous(), self.values_dtype))
            for name, off, size in self.fields(n):
                rec[off:off + size] = np.ascontiguousarray(arrays[name]).reshape(-1).view(np.uint8)
            out.append(rec)
        return out

    def decode(self, records: Sequence[np.ndarray], k: int | None = None, tau: Optional[float] = None
               ) -> dict[str, torch.Tensor]:
        """Records -> the same tensors as ``RecordLayout.decode``, plus ``targets`` [B, S] bool."""
        k = self.k if k is None else k
        assert 1 <= k <= self.k
        B, S = len(records), self.seq_length
        tbits, mbits = packed_bytes(S, self.bits), -(-S // 8)
        stored = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float32}
        ids = torch.arange(k, dtype=torch.int32).expand(B, S, k).clone()
        values = torch.zeros(B, S, k, dtype=stored[self.values_dtype])
        # Rows that are not targets are never read: any finite tail will do.
        tail_lse = torch.full((B, S), math.log(self.vocab_size), dtype=torch.float32)
        tokens = np.empty((B, S), dtype=np.int64)
        targets = np.zeros((B, S), dtype=bool)
        checksum = np.empty(B, dtype=np.int64)
        for b, rec in enumerate(records):
            rec = np.asarray(rec)
            checksum[b] = rec[0:8].view(np.int64)[0]
            n = int(rec[8:12].view(np.uint32)[0])
            if n > S or rec.shape[0] != self.record_bytes(n):
                raise ValueError(f"a cache record of {rec.shape[0]} bytes does not hold {n} targets of {S}")
            tokens[b] = unpack_bits(rec[16:16 + tbits], self.bits, S)
            at = 16 + _pad8(tbits)
            targets[b] = np.unpackbits(rec[at:at + mbits], bitorder="little")[:S].astype(bool)
            rows = torch.from_numpy(np.flatnonzero(targets[b]))
            if len(rows) != n:
                raise ValueError(f"a cache record's target bitmap has {len(rows)} positions, its count says {n}")
            if n == 0:
                continue
            f = {name: rec[off:off + size] for name, off, size in self.fields(n)}
            ids[b, rows] = torch.from_numpy(unpack_bits(f["ids"], self.bits, n * self.k).reshape(n, self.k)[:, :k]
                                            .astype(np.int32))
            per_row = {"values": np.ascontiguousarray(f["values"]).view(
                {"fp32": np.uint32, "bf16": np.uint16, "fp16": np.uint16, "fp8": np.uint8}[self.values_dtype])
                .reshape(n, self.k)}
            for name in ("offset", "scale"):
                if name in f:
                    per_row[name] = np.ascontiguousarray(f[name]).view(np.uint32)
            row_values, row_tail = fold_tail(decode_values(per_row, self.values_dtype),
                                             torch.from_numpy(np.ascontiguousarray(f["tail_lse"]).view(np.float32)),
                                             k, tau)
            values[b, rows] = row_values.to(values.dtype)
            tail_lse[b, rows] = row_tail
        return {"tokens": torch.from_numpy(tokens), "ids": ids.permute(1, 0, 2), "values": values.permute(1, 0, 2),
                "tail_lse": tail_lse.t(), "checksum": torch.from_numpy(checksum), "targets": torch.from_numpy(targets)}


def bytes_per_token(vocab_size: int, k: int, dtype: str, seq_length: int | None = None) -> float:
    """Stored bytes per token: exact for a given ``seq_length`` (record size / S), else the
    asymptotic per-token cost (tail_lse + k packed ids + k values + one packed token [+ fp8 offset/scale])."""
    if seq_length is not None:
        return RecordLayout(seq_length, k, vocab_size, dtype).record_bytes / seq_length
    if dtype not in VALUE_DTYPES:
        raise ValueError(f"cache.dtype: {dtype!r} is not one of {list(VALUE_DTYPES)}")
    b = id_bits(vocab_size)
    return 4 + k * b / 8 + k * _VALUE_BYTES[dtype] + b / 8 + (8 if dtype == "fp8" else 0)


def live_payload_bytes_per_token(k: int, values_dtype: str = "fp32") -> float:
    """What the online teacher sends per token (int32 ids, fp32|bf16 values, fp32 tail_lse), for comparison."""
    return 4 + k * 4 + k * (4 if values_dtype == "fp32" else 2)


def shard_samples_for(target_bytes: int, record_bytes: int, multiple: int) -> int:
    """Largest multiple of ``multiple`` samples whose records fit ``target_bytes`` (at least one multiple)."""
    return max(multiple, (target_bytes // record_bytes) // multiple * multiple)


__all__ = ["VALUE_DTYPES", "RecordLayout", "TargetRecordLayout", "bytes_per_token", "decode_values", "encode_values", "fp8_error_bound",
           "id_bits", "live_payload_bytes_per_token", "pack_bits", "packed_bytes", "shard_samples_for",
           "unpack_bits"]
