"""Several invocations of the torchrun entry points (scripts/*.py) in one torchrun launch.

    torchrun --nproc_per_node=N tests/run_entries.py JOBS.json

JOBS.json: ``{"jobs": [{"script": "pretrain_gpt.py", "args": [...], "log": DIR}, ...]}``. Every
rank runs the jobs in order, each through the script's own ``main(argv)`` (so through
``kdtrain.parallel.run_job``, which tears the process group down at the end of each job; the
next job starts a new one). The first job joins torchrun's store like any launch; each later job
gets a fresh TCPStore that rank 0 hosts on a port the system picks (bound as it is picked, so no
other process can take it), published in torchrun's store; every rank joins it as a client (a
process group re-created on the same store would find the previous group's keys). A job's stdout and stderr
(file descriptors 1 and 2, so native output too) go to ``DIR/rank<r>.out`` and
``DIR/rank<r>.err``, its exit code to ``DIR/rank<r>.rc``. The first job that fails ends the
launch with its exit code; later jobs are not run. What this saves is the ~10 s of imports each
rank pays per process (torch, megatron-core).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _entry(script: str, cache: dict):
    if script not in cache:
        spec = importlib.util.spec_from_file_location(f"entry_{Path(script).stem}", SCRIPTS / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        cache[script] = module.main
    return cache[script]


def _run(main, args: list[str]) -> int:
    try:
        rc = main(args)
    except SystemExit as e:  # argparse
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - reported in the job's stderr file
        traceback.print_exc()
        rc = 1
    return int(rc or 0)


def _fresh_store(index: int, agent_store, hosted: list) -> None:
    """Point env:// at a new store for job ``index``, hosted by rank 0 (kept in ``hosted`` until the
    launch ends, so no rank loses it while finishing a job) and joined by every rank as a client."""
    from torch.distributed import TCPStore

    key = f"run_entries/job{index}/port"
    if int(os.environ["RANK"]) == 0:
        store = TCPStore(os.environ["MASTER_ADDR"], 0, int(os.environ["WORLD_SIZE"]), is_master=True,
                         wait_for_workers=False, timeout=timedelta(seconds=300))
        hosted.append(store)
        agent_store.set(key, str(store.port))
        port = store.port
    else:
        port = int(agent_store.get(key))
    os.environ.update(MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")


def main() -> int:
    jobs = json.loads(Path(sys.argv[1]).read_text())["jobs"]
    rank = int(os.environ.get("RANK", 0))
    entries: dict = {}
    agent_store = None
    hosted: list = []
    for index, job in enumerate(jobs):
        if index > 0 and "MASTER_ADDR" in os.environ:
            if agent_store is None:
                from torch.distributed import TCPStore

                agent_store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                       int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timedelta(seconds=300))
            _fresh_store(index, agent_store, hosted)
        log = Path(job["log"])
        log.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        with open(log / f"rank{rank}.out", "w") as out, open(log / f"rank{rank}.err", "w") as err:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            try:
                rc = _run(_entry(job["script"], entries), job["args"])
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                os.close(saved[0])
                os.close(saved[1])
        (log / f"rank{rank}.rc").write_text(str(rc))
        if rc != 0:
            print(f"rank {rank}: {job['script']} {' '.join(job['args'])} exited {rc}; see {log}", file=sys.stderr)
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
