"""Conversations -> token ids plus a loss mask that makes the assistant's replies the only targets.

Records (one per line of a .jsonl, one per row of a .parquet), in the formats chat datasets ship:

* ``{"messages": [{"role": "system" | "user" | "assistant" | ..., "content": str}, ...]}``
  (the key is ``--json-key``; default ``messages``): rendered with a chat template;
* ``{"prompt": [messages], "completion": [messages]}``: the same, prompt then completion;
* ``{"prompt": str, "completion": str}``: plain text, no template (none is needed); the completion
  and the EOS id after it are the targets, prompt and completion encoded each on its own (the
  preprocessor starts the pair with the tokenizer's BOS convention, as a text document).

Tool use in OpenAI's format works through the template: assistant messages with ``tool_calls``
(content empty or null) are replies like any other, ``tool`` messages are context, and a record's
``tools`` list reaches the template as ``tools``.

A rendered conversation is cut into segments: context (system and user turns, and the text the
template puts before each reply, e.g. ``<|im_start|>assistant\\n``) and targets (each assistant
reply with the template's end-of-turn text, e.g. ``...<|im_end|>\\n``, so the student also learns
to stop). The cut points come from rendering prefixes of the conversation, as generation would:

    reply i starts at  len(render(messages[:i], add_generation_prompt=True))
    reply i ends at    len(render(messages[:i + 1]))

A conversation that opens with a reply has an empty prefix, which templates that read
``messages[0]`` cannot render (Qwen2.5's checks it for a system prompt); that reply starts after
the first generation prompt (``<|im_start|>assistant\\n``) in ``render(messages[:1])``.

This needs a template whose render of a prefix is a prefix of the render of the whole, as
turn-by-turn templates do (ChatML, e.g. Qwen2.5's with its default system prompt; Llama-3-style
headers); one that rewrites earlier turns (drops the reasoning of past replies, or moves the
system prompt into the last user turn) is refused, naming the record.

Templates: the tokenizer's own (``chat_template.jinja`` or ``chat_template`` in
``tokenizer_config.json`` beside a Hugging Face ``tokenizer.json``), a Jinja file, or ``plain``
(``User: ...`` / ``Assistant: ...`` lines, each reply ending with the EOS id) for tokenizers
without one, such as the demo's SentencePiece model. Hugging Face tokenizers encode the whole
rendered text at once and give each token the segment its first character falls in (what
``transformers`` does for ``return_assistant_tokens_mask``); others encode segment by segment.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from kdtrain.cli import missing
from kdtrain.data.tokenizer import Tokenizer, tokenizer_file

# A segment: text (or one literal token id) and whether its tokens are targets.
Segment = tuple[Union[str, int], bool]

PLAIN = "plain"


def _messages(value: Any, where: str, field: str) -> list[dict]:
    """Checked messages: a string ``role`` and a string ``content``, which an assistant message
    calling tools (``tool_calls``, OpenAI's format) may leave empty or null. Other keys go to the
    template as they are."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: {field!r} must be a non-empty list of messages, got {type(value).__name__}")
    for j, m in enumerate(value):
        content = m.get("content") if isinstance(m, dict) else None
        calls = isinstance(m, dict) and m.get("role") == "assistant" and bool(m.get("tool_calls"))
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not (
                isinstance(content, str) or (calls and content is None)):
            raise ValueError(f"{where}: {field}[{j}] must be an object with string 'role' and 'content' (null "
                             f"only for an assistant message with tool_calls; got {m!r:.120})")
    return value


def record_messages(record: dict, where: str, key: str = "messages") -> list[dict] | tuple[str, str]:
    """The conversation of a record: its messages, or (prompt, completion) text for plain pairs.
    (A record's ``tools``, the function schemas of tool-use data, are passed to ``segments``.)"""
    if key in record:
        return _messages(record[key], where, key)
    if "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            return prompt, completion
        return _messages(prompt, where, "prompt") + _messages(completion, where, "completion")
    raise ValueError(f"{where}: a conversation record needs {key!r} (a list of messages) or 'prompt' and "
                     f"'completion'; it has keys {sorted(record)}")


def _sandbox():
    try:
        from jinja2 import nodes
        from jinja2.ext import Extension
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ValueError("chat templates need the jinja2 package (pip install jinja2)") from None

    class Generation(Extension):
        # Templates written for transformers' assistant masks wrap replies in {% generation %}:
        # the body renders as is (the masks here come from prefix renders).
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    def raise_exception(message):
        raise ValueError(f"the chat template refused the conversation: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _own_template(tokenizer: Tokenizer) -> tuple[str, str] | None:
    """(template source, where it came from) of a Hugging Face tokenizer, or None."""
    folder = tokenizer_file(tokenizer.path).parent
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8"), str(jinja)
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"tokenizer {config}: not a JSON object ({e})") from None
    if isinstance(value, list):  # named templates: the default one
        value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"), None)
    return (value, str(config)) if isinstance(value, str) and value else None


