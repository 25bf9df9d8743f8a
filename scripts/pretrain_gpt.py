r"""Pretrain a GPT with tensor, pipeline and data parallelism (torchrun; gloo on CPU, NCCL on GPU).

    torchrun --nproc_per_node=4 scripts/pretrain_gpt.py --config configs/pretrain/demo.yaml \
        parallel.tp=2 parallel.pp=2 training.train_steps=50 \
        logging.dir=runs/demo-tp2-pp2 checkpoint.dir=checkpoints/demo-tp2-pp2

Any config field can be overridden as ``section.field=value`` after the options. A
``checkpoint.dir`` that holds a run's checkpoints resumes that run: a new run needs its own.
Single process: ``python scripts/pretrain_gpt.py --config configs/pretrain/demo.yaml
logging.dir=runs/demo-1proc checkpoint.dir=checkpoints/demo-1proc``.
"""

import argparse
import sys

from kdtrain.config import load_pretrain_config
from kdtrain.parallel import run_job
from kdtrain.training.pretrain import pretrain


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run YAML (path or name under configs/pretrain/)")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides")
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after the options
    return run_job(lambda: pretrain(load_pretrain_config(args.config, args.overrides)))


if __name__ == "__main__":
    sys.exit(main())
