"""Shared fixtures: a small tokenised corpus built once per session, and torchrun launchers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def sigkill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (a node going down). torchrun starts each worker
    in a session of its own, so killing torchrun's process group leaves the workers running."""
    import signal

    signal_tree(pid, signal.SIGKILL)


def signal_tree(pid: int, sig: int) -> None:
    """Send ``sig`` to a process and all its descendants, the process first (as Slurm signals
    every process of a job step: torchrun and, in their own sessions, its workers)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # "pid (comm) state ppid ..."
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in tree:  # the launcher first: it must not see its workers die and act on it
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def run_bounded(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)``, except
    that a timeout kills the whole process tree: ``subprocess.run`` kills the child alone, and
    torchrun's workers (sessions of their own) would go on running, and writing, after the test."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        sigkill_tree(proc.pid)
        out, err = proc.communicate(timeout=30)  # a descendant that escaped the kill holds the pipes
        raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_torchrun(nproc: int, script: str, args: list[str], timeout: float = 300, check: bool = True,
                 env: dict | None = None) -> subprocess.CompletedProcess:
    """Launch ``scripts/<script>`` under torchrun on CPU (gloo) and wait, bounded in time."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--standalone", str(REPO / "scripts" / script), *args]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    full_env.update(env or {})
    proc = run_bounded(cmd, timeout, cwd=REPO, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def run_entries(nproc: int, jobs: list[tuple[str, list[str]]], workdir: Path, timeout: float = 600,
                last_fails: bool = False) -> list[dict]:
    """Run ``jobs`` ((script, args) pairs) one after another in a single torchrun launch of
    ``nproc`` ranks (tests/run_entries.py); each job goes through the script's ``main``. Returns,
    per job, its stdout and stderr (ranks concatenated in rank order). A failing job fails here,
    with its output, except the last one when ``last_fails``: a job that is meant to fail (a user
    error) ends the launch like a launch of its own, and its result also carries ``returncode``
    (the launch's exit status) with torchrun's stderr appended to its own."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    logs = [workdir / f"job{i}" for i in range(len(jobs))]
    spec = {"jobs": [{"script": script, "args": list(args), "log": str(log)} for (script, args), log in zip(jobs, logs)]}
    (workdir / "jobs.json").write_text(json.dumps(spec, indent=1))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
           str(REPO / "tests" / "run_entries.py"), str(workdir / "jobs.json")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    proc = run_bounded(cmd, timeout, cwd=REPO, env=env)

    def read(log: Path, ext: str) -> str:
        return "".join((log / f"rank{r}.{ext}").read_text() for r in range(nproc) if (log / f"rank{r}.{ext}").is_file())

    results = [{"stdout": read(log, "out"), "stderr": read(log, "err"),
                "rc": [(log / f"rank{r}.rc").read_text() for r in range(nproc) if (log / f"rank{r}.rc").is_file()]}
               for log in logs]
    must_pass = results[:-1] if last_fails else results
    failed = [(job, res) for job, res in zip(jobs, must_pass) if res["rc"] != ["0"] * nproc]
    if failed or (proc.returncode != 0 and not last_fails):
        detail = "".join(f"\n--- {script} {' '.join(args)}: rc {res['rc']}\n{res['stdout'][-2000:]}\n{res['stderr'][-6000:]}"
                         for (script, args), res in failed[:1])
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}{detail}\n--- launcher stderr\n{proc.stderr[-3000:]}")
    if last_fails:
        results[-1]["returncode"] = proc.returncode
        results[-1]["stderr"] += proc.stderr
    return results


def small_gpt(kind: str, vocab_size: int, num_layers: int = 2, pp: int = 1):
    """An fp32 CPU GPT of 64 hidden units in one of three shapes: ``llama`` (GQA, SwiGLU,
    rotary), ``qwen3`` (also per-head query/key norms, head_dim 24, tied embeddings) or ``gpt2``
    (LayerNorm, GELU, learned positions, biases, tied embeddings); with ``pp`` > 1 this rank's
    pipeline stage (a world of ``pp`` ranks; the same weights as the whole model)."""
    import torch

    from kdtrain.config import ModelConfig
    from kdtrain.models import build_gpt
    from kdtrain.parallel import RoleLayout, build_role_groups

    common = dict(name=kind, num_layers=num_layers, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96,
                  vocab_size=vocab_size, max_seq_length=64, init_std=0.1)
    cfg = {"llama": ModelConfig(**common, num_query_groups=2),
           "qwen3": ModelConfig(**common, num_query_groups=2, kv_channels=24, qk_layernorm=True, tie_embeddings=True),
           "gpt2": ModelConfig(**common, normalization="layernorm", activation="gelu_tanh",
                               position_embedding="learned", add_bias_linear=True, tie_embeddings=True)}[kind]
    cfg.check()
    return build_gpt(cfg, build_role_groups(RoleLayout("m", 0, 1, pp, 1)), device=torch.device("cpu"),
                     dtype=torch.float32, seed=0)


def read_metrics(run_dir: Path, kind: str = "train") -> dict[int, dict]:
    """metrics.jsonl -> {step: record}; a re-run step (after a resume) keeps its last record."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == kind:
            out[rec["step"]] = rec
    return out


def one_rank_role(model_name: str, dtype=None, seed: int = 3):
    """(config, groups, trainable role) of a shipped model config on one rank (a gloo world of one)."""
    import torch

    from kdtrain.config import OptimizerConfig, load_model_config
    from kdtrain.parallel import RoleLayout, build_role_groups
    from kdtrain.training.pretrain import build_trainable

    cfg = load_model_config(model_name)
    groups = build_role_groups(RoleLayout("model", 0, 1, 1, 1))
    role = build_trainable(cfg, groups, OptimizerConfig(), seq_length=16, micro_batch=1,
                           device=torch.device("cpu"), dtype=dtype or torch.float32, seed=seed)
    return cfg, groups, role


def save_one_rank_role(root, step, role, groups, cfg):
    """A checkpoint of a one-rank role at ``step`` under ``root``."""
    from kdtrain.config import to_dict
    from kdtrain.training.checkpoint import save_checkpoint

    meta = {"model": to_dict(cfg), "layout": {"tp": 1, "pp": 1, "dp": 1, "rank_offset": 0}}
    return save_checkpoint(root, step, role.params, role.optimizer, 0, groups.role_group, 0, meta, keep=3)


def pretend_transformer_engine(monkeypatch) -> None:
    """Make ``build_gpt`` see Transformer Engine as importable (its default picks TE layers then),
    with building its layers an error: a tool that must run on kdtrain's local layers passes
    ``use_te=False`` and never gets there."""
    import kdtrain.models.gpt as gpt

    def no_te_layers(*args, **kwargs):
        raise AssertionError("Transformer Engine layers were built")

    monkeypatch.setattr(gpt, "transformer_engine_available", lambda device: True)
    monkeypatch.setattr(gpt, "get_gpt_layer_with_transformer_engine_spec", no_te_layers)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> dict:
    """Demo-corpus slice -> 512-id tokenizer -> indexed dataset (about 1 s to build)."""
    from kdtrain.data import build_demo_corpus, train_tokenizer
    from kdtrain.data.preprocess import encode_files

    root = tmp_path_factory.mktemp("corpus")
    corpus = root / "corpus.jsonl"
    build_demo_corpus(str(corpus), max_documents=120)
    model = train_tokenizer([str(corpus)], str(root / "tok"), vocab_size=512)
    prefix = str(root / "text")
    encode_files([str(corpus)], model, prefix)
    return {"dir": root, "tokenizer": model, "prefix": prefix, "corpus": corpus}


@pytest.fixture(scope="session")
def tiny_chat_corpus(tiny_corpus) -> dict:
    """Demo conversations in the tiny tokenizer (plain template): a corpus with a loss mask, the
    replies (about 40% of the tokens) its targets."""
    from kdtrain.data import build_demo_corpus
    from kdtrain.data.preprocess import encode_files

    chats = tiny_corpus["dir"] / "chats.jsonl"
    build_demo_corpus(str(chats), max_documents=60, conversations=True)
    prefix = str(tiny_corpus["dir"] / "chat")
    encode_files([str(chats)], tiny_corpus["tokenizer"], prefix, format="chat", chat_template="plain")
    return dict(tiny_corpus, prefix=prefix, corpus=chats)


@pytest.fixture(scope="session")
def short_chat_corpus(tmp_path_factory) -> str:
    """400 random conversations of 8-40 tokens in the tiny 512-id vocabulary (a prompt, then a
    reply ending in the EOS id 0, the reply the target): most 32-token windows hold a document
    start with a reply after it (attention within documents). Returns the prefix."""
    import numpy as np

    from kdtrain.data import write_indexed_dataset

    prefix = tmp_path_factory.mktemp("short-chats") / "chats"
    rng = np.random.default_rng(0)
    docs = []
    for n in rng.integers(8, 41, size=400):
        prompt = int(rng.integers(2, n - 2))
        docs.append((np.append(rng.integers(1, 512, n - 1), 0), np.arange(n) >= prompt))
    write_indexed_dataset(str(prefix), docs, 512, {"eos_id": 0})
    return str(prefix)


def _spawn_entry(rank, world, init_file, fn, args):
    import torch
    import torch.distributed as dist

    from kdtrain.parallel import shutdown_distributed

    # One thread per process, as torchrun's OMP_NUM_THREADS=1 gives the launched tests: several
    # processes each running a thread per core oversubscribe the cores, and every collective then
    # waits for a descheduled peer.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        shutdown_distributed()  # gloo's threads end before the interpreter does


def run_spawn(world: int, fn, *args, tmp_path: Path) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` gloo processes (for collective unit tests)."""
    import torch.multiprocessing as mp

    init_file = tmp_path / f"pg_init_{os.getpid()}_{id(fn)}"
    mp.start_processes(_spawn_entry, args=(world, str(init_file), fn, args), nprocs=world, start_method="spawn")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict:
    """A small demo corpus (JSONL) and a SentencePiece tokenizer trained on it."""
    from kdtrain.data import build_demo_corpus, train_tokenizer

    root = tmp_path_factory.mktemp("data")
    path = root / "corpus.jsonl"
    stats = build_demo_corpus(str(path), max_documents=40)
    model = train_tokenizer([str(path)], str(root / "tok"), vocab_size=320)
    return {"root": root, "jsonl": path, "stats": stats, "model": model}


@pytest.fixture(scope="module")
def world_of_one():
    """A one-process gloo world inside the test process. Rendezvous through an in-process store,
    not environment variables (subprocesses and spawned workers of the tests do not inherit it) nor
    a port (which another process could take between picking and binding it)."""
    import torch.distributed as dist

    from kdtrain.parallel import shutdown_distributed

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        shutdown_distributed()


def routing_channels(max_world: int):
    """(world, teacher layout, student layout, channel) for every colocated pair of (tp, pp, dp)
    layouts of 1..``max_world`` ranks, the channel built for routing only (no messages; a
    2 * lcm(dp) micro-batch step). Needs a process group (``world_of_one``)."""
    import math

    import torch

    from kdtrain.parallel import RoleLayout
    from kdtrain.stream import Pairing, PayloadSpec
    from kdtrain.stream.channel import PayloadChannel

    spec = PayloadSpec(seq_length=4, micro_batch=1, k=2, values_dtype=torch.float32)
    for world in range(1, max_world + 1):
        layouts = [(tp, pp, world // (tp * pp)) for tp in range(1, world + 1) for pp in range(1, world + 1)
                   if world % (tp * pp) == 0]
        for t in layouts:
            for s in layouts:
                n = 2 * math.lcm(t[2], s[2])
                yield world, t, s, PayloadChannel(Pairing(n, t[2], s[2]), RoleLayout("teacher", 0, *t),
                                                  RoleLayout("student", 0, *s), spec, None, torch.device("cpu"), 1.0,
                                                  None, None, connect=False)


def count_shard_opens(m, opened: list) -> None:
    """Record (in ``opened``) the name of every shard file that ``torch.load`` reads."""
    import torch

    real = torch.load

    def load(f, *a, **k):
        if os.path.basename(os.path.dirname(f)) == "shards":
            opened.append(os.path.basename(f))
        return real(f, *a, **k)

    m.setattr(torch, "load", load)


def drop_shard_index(step_dir) -> None:
    """Make ``step_dir`` a checkpoint as written before meta.json held the shard index."""
    meta = json.loads((step_dir / "meta.json").read_text())
    del meta["shard_index"]
    (step_dir / "meta.json").write_text(json.dumps(meta))


def replica_microbatches(step: int, global_batch: int, micro_batch: int, dp_rank: int, dp: int, sample, targets,
                         device) -> list:
    """Data-parallel replica ``dp_rank``'s micro-batches of global batch ``step``: the tokens
    ``sample(j)`` and target flags ``targets(j)`` of its share of the batch's sample ids."""
    import numpy as np

    from kdtrain.training.batches import make_microbatch, replica_sample_ids

    ids = replica_sample_ids(step * global_batch, global_batch, dp_rank, dp)
    return [make_microbatch(np.stack([sample(j) for j in chunk]), device, np.stack([targets(j) for j in chunk]))
            for chunk in (ids[i:i + micro_batch] for i in range(0, len(ids), micro_batch))]
