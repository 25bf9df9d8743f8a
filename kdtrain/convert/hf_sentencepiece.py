"""A SentencePiece model as a Hugging Face tokenizer (``tokenizer.json`` + ``tokenizer_config.json``)
that encodes every text to the ids kdtrain's own data pipeline gives it (``kdtrain convert
kdtrain-to-hf`` writes it beside the weights).

Why a tokenizer.json rather than the ``.model`` file: transformers (5.x) runs the tokenizers of
the architectures kdtrain exports (Llama, Qwen2/3, GPT-2) on the ``tokenizers`` library; given only
a ``tokenizer.model``, it rebuilds a pipeline from the pieces at load time (needing sentencepiece and
protobuf then), in the way of the class the directory names or its model type selects, and how
depends on the release: with 5.25 and ``tokenizer_class: LlamaTokenizer`` runs of spaces encode
otherwise, and either way the text ``</s>`` becomes the EOS id. A tokenizer.json states the
whole pipeline; ``tokenizer_class: PreTrainedTokenizerFast`` makes transformers load it as it is,
the ``tokenizers`` library alone (kdtrain's ``HFTokenizer``) reads it too, and the export checks
the directory as transformers loads it (``transformers_differs``: a model type can override the
class, as 5.x does for qwen2).

The pipeline, as sentencepiece encodes (a byte-fallback BPE model, identity normalization):

* normalizer: extra spaces removed when the model asks for it (leading ones, runs of them, trailing
  ones: only U+0020, as sentencepiece), spaces -> U+2581, the dummy prefix U+2581 before a
  non-empty text;
* no pre-tokenizer: sentencepiece encodes the whole text as one sequence (its whitespace
  splitting only shapes training);
* BPE model: the pieces as the vocabulary (ids unchanged), byte fallback, and as merges every split
  of a normal piece into two normal pieces, ranked by the joined piece's score (sentencepiece
  merges the adjacent pair whose joined piece scores highest; ``tokenizers`` the pair ranked first;
  among splits of one piece, by id);
* special pieces (``<unk>``, ``<s>``, ``</s>``, byte pieces) are vocabulary only, never added
  tokens, and ``split_special_tokens`` is set: the text ``</s>`` in a document is the characters
  ``<``, ``/``, ``s``, ``>`` as sentencepiece encodes it (transformers' Llama tokenizers would make it
  the EOS token);
* post-processor: the tokenizer's ``document_prefix`` (the BOS id for a Llama-style directory whose
  tokenizer_config.json asks for it; nothing for a bare ``.model``, e.g. kdtrain's own);
* decoder: U+2581 -> space, bytes joined back into characters, the dummy prefix's space dropped.

What is equal: ``tokenizer(text, add_special_tokens=False)`` is ``SentencePieceTokenizer.encode(text)``
(sentencepiece's ``encode``) for every text; ``tokenizer(text)`` (the default) is what the
preprocessor writes for a plain-text document less the EOS after it: the BOS convention above,
then those ids. ``decode`` of a text's ids is sentencepiece's (with BOS / EOS around them, given
``skip_special_tokens=True``): for kdtrain's models (identity normalization, byte fallback) the
text itself, but for a typed U+2581, which reads back as a space. What is not: the EOS id is not
appended (a document's end in the corpus; ``generate`` stops at it: config.json's
``eos_token_id``); ``decode`` without ``skip_special_tokens`` writes ``<s>`` / ``</s>`` where
sentencepiece writes nothing; kdtrain's ``plain`` chat format (an EOS id after each reply) is no
Jinja template and is not written.

Refused, with a ValueError naming the file and the reason, rather than written to encode otherwise:
Unigram models (the ``tokenizers`` Unigram breaks ties between equally scored segmentations, e.g.
of a run of ``*``, otherwise than sentencepiece), normalization rules other than identity
(``nmt_nfkc``'s character map), models without byte fallback (an unknown character's ``<unk>``
decodes otherwise), user-defined or unused pieces, whitespace as a suffix, and models whose merges
could tie (two multi-character pieces of one score). The pipeline is then checked against
sentencepiece on probe texts (every piece's text alone and in runs, the texts where two splits of
one piece compete, spaces, newlines, unicode, digits); a difference is refused too.
"""

