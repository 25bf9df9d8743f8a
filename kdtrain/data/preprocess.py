"""Raw documents or conversations -> token ids (and a loss mask) -> megatron-core indexed dataset."""

from __future__ import annotations

import collections
import itertools
import os
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from kdtrain.cli import check_out_dir
from kdtrain.data.chat import ChatTemplate, encode_segments, record_messages
from kdtrain.data.indexed import bin_path, write_indexed_dataset
from kdtrain.data.sources import check_input_file, iter_documents, iter_records
from kdtrain.data.tokenizer import Tokenizer, bos_ids

_BATCH_DOCUMENTS = 64
_BATCHES_AHEAD = 4  # batches in flight per worker
FORMATS = ("text", "chat")
_worker_encoder = None


class _TextEncoder:
    """A batch of documents -> their ids, each after the ``bos`` ids and followed by the EOS id
    when ``append_eos``."""

    def __init__(self, tokenizer_path: str, append_eos: bool, prepend_bos: bool | None):
        self.tok = Tokenizer(tokenizer_path)
        if append_eos and self.tok.eos_id < 0:
            raise ValueError(f"tokenizer {tokenizer_path} has no EOS token; pass append_eos=False (--no-append-eos)")
        self.eos = [self.tok.eos_id] if append_eos else []
        self.bos = bos_ids(self.tok, prepend_bos, "prepend_bos (--prepend-bos)")

    def __call__(self, texts: list[str]) -> list:
        return [self.bos + ids + self.eos for ids in self.tok.encode_batch(texts)]


class _ChatEncoder(_TextEncoder):
    """A batch of (location, record) conversations -> (ids, target flags) pairs (kdtrain/data/chat.py),
    None for a conversation without a reply. An EOS id appended after a conversation (only when
    asked for) is context: each reply's own end-of-turn text (or the plain template's EOS) is what
    teaches stopping. A plain prompt / completion pair, which no template renders, starts with the
    ``bos`` ids as a text document does (context); a template writes its own start tokens."""

    def __init__(self, tokenizer_path: str, append_eos: bool, template: str | None, key: str,
                 prepend_bos: bool | None):
        super().__init__(tokenizer_path, append_eos, prepend_bos)
        self.template = ChatTemplate(template, self.tok)
        self.key = key

    def __call__(self, records: list[tuple[str, dict]]) -> list:
        out = []
        for where, record in records:
            tools = record.get("tools")
            if tools is not None and not isinstance(tools, list):
                raise ValueError(f"{where}: 'tools' must be a list of function schemas, got {type(tools).__name__}")
            conversation = record_messages(record, where, self.key)
            segments = self.template.segments(conversation, where, tools)
            if isinstance(conversation, tuple) and segments:  # a plain pair: no template
                segments = [(i, False) for i in self.bos] + segments
            if not any(target for _, target in segments):
                out.append(None)
                continue
            ids, mask = encode_segments(self.tok, segments)
            if self.eos and ids[-1] != self.eos[0]:
                ids, mask = ids + self.eos, mask + [False]
            out.append((ids, mask))
        return out


def _init_worker(encoder_args: tuple) -> None:
    global _worker_encoder
    # One encoding thread per worker process: the processes are the parallelism (Hugging Face
    # tokenizers would otherwise start a thread pool in each).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _worker_encoder = _make_encoder(*encoder_args)


def _encode_in_worker(batch: list) -> list:
    assert _worker_encoder is not None
    return _worker_encoder(batch)


def _make_encoder(fmt: str, tokenizer_path: str, append_eos: bool, template: str | None, key: str,
                  prepend_bos: bool | None):
    if fmt == "chat":
        return _ChatEncoder(tokenizer_path, append_eos, template, key, prepend_bos)
    return _TextEncoder(tokenizer_path, append_eos, prepend_bos)


def _ordered_map(pool: ProcessPoolExecutor, func, batches: Iterable[list], ahead: int) -> Iterator[list]:
    """``pool.map(func, batches)`` with at most ``ahead`` batches in flight: map submits the
    whole input at once and keeps every result the writer has not yet taken, so workers faster
    than the writer would pile up encoded documents without bound. A worker that dies (the
    out-of-memory killer) or cannot start breaks the pool, which raises here (multiprocessing.Pool
    would replace the worker and wait forever for its batch)."""
    pending: collections.deque = collections.deque()
    try:
        for batch in batches:
            pending.append(pool.submit(func, batch))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool as e:
        raise RuntimeError(f"a tokenizing worker process died or failed to start ({e}); its own error, if any, "
                           "is printed above. Killed for memory? Fewer --workers use less") from None
    finally:  # the writer failed (or the pool broke): the batches not started are not tokenized
        for f in pending:
            f.cancel()


