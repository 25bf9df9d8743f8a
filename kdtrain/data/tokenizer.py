"""Tokenizers: a SentencePiece model file or a Hugging Face ``tokenizer.json``, and training a new
SentencePiece model deterministically.

``Tokenizer(path)`` opens either kind and returns the matching subclass:

* a SentencePiece ``.model`` file (``scripts/train_tokenizer.py`` trains one);
* a Hugging Face ``tokenizer.json``, or a directory holding one (a Hugging Face model or tokenizer
  directory, e.g. the checkpoint ``kdtrain convert hf-to-kdtrain`` reads), so that a student is
  distilled on the teacher's own tokenization (kdtrain/data/hf_tokenizer.py); a directory with
  only a SentencePiece ``tokenizer.model`` (older Llama/Mistral releases) opens that.

Both encode plain text without special tokens; when the corpus is preprocessed, documents start with
the tokenizer's ``document_prefix`` (Llama's BOS) and are separated by the EOS id. A tokenizer's
fingerprint is the first 16 hex digits of the sha256 of the file that defines it
(``tokenizer_file``): datasets and teacher caches record it, and a run whose ``data.tokenizer``
differs is refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from abc import ABC, abstractmethod
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm

from kdtrain.cli import missing
from kdtrain.data.sources import check_input_file, iter_documents

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
_BYTE_PIECES = 256
_SPECIAL_PIECES = 3
_MIN_ALPHABET = 8
MIN_VOCAB_SIZE = _BYTE_PIECES + _SPECIAL_PIECES + _MIN_ALPHABET
MAX_VOCAB_SIZE = 1_000_000
MODEL_TYPES = ("bpe", "unigram")
_MAX_SENTENCE_CHARS = 4096
_SPM_WHITESPACE = "\u2581"


def tokenizer_file(path: str) -> Path:
    """The file that defines the tokenizer at ``path``: the path itself, or a directory's
    ``tokenizer.json`` (else its SentencePiece ``tokenizer.model``). ValueError when there is none."""
    p = Path(path)
    if p.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (p / name).is_file():
                return p / name
        raise ValueError(f"tokenizer {path} is a directory without a tokenizer.json (a Hugging Face tokenizer "
                         "directory needs one; a SentencePiece tokenizer is a .model file)")
    if not p.is_file():
        raise ValueError(f"tokenizer model {missing(path)} does not exist")
    return p


def is_hf_tokenizer(path: str) -> bool:
    """Whether ``path`` names a Hugging Face tokenizer.json (itself, or in a directory); ValueError
    when it names no tokenizer file."""
    return tokenizer_file(path).suffix == ".json"


class Tokenizer(ABC):
    """A tokenizer file with encode/decode, special ids and a content fingerprint.

    ``Tokenizer(path)`` returns a :class:`SentencePieceTokenizer` or an ``HFTokenizer`` by the kind
    of ``path`` (see the module docstring); the subclasses implement the methods below."""

    def __new__(cls, path: str):
        if cls is Tokenizer:
            if is_hf_tokenizer(path):
                from kdtrain.data.hf_tokenizer import HFTokenizer

                cls = HFTokenizer
            else:
                cls = SentencePieceTokenizer
        return super().__new__(cls)

    def __init__(self, path: str):
        self._path = str(path)
        self._file = tokenizer_file(path)
        data = self._file.read_bytes()
        self._fingerprint = hashlib.sha256(data).hexdigest()[:16]
        self._load(data)

    def __reduce__(self):
        return (Tokenizer, (self._path,))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self._path!r}, vocab_size={self.vocab_size}, "
                f"fingerprint={self._fingerprint})")

    @property
    def path(self) -> str:
        return self._path

    @property
    def fingerprint(self) -> str:
        """First 16 hex digits of the sha256 of the defining file's bytes (``tokenizer_file``)."""
        return self._fingerprint

    @abstractmethod
    def _load(self, data: bytes) -> None:
        """Build the tokenizer from the bytes of its defining file (``self._file``)."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """One more than the largest id the tokenizer can produce."""

    @property
    @abstractmethod
    def eos_id(self) -> int:
        """End-of-document id, or -1 when the tokenizer has none."""

    @property
    @abstractmethod
    def bos_id(self) -> int:
        """Beginning-of-document id, or -1."""

    @property
    @abstractmethod
    def pad_id(self) -> int:
        """Padding id, or -1."""

    @property
    def document_prefix(self) -> list[int]:
        """The ids the tokenizer's own convention puts before a text (what ``transformers`` adds by
        default): ``[bos_id]`` for Llama-family tokenizers, nothing for GPT-2 / Qwen or kdtrain's own.
        ``preprocess_data.py`` and ``kdtrain generate`` start each plain-text document with them
        unless told otherwise (``--prepend-bos`` / ``--no-prepend-bos``)."""
        return []

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``, no template tokens added."""
        return self.encode_batch([text])[0]

    @abstractmethod
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` of each text."""

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``."""


def bos_ids(tok: "Tokenizer", prepend_bos: bool | None, where: str) -> list[int]:
    """The ids a plain text starts with: the tokenizer's own convention (``document_prefix``) when
    ``prepend_bos`` is None, ``[]`` when False, the BOS id when True (ValueError if it has none)."""
    if prepend_bos is None:
        return tok.document_prefix
    if not prepend_bos:
        return []
    if tok.document_prefix:
        return tok.document_prefix
    if tok.bos_id < 0:
        raise ValueError(f"{where}: tokenizer {tok.path} has no BOS token to prepend")
    return [tok.bos_id]


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model file."""

    def _load(self, data: bytes) -> None:
        try:
            sp = spm.SentencePieceProcessor(model_proto=data)
        except RuntimeError as e:
            raise ValueError(f"tokenizer model {self._path} is not a valid sentencepiece model ({e})") from None
        if sp.vocab_size() == 0:
            raise ValueError(f"tokenizer model {self._path} is not a valid sentencepiece model (no pieces)")
        self._sp = sp

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def document_prefix(self) -> list[int]:
        # A bare SentencePiece model says nothing; a Hugging Face directory holding only a
        # tokenizer.model (older Llama / Mistral releases) states ``add_bos_token`` in its config.
        config = self._file.parent / "tokenizer_config.json"
        if self.bos_id < 0 or not config.is_file():
            return []
        try:
            settings = json.loads(config.read_text())
            add_bos = settings.get("add_bos_token")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise ValueError(f"tokenizer {config}: not a JSON object ({e})") from None
        if add_bos is None:  # transformers' Llama tokenizers add BOS unless told otherwise
            add_bos = "Llama" in str(settings.get("tokenizer_class", ""))
        return [self.bos_id] if add_bos is True else []

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


def _training_sentences(input_files: Sequence[str], json_key: str, max_sentences: int) -> list[str]:
    sentences: list[str] = []
    for path in input_files:
        for doc in iter_documents(path, json_key=json_key):
            for line in doc.split("\n"):
                for start in range(0, len(line), _MAX_SENTENCE_CHARS):
                    chunk = line[start : start + _MAX_SENTENCE_CHARS]
                    if chunk.strip():
                        sentences.append(chunk)
                        if len(sentences) >= max_sentences:
                            return sentences
    return sentences


def training_alphabet(sentences: Sequence[str], max_chars: int, coverage: float) -> set[str]:
    """The most frequent characters covering `coverage` of the text, at most `max_chars` of them.

    Space is always included (SentencePiece represents it by its own piece). Characters left out
    are encoded by byte fallback.
    """
    counts: Counter[str] = Counter()
    for s in sentences:
        counts.update(s)
    counts.pop(_SPM_WHITESPACE, None)
    total = sum(counts.values())
    alphabet = {" "}
    covered = counts.pop(" ", 0)
    for ch, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if covered >= coverage * total or len(alphabet) >= max_chars:
            break
        alphabet.add(ch)
        covered += n
    return alphabet


def _restrict_to_alphabet(sentences: Sequence[str], alphabet: set[str]) -> Iterator[str]:
    """Split sentences at characters outside `alphabet`, dropping those characters."""
    outside = re.compile("[^" + "".join(re.escape(c) for c in sorted(alphabet)) + "]+")
    for s in sentences:
        for part in outside.split(s):
            if part.strip():
                yield part


def train_tokenizer(
    input_files: Sequence[str],
    model_prefix: str,
    vocab_size: int,
    *,
    model_type: str = "bpe",
    character_coverage: float = 0.9995,
    max_sentences: int = 2_000_000,
    json_key: str = "text",
    num_threads: int = 1,
) -> str:
    """Train a byte-fallback SentencePiece model on .txt/.jsonl files; return the .model path.

    Lines are the training sentences, read in file order without shuffling (the first
    `max_sentences` are used), so the same inputs always produce the same model bytes.
    Ids: unk=0, bos=1, eos=2, no pad. Writes `<model_prefix>.model` and `<model_prefix>.vocab`.
    """
    if not input_files:
        raise ValueError("train_tokenizer needs at least one input file")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    if not isinstance(vocab_size, int) or not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be an integer in [{MIN_VOCAB_SIZE}, {MAX_VOCAB_SIZE}], got {vocab_size!r} "
            f"(byte fallback alone takes {_BYTE_PIECES} pieces plus {_SPECIAL_PIECES} special pieces)"
        )
    if not 0.0 < character_coverage <= 1.0:
        raise ValueError(f"character_coverage must be in (0, 1], got {character_coverage}")
    if max_sentences < 1:
        raise ValueError(f"max_sentences must be >= 1, got {max_sentences}")
    for path in input_files:
        check_input_file(path)
    sentences = _training_sentences(input_files, json_key, max_sentences)
    if not sentences:
        raise ValueError(f"input files {list(input_files)} contain no text to train a tokenizer on")
    alphabet = training_alphabet(sentences, vocab_size - _BYTE_PIECES - _SPECIAL_PIECES, character_coverage)

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_restrict_to_alphabet(sentences, alphabet),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            character_coverage=1.0,
            byte_fallback=True,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=-1,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            shuffle_input_sentence=False,
            input_sentence_size=0,
            max_sentence_length=4 * _MAX_SENTENCE_CHARS,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(
            f"sentencepiece could not train a {vocab_size}-piece {model_type} model on {list(input_files)}: {e}"
        ) from None

    model_path = f"{model_prefix}.model"
    Path(model_path).parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes(model_path, model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab_lines = (f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.vocab_size()))
    _atomic_write_bytes(f"{model_prefix}.vocab", "".join(vocab_lines).encode("utf-8"))
    return model_path


def _atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
