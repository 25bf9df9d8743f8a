"""Raw .jsonl/.txt documents -> token ids -> megatron-core indexed dataset."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import time
from typing import Iterable, Iterator, Sequence

from kdtrain.data.indexed import bin_path, write_indexed_dataset
from kdtrain.data.sources import check_input_file, iter_documents
from kdtrain.data.tokenizer import Tokenizer

_BATCH_DOCUMENTS = 64
_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    # One encoding thread per worker process: the processes are the parallelism (Hugging Face
    # tokenizers would otherwise start a thread pool in each).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _worker_tokenizer = Tokenizer(tokenizer_path)


def _encode_in_worker(texts: list[str]) -> list[list[int]]:
    assert _worker_tokenizer is not None
    return _worker_tokenizer.encode_batch(texts)


def _batches(docs: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(docs)
    while batch := list(itertools.islice(it, size)):
        yield batch


def encode_files(
    input_files: Sequence[str],
    tokenizer_path: str,
    output_prefix: str,
    *,
    json_key: str = "text",
    txt_document_per_file: bool = False,
    append_eos: bool = True,
    workers: int = 1,
) -> dict:
    """Tokenize every document of `input_files` (in order) into `<output_prefix>.bin/.idx/.meta.json`.

    Returns the metadata written plus `bytes` (size of the .bin) and `seconds`.
    """
    start = time.perf_counter()
    if not input_files:
        raise ValueError("encode_files needs at least one input file")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    for path in input_files:
        check_input_file(path)
    tok = Tokenizer(tokenizer_path)
    if append_eos and tok.eos_id < 0:
        raise ValueError(f"tokenizer {tokenizer_path} has no EOS token; pass append_eos=False (--no-append-eos)")
    eos = [tok.eos_id] if append_eos else []

    docs = itertools.chain.from_iterable(
        iter_documents(p, json_key=json_key, txt_document_per_file=txt_document_per_file) for p in input_files
    )
    metadata = {
        "tokenizer_path": os.path.abspath(tok.path),
        "tokenizer_fingerprint": tok.fingerprint,
        "eos_id": tok.eos_id,
        "append_eos": append_eos,
        "inputs": [os.path.abspath(p) for p in input_files],
    }

    def token_documents(encoded: Iterable[list[list[int]]]) -> Iterator[list[int]]:
        for batch in encoded:
            for ids in batch:
                yield ids + eos

    if workers == 1:
        meta = write_indexed_dataset(
            output_prefix, token_documents(map(tok.encode_batch, _batches(docs, _BATCH_DOCUMENTS))),
            tok.vocab_size, metadata,
        )
    else:
        with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(tok.path,)) as pool:
            encoded = pool.imap(_encode_in_worker, _batches(docs, _BATCH_DOCUMENTS))
            meta = write_indexed_dataset(output_prefix, token_documents(encoded), tok.vocab_size, metadata)
    return dict(meta, bytes=os.path.getsize(bin_path(output_prefix)), seconds=time.perf_counter() - start)