def _batches(docs: Iterable, size: int) -> Iterator[list]:
    it = iter(docs)
    while batch := list(itertools.islice(it, size)):
        yield batch


def encode_files(
    input_files: Sequence[str],
    tokenizer_path: str,
    output_prefix: str,
    *,
    json_key: str | None = None,
    txt_document_per_file: bool = False,
    append_eos: bool | None = None,
    prepend_bos: bool | None = None,
    workers: int = 1,
    format: str = "text",
    chat_template: str | None = None,
) -> dict:
    """Tokenize every document of `input_files` (in order) into `<output_prefix>.bin/.idx/.meta.json`.

    ``format="chat"`` reads conversation records (kdtrain/data/chat.py; ``json_key`` defaults to
    ``messages``, ``chat_template`` is None for the tokenizer's own, ``"plain"`` or a Jinja file)
    and also writes the loss mask that makes the replies the only targets. ``append_eos`` (the EOS
    id after each document) defaults to on for text and off for conversations, whose template
    already marks where each one starts and ends. ``prepend_bos`` starts each text document (and
    each plain prompt / completion pair, which no template renders) with the BOS id; by default as
    the tokenizer's own convention does (``document_prefix``: Llama-family tokenizers do, GPT-2 /
    Qwen and kdtrain's SentencePiece models do not), so a teacher sees its documents as it was
    trained on them.
    Returns the metadata written plus `bytes` (size of the .bin) and `seconds`.
    """
    start = time.perf_counter()
    if not input_files:
        raise ValueError("encode_files needs at least one input file")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if chat_template is not None and format != "chat":
        raise ValueError("a chat template applies to format='chat' (--format chat) only")
    for path in input_files:
        check_input_file(path)
    if str(output_prefix).endswith(("/", os.sep)) or Path(output_prefix).is_dir():
        raise ValueError(f"output prefix {output_prefix}: name the files' prefix, not a directory "
                         "(e.g. data/corpus_text_document)")
    check_out_dir(Path(output_prefix).parent, "output prefix")  # before the corpus is tokenized
    key = json_key or ("messages" if format == "chat" else "text")
    if append_eos is None:
        append_eos = format == "text"
    encoder_args = (format, tokenizer_path, append_eos, chat_template, key, prepend_bos)
    encode = _make_encoder(*encoder_args)  # checks the tokenizer and template before any work
    tok = encode.tok
    if format == "chat":
        docs = itertools.chain.from_iterable(iter_records(p) for p in input_files)
    else:
        docs = itertools.chain.from_iterable(
            iter_documents(p, json_key=key, txt_document_per_file=txt_document_per_file) for p in input_files)
    metadata = {
        "tokenizer_path": os.path.abspath(tok.path),
        "tokenizer_fingerprint": tok.fingerprint,
        "eos_id": tok.eos_id if tok.eos_id >= 0 else None,
        "append_eos": append_eos,
        "document_prefix": encode.bos,
        "inputs": [os.path.abspath(p) for p in input_files],
        "format": format,
    }
    if format == "chat":
        metadata["chat_template"] = encode.template.name
    skipped = 0

    def documents(encoded: Iterable[list]) -> Iterator:
        nonlocal skipped
        for batch in encoded:
            for doc in batch:
                if doc is None:
                    skipped += 1
                else:
                    yield doc

    if workers == 1:
        meta = write_indexed_dataset(output_prefix, documents(map(encode, _batches(docs, _BATCH_DOCUMENTS))),
                                     tok.vocab_size, metadata)
    else:
        with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(encoder_args,)) as pool:
            encoded = _ordered_map(pool, _encode_in_worker, _batches(docs, _BATCH_DOCUMENTS),
                                   _BATCHES_AHEAD * workers)
            meta = write_indexed_dataset(output_prefix, documents(encoded), tok.vocab_size, metadata)
    return dict(meta, bytes=os.path.getsize(bin_path(output_prefix)), seconds=time.perf_counter() - start,
                skipped=skipped)
