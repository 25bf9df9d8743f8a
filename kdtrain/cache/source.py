"""The student's payload source for cached steps: the teacher cache behind the channel interface.

The distillation loop talks to its payload source with three calls, whatever the teacher is:
``post(seqs)`` announces this replica's upcoming micro-batches (sequence numbers, see
``stream/pairing.py``), ``get(seq, tokens)`` returns the checksum-verified payload of one
(``verify=False`` defers the comparison to ``verify_pending()``), ``flush()`` ends the step.
:class:`~kdtrain.stream.channel.PayloadChannel` implements them for a live teacher;
:class:`CachedPayloads` for a cache, on every last-stage rank of the student (each tensor rank
reads the cache itself, so no broadcast is needed). Announced micro-batches are decoded ahead by
the reader's prefetch thread.
"""

from __future__ import annotations

import torch

from ..stream import Pairing, Payload, PayloadSpec, token_checksum
from .reader import CacheReader


class CachedPayloads:
    def __init__(self, reader: CacheReader, spec: PayloadSpec, pairing: Pairing, device: torch.device):
        self.reader, self.spec, self.pairing, self.device = reader, spec, pairing, device
        self.bytes_sent = self.bytes_received = 0  # nothing crosses ranks
        self._ids: dict[int, tuple[int, ...]] = {}
        self._posted: set[int] = set()
        self._unverified: list[tuple[tuple[int, ...], torch.Tensor, torch.Tensor]] = []
        self.where = ""  # as PayloadChannel.where

    def origin(self, o: int) -> str:
        """Where the payload of ``o`` comes from, for error messages."""
        return f"cache {self.reader.path}, samples {list(self._ids[o])}"

    def start_step(self, sample_ids_of: dict[int, tuple[int, ...]]) -> None:
        """This step's micro-batches of this replica: sequence number -> dataset sample ids."""
        self._ids = dict(sample_ids_of)
        self._posted.clear()

    def post(self, sequence: list[int]) -> None:
        """Announce ``sequence``: what is left of this replica's work in the step, in order (the
        contract of ``PayloadChannel.post``). The first call of a step announces all of it; a later
        call, a suffix of it, finds its last entry announced and returns without a scan (a scan
        per micro-batch made the step quadratic in its micro-batches)."""
        if not sequence or sequence[-1] in self._posted:
            return
        new = [o for o in sequence if o not in self._posted]
        self._posted.update(new)
        if new:
            self.reader.prefetch([self._ids[o] for o in new], self.spec, self.device)

    def get(self, o: int, tokens: torch.Tensor, verify: bool = True) -> Payload:
        payload = self.reader.payload(self._ids[o], self.spec, self.device)
        self._unverified.append((self._ids[o], payload.checksum.clone(), token_checksum(tokens)))
        if verify:
            self.verify_pending()
        return payload

    def verify_pending(self) -> None:
        """Raise ``ValueError`` if a payload taken with ``get(verify=False)`` belongs to other tokens."""
        pending, self._unverified = self._unverified, []
        for ids, got, expected in pending:
            if int(got) != int(expected):
                raise ValueError(f"cache {self.reader.path}{self.where}: the cached payload of samples {list(ids)} "
                                 f"was computed on other tokens than the student reads: the cache does not belong "
                                 f"to this dataset (data.*) or was written with another data order")

    def flush(self) -> None:
        pass
