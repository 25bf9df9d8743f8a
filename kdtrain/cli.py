"""The ``kdtrain`` command.

    kdtrain info                      versions, devices and optional accelerators
    kdtrain model llama-3.2-1b --tp 2 parameter count, padded vocab and FLOPs of a model config
    kdtrain convert hf-to-kdtrain --hf DIR --out DIR   Hugging Face model -> kdtrain checkpoint (and back:
    kdtrain convert kdtrain-to-hf --ckpt DIR --out DIR  see kdtrain/convert/cli.py)
    kdtrain prune --src TEACHER --out DIR --num-layers N [--ffn-hidden-size F ... --data PREFIX]
                                      a student pruned from the teacher (see kdtrain/prune/cli.py)
    kdtrain generate --model CKPT [--chat] --prompt TEXT   continuations or chat replies from a
                                      checkpoint or HF model (see kdtrain/generate/cli.py)
    kdtrain eval --model CKPT... --data PREFIX --seq-length N   held-out losses, replies and prompts
                                      apart (see kdtrain/evaluate/cli.py)
    kdtrain plan --teacher T --student S --world-size N --seq-len S --global-batch B
                                      ranked teacher/student splits (see kdtrain/planner/cli.py)
    kdtrain calibrate --out FILE      measure this device into a planner profile
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows an option's default unless it is None or False (a flag) or the help already says
    what it is; a description (a module docstring) keeps its lines."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def nearest_existing(path: str | os.PathLike) -> Path:
    """``path`` or its nearest ancestor that exists (where creating ``path`` would start)."""
    p = Path(path)
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def missing(path: str | os.PathLike) -> str:
    """``path`` for a "does not exist" message: a relative one with the directory it is relative to
    (configs name paths from the repository root; a run started elsewhere does not find them)."""
    return str(path) if os.path.isabs(path) else f"{path} (relative to the working directory {os.getcwd()})"


def check_out_dir(out: str | os.PathLike, flag: str = "--out") -> None:
    """``out`` is a directory, or one that can be created: not a file, not below one, and its
    nearest existing ancestor writable. Checked before any weights are read; nothing is created."""
    path = Path(out)
    try:
        if path.exists() and not path.is_dir():
            raise ValueError(f"{flag} {out}: exists and is not a directory")
        above = nearest_existing(path)
        if not above.is_dir():
            raise ValueError(f"{flag} {out}: cannot create the directory, {above} is not a directory")
    except OSError as e:  # a name over the file system's limit (ENAMETOOLONG), a path too deep, ...
        raise ValueError(f"{flag} {out}: {e.strerror or e}") from None
    if not os.access(above, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {out}: cannot write there, {above} is not writable")


def check_out_file(out: str | os.PathLike, flag: str = "--out", what: str = "file") -> None:
    """A ``what`` can be written at ``out``: not a directory, its folder one that exists or can be
    created (not below a file) and writable. Checked before the work that produces it; nothing is
    created."""
    p = Path(out)
    try:
        if p.is_dir():
            raise ValueError(f"{flag} {out}: is a directory (name the {what} to write)")
        above = nearest_existing(p.parent)
        if not above.is_dir():
            raise ValueError(f"{flag} {out}: cannot create its directory, {above} is not a directory")
        target = p if p.exists() else above
    except OSError as e:  # as in check_out_dir
        raise ValueError(f"{flag} {out}: {e.strerror or e}") from None
    if not os.access(target, os.W_OK):
        raise ValueError(f"{flag} {out}: cannot write there, {target} is not writable")


def _info(args) -> int:
    import torch

    import kdtrain

    print(f"kdtrain {kdtrain.__version__}")
    print(f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}")
    try:
        from .te_guard import guard_transformer_engine

        guard_transformer_engine()
        from megatron.core import package_info

        print(f"megatron-core {package_info.__version__}")
    except ImportError:
        print("megatron-core: not installed")
    for name in ("transformer_engine", "apex", "wandb"):
        print(f"{name}: {'available' if importlib.util.find_spec(name) else 'not installed'}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"cuda:{i} {torch.cuda.get_device_name(i)}")
    return 0


def _model(args) -> int:
    from kdtrain.config import load_model_config

    m = load_model_config(args.name)
    for flag, value in (("--tp", args.tp), ("--pp", args.pp), ("--seq-len", args.seq_len)):
        if value < 1:
            raise ValueError(f"{flag}: must be >= 1, got {value}")
    try:
        m.check_layout(args.tp, args.pp, "")
    except ValueError as e:  # "tp: 3 does not divide ..."
        raise ValueError(f"--{e}") from None
    print(f"{m.name}: {m.num_params() / 1e6:.2f}M parameters ({m.num_params(include_embedding=False) / 1e6:.2f}M "
          f"without input embeddings), {m.num_layers} layers, hidden {m.hidden_size}")
    print(f"vocab {m.vocab_size} -> padded {m.padded_vocab_size(args.tp)} for tp={args.tp}")
    print(f"training FLOPs/token at seq {args.seq_len}: {m.flops_per_token(args.seq_len) / 1e9:.3f} GFLOP")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kdtrain", description="knowledge distillation of megatron-core GPTs")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and optional accelerators").set_defaults(func=_info)
    p = sub.add_parser("model", help="size and FLOPs of a model config", formatter_class=DefaultsHelp)
    p.add_argument("name", help="name under configs/models/ or a YAML path")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (the padded vocab; default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages (layers per stage; default 1)")
    p.add_argument("--seq-len", type=int, default=2048, help="sequence length of the FLOPs per token (default 2048)")
    p.set_defaults(func=_model)
    from kdtrain.convert.cli import register as register_convert

    register_convert(sub)
    from kdtrain.prune.cli import register as register_prune

    register_prune(sub)
    from kdtrain.generate.cli import register as register_generate

    register_generate(sub)
    from kdtrain.evaluate.cli import register as register_eval

    register_eval(sub)
    from kdtrain.planner.cli import register as register_planner

    register_planner(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
