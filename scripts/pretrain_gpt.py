"""Pretrain a GPT with tensor, pipeline and data parallelism (torchrun; gloo on CPU, NCCL on GPU).

    torchrun --nproc_per_node=4 scripts/pretrain_gpt.py --config configs/pretrain/demo.yaml \
        parallel.tp=2 parallel.pp=2 training.train_steps=50

Any config field can be overridden as ``section.field=value`` after the options.
Single process: ``python scripts/pretrain_gpt.py --config configs/pretrain/demo.yaml``.
"""

import argparse
import os
import sys

from kdtrain.config import load_pretrain_config
from kdtrain.parallel import shutdown_distributed
from kdtrain.training.pretrain import pretrain


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run YAML (path or name under configs/pretrain/)")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_pretrain_config(args.config, args.overrides)
        pretrain(cfg)
    except ValueError as e:
        rank = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
        print(f"{rank}error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
