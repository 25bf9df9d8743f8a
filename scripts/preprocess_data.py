r"""Tokenize .jsonl/.txt documents into a megatron-core indexed dataset (.bin/.idx/.meta.json).

    python scripts/preprocess_data.py --input corpus.jsonl --tokenizer data/tok.model \
        --output-prefix data/corpus_text_document --workers 2

Demo corpus (built offline from the Python standard library's docstrings, written to
``--demo-corpus-out``, default ``<output-prefix>.jsonl``):

    python scripts/preprocess_data.py --demo-corpus --tokenizer data/demo/tokenizer.model \
        --output-prefix data/demo/demo_text_document

With a Hugging Face teacher, its tokenizer (a tokenizer.json, or the model directory holding it):

    python scripts/preprocess_data.py --input corpus.jsonl --tokenizer hf/Qwen2.5-1.5B \
        --output-prefix data/qwen/text_document --workers 8

Conversations (a .jsonl or .parquet of {"messages": [{"role": ..., "content": ...}, ...]} records,
or {"prompt": ..., "completion": ...}), rendered with the tokenizer's chat template; only the
assistant replies are targets of the loss (a loss mask beside the tokens, kdtrain/data/chat.py):

    python scripts/preprocess_data.py --format chat --input chats.jsonl --tokenizer hf/Qwen2.5-1.5B-Instruct \
        --output-prefix data/chat/chat_document --workers 8

Demo conversations (questions about stdlib definitions answered by their docstrings), with the
demo's SentencePiece tokenizer, which has no chat template of its own:

    python scripts/preprocess_data.py --demo-corpus --format chat --chat-template plain \
        --tokenizer data/demo/tokenizer.model --output-prefix data/demo/demo_chat_document

A .jsonl input holds one {"text": ...} object per line (see --json-key); a .txt input holds one
document per line, or one per file with --txt-document-per-file; a .parquet input (Hugging Face
datasets) one document per row of its --json-key column. .jsonl and .txt may be .gz or .zst
compressed. Each text document ends with the
tokenizer's EOS id unless --no-append-eos (conversations only with --append-eos), and starts as the
tokenizer's own convention says (Llama tokenizers: with BOS; GPT-2 / Qwen: without), or as
--prepend-bos / --no-prepend-bos says; so does a plain {"prompt": str, "completion": str} pair (a
chat template writes its own start tokens).
"""

import argparse
import sys
import time
import warnings

from kdtrain.data import build_demo_corpus, encode_files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", metavar="FILE",
                        help=".jsonl / .txt (optionally .gz or .zst) or .parquet files, read in order")
    source.add_argument("--demo-corpus", action="store_true",
                        help="tokenize the stdlib-docstring demo corpus (with --format chat: demo conversations)")
    parser.add_argument("--demo-corpus-out", help="where --demo-corpus writes its jsonl")
    parser.add_argument("--tokenizer", required=True,
                        help="sentencepiece .model file, or a Hugging Face tokenizer.json or model directory")
    parser.add_argument("--output-prefix", required=True, help="writes <prefix>.bin, .idx and .meta.json")
    parser.add_argument("--format", choices=("text", "chat"), default="text",
                        help="text: documents; chat: conversation records, replies as the only targets")
    parser.add_argument("--chat-template", metavar="FILE|plain",
                        help="with --format chat: a Jinja chat template, or 'plain' (User:/Assistant: lines); "
                             "default: the tokenizer's own")
    parser.add_argument("--json-key", help="text field of .jsonl records / text column of .parquet (default: text); "
                                           "with --format chat, the messages field (default: messages)")
    parser.add_argument("--txt-document-per-file", action="store_true", help="a .txt file is one document")
    parser.add_argument("--append-eos", action=argparse.BooleanOptionalAction, default=None,
                        help="end each document with the EOS id (default: on for text, off for conversations, "
                             "which their template delimits)")
    parser.add_argument("--prepend-bos", action=argparse.BooleanOptionalAction, default=None,
                        help="start each text document (and plain prompt/completion pair) with the BOS id "
                             "(default: as the tokenizer's own convention, e.g. yes for Llama tokenizers, no "
                             "for GPT-2 / Qwen)")
    parser.add_argument("--workers", type=int, default=1, help="encoding processes (order is preserved)")
    args = parser.parse_args(argv)
    if args.demo_corpus_out and not args.demo_corpus:
        parser.error("--demo-corpus-out needs --demo-corpus")
    if args.chat_template and args.format != "chat":
        parser.error("--chat-template needs --format chat")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")

    start = time.perf_counter()
    try:
        inputs = args.input
        if args.demo_corpus:
            out = args.demo_corpus_out or f"{args.output_prefix}.jsonl"
            build_demo_corpus(out, conversations=args.format == "chat")
            inputs = [out]
        stats = encode_files(
            inputs, args.tokenizer, args.output_prefix, json_key=args.json_key,
            txt_document_per_file=args.txt_document_per_file, append_eos=args.append_eos,
            prepend_bos=args.prepend_bos, workers=args.workers,
            format=args.format, chat_template=args.chat_template,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    targets = ""
    if stats.get("loss_mask"):
        share = 100 * stats["loss_mask_tokens"] / stats["num_tokens"]
        targets = f", {stats['loss_mask_tokens']} targets ({share:.1f}%)"
    if stats["skipped"]:
        targets += f", {stats['skipped']} conversations without a reply skipped"
    print(f"{args.output_prefix}: {stats['num_documents']} documents, {stats['num_tokens']} tokens{targets}, "
          f"{stats['bytes']} bytes ({stats['dtype']}), {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
