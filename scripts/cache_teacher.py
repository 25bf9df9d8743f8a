r"""Run a distillation run's teacher once over its training samples and cache its top-k payload
(the demo config's teacher is the one ``bash scripts/quickstart.sh`` trains).

    torchrun --standalone --nproc_per_node=2 scripts/cache_teacher.py --config configs/distill/demo.yaml \
        --out cache/demo cache.dtype=bf16

    # teacher TP=2 x DP=2 on 4 ranks, first 8192 samples, fp8 values, 512-sample shards
    torchrun --standalone --nproc_per_node=4 scripts/cache_teacher.py --config configs/distill/demo.yaml \
        --out cache/demo-fp8 --samples 8192 teacher.tp=2 cache.dtype=fp8 cache.shard_samples=512

Only the teacher role is built, over all ranks (``teacher.tp`` x ``teacher.pp`` x dp = world size);
the student and split sections are ignored. By default the cache covers what the run consumes,
``training.train_steps * training.global_batch_size`` samples. A killed job, restarted with the
same command, keeps its complete shards and rewrites the rest. Options ``cache.*``: ``dtype``
(fp32 | bf16 | fp16 | fp8), ``samples``, ``shard_samples`` (0 = ~256 MiB shards, at most a replica's
share), ``micro_batch``, ``positions`` (all | targets: on conversations, store the replies' positions
only); any other ``section.field=value`` overrides the distillation config. See docs/offline-cache.md.

    # conversations: the teacher's output at the replies only
    torchrun --standalone --nproc_per_node=2 scripts/cache_teacher.py --config configs/distill/demo.yaml \
        --out cache/chat "data.path=[data/demo/demo_chat_document]" cache.positions=targets
"""

import argparse
import os
import sys

from kdtrain.cache.job import load_cache_job_config, run_cache_job
from kdtrain.config.distill import load_distill_config
from kdtrain.parallel import run_job


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="distillation run YAML (path or name under configs/distill/)")
    parser.add_argument("--out", help="cache directory (cache.out=...; this flag wins over it)")
    parser.add_argument("--samples", type=int,
                        help="number of training samples to cache (cache.samples=...; this flag wins over it)")
    parser.add_argument("overrides", nargs="*", help="cache.field=value and section.field=value overrides")
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after the options
    cache_over = [o for o in args.overrides if o.lstrip("-").startswith("cache.")]
    run_over = [o for o in args.overrides if o not in cache_over]
    log = (lambda msg: print(msg, flush=True)) if int(os.environ.get("RANK", 0)) == 0 else (lambda msg: None)

    def job():
        cache_job = load_cache_job_config(cache_over, out=args.out, samples=args.samples)
        run_cache_job(load_distill_config(args.config, run_over), cache_job, log=log)

    return run_job(job)


if __name__ == "__main__":
    sys.exit(main())
