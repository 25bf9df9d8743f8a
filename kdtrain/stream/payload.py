"""The teacher's per-micro-batch payload: top-k ids and logits, the tail's log-mass, input checksum.

Everything lives in one flat byte buffer so a payload moves as a single message (one isend, one
broadcast) and its size is known to both sides from the shapes alone:

    [checksum int64 (1)] [tail_lse fp32 (S*B)] [ids int32 (S*B*k)] [values fp32|bf16 (S*B*k)]

Each field starts at a multiple of its element size, so the typed views are free.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..loss import vocab_shard

_CHECKSUM_MULT = 0x9E3779B1  # odd constants of a multiplicative hash; any fixed values do
_CHECKSUM_ADD = 0x7F4A7C15


def token_checksum(tokens: torch.Tensor) -> torch.Tensor:
    """Order-sensitive int64 fingerprint of a token-id tensor (any shape), on its device.

    sum_i (token_i + 1) * w_i with per-position weights w_i in [1, 2^31); int64 overflow wraps,
    and wrap-around addition is associative, so the value does not depend on reduction order or
    device. Swapped, shifted or substituted tokens change it (except with probability ~2^-64)."""
    flat = tokens.reshape(-1).to(torch.int64)
    return ((flat + 1) * _checksum_weights(flat.numel(), flat.device)).sum()


@functools.lru_cache(maxsize=8)  # a run checksums micro-batches of one or two sizes, every step
def _checksum_weights(n: int, device: torch.device) -> torch.Tensor:
    pos = torch.arange(n, dtype=torch.int64, device=device)
    return (pos * _CHECKSUM_MULT + _CHECKSUM_ADD) % (2**31 - 1) + 1


@dataclass(frozen=True)
class PayloadSpec:
    """Shapes and dtypes of a payload, agreed by sender and receiver from the run config."""

    seq_length: int
    micro_batch: int
    k: int
    values_dtype: torch.dtype

    def __post_init__(self):
        assert self.values_dtype in (torch.float32, torch.bfloat16), self.values_dtype

    @property
    def tokens(self) -> int:
        return self.seq_length * self.micro_batch

    def _layout(self):
        n, nk = self.tokens, self.tokens * self.k
        vbytes = torch.finfo(self.values_dtype).bits // 8
        fields = [("checksum", torch.int64, 1, ()),
                  ("tail_lse", torch.float32, n, (self.seq_length, self.micro_batch)),
                  ("ids", torch.int32, nk, (self.seq_length, self.micro_batch, self.k)),
                  ("values", self.values_dtype, nk, (self.seq_length, self.micro_batch, self.k))]
        off = 0
        for name, dtype, count, shape in fields:
            size = {torch.int64: 8, torch.float32: 4, torch.int32: 4}.get(dtype, vbytes)
            assert off % size == 0
            yield name, dtype, off, count * size, shape
            off += count * size

    @property
    def nbytes(self) -> int:
        return sum(nb for *_, nb, _ in self._layout())

    def empty(self, device: torch.device) -> "Payload":
        return Payload(self, torch.empty(self.nbytes, dtype=torch.uint8, device=device))


class Payload:
    """Typed views (``checksum``, ``tail_lse``, ``ids``, ``values``) over one byte buffer."""

    def __init__(self, spec: PayloadSpec, buffer: torch.Tensor):
        assert buffer.dtype == torch.uint8 and buffer.numel() == spec.nbytes
        self.spec, self.buffer = spec, buffer
        for name, dtype, off, nbytes, shape in spec._layout():
            view = buffer[off: off + nbytes].view(dtype)
            setattr(self, name, view.view(shape) if shape else view.view(()))


@torch.no_grad()
def vocab_parallel_topk(logits_SBVl: torch.Tensor, k: int, vocab_size: int, tp_group, tau: float = 1.0,
                        chunk_bytes: int = 256 << 20) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of vocab-parallel teacher logits and the log-mass of the rest, of ``logits / tau``.

    Returns ``ids [S, B, k]`` int32 (global ids, sorted by descending logit), ``values [S, B, k]``
    (raw logits, input dtype) and ``tail_lse [S, B]`` fp32 = logsumexp of ``logits / tau`` over
    the real ids outside the top-k (-inf when k covers the vocabulary); identical on every rank of
    the TP group. Padding columns never enter.

    The tail is summed over its own ids, not taken as what the top-k leave of the whole: for a
    confident teacher (a tail of 1e-10 next to a top-1 probability of almost 1) ``1 - sum_K p``
    is lost in fp32 rounding, the sum itself is exact. Each rank takes the top-(k+1) of its shard;
    an all-gather of the candidates and a second top-(k+1) give the global top-k and, as the
    (k+1)-th, the largest logit outside it, by which the tail's exponentials are shifted (so they
    cannot all underflow). The tail sum is one SUM all-reduce. Nothing logits-sized is kept: the
    fp32 upcast is done in chunks of rows of at most ``chunk_bytes``.
    """
    tp = dist.get_world_size(tp_group) if tp_group is not None else 1
    tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
    S, B, Vl = logits_SBVl.shape
    start, real = vocab_shard(Vl, tp_rank, vocab_size)
    if k > vocab_size:
        raise ValueError(f"teacher top-k k={k} exceeds the vocabulary size {vocab_size}")
    shard = logits_SBVl[..., :real]
    assert tau > 0, tau  # KDLossConfig checks it; the order of x and x / tau must agree
    device = logits_SBVl.device

    # Local candidates, padded with -inf / id 0 where the shard holds fewer real ids.
    kc = min(k + 1, vocab_size)  # one more than k where the vocabulary has it: the tail's maximum
    kl = min(kc, real)
    cand_vals = torch.full((S, B, kc), float("-inf"), dtype=torch.float32, device=device)
    cand_ids = torch.zeros((S, B, kc), dtype=torch.int64, device=device)
    if kl > 0:
        v, i = torch.topk(shard, kl, dim=-1)
        cand_vals[..., :kl] = v.float()
        cand_ids[..., :kl] = i + start
    if tp > 1:
        gathered_vals = [torch.empty_like(cand_vals) for _ in range(tp)]
        gathered_ids = [torch.empty_like(cand_ids) for _ in range(tp)]
        dist.all_gather(gathered_vals, cand_vals, group=tp_group)
        dist.all_gather(gathered_ids, cand_ids, group=tp_group)
        all_vals, all_ids = torch.cat(gathered_vals, dim=-1), torch.cat(gathered_ids, dim=-1)
        cand_vals, pos = torch.topk(all_vals, kc, dim=-1)
        cand_ids = all_ids.gather(-1, pos)
    top_vals, top_ids = cand_vals[..., :k], cand_ids[..., :k]

    tail_lse = torch.full((S, B), float("-inf"), dtype=torch.float32, device=device)
    if kc == k:  # the top-k are the whole vocabulary
        return top_ids.to(torch.int32), top_vals.to(logits_SBVl.dtype), tail_lse
    # x -> x / tau is monotonic and rounds the maximal element alike: float(max x) / tau equals
    # max(float(x) / tau) bitwise, so the shift is the largest tail element itself.
    tail_max = cand_vals[..., k] / tau
    shift = torch.where(torch.isfinite(tail_max), tail_max, 0.0)  # no finite logit outside K: a sum of 0
    tail_sum = torch.zeros((S, B), dtype=torch.float32, device=device)
    if real > 0:
        # The top-k columns of this shard are set to -inf before the exponentials: amin makes the
        # scatter order-free where an id of another shard is clamped onto one of them.
        local = top_ids - start
        in_shard = (local >= 0) & (local < real)
        idx = local.clamp(0, real - 1)
        fill = torch.where(in_shard, float("-inf"), float("inf")).to(torch.float32)
        rows = max(1, chunk_bytes // max(1, B * real * 4))
        for s0 in range(0, S, rows):
            c = slice(s0, s0 + rows)
            t = shard[c].to(torch.float32, copy=True)  # a copy even of fp32 logits, which must not change
            if tau != 1.0:
                t.div_(tau)
            t.scatter_reduce_(-1, idx[c], fill[c], reduce="amin")
            tail_sum[c] = t.sub_(shift[c, :, None]).exp_().sum(dim=-1)
    if tp > 1:
        dist.all_reduce(tail_sum, group=tp_group)
    tail_lse = shift + tail_sum.log()
    return top_ids.to(torch.int32), top_vals.to(logits_SBVl.dtype), tail_lse
