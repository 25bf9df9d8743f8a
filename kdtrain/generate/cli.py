"""``kdtrain generate``: continuations (or chat replies) from a checkpoint, to look at what a student
says before and after distillation.

    kdtrain generate --model checkpoints/demo-distill --prompt "The os module" --max-new-tokens 40
    kdtrain generate --model /models/Qwen2.5-0.5B-Instruct --chat --prompt "What does zip() do?"

``--model`` is a kdtrain checkpoint (any layout) or a Hugging Face directory; the tokenizer is
``--tokenizer``, else the HF directory's own, else the one the checkpoint's run read its data
with; a checkpoint that records the tokenizer of its training ids (its fingerprint) refuses any
other. ``--chat`` renders each prompt as a user turn (after ``--system``) with the tokenizer's chat
template, or ``--chat-template FILE|plain``. A reply stops at an end token: the tokenizer's EOS
and those the model names (a Hugging Face directory's ``generation_config.json`` / ``config.json``
``eos_token_id``, kept by an import: Llama-3-Instruct ends a turn with ``<|eot_id|>``, its
tokenizer's EOS is ``<|end_of_text|>``). A plain prompt starts as preprocessed documents do (the
tokenizer's convention: BOS for Llama tokenizers; ``--prepend-bos`` / ``--no-prepend-bos``).
Prompts of different lengths are decoded together (kdtrain/models/generate.py: key/value cache,
layout-independent sampling keyed by ``--seed`` and the prompt's index); ``--temperature 0`` is
greedy, and ``--top-k`` / ``--top-p`` restrict a sampled draw to the most likely tokens. The whole
model runs on one device (GPU when there is one), in bf16 on GPU and fp32 on CPU; on a GPU,
``--cuda-graphs`` replays each position's forward as one CUDA graph (models/decode_graph.py).
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Optional

from ..cli import DefaultsHelp


def default_tokenizer(model: str) -> Optional[str]:
    """The HF directory's own tokenizer, else the tokenizer the checkpoint's run read its data with."""
    from ..convert.hf_weights import is_hf_model_dir
    from ..convert.sources import CheckpointWeights
    from ..data.tokenizer import tokenizer_file

    if is_hf_model_dir(model):
        try:
            return str(tokenizer_file(model))
        except ValueError:
            return None
    path = (CheckpointWeights(model).reader.meta.get("data") or {}).get("tokenizer")
    try:
        return str(tokenizer_file(path)) if path else None
    except ValueError:  # moved or deleted since the run
        return None


def check_tokenizer(reader, tok, given: bool = True) -> None:
    """``tok`` is the tokenizer whose ids the checkpoint was trained on, when it records that
    (``tokenizer_fingerprint``, as ``load_model_weights`` checks it for a run): with another one,
    even of the same size, the model's rows mean other tokens and the replies are noise.
    ``given``: ``tok`` is ``--tokenizer`` (else the run's ``data.tokenizer``, changed since)."""
    theirs = reader.meta.get("tokenizer_fingerprint")
    if theirs is None or theirs == tok.fingerprint:
        return
    path = (reader.meta.get("data") or {}).get("tokenizer")
    run = f"tokenizer {theirs}{f' ({path})' if path else ''}"
    if given:
        raise ValueError(f"--tokenizer {tok.path} (fingerprint {tok.fingerprint}) is not the tokenizer of "
                         f"{reader.path}, which was trained on ids of {run}: the model's rows would mean other "
                         "tokens")
    raise ValueError(f"the run's data.tokenizer {tok.path} has changed since {reader.path} was trained: its "
                     f"fingerprint is {tok.fingerprint}, the model was trained on ids of tokenizer {theirs}; pass "
                     "--tokenizer with the tokenizer the run read its data with")


def _ids(value) -> list[int]:
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0]


def end_tokens(model: str, tok) -> list[int]:
    """The ids that end a reply: the tokenizer's EOS, then the end tokens the model itself names
    (those of a Hugging Face directory, or of the one a kdtrain checkpoint was imported from)."""
    from ..convert.hf_weights import is_hf_model_dir, read_generation_config, read_hf_config
    from ..convert.sources import CheckpointWeights

    if is_hf_model_dir(model):
        named = [(read_generation_config(model) or {}).get("eos_token_id"),
                 read_hf_config(model).get("eos_token_id")]
    else:
        source = CheckpointWeights(model).reader.meta.get("source") or {}
        named = [(source.get("generation_config") or {}).get("eos_token_id"),
                 (source.get("special_ids") or {}).get("eos_token_id")]
    ids = _ids(tok.eos_id)
    for value in named:
        ids += [i for i in _ids(value) if i not in ids]
    return ids