from __future__ import annotations

import json
import struct
import warnings
from typing import Iterator

from ..data.tokenizer import SentencePieceTokenizer, tokenizer_file
from ..optional import need

SPACE = "\u2581"
# sentencepiece_model.proto: piece types, model types.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE = 1, 2
_TYPE_NAMES = {USER_DEFINED: "user-defined", UNUSED: "unused"}
PROBES = ("", " ", "  ", "   x", "x   ", "a  b   c", "\n", "\n\n", " \n ", "x\n  y\n", "\t tab", "\r\n",
          "hello world", " hello", "hello ", "  def f(x):\n    return x + 1\n", "0123456789 3.14159 1,000",
          "ünïcödé 漢字 😀 Ω≈ç√", "<unk> <s> </s> <0x41> <pad>", SPACE, f"a{SPACE} b {SPACE}", "\x00\x01")


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(data: bytes) -> Iterator[tuple[int, object]]:
    """(field number, value) of a protobuf message's fields: an int for a varint, a float for a
    fixed32 (sentencepiece's only one is a float), bytes for a fixed64 or a length-delimited field."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 1:
            value, i = data[i:i + 8], i + 8
        elif wire == 2:
            n, i = _varint(data, i)
            value, i = data[i:i + n], i + n
        elif wire == 5:
            value, i = struct.unpack("<f", data[i:i + 4])[0], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, value


def _int(v: int) -> int:
    """A protobuf int32 / bool read as a varint (negative ids are 64-bit two's complement)."""
    return v - (1 << 64) if v >= 1 << 63 else v


def read_model(data: bytes) -> dict:
    """The parts of a SentencePiece ``ModelProto`` the conversion reads: ``pieces`` [(text, score,
    type)], ``model_type``, ``byte_fallback``, ``treat_whitespace_as_suffix``, ``unk_id``, the
    normalizer's ``name``, ``charsmap``, ``add_dummy_prefix``, ``remove_extra_whitespaces``,
    ``escape_whitespaces``, and ``denormalizer_charsmap`` (proto defaults where a field is absent)."""
    out = {"pieces": [], "model_type": UNIGRAM, "byte_fallback": False, "treat_whitespace_as_suffix": False,
           "unk_id": 0, "name": "", "charsmap": b"", "add_dummy_prefix": True, "remove_extra_whitespaces": True,
           "escape_whitespaces": True, "denormalizer_charsmap": b""}
    trainer = {3: "model_type", 35: "byte_fallback", 24: "treat_whitespace_as_suffix", 40: "unk_id"}
    normalizer = {1: "name", 2: "charsmap", 3: "add_dummy_prefix", 4: "remove_extra_whitespaces",
                  5: "escape_whitespaces"}
    for number, value in _fields(data):
        if number == 1:
            piece = {1: b"", 2: 0.0, 3: NORMAL}
            piece.update(_fields(value))
            out["pieces"].append((piece[1].decode("utf-8"), float(piece[2]), _int(piece[3])))
        elif number == 2:
            for k, v in _fields(value):
                if k in trainer:
                    out[trainer[k]] = _int(v)
        elif number == 3:
            for k, v in _fields(value):
                if k in normalizer:
                    out[normalizer[k]] = v.decode("utf-8") if k == 1 else v if k == 2 else bool(v)
        elif number == 5:
            out["denormalizer_charsmap"] = dict(_fields(value)).get(2, b"")
    for key in ("byte_fallback", "treat_whitespace_as_suffix"):
        out[key] = bool(out[key])
    return out


def _unsupported(model: dict) -> str | None:
    """Why ``model`` cannot be written as a tokenizer.json that encodes as sentencepiece does, or None."""
    if model["model_type"] != BPE:
        return ("it is a Unigram model (the tokenizers library breaks ties between equally scored segmentations "
                "otherwise than sentencepiece); only BPE models are written")
    if model["charsmap"] or model["denormalizer_charsmap"]:
        return (f"its normalization rule {model['name'] or '(custom)'!r} maps characters (only the 'identity' rule "
                "is written: tokenizers' version of the map can differ)")
    if not model["byte_fallback"]:
        return "it has no byte fallback (an unknown character's <unk> decodes otherwise in transformers)"
    if model["treat_whitespace_as_suffix"] or not model["escape_whitespaces"]:
        return "it treats whitespace as a suffix or does not escape it (only sentencepiece's default is written)"
    scores: dict[float, str] = {}
    for i, (text, score, kind) in enumerate(model["pieces"]):
        if kind in _TYPE_NAMES:
            return f"it has {_TYPE_NAMES[kind]} pieces ({text!r}, id {i})"
        if kind not in (NORMAL, UNKNOWN, CONTROL, BYTE):
            return f"piece {text!r} (id {i}) has type {kind}, which sentencepiece does not define"
        if kind != NORMAL and len(text) == 1:
            return f"its special piece {text!r} (id {i}) is one character, which BPE would read as text"
        if kind == NORMAL and len(text) > 1:
            if score in scores:
                return (f"pieces {scores[score]!r} and {text!r} have the same score {score} (sentencepiece merges "
                        "the leftmost of tied pairs, tokenizers the first ranked)")
            scores[score] = text
    normal = {text for text, _, kind in model["pieces"] if kind == NORMAL}
    for text in normal:
        for ch in text:
            if ch not in normal:
                return f"its piece {text!r} holds the character {ch!r}, which is no piece of its own"
    return None


def _backend(model: dict, bos: str | None):
    """The ``tokenizers.Tokenizer`` (see the module docstring)."""
    tk = need("tokenizers", "writing a SentencePiece tokenizer as a Hugging Face tokenizer.json")
    pieces = model["pieces"]
    vocab = {text: i for i, (text, _, _) in enumerate(pieces)}
    normal = {text: (score, i) for i, (text, score, kind) in enumerate(pieces) if kind == NORMAL}
    ranked = sorted((-score, i, text[:k], text[k:]) for text, (score, i) in normal.items()
                    for k in range(1, len(text)) if text[:k] in normal and text[k:] in normal)
    backend = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=[(a, b) for _, _, a, b in ranked],
                                         unk_token=pieces[model["unk_id"]][0], fuse_unk=True, byte_fallback=True))
    steps = []
    if model["remove_extra_whitespaces"]:  # sentencepiece strips and collapses U+0020 only
        steps += [tk.normalizers.Replace(tk.Regex(r"\A +"), ""), tk.normalizers.Replace(tk.Regex(" {2,}"), " ")]
    steps.append(tk.normalizers.Replace(" ", SPACE))
    if model["add_dummy_prefix"]:
        steps.append(tk.normalizers.Prepend(SPACE))  # not before an empty text, as sentencepiece
    if model["remove_extra_whitespaces"]:  # trailing: after the prefix, U+2581 typed as such included
        steps.append(tk.normalizers.Replace(tk.Regex(SPACE + r"+\z"), ""))
    backend.normalizer = tk.normalizers.Sequence(steps)
    decoders = [tk.decoders.Replace(SPACE, " "), tk.decoders.ByteFallback(), tk.decoders.Fuse()]
    if model["add_dummy_prefix"]:
        decoders.append(tk.decoders.Strip(" ", 1, 0))
    backend.decoder = tk.decoders.Sequence(decoders)
    if bos is not None:
        backend.post_processor = tk.processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, vocab[bos])])
    return backend


