"""Conversation data (kdtrain/data/chat.py): token ids and reply targets equal what ``transformers``
computes from the same chat template, the loss mask survives preprocessing and storage bit for bit,
training windows and micro-batches carry it, and bad records or templates are clear errors.

The Hugging Face tokenizer is a byte-level BPE trained here with ChatML and Llama-3-style special
tokens, saved by ``transformers`` with a chat template; no download."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from kdtrain.data import GPTWindowDataset, Tokenizer, build_demo_corpus, iter_documents, open_indexed_dataset
from kdtrain.data.blend import BlendedWindowDataset
from kdtrain.data.chat import ChatTemplate, encode_segments
from kdtrain.data.indexed import loss_mask_path, write_indexed_dataset
from kdtrain.data.preprocess import encode_files

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]
# ChatML (Qwen2.5) and Llama-3 layouts, written with {% generation %} around the replies so that
# transformers' return_assistant_tokens_mask gives the reference targets.
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}{% if m['role'] == 'assistant' %}"
          "{% generation %}{{ m['content'] + '<|im_end|>\\n' }}{% endgeneration %}{% else %}"
          "{{ m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' }}"
          "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
          "{% else %}{{ m['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": "What does `f` do?"}, {"role": "assistant", "content": "It returns x + 1."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "def f(x): what?"},
     {"role": "assistant", "content": " It adds one.\n"}, {"role": "user", "content": "and g?"},
     {"role": "assistant", "content": "g calls f  twice: ünïcödé 漢字"}],
    [{"role": "user", "content": "no reply yet"}],
]


@pytest.fixture(scope="module")
def hf_chat(tmp_path_factory) -> dict:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("jinja2")
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("hf_chat")
    build_demo_corpus(str(root / "corpus.jsonl"), max_documents=30)
    bpe = Backend(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(list(iter_documents(str(root / "corpus.jsonl"))), trainers.BpeTrainer(
        vocab_size=500, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    dirs = {}
    for name, template, specials in (("chatml", CHATML, {"eos_token": "<|im_end|>"}),
                                     ("llama3", LLAMA3, {"eos_token": "<|eot_id|>", "bos_token": "<|begin_of_text|>"})):
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, **specials)
        fast.chat_template = template
        fast.save_pretrained(root / name)
        dirs[name] = root / name
    return {"root": root, "dirs": dirs, "transformers": transformers}


@pytest.mark.parametrize("layout", ["chatml", "llama3"])
def test_ids_and_targets_equal_transformers_assistant_mask(hf_chat, layout):
    """Every conversation with a reply: the same ids as apply_chat_template, and the targets are
    exactly the tokens transformers marks as the assistant's (its {% generation %} spans)."""
    folder = hf_chat["dirs"][layout]
    reference = hf_chat["transformers"].AutoTokenizer.from_pretrained(folder)
    tok = Tokenizer(str(folder))
    template = ChatTemplate(None, tok)
    assert template.name.endswith("chat_template.jinja")
    for conv in CONVERSATIONS[:2]:
        ref = reference.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = encode_segments(tok, template.segments(conv, "conv"))
        assert ids == ref["input_ids"]
        assert mask == [bool(x) for x in ref["assistant_masks"]]
        # The targets are the replies with the end-of-turn token, and nothing else.
        end = "<|im_end|>" if layout == "chatml" else "<|eot_id|>"
        replies = [m["content"] for m in conv if m["role"] == "assistant"]
        assert tok.decode(np.array(ids)[mask]) == "".join(
            (r + end + "\n") if layout == "chatml" else (r.strip() + end) for r in replies)
    assert template.segments(CONVERSATIONS[2], "conv") == []


# Tool use in OpenAI's format, in a ChatML layout: schemas in the system turn, calls in the reply.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if m.role == 'assistant' %}<|im_start|>assistant\n{% generation %}"
    "{% if m.content %}{{ m.content }}{% endif %}{% for c in m.tool_calls or [] %}"
    "<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}<|im_end|>\n{% endgeneration %}"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Find a definition.",
                                           "parameters": {"type": "object", "properties": {"name": {"type": "string"}}}}}]
