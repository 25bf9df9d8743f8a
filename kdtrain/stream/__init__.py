"""Teacher -> student transport: pairing of replicas, the payload format, point-to-point channels."""

from .pairing import Pairing
from .payload import Payload, PayloadSpec, token_checksum, vocab_parallel_topk

__all__ = ["Pairing", "Payload", "PayloadSpec", "token_checksum", "vocab_parallel_topk"]
