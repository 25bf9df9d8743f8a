r"""Train a byte-fallback SentencePiece tokenizer on .jsonl/.txt/.parquet files (or on the demo corpus).

    python scripts/train_tokenizer.py --input corpus.jsonl --output-prefix data/tok --vocab-size 4096

Demo corpus (built offline from the Python standard library's docstrings, written to
``--demo-corpus-out``, default ``<output-prefix>.corpus.jsonl``):

    python scripts/train_tokenizer.py --demo-corpus --demo-corpus-out data/demo/corpus.jsonl \
        --output-prefix data/demo/tokenizer --vocab-size 4096

Writes ``<output-prefix>.model`` and ``<output-prefix>.vocab``.
"""

import argparse
import sys
import time

from kdtrain.data import Tokenizer, build_demo_corpus, train_tokenizer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", metavar="FILE",
                        help=".jsonl (with --json-key), .txt (either optionally .gz/.zst) or .parquet files")
    source.add_argument("--demo-corpus", action="store_true", help="train on the stdlib-docstring demo corpus")
    parser.add_argument("--demo-corpus-out", help="where --demo-corpus writes its jsonl")
    parser.add_argument("--output-prefix", required=True, help="writes <prefix>.model and <prefix>.vocab")
    parser.add_argument("--vocab-size", type=int, required=True, help="ids in the tokenizer (the model's vocab_size)")
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe",
                        help="sentencepiece's algorithm (default bpe)")
    parser.add_argument("--json-key", default="text", help="text field of .jsonl records / text column of .parquet")
    parser.add_argument("--max-sentences", type=int, default=2_000_000, help="use at most this many lines")
    args = parser.parse_args(argv)
    if args.demo_corpus_out and not args.demo_corpus:
        parser.error("--demo-corpus-out needs --demo-corpus")

    start = time.perf_counter()
    try:
        inputs = args.input
        if args.demo_corpus:
            out = args.demo_corpus_out or f"{args.output_prefix}.corpus.jsonl"
            stats = build_demo_corpus(out)
            print(f"demo corpus {out}: {stats['documents']} documents, {stats['characters']} characters")
            inputs = [out]
        model = train_tokenizer(
            inputs, args.output_prefix, args.vocab_size, model_type=args.model_type,
            json_key=args.json_key, max_sentences=args.max_sentences,
        )
        tok = Tokenizer(model)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"tokenizer {model}: vocab_size={tok.vocab_size} eos_id={tok.eos_id} fingerprint={tok.fingerprint} "
          f"({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
