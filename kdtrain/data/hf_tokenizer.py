"""A Hugging Face tokenizer (``tokenizer.json``) behind kdtrain's ``Tokenizer`` interface.

Users who distill a Hugging Face teacher must tokenize their corpus exactly as the teacher was
trained: ``data.tokenizer`` (and ``scripts/preprocess_data.py --tokenizer``) may name the teacher's
model directory or its ``tokenizer.json``. The file is read with the ``tokenizers`` library (what
``transformers``' fast tokenizers run on), so ids equal ``AutoTokenizer.from_pretrained(dir)(text,
add_special_tokens=False)``.

Special ids come from the files beside ``tokenizer.json``: ``tokenizer_config.json``, then
``special_tokens_map.json`` (``eos_token`` / ``bos_token`` / ``pad_token``, as a string or as
``{"content": ...}``); an EOS not named there is looked up among the usual end-of-text tokens.
Text is encoded without template tokens (as transformers does, the text of an added special token
inside a document still becomes that token); ``document_prefix`` gives the ids the tokenizer's
template puts before a text (Llama's BOS), which the preprocessor writes at each document's start,
and it separates documents with the EOS id, as for SentencePiece tokenizers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional, Sequence

from kdtrain.data.tokenizer import Tokenizer
from kdtrain.optional import need

# End-of-text tokens of common families (GPT-2/Qwen, Llama 3, Llama 2/Mistral, Gemma), tried in
# order when no config names the EOS token.
_EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


def special_token_text(folder: Path, key: str) -> Optional[str]:
    """The ``key`` token's text from the tokenizer's config files, or None."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = folder / name
        if not f.is_file():
            continue
        try:
            value = json.loads(f.read_text()).get(key)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise ValueError(f"tokenizer {f}: not a JSON object ({e})") from None
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value:
            return value
    return None


class HFTokenizer(Tokenizer):
    def _load(self, data: bytes) -> None:
        _Backend = need("tokenizers", f"tokenizer {self._path}: a Hugging Face tokenizer").Tokenizer
        f = self._file
        try:
            self._tok = _Backend.from_str(data.decode("utf-8"))
        except Exception as e:  # the Rust library raises its own Exception type
            raise ValueError(f"tokenizer {f} is not a valid Hugging Face tokenizer.json ({e})") from None
        vocab = self._tok.get_vocab(with_added_tokens=True)
        if not vocab:
            raise ValueError(f"tokenizer {f} is not a valid Hugging Face tokenizer.json (empty vocabulary)")
        self._vocab_size = max(vocab.values()) + 1
        self._special = {}
        for key in ("eos_token", "bos_token", "pad_token"):
            text = special_token_text(f.parent, key)
            if text is not None and text not in vocab:
                raise ValueError(f"tokenizer {f}: {key} {text!r} (from its config files) is not in its vocabulary")
            self._special[key] = vocab[text] if text is not None else -1
        if self._special["eos_token"] < 0:
            self._special["eos_token"] = next((vocab[t] for t in _EOS_CANDIDATES if t in vocab), -1)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_id(self) -> int:
        return self._special["eos_token"]

    @property
    def bos_id(self) -> int:
        return self._special["bos_token"]

    @property
    def pad_id(self) -> int:
        return self._special["pad_token"]

    @property
    def document_prefix(self) -> list[int]:
        # The ids tokenizer.json's post-processor (template) puts before a single text: Llama 3's
        # adds <|begin_of_text|>, Llama 2's <s>, GPT-2's and Qwen's nothing. transformers (5.x)
        # applies that template by default; ids it appends (an EOS) are left to ``append_eos``.
        probe = "a"
        plain = self._tok.encode(probe, add_special_tokens=False).ids
        templated = self._tok.encode(probe, add_special_tokens=True).ids
        for start in range(len(templated) - len(plain) + 1):
            if templated[start:start + len(plain)] == plain:
                return templated[:start]
        return []

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """Ids of ``text`` and the character index where each token starts (kdtrain/data/chat.py)."""
        e = self._tok.encode(text, add_special_tokens=False)
        return e.ids, [start for start, _ in e.offsets]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)