def _special_texts(tokenizer: Tokenizer) -> dict[str, str]:
    """bos_token / eos_token / ... as the template sees them (their text in the tokenizer's config)."""
    from kdtrain.data.hf_tokenizer import special_token_text

    folder = tokenizer_file(tokenizer.path).parent
    out = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        text = special_token_text(folder, key)
        if text is not None:
            out[key] = text
    return out


# Roles that chat templates render (transformers' conventions); replies are the assistant's.
KNOWN_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "ipython", "function"})


class ChatTemplate:
    """Renders conversations and cuts them into context and target segments."""

    def __init__(self, spec: str | None, tokenizer: Tokenizer):
        """``spec``: None for the tokenizer's own template, ``"plain"``, or a Jinja file."""
        self.eos_id = tokenizer.eos_id
        self._missing: Optional[str] = None  # why messages cannot be rendered (no template found)
        if spec == PLAIN:
            if self.eos_id < 0:
                raise ValueError(f"the plain chat template ends replies with EOS, but tokenizer {tokenizer.path} has none")
            self.name, self._render = PLAIN, None
            return
        if spec is None:
            found = _own_template(tokenizer)
            if found is None:
                # Plain prompt / completion text needs none: the error waits for a list of messages.
                self.name, self._render = None, None
                self._missing = (f"tokenizer {tokenizer.path} has no chat template (chat_template.jinja or "
                                 "tokenizer_config.json's chat_template); pass --chat-template FILE.jinja or "
                                 f"--chat-template {PLAIN} (plain prompt / completion text needs none)")
                return
            source, self.name = found
        else:
            path = Path(spec)
            if not path.is_file():
                raise ValueError(f"chat template {missing(spec)} does not exist (a Jinja file, or {PLAIN!r})")
            source, self.name = path.read_text(encoding="utf-8"), str(path)
        env = _sandbox()
        try:
            template = env.from_string(source)
        except Exception as e:  # jinja2.TemplateSyntaxError and friends
            raise ValueError(f"chat template {self.name} does not parse ({type(e).__name__}: {e})") from None
        specials = _special_texts(tokenizer)

        def render(messages: list[dict], add_generation_prompt: bool, tools=None) -> str:
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                   **specials)

        self._render = render

    def segments(self, conversation: list[dict] | tuple[str, str], where: str,
                 tools: Optional[list] = None) -> list[Segment]:
        """Context and reply segments of a conversation; ``tools`` (a record's function schemas)
        go to the template as transformers passes them."""
        if isinstance(conversation, tuple):  # plain prompt / completion text: the EOS teaches stopping
            prompt, completion = conversation
            eos = [(self.eos_id, True)] if self.eos_id >= 0 else []
            return _nonempty([(prompt, False), (completion, True)] + eos)
        if not any(m["role"] == "assistant" for m in conversation):
            # Nothing to learn from: skipped by the caller, unless the replies are under another
            # name (Gemma's "model", ShareGPT's "gpt"): then every conversation would be skipped.
            other = sorted({m["role"] for m in conversation} - KNOWN_ROLES)
            if other:
                raise ValueError(f"{where}: no 'assistant' message, and role(s) {', '.join(map(repr, other))} that are "
                                 f"none of {', '.join(sorted(KNOWN_ROLES))}: the replies learned are the 'assistant' "
                                 "messages; rename the roles (e.g. 'model' or 'gpt' -> 'assistant', 'human' -> "
                                 "'user')")
            return []
        if self._missing:
            raise ValueError(f"{where}: {self._missing}")
        if self._render is None:
            if tools or any(m.get("tool_calls") for m in conversation):
                raise ValueError(f"{where}: the plain template does not render tools or tool calls; use the "
                                 "tokenizer's chat template or --chat-template FILE.jinja")
            return _plain_segments(conversation, self.eos_id)
        try:
            return _template_segments(lambda m, g: self._render(m, g, tools), conversation)
        except ValueError as e:
            raise ValueError(f"{where}: {e} (chat template {self.name})") from None
        except Exception as e:  # jinja2 errors while rendering (UndefinedError, SecurityError, ...)
            raise ValueError(f"{where}: chat template {self.name} failed ({type(e).__name__}: {e})") from None

    def prompt(self, messages: list[dict]) -> list[Segment]:
        """The conversation so far followed by the start of the assistant's turn: what a model
        continues with its reply (all context)."""
        if self._missing:
            raise ValueError(self._missing)
        if self._render is None:
            return [(text, False) for text, _ in _plain_segments(messages, self.eos_id)] + [("Assistant: ", False)]
        try:
            return [(self._render(messages, True), False)]
        except Exception as e:  # jinja2 errors while rendering, as in segments()
            raise ValueError(f"chat template {self.name} failed on the prompt ({type(e).__name__}: {e})") from None