def _probes(model: dict) -> list[str]:
    """Texts the written tokenizer must encode as sentencepiece does: fixed ones, every normal
    piece's text alone, after a space and in runs of 64 by id, and for each piece with two splits
    that can meet (``x+y`` and ``y+z`` both the piece, ``y`` its border), the text ``x+y+z``."""
    normal = [text for text, _, kind in model["pieces"] if kind == NORMAL]
    known = set(normal)
    texts = [t.replace(SPACE, " ") for t in normal]
    out = list(PROBES) + [f"{t.replace(SPACE, ' ')}text" for t, _, k in model["pieces"] if k != NORMAL]
    out += texts + [" " + t for t in texts] + ["".join(texts[i:i + 64]) for i in range(0, len(texts), 64)]
    for p in normal:
        for n in range(1, len(p)):
            y = p[:n]
            if n * 2 != len(p) and p.endswith(y) and y in known and p[:-n] in known and p[n:] in known:
                out.append((p[:-n] + p).replace(SPACE, " "))
    return out


def sentencepiece_files(tok: SentencePieceTokenizer) -> dict[str, bytes]:
    """``{"tokenizer.json": ..., "tokenizer_config.json": ...}`` for the SentencePiece tokenizer
    ``tok``; ValueError naming its file when it cannot be written to encode as it does."""
    source = tokenizer_file(tok.path)
    where = f"SentencePiece model {source}"
    try:
        model = read_model(source.read_bytes())
    except (ValueError, IndexError, KeyError, UnicodeDecodeError, struct.error) as e:
        raise ValueError(f"{where}: cannot read its pieces ({e})") from None
    if len(model["pieces"]) != tok.vocab_size:
        raise ValueError(f"{where}: read {len(model['pieces'])} pieces, sentencepiece has {tok.vocab_size}")
    if (why := _unsupported(model)) is not None:
        raise ValueError(f"{where} cannot be written as a Hugging Face tokenizer that encodes as it does: {why}")
    pieces = model["pieces"]

    def name(i: int):
        return pieces[i][0] if 0 <= i < len(pieces) else None

    prefix = tok.document_prefix
    bos = name(prefix[0]) if prefix else None
    backend = _backend(model, bos)
    probes = _probes(model)
    theirs = tok.encode_batch(probes)
    ours = [e.ids for e in backend.encode_batch(probes, add_special_tokens=False)]
    for text, a, b in zip(probes, theirs, ours):
        if a != b or backend.decode(b, skip_special_tokens=False) != tok.decode(a):
            raise ValueError(f"{where} cannot be written as a Hugging Face tokenizer that encodes as it does: the "
                             f"text {text[:80]!r} is {a[:12]} in sentencepiece, {b[:12]} in the converted tokenizer")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name(tok.bos_id), "eos_token": name(tok.eos_id), "unk_token": name(model["unk_id"]),
        "pad_token": name(tok.pad_id),
        # tokenizer(text) starts as the corpus' documents do (document_prefix); the EOS that ends
        # them is not appended.
        "add_bos_token": bool(prefix), "add_eos_token": False,
        # The text of a special piece stays text, as sentencepiece encodes it.
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
    }
    return {"tokenizer.json": backend.to_str(pretty=True).encode("utf-8"),
            "tokenizer_config.json": (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8")}


def transformers_differs(folder, tok: SentencePieceTokenizer) -> str | None:
    """How ``AutoTokenizer.from_pretrained(folder)`` (the exported directory, config.json included)
    encodes otherwise than ``tok``, or None; None too when transformers is not installed, or
    cannot load the directory (a warning says so: an older release without the model type). The
    class transformers picks can depend on the model type: 5.x loads a qwen2 model's tokenizer
    as Qwen2Tokenizer (byte-level BPE built from the vocabulary) whatever tokenizer_class says."""
    try:
        import transformers
    except ImportError:
        return None
    try:
        loaded = transformers.AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # whatever a release raises for a directory it cannot read
        warnings.warn(f"kdtrain: the tokenizer written for SentencePiece model {tok.path} could not be checked: "
                      f"transformers {transformers.__version__} cannot load it ({type(e).__name__}: {e})")
        return None
    probes = list(PROBES)
    model = read_model(tokenizer_file(tok.path).read_bytes())
    probes += [text.replace(SPACE, " ") for text, _, kind in model["pieces"] if kind == NORMAL]
    ours = loaded(probes, add_special_tokens=False)["input_ids"]
    for text, want, got in zip(probes, tok.encode_batch(probes), ours):
        if want != got:
            return (f"transformers {transformers.__version__} loads it as {type(loaded).__name__}, which encodes "
                    f"{text[:80]!r} as {got[:12]}, sentencepiece as {want[:12]}")
    if loaded("a")["input_ids"] != tok.document_prefix + tok.encode("a") or loaded.eos_token_id != (
            tok.eos_id if tok.eos_id >= 0 else None):
        return (f"transformers {transformers.__version__} loads it as {type(loaded).__name__} with another start "
                f"(BOS) or end (EOS {loaded.eos_token_id}) token")
    return None