def generate(model: str, prompts: list[str], *, tokenizer: Optional[str] = None, chat: bool = False,
             chat_template: Optional[str] = None, system: Optional[str] = None, max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             device: str = "auto", cuda_graphs: bool = False, prepend_bos: Optional[bool] = None) -> list[dict]:
    """One ``{"prompt", "ids", "text", "stopped"}`` per prompt: the new token ids, their text, and
    whether the reply ended with an end token (``end_tokens``). A plain prompt starts as the corpus
    documents did (``prepend_bos``, the preprocessor's rule: None = the tokenizer's convention)."""
    import torch

    from ..convert.sources import open_weights
    from ..data.chat import ChatTemplate, encode_segments
    from ..data.tokenizer import Tokenizer, bos_ids
    from ..models.generate import sample_replies
    from ..parallel import one_process_world
    from ..training.checkpoint_load import load_whole_model

    if not prompts:
        raise ValueError("give at least one --prompt (or --prompts-file)")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"--temperature must be a number >= 0 (0 = greedy), got {temperature}")
    if top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"--top-k must be >= 0 and --top-p in (0, 1], got {top_k} and {top_p}")
    if prepend_bos is not None and (chat or chat_template):
        raise ValueError("--prepend-bos / --no-prepend-bos apply to plain prompts: a chat template writes its own "
                         "start tokens")
    given = tokenizer is not None
    tokenizer = tokenizer or default_tokenizer(model)
    if tokenizer is None:
        raise ValueError(f"no tokenizer for {model}: pass --tokenizer (a SentencePiece .model, or a Hugging Face "
                         "tokenizer.json or its directory)")
    tok = Tokenizer(tokenizer)
    weights = open_weights(model)
    cfg = weights.cfg
    if hasattr(weights, "reader"):  # a kdtrain checkpoint (a Hugging Face directory records no fingerprint)
        check_tokenizer(weights.reader, tok, given)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer {tokenizer} has {tok.vocab_size} ids but model {model} has "
                         f"vocab_size={cfg.vocab_size}: not the model's tokenizer")
    if chat or chat_template:
        template = ChatTemplate(chat_template, tok)
        head = [{"role": "system", "content": system}] if system else []
        encoded = [encode_segments(tok, template.prompt(head + [{"role": "user", "content": p}]))[0] for p in prompts]
    else:
        bos = bos_ids(tok, prepend_bos, "--prepend-bos")
        encoded = [bos + ids for ids in tok.encode_batch(prompts)]
    if any(len(ids) == 0 for ids in encoded):
        raise ValueError("a prompt encodes to no tokens")
    longest = max(len(ids) for ids in encoded) + max_new_tokens
    if longest > cfg.max_seq_length:
        raise ValueError(f"prompt + --max-new-tokens = {longest} tokens exceed the model's max_seq_length "
                         f"{cfg.max_seq_length}")
    stops = [i for i in end_tokens(model, tok) if i < cfg.vocab_size]
    with one_process_world(device) as env:
        if cuda_graphs and env.device.type != "cuda":
            raise ValueError(f"--cuda-graphs: CUDA graphs need a CUDA device, this runs on {env.device.type}")
        dtype = torch.bfloat16 if env.device.type == "cuda" else torch.float32
        # kdtrain's local layers: the key/value-cached decoder and its graphs run on them only.
        _, net = load_whole_model(model, env.device, dtype, "generate --model", cfg, use_te=False)
        # Each row: its prompt, then room for its reply (the prompt lengths differ by row).
        windows = torch.zeros(len(encoded), longest, dtype=torch.long)
        for i, ids in enumerate(encoded):
            windows[i, :len(ids)] = torch.tensor(ids)
        starts = [len(ids) for ids in encoded]
        out, sampled, _ = sample_replies(net, windows.to(env.device), [[(s, longest)] for s in starts],
                                      vocab_size=cfg.vocab_size, temperature=temperature, seed=seed,
                                      sample_ids=range(len(encoded)), stop_token=stops or None, top_k=top_k, top_p=top_p,
                                      graphs=cuda_graphs)
    results = []
    for i, p in enumerate(prompts):
        end = min(starts[i] + int(sampled[i].sum()), starts[i] + max_new_tokens)
        ids = out[i, starts[i]:end].tolist()
        results.append({"prompt": p, "ids": ids, "text": tok.decode(ids), "stopped": bool(ids) and ids[-1] in stops})
    return results


def read_prompts(path: str) -> list[str]:
    """The non-blank lines of a ``--prompts-file``, one prompt each."""
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    except OSError as e:  # missing, a directory, unreadable
        raise ValueError(f"--prompts-file {path}: cannot read it: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompts-file {path}: not UTF-8 text ({e.reason})") from None


def _run(args) -> int:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += read_prompts(args.prompts_file)
    results = generate(args.model, prompts, tokenizer=args.tokenizer, chat=args.chat, chat_template=args.chat_template,
                       system=args.system, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, seed=args.seed, device=args.device,
                       cuda_graphs=args.cuda_graphs, prepend_bos=args.prepend_bos)
    for r in results:
        if args.json:
            print(json.dumps(r, ensure_ascii=False))
        else:
            print(f"### {r['prompt']}\n{r['text']}{'' if r['stopped'] else ' [...]'}\n")
    return 0


def register(sub) -> None:
    p = sub.add_parser("generate", help="continuations or chat replies from a checkpoint or HF model",
                       description=__doc__, formatter_class=DefaultsHelp)
    p.add_argument("--model", required=True, help="kdtrain checkpoint or Hugging Face model directory")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="a text file: one prompt per line")
    p.add_argument("--tokenizer", help="default: the HF directory's own, or the checkpoint's data.tokenizer")
    p.add_argument("--chat", action="store_true", help="prompts are user turns, rendered with the chat template")
    p.add_argument("--chat-template", metavar="FILE|plain", help="implies --chat; default: the tokenizer's own")
    p.add_argument("--system", help="with --chat: a system message before each prompt")
    p.add_argument("--prepend-bos", action=argparse.BooleanOptionalAction, default=None,
                   help="start a plain prompt with the BOS id (default: as the tokenizer's convention, which "
                        "is also what preprocess_data.py did unless told otherwise)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="at most this many tokens per prompt (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="draw among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="then among the smallest set holding this mass (1: all)")
    p.add_argument("--seed", type=int, default=0, help="of the sampling draws (default 0)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: GPU when there is one")
    p.add_argument("--cuda-graphs", action="store_true", help="replay each position's forward as one CUDA graph "
                   "(CUDA only)")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt instead of text")
    p.set_defaults(func=_run)
