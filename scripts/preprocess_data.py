"""Tokenize .jsonl/.txt documents into a megatron-core indexed dataset (.bin/.idx/.meta.json).

    python scripts/preprocess_data.py --input corpus.jsonl --tokenizer data/tok.model \
        --output-prefix data/corpus_text_document --workers 2

Demo corpus (built offline from the Python standard library's docstrings, written to
``--demo-corpus-out``, default ``<output-prefix>.jsonl``):

    python scripts/preprocess_data.py --demo-corpus --tokenizer data/demo/tokenizer.model \
        --output-prefix data/demo/demo_text_document

With a Hugging Face teacher, its tokenizer (a tokenizer.json, or the model directory holding it):

    python scripts/preprocess_data.py --input corpus.jsonl --tokenizer hf/Qwen2.5-1.5B \
        --output-prefix data/qwen/text_document --workers 8

A .jsonl input holds one {"text": ...} object per line (see --json-key); a .txt input holds one
document per line, or one per file with --txt-document-per-file; a .parquet input (Hugging Face
datasets) one document per row of its --json-key column. .jsonl and .txt may be .gz or .zst
compressed. Each document ends with the
tokenizer's EOS id unless --no-append-eos.
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
    source.add_argument("--demo-corpus", action="store_true", help="tokenize the stdlib-docstring demo corpus")
    parser.add_argument("--demo-corpus-out", help="where --demo-corpus writes its jsonl")
    parser.add_argument("--tokenizer", required=True,
                        help="sentencepiece .model file, or a Hugging Face tokenizer.json or model directory")
    parser.add_argument("--output-prefix", required=True, help="writes <prefix>.bin, .idx and .meta.json")
    parser.add_argument("--json-key", default="text", help="text field of .jsonl records / text column of .parquet")
    parser.add_argument("--txt-document-per-file", action="store_true", help="a .txt file is one document")
    parser.add_argument("--append-eos", action=argparse.BooleanOptionalAction, default=True,
                        help="end each document with the EOS id (default: on)")
    parser.add_argument("--workers", type=int, default=1, help="encoding processes (order is preserved)")
    args = parser.parse_args(argv)
    if args.demo_corpus_out and not args.demo_corpus:
        parser.error("--demo-corpus-out needs --demo-corpus")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")

    start = time.perf_counter()
    try:
        inputs = args.input
        if args.demo_corpus:
            out = args.demo_corpus_out or f"{args.output_prefix}.jsonl"
            build_demo_corpus(out)
            inputs = [out]
        stats = encode_files(
            inputs, args.tokenizer, args.output_prefix, json_key=args.json_key,
            txt_document_per_file=args.txt_document_per_file, append_eos=args.append_eos, workers=args.workers,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.output_prefix}: {stats['num_documents']} documents, {stats['num_tokens']} tokens, "
          f"{stats['bytes']} bytes ({stats['dtype']}), {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
