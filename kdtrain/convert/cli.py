"""``kdtrain convert``: Hugging Face <-> kdtrain checkpoints.

    kdtrain convert hf-to-kdtrain --hf DIR --out DIR [--name NAME] [--vocab-size N] [--shard-gb 2]
    kdtrain convert kdtrain-to-hf --ckpt DIR [--model CFG] --out DIR [--arch llama|qwen2|qwen3|gpt2] [--dtype ...]
        [--tokenizer auto|none|PATH] [--shard-gb 5]

A run can also load a Hugging Face directory directly (``teacher.load: DIR``, ``model: DIR``).
"""

from __future__ import annotations

from ..cli import DefaultsHelp, check_out_dir


def _hf_to_kdtrain(args) -> int:
    from .hf_import import import_hf

    check_out_dir(args.out)
    cfg, step_dir = import_hf(args.hf, args.out, args.name, args.vocab_size, _shard_bytes(args))
    print(f"{cfg.name}: {cfg.num_params() / 1e6:.2f}M parameters -> checkpoint {step_dir}")
    print(f"model config: {args.out}/model.yaml  (use teacher.load={args.out} teacher.model={args.out}/model.yaml)")
    return 0


def _kdtrain_to_hf(args) -> int:
    from .hf_export import export_hf

    check_out_dir(args.out)
    tokenizer = None if args.tokenizer == "none" else args.tokenizer
    out = export_hf(args.ckpt, args.out, args.model, args.arch, args.dtype, tokenizer, _shard_bytes(args))
    tok = ("and the tokenizer (tokenizer.json)" if (out / "tokenizer.json").is_file() else
           "(no tokenizer, as --tokenizer none asked)" if tokenizer is None else
           "(no tokenizer: none recorded, or it could not be written, as warned above; pass --tokenizer)")
    print(f"wrote {out}/config.json and the weights (*.safetensors) {tok}")
    return 0


def _shard_bytes(args) -> int:
    if args.shard_gb <= 0:
        raise ValueError(f"--shard-gb must be positive, got {args.shard_gb}")
    return int(args.shard_gb * 10**9)


def register(subparsers) -> None:
    """Add ``convert hf-to-kdtrain`` and ``convert kdtrain-to-hf`` to the ``kdtrain`` command."""
    p = subparsers.add_parser("convert", help="Hugging Face <-> kdtrain checkpoints")
    sub = p.add_subparsers(dest="convert_command", required=True)
    a = sub.add_parser("hf-to-kdtrain", help="HF safetensors model dir -> kdtrain checkpoint + model YAML",
                       formatter_class=DefaultsHelp)
    a.add_argument("--hf", required=True, help="HF model directory (config.json + *.safetensors)")
    a.add_argument("--out", required=True, help="output checkpoint directory (gets latest, step_0000000, model.yaml)")
    a.add_argument("--name", default=None, help="model name (default: the HF directory's name)")
    a.add_argument("--vocab-size", type=int, default=None,
                   help="keep only the first N vocabulary rows (tokenizer size, when the HF table is padded)")
    a.add_argument("--shard-gb", type=float, default=2.0,
                   help="size of each checkpoint shard file (host memory needed is about one shard)")
    a.set_defaults(func=_hf_to_kdtrain)
    b = sub.add_parser("kdtrain-to-hf", help="kdtrain checkpoint -> HF model dir (config.json + model.safetensors)",
                       formatter_class=DefaultsHelp)
    b.add_argument("--ckpt", required=True, help="checkpoint directory (its latest step) or a step_N directory")
    b.add_argument("--model", default=None, help="model config (name or YAML); default: the one the checkpoint records")
    b.add_argument("--out", required=True, help="output HF model directory")
    b.add_argument("--arch", default=None, choices=["llama", "qwen2", "qwen3", "gpt2"],
                   help="HF architecture (default: derived from the model config)")
    b.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="weights' dtype; auto: the precision the run trained in (the master weights rounded "
                        "to it), an imported checkpoint's source dtype, else fp32")
    b.add_argument("--tokenizer", default="auto",
                   help="tokenizer to write into --out: a Hugging Face tokenizer.json or its directory, or a "
                        "SentencePiece .model (written as tokenizer.json); auto: the run's data.tokenizer (else "
                        "its corpora's) or an imported model's; none: no tokenizer")
    b.add_argument("--shard-gb", type=float, default=5.0,
                   help="split the weights into safetensors files of about this size (with an index)")
    b.set_defaults(func=_kdtrain_to_hf)
