r"""Distil a teacher GPT into a student GPT (torchrun; gloo on CPU, NCCL on GPU). The demo config's
teacher and data are the ones ``bash scripts/quickstart.sh`` builds.

    torchrun --nproc_per_node=2 scripts/distill_gpt.py --config configs/distill/demo.yaml \
        logging.dir=runs/demo-distill-2 checkpoint.dir=checkpoints/demo-distill-2

    # disaggregated: teacher TP=2 on ranks 0-1, student DP=2 on ranks 2-3
    torchrun --nproc_per_node=4 scripts/distill_gpt.py --config configs/distill/demo.yaml \
        split.mode=disaggregated split.teacher_ranks=2 teacher.tp=2 \
        logging.dir=runs/demo-disagg checkpoint.dir=checkpoints/demo-disagg

Any config field can be overridden as ``section.field=value`` after the options. A
``checkpoint.dir`` that holds a run's checkpoints resumes that run: a new run needs its own.
"""

import argparse
import sys

from kdtrain.config.distill import load_distill_config
from kdtrain.parallel import run_job
from kdtrain.stream.channel import StreamError
from kdtrain.training.distill import distill


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run YAML (path or name under configs/distill/)")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides")
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after the options
    return run_job(lambda: distill(load_distill_config(args.config, args.overrides)), errors=(ValueError, StreamError))


if __name__ == "__main__":
    sys.exit(main())
