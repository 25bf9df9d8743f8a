"""Teacher cache codec (kdtrain/cache/codec.py): id packing, value encodings and records round
trip. Tolerances: ids, tokens, lse and checksums are exact; values are bitwise for fp32 and bf16;
fp8 stays within ``codec.fp8_error_bound`` (2^-4 of the distance to the row's top logit + 2^-10 of
the row scale), the documented formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdtrain.cache.codec import (RecordLayout, bytes_per_token, decode_values, encode_values, fp8_error_bound, id_bits,
                                 pack_bits, packed_bytes, unpack_bits)
from kdtrain.stream import token_checksum


@pytest.mark.parametrize("vocab,bits", [(50257, 16), (151936, 18), (262144, 18), (32000, 15), (512, 9), (2, 1),
                                        (300000, 19)])
def test_id_packing_round_trip_is_exact(vocab, bits):
    assert id_bits(vocab) == bits
    rng = np.random.default_rng(vocab)
    for n in (1, 7, 8, 9, 64, 1001):
        ids = rng.integers(0, vocab, size=(3, n))
        ids[0, 0], ids[-1, -1] = vocab - 1, 0  # both ends of the range
        packed = pack_bits(ids, bits)
        assert packed.dtype == np.uint8 and packed.shape == (3, packed_bytes(n, bits)) == (3, -(-n // 8) * bits)
        assert np.array_equal(unpack_bits(packed, bits, n), ids)
    with pytest.raises(ValueError, match="out of range"):
        pack_bits(np.array([1 << bits]), bits)


def test_values_round_trip_per_dtype():
    g = torch.Generator().manual_seed(0)
    v = (torch.randn(64, 3, 32, generator=g) * 4 + 12).sort(dim=-1, descending=True).values
    v[0, 0] = 7.0  # a constant row
    assert torch.equal(decode_values(encode_values(v, "fp32"), "fp32"), v)
    assert torch.equal(decode_values(encode_values(v, "bf16"), "bf16"), v.to(torch.bfloat16))
    assert torch.equal(decode_values(encode_values(v, "fp16"), "fp16"), v.to(torch.float16))
    got = decode_values(encode_values(v, "fp8"), "fp8")
    assert got.dtype == torch.float32
    err = (got - v).abs()
    assert bool((err <= fp8_error_bound(v)).all()), float((err / fp8_error_bound(v)).max())
    # The bound is the documented one (codec docstring: 2^-4 of the distance d to the row's top,
    # 2^-10 of the row scale max(d) / 448, fp32 rounding), not whatever the codec needs; and fp8
    # is lossy here (the values did go through 8 bits).
    d = v.amax(-1, keepdim=True) - v
    documented = 2.0**-4 * d + 2.0**-10 * d.amax(-1, keepdim=True) / 448 + 2.0**-22 * (v.abs() + d)
    assert torch.equal(fp8_error_bound(v), documented)
    assert float(err.max()) > 2.0**-6 * float(d.max())
    assert torch.equal(got[..., 0], v[..., 0])  # the top logit is exact
    assert torch.equal(got[0, 0], v[0, 0])
    with pytest.raises(ValueError, match="fp16 range"):
        encode_values(torch.tensor([[7e4, 1.0]]), "fp16")
    with pytest.raises(ValueError, match="non-finite"):
        encode_values(torch.tensor([[float("-inf"), 1.0]]), "fp8")


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16", "fp8"])
def test_record_round_trip_and_topk_prefix(dtype):
    S, B, k, V = 13, 3, 5, 151936
    g = torch.Generator().manual_seed(1)
    layout = RecordLayout(S, k, V, dtype)
    tokens = torch.randint(0, V, (B, S), generator=g)
    ids = torch.randint(0, V, (S, B, k), generator=g, dtype=torch.int32)
    vals = torch.randn(S, B, k, generator=g).sort(dim=-1, descending=True).values
    lse = torch.randn(S, B, generator=g)
    rec = layout.encode(tokens, ids, vals, lse)
    assert rec.shape == (B, layout.record_bytes) and layout.record_bytes % 8 == 0
    d = layout.decode(rec)
    assert torch.equal(d["tokens"], tokens) and torch.equal(d["ids"], ids) and torch.equal(d["tail_lse"], lse)
    assert [int(c) for c in d["checksum"]] == [int(token_checksum(tokens[b])) for b in range(B)]
    ref = decode_values(encode_values(vals, dtype), dtype)
    assert torch.equal(d["values"], ref)
    d2 = layout.decode(rec, k=2, tau=0.7)
    assert torch.equal(d2["ids"], ids[..., :2]) and torch.equal(d2["values"], ref[..., :2])
    # The dropped entries join the tail, as a live teacher at top-2 sends it.
    want = torch.logsumexp(torch.cat([ref[..., 2:].float() / 0.7, lse.unsqueeze(-1)], -1), -1)
    torch.testing.assert_close(d2["tail_lse"], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp8"])
def test_target_records_hold_the_flagged_positions_only(dtype):
    """cache.positions: targets: the flagged rows decode exactly as from a full record, the others
    to a finite placeholder; the record grows with the number of targets only."""
    from kdtrain.cache.codec import TargetRecordLayout

    S, B, k, V = 13, 4, 5, 32000
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, V, (B, S), generator=g)
    ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(S * B)]).view(S, B, k).to(torch.int32)
    vals = torch.randn(S, B, k, generator=g).sort(dim=-1, descending=True).values * 3
    lse = torch.randn(S, B, generator=g) + 5
    flags = np.random.default_rng(3).random((B, S)) < 0.4
    flags[1], flags[2] = False, True  # a sample with no target, one with all
    layout, full = TargetRecordLayout(S, k, V, dtype), RecordLayout(S, k, V, dtype)
    recs = layout.encode(tokens, ids, vals, lse, flags)
    assert [len(r) for r in recs] == [layout.record_bytes(int(f.sum())) for f in flags]
    assert len(recs[1]) == layout.head_bytes and len(recs[2]) == layout.max_record_bytes
    d, ref = layout.decode(recs), full.decode(full.encode(tokens, ids, vals, lse))
    m = torch.from_numpy(flags).t()
    for name in ("ids", "values", "tail_lse"):
        assert torch.equal(d[name][m], ref[name][m]), name
    assert torch.equal(d["tokens"], tokens) and torch.equal(d["checksum"], ref["checksum"])
    assert torch.equal(d["targets"], torch.from_numpy(flags))
    assert bool(torch.isfinite(d["values"].float()).all()) and bool(torch.isfinite(d["tail_lse"]).all())
    d2, ref2 = layout.decode(recs, k=2, tau=0.7), full.decode(full.encode(tokens, ids, vals, lse), k=2, tau=0.7)
    for name in ("ids", "values", "tail_lse"):
        assert torch.equal(d2[name][m], ref2[name][m]), name
    bad = recs[0].copy()
    bad[8] += 1  # the target count no longer matches the record
    with pytest.raises(ValueError, match="does not hold"):
        layout.decode([bad])


def test_bytes_per_token_table():
    # 151936 ids -> 18 bits: lse 4 + k ids * 2.25 + k values + one token 2.25 (+ 8 for fp8 offset/scale)
    assert bytes_per_token(151936, 64, "bf16") == 4 + 64 * 2.25 + 64 * 2 + 2.25
    assert bytes_per_token(32000, 16, "fp8") == 4 + 16 * 15 / 8 + 16 + 15 / 8 + 8
    assert bytes_per_token(32000, 256, "fp32", seq_length=1024) >= bytes_per_token(32000, 256, "fp32")