def _nonempty(segments: list[Segment]) -> list[Segment]:
    return [s for s in segments if not (isinstance(s[0], str) and s[0] == "")]


def _plain_segments(messages: list[dict], eos_id: int) -> list[Segment]:
    out: list[Segment] = []
    for m in messages:
        if m["role"] == "assistant":
            out += [("Assistant: ", False), (m["content"], True), (eos_id, True), ("\n", False)]
        elif m["role"] == "system":
            out.append((m["content"] + "\n\n", False))
        else:
            out.append((f"{m['role'].capitalize()}: {m['content']}\n", False))
    return _nonempty(out)


def _template_segments(render: Callable[[list, bool], str], messages: list[dict]) -> list[Segment]:
    """Cut the rendered conversation at the replies (prefix renders, see the module docstring)."""
    full = render(messages, False)
    out: list[Segment] = []
    pos = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        through = render(messages[:i + 1], False)
        before = render(messages[:i], True) if i else _opening_prefix(render, through)
        start, end = len(before), len(through)
        if not (full.startswith(before) and full.startswith(through) and pos <= start <= end):
            raise ValueError(f"the template's render of messages[:{i + 1}] is not a prefix of the whole "
                             "conversation's, so reply boundaries are undefined; use a template that renders "
                             "earlier turns the same way in every prefix (--chat-template FILE.jinja)")
        out += [(full[pos:start], False), (full[start:end], True)]
        pos = end
    out.append((full[pos:], False))
    return _nonempty(out)


def _opening_prefix(render: Callable[[list, bool], str], through: str) -> str:
    """What precedes a conversation's opening reply, ``render([], True)`` where the template can
    render no messages, else the text of ``through`` (the render of that reply alone) up to the
    end of its first generation prompt, the one added after a user turn."""
    try:
        before = render([], True)
        if through.startswith(before):
            return before
    except Exception:  # the template reads messages[0]
        pass
    probe = [{"role": "user", "content": "?"}]
    context, prompted = render(probe, False), render(probe, True)
    header = prompted[len(context):] if prompted.startswith(context) else ""
    at = through.find(header) if header else -1
    if at < 0:
        raise ValueError("the conversation opens with a reply, the template cannot render the empty prefix "
                         "before it, and its render holds no generation prompt to start the reply after")
    return through[:at + len(header)]


def encode_segments(tokenizer: Tokenizer, segments: Sequence[Segment]) -> tuple[list[int], list[bool]]:
    """Token ids and their target flags. Text-only segments with a tokenizer that reports character
    offsets: the whole text is encoded once and each token takes the flag of the segment holding
    its first character; otherwise each segment is encoded on its own."""
    if all(isinstance(text, str) for text, _ in segments) and hasattr(tokenizer, "encode_with_offsets"):
        text = "".join(t for t, _ in segments)
        ids, starts = tokenizer.encode_with_offsets(text)
        bounds = np.cumsum([len(t) for t, _ in segments])
        flags = np.array([f for _, f in segments], dtype=bool)
        which = np.searchsorted(bounds, np.asarray(starts, dtype=np.int64), side="right")
        return ids, flags[np.minimum(which, len(segments) - 1)].tolist()
    texts = [t for t, _ in segments if isinstance(t, str)]
    encoded = iter(tokenizer.encode_batch(texts))
    ids: list[int] = []
    mask: list[bool] = []
    for text, flag in segments:
        piece = next(encoded) if isinstance(text, str) else [text]
        ids += piece
        mask += [flag] * len(piece)
    return ids, mask


def reply_spans(label_flags: np.ndarray) -> list[tuple[int, int]]:
    """The replies that start inside a window, as token ranges ``[start, end)`` of the window
    (``S + 1`` tokens; ``label_flags`` [S] flags tokens 1..S): maximal runs of target tokens
    whose previous token is not one. A reply already under way at the window's start (a run from
    token 1) is not one: its question is outside the window."""
    f = np.concatenate([[False, False], np.asarray(label_flags, dtype=bool)])  # tokens 0..S, and one before
    edges = np.flatnonzero(f[1:] != f[:-1])  # token index where a run of flags starts or ends (+1 shift)
    bounds = edges.reshape(-1, 2) if len(edges) % 2 == 0 else np.append(edges, len(f) - 1).reshape(-1, 2)
    return [(int(a), int(b)) for a, b in bounds if a >= 2]