TOOL_CONVERSATION = [
    {"role": "user", "content": "What does zip do?"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"type": "function", "function": {"name": "lookup", "arguments": {"name": "zip"}}}]},
    {"role": "tool", "content": "zip(*iterables): pairs items."},
    {"role": "assistant", "content": "It pairs items of several iterables."}]


def test_tool_calls_are_replies_and_tool_results_context(hf_chat, tmp_path):
    """An assistant message that calls a tool (content null) is a reply, the tool's result is
    context, and the record's tools reach the template: the same ids and targets as transformers'
    apply_chat_template(tools=...) with its assistant mask."""
    folder = hf_chat["dirs"]["chatml"]
    (tmp_path / "tools.jinja").write_text(TOOLS_TEMPLATE)
    tok = Tokenizer(str(folder))
    template = ChatTemplate(str(tmp_path / "tools.jinja"), tok)
    reference = hf_chat["transformers"].AutoTokenizer.from_pretrained(folder)
    reference.chat_template = TOOLS_TEMPLATE
    ref = reference.apply_chat_template(TOOL_CONVERSATION, tools=TOOLS, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    segments = template.segments(TOOL_CONVERSATION, "rec", TOOLS)
    ids, mask = encode_segments(tok, segments)
    assert ids == ref["input_ids"] and mask == [bool(x) for x in ref["assistant_masks"]]
    replies = tok.decode(np.array(ids)[mask])
    assert '<tool_call>{"name": "lookup"' in replies and "pairs items." not in replies.split("</tool_call>")[0]
    assert "zip(*iterables)" in tok.decode(np.array(ids)[~np.array(mask)]) and "Tools: [" in segments[0][0]
    # Through preprocessing, tools read from the record.
    chats = _write_chats(tmp_path / "tools.jsonl", [{"messages": TOOL_CONVERSATION, "tools": TOOLS}])
    encode_files([str(chats)], str(folder), str(tmp_path / "t"), format="chat", chat_template=str(tmp_path / "tools.jinja"))
    ds = open_indexed_dataset(str(tmp_path / "t"))
    assert ds.tokens.tolist() == ids and ds.loss_mask(0, ds.num_tokens).tolist() == mask
    with pytest.raises(ValueError, match="plain template does not render tools"):
        ChatTemplate("plain", tok).segments(TOOL_CONVERSATION, "rec")
    with pytest.raises(ValueError, match=r"messages\[0\] must be an object"):
        from kdtrain.data.chat import record_messages
        record_messages({"messages": [{"role": "user", "content": None}]}, "rec")


def test_prompt_completion_records(hf_chat, tiny_corpus):
    from kdtrain.data.chat import record_messages

    template = ChatTemplate(None, Tokenizer(str(hf_chat["dirs"]["chatml"])))
    conv = record_messages({"prompt": CONVERSATIONS[0][:1], "completion": CONVERSATIONS[0][1:]}, "rec")
    assert template.segments(conv, "rec") == template.segments(CONVERSATIONS[0], "rec")
    # Plain text pairs: no template; the completion, encoded on its own, and the EOS are the targets.
    sp = Tokenizer(tiny_corpus["tokenizer"])
    pair = record_messages({"prompt": "Q: two and two?", "completion": " four"}, "rec")
    ids, mask = encode_segments(sp, ChatTemplate("plain", sp).segments(pair, "rec"))
    assert ids == sp.encode("Q: two and two?") + sp.encode(" four") + [sp.eos_id]
    assert mask == [False] * len(sp.encode("Q: two and two?")) + [True] * (len(sp.encode(" four")) + 1)
    for bad, msg in (({"text": "x"}, r"needs 'messages'.*keys \['text'\]"),
                     ({"messages": []}, "non-empty list"),
                     ({"messages": [{"role": "user", "content": ["part"]}]}, r"messages\[0\] must be an object")):
        with pytest.raises(ValueError, match=msg):
            record_messages(bad, "rec")


def test_text_pairs_end_with_a_target_eos_and_need_no_template(tiny_corpus, tmp_path):
    """{"prompt": str, "completion": str} records teach stopping: each completion is followed by
    the EOS id as a target (with append_eos too: no second, context EOS), and a tokenizer without
    a chat template preprocesses them without --chat-template; only message lists need one."""
    tok = Tokenizer(tiny_corpus["tokenizer"])
    pairs = [("Q: two and two?", " four"), ("Q: capital of France?", " Paris"), ("Q: 3*3?", " nine")]
    chats = _write_chats(tmp_path / "pairs.jsonl", [{"prompt": q, "completion": a} for q, a in pairs])
    want_ids, want_mask = [], []
    for q, a in pairs:
        want_ids += tok.encode(q) + tok.encode(a) + [tok.eos_id]
        want_mask += [False] * len(tok.encode(q)) + [True] * (len(tok.encode(a)) + 1)
    for name, template, append_eos in (("own", None, False), ("plain", "plain", False), ("eos", None, True)):
        meta = encode_files([str(chats)], tiny_corpus["tokenizer"], str(tmp_path / name), format="chat",
                            chat_template=template, append_eos=append_eos)
        ds = open_indexed_dataset(str(tmp_path / name))
        assert ds.tokens.tolist() == want_ids and ds.loss_mask(0, ds.num_tokens).tolist() == want_mask
        assert meta["num_documents"] == 3 and meta["chat_template"] == template
    messages = _write_chats(tmp_path / "messages.jsonl", [{"messages": CONVERSATIONS[0]}])
    with pytest.raises(ValueError, match="messages.jsonl:1: tokenizer .* has no chat template.*--chat-template"):
        encode_files([str(messages)], tiny_corpus["tokenizer"], str(tmp_path / "m"), format="chat")


def test_plain_template_ends_each_reply_with_eos(tiny_corpus):
    """SentencePiece tokenizers have no template: 'plain' marks each reply and the EOS after it."""
    tok = Tokenizer(tiny_corpus["tokenizer"])
    ids, mask = encode_segments(tok, ChatTemplate("plain", tok).segments(CONVERSATIONS[1], "conv"))
    ids = np.array(ids)
    targets = ids[mask]
    assert (targets == tok.eos_id).sum() == 2 and targets[-1] == tok.eos_id
    first, second = np.split(targets, [int(np.flatnonzero(targets == tok.eos_id)[0]) + 1])
    assert first[:-1].tolist() == tok.encode(" It adds one.\n")
    assert tok.decode(second[:-1]) == tok.decode(tok.encode(CONVERSATIONS[1][4]["content"]))
    assert "User: and g?" in tok.decode(ids[~np.array(mask)])
    # A conversation without a reply is skipped, unless its replies go by another role's name
    # (every record would have been skipped, the corpus reported empty).
    assert ChatTemplate("plain", tok).segments([{"role": "user", "content": "hi"}], "conv") == []
    for roles in (("user", "model"), ("human", "gpt")):
        with pytest.raises(ValueError, match=rf"conv 3: no 'assistant' message, and role\(s\) '{roles[1]}'"):
            ChatTemplate("plain", tok).segments([{"role": r, "content": "hi"} for r in roles], "conv 3")


# Qwen2.5's layout: a default system prompt unless the first message is one, so the template
# reads messages[0] and cannot render an empty conversation.
QWEN = ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
        "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
        "{%- for m in messages %}{%- if not (m.role == 'system' and loop.first) %}{%- if m.role == 'assistant' %}"
        "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- m.content + '<|im_end|>\\n' }}{% endgeneration %}"
        "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}{%- endif %}"
        "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def test_conversation_opening_with_a_reply(hf_chat, tmp_path):
    """A conversation whose first message is the assistant's, with a template that reads
    messages[0]: the same ids and targets as transformers (the opening reply is a target, the
    default system prompt and its header context), in preprocessing as well."""
    folder = hf_chat["dirs"]["chatml"]
    (tmp_path / "qwen.jinja").write_text(QWEN)
    tok = Tokenizer(str(folder))
    template = ChatTemplate(str(tmp_path / "qwen.jinja"), tok)
    reference = hf_chat["transformers"].AutoTokenizer.from_pretrained(folder)
    reference.chat_template = QWEN
    opening = [{"role": "assistant", "content": "How can I help?"}, {"role": "user", "content": "hi"},
               {"role": "assistant", "content": "hello"}]
    for conv in (opening, opening[:1], [{"role": "system", "content": "Be terse."}] + opening, CONVERSATIONS[1]):
        ref = reference.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = encode_segments(tok, template.segments(conv, "rec"))
        assert ids == ref["input_ids"] and mask == [bool(x) for x in ref["assistant_masks"]]
    ids, mask = encode_segments(tok, template.segments(opening, "rec"))
    assert tok.decode(np.array(ids)[mask]) == "How can I help?<|im_end|>\nhello<|im_end|>\n"
    chats = _write_chats(tmp_path / "chats.jsonl", [{"messages": c} for c in (CONVERSATIONS[0], opening)])
    meta = encode_files([str(chats)], str(folder), str(tmp_path / "q"), format="chat",
                        chat_template=str(tmp_path / "qwen.jinja"))
    ds = open_indexed_dataset(str(tmp_path / "q"))
    assert meta["num_documents"] == 2 and ds.loss_mask(0, ds.num_tokens).tolist()[-len(mask):] == mask


def test_templates_that_cannot_be_cut_are_refused(hf_chat, tmp_path):
    tok = Tokenizer(str(hf_chat["dirs"]["chatml"]))
    # Drops the content of earlier replies (as reasoning templates drop past thoughts): a prefix
    # render is no prefix of the whole, so where a reply starts is undefined.
    rewriting = tmp_path / "rewriting.jinja"
    rewriting.write_text("{% for m in messages %}{{ m['role'] }}: {% if m['role'] != 'assistant' or loop.last %}"
                         "{{ m['content'] }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(ValueError, match=r"chats.jsonl:3: the template's render of messages\[:3\] is not a prefix"):
        ChatTemplate(str(rewriting), tok).segments(CONVERSATIONS[1], "chats.jsonl:3")
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(ValueError, match="broken.jinja does not parse"):
        ChatTemplate(str(broken), tok)
    refusing = tmp_path / "refusing.jinja"
    refusing.write_text("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValueError, match="rec: .*refused the conversation: roles must alternate"):
        ChatTemplate(str(refusing), tok).segments(CONVERSATIONS[0], "rec")
    # A template that fails while rendering (here: on any message) fails the same way on a prompt
    # (kdtrain generate --chat), not with jinja's traceback.
    undefined = tmp_path / "undefined.jinja"
    undefined.write_text("{% for m in messages %}{{ m.content.foo.bar }}{% endfor %}")
    with pytest.raises(ValueError, match="chat template .*undefined.jinja failed on the prompt \\(UndefinedError"):
        ChatTemplate(str(undefined), tok).prompt([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="rec: tokenizer .* has no chat template.*--chat-template"):
        ChatTemplate(None, _no_template(hf_chat, tmp_path)).segments(CONVERSATIONS[0], "rec")
    with pytest.raises(ValueError, match="nope.jinja does not exist"):
        ChatTemplate(str(tmp_path / "nope.jinja"), tok)


def _no_template(hf_chat, tmp_path) -> Tokenizer:
    d = tmp_path / "bare"
    d.mkdir()
    (d / "tokenizer.json").write_bytes((hf_chat["dirs"]["chatml"] / "tokenizer.json").read_bytes())
    return Tokenizer(str(d))


def _write_chats(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_preprocessed_mask_is_the_encoders_bit_for_bit(hf_chat, tmp_path):
    """encode_files(format='chat'): tokens and loss mask on disk are the encoder's, conversations
    laid end to end (with --append-eos: separated by a context EOS), those without a reply
    skipped; workers do not change a bit."""
    folder = hf_chat["dirs"]["chatml"]
    tok = Tokenizer(str(folder))
    records = [{"messages": c} for c in CONVERSATIONS] * 5 + [{"prompt": CONVERSATIONS[0][:1],
                                                               "completion": CONVERSATIONS[0][1:]}]
    chats = _write_chats(tmp_path / "chats.jsonl", records)
    meta = encode_files([str(chats)], str(folder), str(tmp_path / "one"), format="chat", append_eos=True)
    meta2 = encode_files([str(chats)], str(folder), str(tmp_path / "two"), format="chat", append_eos=True, workers=2)
    plain = encode_files([str(chats)], str(folder), str(tmp_path / "plain"), format="chat")
    assert plain["append_eos"] is False and plain["num_tokens"] == meta["num_tokens"] - 11
    assert meta["skipped"] == 5 and meta["num_documents"] == 11 and meta["loss_mask"] is True
    template = ChatTemplate(None, tok)
    want_ids, want_mask = [], []
    for r in records:
        segments = template.segments(r.get("messages") or r["prompt"] + r["completion"], "r")
        if segments:
            ids, mask = encode_segments(tok, segments)
            want_ids += ids + [tok.eos_id] if ids[-1] != tok.eos_id else ids
            want_mask += mask + [False] if ids[-1] != tok.eos_id else mask
    for name in ("one", "two"):
        ds = open_indexed_dataset(str(tmp_path / name))
        assert ds.has_loss_mask and ds.tokens.tolist() == want_ids
        assert ds.loss_mask(0, ds.num_tokens).tolist() == want_mask
    assert meta["loss_mask_tokens"] == sum(want_mask) == meta2["loss_mask_tokens"]
    assert Path(loss_mask_path(str(tmp_path / "one"))).read_bytes() == Path(loss_mask_path(str(tmp_path / "two"))).read_bytes()
    # Errors name the record; a text dataset written over the prefix drops the old mask.
    bad = _write_chats(tmp_path / "bad.jsonl", records[:2] + [{"messages": [{"role": "user", "content": 3}]}])
    with pytest.raises(ValueError, match=r"bad.jsonl:3: 'messages'\[0\]|bad.jsonl:3: messages\[0\]"):
        encode_files([str(bad)], str(folder), str(tmp_path / "bad"), format="chat")
    with pytest.raises(ValueError, match="format='chat'"):
        encode_files([str(chats)], str(folder), str(tmp_path / "x"), chat_template="plain")
    txt = tmp_path / "plain.txt"
    txt.write_text("a document\n")
    encode_files([str(txt)], str(folder), str(tmp_path / "one"))
    assert not open_indexed_dataset(str(tmp_path / "one")).has_loss_mask
    assert not os.path.exists(loss_mask_path(str(tmp_path / "one")))


def test_parquet_and_compressed_conversations_read_like_jsonl(hf_chat, tmp_path):
    """Chat datasets ship as parquet (a list-of-structs messages column) or compressed jsonl: the
    same records give the same tokens and mask."""
    import gzip

    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    folder = str(hf_chat["dirs"]["chatml"])
    records = [{"messages": c} for c in CONVERSATIONS[:2]] * 3
    chats = _write_chats(tmp_path / "chats.jsonl", records)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "chats.parquet", row_group_size=2)
    (tmp_path / "chats.jsonl.gz").write_bytes(gzip.compress(chats.read_bytes()))
    outs = []
    for name in ("chats.jsonl", "chats.parquet", "chats.jsonl.gz"):
        encode_files([str(tmp_path / name)], folder, str(tmp_path / name.replace(".", "_")), format="chat")
        ds = open_indexed_dataset(str(tmp_path / name.replace(".", "_")))
        outs.append((ds.tokens.tolist(), ds.loss_mask(0, ds.num_tokens).tolist()))
    assert outs[0] == outs[1] == outs[2] and sum(outs[0][1]) > 0
    with pytest.raises(ValueError, match="records .* are read from .jsonl or .parquet, not .txt"):
        (tmp_path / "chats.txt").write_text("hello\n")
        encode_files([str(tmp_path / "chats.txt")], folder, str(tmp_path / "t"), format="chat")


def test_loss_mask_storage_and_damage(tmp_path):
    rng = np.random.default_rng(0)
    docs = [(rng.integers(0, 100, n), rng.random(n) < 0.4) for n in (3, 17, 1, 8, 44)]
    meta = write_indexed_dataset(str(tmp_path / "m"), docs, 100, {})
    full = np.concatenate([m for _, m in docs])
    assert meta["loss_mask_tokens"] == full.sum() and os.path.getsize(loss_mask_path(str(tmp_path / "m"))) == 10
    ds = open_indexed_dataset(str(tmp_path / "m"))
    for a, b in ((0, 73), (5, 6), (7, 9), (8, 16), (13, 70), (72, 73), (40, 40)):
        assert ds.loss_mask(a, b).tolist() == full[a:b].tolist()
    with pytest.raises(ValueError, match="either every document has a loss mask or none"):
        write_indexed_dataset(str(tmp_path / "mixed"), [docs[0], docs[1][0]], 100, {})
    with pytest.raises(ValueError, match="loss mask of shape"):
        write_indexed_dataset(str(tmp_path / "short"), [(docs[1][0], docs[1][1][:-1])], 100, {})
    assert not any(p.name.startswith(("mixed", "short")) for p in tmp_path.iterdir())
    path = loss_mask_path(str(tmp_path / "m"))
    Path(path).write_bytes(Path(path).read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"loss mask .*m.loss_mask.bin has 9 bytes, but 73 tokens need 10"):
        open_indexed_dataset(str(tmp_path / "m"))
    os.remove(path)
    with pytest.raises(ValueError, match="records a loss mask, but .* does not exist"):
        open_indexed_dataset(str(tmp_path / "m"))


def test_windows_and_microbatches_carry_the_targets(tmp_path):
    """A window's label flags are the stream's bits at tokens [w*S + 1, w*S + S + 1), across
    corpus boundaries; an unmasked corpus counts every token; micro-batches count the targets."""
    import torch

    from kdtrain.training.batches import microbatches

    rng = np.random.default_rng(1)
    masked = [(rng.integers(0, 100, n), rng.random(n) < 0.5) for n in (30, 11, 25)]
    write_indexed_dataset(str(tmp_path / "a"), masked, 100, {})
    write_indexed_dataset(str(tmp_path / "b"), [rng.integers(0, 100, 40)], 100, {})
    S = 8
    ds = GPTWindowDataset([str(tmp_path / "a"), str(tmp_path / "b")], S, split=(0.75, 0.25), seed=3)
    stream_mask = np.concatenate([m for _, m in masked] + [np.ones(40, dtype=bool)])
    assert ds.has_loss_mask and ds.num_windows == (66 + 40 - 1) // S
    for w in range(ds.num_windows):
        assert ds.window_loss_mask(w).tolist() == stream_mask[w * S + 1: w * S + S + 1].tolist()
    g = 5
    assert ds.train_loss_mask(g).tolist() == ds.window_loss_mask(ds.train_window_index(g)).tolist()
    assert ds.valid_loss_mask(0).tolist() == ds.window_loss_mask(ds.num_train_windows).tolist()
    assert GPTWindowDataset([str(tmp_path / "b")], S, split=(1.0, 0.0)).train_loss_mask(0) is None
    # data.loss_mask=false: the masks are ignored, every token counts.
    assert GPTWindowDataset([str(tmp_path / "a")], S, split=(1.0, 0.0), loss_mask=False).train_loss_mask(0) is None

    mbs = microbatches(ds.train_sample, 4, 4, 2, 0, 1, torch.device("cpu"), targets=ds.train_loss_mask)
    for i, mb in enumerate(mbs):
        want = np.stack([ds.train_loss_mask(4 + 2 * i + j) for j in range(2)])
        assert mb.loss_mask.numpy().astype(bool).tolist() == want.tolist() and mb.num_tokens == want.sum()

    blend = BlendedWindowDataset([GPTWindowDataset([str(tmp_path / "a")], S, split=(1.0, 0.0), seed=1),
                                  GPTWindowDataset([str(tmp_path / "b")], S, split=(1.0, 0.0), seed=2)], [1.0, 1.0])
    for g in range(8):
        c, local = blend.source_of(g)
        want = blend.components[c].train_loss_mask(local)
        assert blend.train_loss_mask(g).tolist() == (np.ones(S, bool) if want is None else want).tolist()


def test_script_builds_demo_conversations(tiny_corpus, tmp_path):
    """The README's command: demo conversations with the plain template, replies as targets."""
    prefix = tmp_path / "chat"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "preprocess_data.py"), "--demo-corpus",
                           "--format", "chat", "--chat-template", "plain", "--tokenizer", tiny_corpus["tokenizer"],
                           "--output-prefix", str(prefix)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "targets (" in proc.stdout
    ds = open_indexed_dataset(str(prefix))
    share = ds.meta["loss_mask_tokens"] / ds.num_tokens
    assert ds.meta["chat_template"] == "plain" and 0.2 < share < 0.8
    first = json.loads(Path(f"{prefix}.jsonl").read_text().splitlines()[0])
    assert first["messages"][0]["role"] == "system" and first["messages"][2]["role"] == "assistant"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "preprocess_data.py"), "--input",
                           str(prefix) + ".jsonl", "--chat-template", "plain", "--tokenizer", tiny_corpus["tokenizer"],
                           "--output-prefix", str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--chat-template needs --format chat" in proc.stderr


def test_evaluation_and_steps_count_the_replies_only(world_of_one, tiny_chat_corpus):
    """The held-out loss of a model on conversation windows is its cross entropy averaged over the
    reply tokens alone (computed here from its logits), and a batch without a reply token gives a
    zero loss and zero gradients rather than 0/0."""
    import torch

    from kdtrain.config import OptimizerConfig, TrainingConfig, load_model_config
    from kdtrain.parallel import RoleLayout, build_role_groups
    from kdtrain.training.batches import microbatches
    from kdtrain.training.pretrain import LM_REPORT_KEYS, build_trainable, evaluate, lm_forward_step
    from kdtrain.training.step import train_step

    S, cpu = 32, torch.device("cpu")
    cfg = load_model_config("tiny")
    ds = GPTWindowDataset([tiny_chat_corpus["prefix"]], S, split=(0.9, 0.1), seed=0)
    groups = build_role_groups(RoleLayout("chat", 0, 1, 1, 1))
    role = build_trainable(cfg, groups, OptimizerConfig(lr=1e-3, warmup_steps=0), seq_length=S, micro_batch=2,
                           device=cpu, dtype=torch.float32, seed=7)
    fwd = lm_forward_step(cfg.vocab_size, groups.pgc.tp)
    got = evaluate(role, ds, TrainingConfig(micro_batch_size=2, global_batch_size=8, eval_batches=1), fwd, cpu)

    windows = torch.from_numpy(np.stack([ds.valid_sample(j) for j in range(8)]))
    targets = torch.from_numpy(np.stack([ds.valid_loss_mask(j) for j in range(8)]))
    assert 0 < targets.sum() < targets.numel()
    role.model.eval()
    with torch.no_grad():
        logits = role.model(windows[:, :-1], torch.arange(S).expand(8, S), None)  # [S, B, V]
    nll = torch.nn.functional.cross_entropy(logits.permute(1, 2, 0).float(), windows[:, 1:], reduction="none")
    assert got["valid_loss"] == pytest.approx(float(nll[targets].mean()), rel=1e-5)
    assert got["valid_loss"] != pytest.approx(float(nll.mean()), rel=1e-3)  # the prompts would change it

    role.model.train()
    none = microbatches(ds.train_sample, 0, 4, 2, 0, 1, cpu, targets=lambda g: np.zeros(S, dtype=bool))
    result = train_step(role.schedule, fwd, none, role.grads, role.optimizer, groups, 1e-3, 1.0,
                        cfg.tie_embeddings, LM_REPORT_KEYS)
    assert result.sums["tokens"] == 0 and result.sums["loss_sum"] == 0
    assert result.grad_norm == 0 and not result.skipped


def test_logits_are_computed_at_the_targets_only(world_of_one):
    """A micro-batch with target flags sends only the targets' rows through the output layer
    (MicroBatch.logit_rows): the same logits there, and the same loss and gradients, as the full
    logits masked; the teacher's payload at those rows is its full payload's."""
    from kdtrain.config import load_model_config
    from kdtrain.models import build_gpt
    from kdtrain.parallel import RoleLayout, build_role_groups
    from kdtrain.stream import PayloadSpec
    from kdtrain.training.batches import make_microbatch
    from kdtrain.training.pretrain import lm_forward_step
    from kdtrain.training.teacher import Teacher

    import torch

    S, B, cpu = 16, 3, torch.device("cpu")
    cfg = load_model_config("tiny")
    groups = build_role_groups(RoleLayout("rows", 0, 1, 1, 1))
    model = build_gpt(cfg, groups, device=cpu, dtype=torch.float32, seed=1)
    rng = np.random.default_rng(0)
    windows = rng.integers(0, cfg.vocab_size, (B, S + 1))
    targets = rng.random((B, S)) < 0.3
    mb = make_microbatch(windows, cpu, targets)
    full = make_microbatch(windows, cpu, targets)
    full.logit_rows = None  # every row's logits, the prompts masked in the loss
    shapes = []
    hook = model.output_layer.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    fwd = lm_forward_step(cfg.vocab_size, None)
    grads = []
    for batch in (mb, full):
        model.zero_grad()
        out, loss_func = fwd(model, batch)
        loss, _, _ = loss_func(out, float(targets.sum()))
        loss.backward()
        grads.append((out.detach(), loss.detach(), [p.grad.clone() for p in model.parameters()]))
    hook.remove()
    assert shapes == [(int(targets.sum()), 1, cfg.hidden_size), (S, B, cfg.hidden_size)]
    rows = torch.from_numpy(np.flatnonzero(targets.T))
    torch.testing.assert_close(grads[0][0][:, 0], grads[1][0].reshape(S * B, -1)[rows], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-6, atol=0)
    for a, b in zip(grads[0][2], grads[1][2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)

    teacher = Teacher(cfg, groups, PayloadSpec(S, B, 8, torch.float32), 1.0, None, cpu, torch.float32, seed=1)
    part, whole = teacher.serve(mb), teacher.serve(full)
    assert not part.values[~torch.from_numpy(targets.T)].any()  # the other rows: zeros, never read
    m = torch.from_numpy(targets.T)
    assert torch.equal(part.ids[m], whole.ids[m]) and int(part.checksum) == int(whole.checksum)
    torch.testing.assert_close(part.values[m], whole.values[m], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(part.tail_lse[m], whole.tail_lse[m], rtol=1e-6, atol=1e-6)
