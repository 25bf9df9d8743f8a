"""Offline teacher cache: cache round trip against the live teacher, resumable writing after a
crash, damaged shards and manifest mismatches (CPU; two gloo spawns of ~15 s). The codec's own
round trips: tests/test_cache_codec.py.

Tolerances: ids, tokens, lse and checksums are exact; values are bitwise for fp32 and bf16 (a bf16
cache equals what a live teacher with ``values_dtype: bf16`` sends); fp8 stays within
``codec.fp8_error_bound`` (2^-4 of the distance to the row's top logit + 2^-10 of the row scale).
"""

from __future__ import annotations

import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_spawn
from kdtrain.cache import CacheReader, Manifest
from kdtrain.cache.codec import bytes_per_token, fp8_error_bound
from kdtrain.stream import PayloadSpec, token_checksum

SAMPLES, SHARD, MB = 16, 4, 2  # 4 shards of 2 micro-batches (tiny config: micro_batch_size 2, seq 32, k 16)


# -- the cache job on a tiny teacher (spawned gloo worlds) ---------------------------------------

def _run_cfg(corpus: dict, *extra: str):
    from kdtrain.config.distill import load_distill_config

    return load_distill_config("tiny", [f"data.path=[{corpus['prefix']}]", f"data.tokenizer={corpus['tokenizer']}",
                                        *extra])


def _job(out, dtype: str, **kw):
    from kdtrain.cache.job import CacheJobConfig

    return CacheJobConfig(out=str(out), dtype=dtype, samples=SAMPLES, shard_samples=SHARD, **kw)


def test_automatic_shards_give_every_replica_work(tiny_corpus, tmp_path):
    """A fresh job's shard i is written by replica i % dp: automatic shards of ~256 MiB made a small cache one
    shard, written by replica 0 while the others idled. They now hold at most a replica's share of
    the samples (whole micro-batches); a resumed job keeps the size it started with."""
    from kdtrain.cache.job import CacheJobConfig

    cfg, job = _run_cfg(tiny_corpus), CacheJobConfig(out="unused", samples=100, micro_batch=2)
    record = 1000  # bytes: 268435 samples would fit the automatic size
    assert job.resolve(cfg, record, dp=1) == (100, 100, 2)
    assert job.resolve(cfg, record, dp=4) == (100, 26, 2)  # shards 0..3 of 26 + 22 samples: every replica
    assert job.resolve(cfg, record, dp=4, recorded_shard=100) == (100, 100, 2)
    with pytest.raises(ValueError, match=r"shard_samples: 25 \(the size of the shards the cache in unused was started "
                                         r"with\) is not a multiple of the micro-batch size 2"):
        job.resolve(cfg, record, dp=4, recorded_shard=25)
    assert job.resolve(cfg, 200 << 20, dp=4) == (100, 2, 2)  # the byte target is the smaller bound
    assert CacheJobConfig(out="x", samples=100, micro_batch=2, shard_samples=10).resolve(cfg, record, dp=4)[1] == 10
    # The job's manifest: the data-parallel size of its layout; in a directory holding a cache
    # already, that cache's shard size.
    import torch

    from kdtrain.cache.job import build_manifest

    fresh = CacheJobConfig(out=str(tmp_path / "c"), samples=100, micro_batch=2)
    assert build_manifest(cfg, fresh, torch.float32, {"tp": 1, "pp": 1, "dp": 4}).shard_samples == 26
    (tmp_path / "c").mkdir()
    build_manifest(cfg, fresh, torch.float32, {"tp": 1, "pp": 1, "dp": 1}).save(tmp_path / "c")
    assert build_manifest(cfg, fresh, torch.float32, {"tp": 1, "pp": 1, "dp": 4}).shard_samples == 100
    # A resumed job deals the shards left over all replicas (round robin by shard index gave them
    # all to the replica that had died, and the others waited for it in the final gather).
    from kdtrain.cache.writer import plan_shards

    assert [plan_shards(8, 2, r) for r in (0, 1)] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert [plan_shards(8, 2, r, {0, 2, 4, 6}) for r in (0, 1)] == [[1, 5], [3, 7]]


class _Crash(RuntimeError):
    pass


def _write_caches(rank, world, corpus, chat_corpus, root):
    """One process: fp32 / bf16 / fp8 caches, a crashed-then-resumed cache, the live teacher's payloads."""
    from kdtrain.cache.job import run_cache_job
    from kdtrain.parallel import RoleLayout, build_role_groups
    from kdtrain.training.batches import make_microbatch
    from kdtrain.training.pretrain import open_dataset
    from kdtrain.training.teacher import Teacher

    root = Path(root)
    cfg = _run_cfg(corpus)
    quiet = lambda msg: None  # noqa: E731
    for dtype in ("fp32", "bf16", "fp8"):
        run_cache_job(cfg, _job(root / dtype, dtype), log=quiet)
    # Conversations (the replies are the targets): every position, and the targets only, the
    # latter also after a crash after its first shard.
    chats = _run_cfg(chat_corpus)
    run_cache_job(chats, _job(root / "chat-all", "fp32"), log=quiet)
    run_cache_job(chats, _job(root / "targets", "fp32", positions="targets"), log=quiet)

    def crash_first(i):
        raise _Crash()

    with pytest.raises(_Crash):
        run_cache_job(chats, _job(root / "targets-resumed", "fp32", positions="targets"), on_shard=crash_first,
                      log=quiet)
    summary = run_cache_job(chats, _job(root / "targets-resumed", "fp32", positions="targets"), log=quiet)
    assert summary["shards_reused"] == 1, summary  # the shard written before the crash, not rewritten

    # Crash after two shards; then leave what a SIGKILL mid-write could: a half-written temp file
    # and (worse than any real crash: renames are atomic) a truncated and a corrupted final shard.
    written = []

    def crash_after_two(i):
        written.append(i)
        if len(written) == 2:
            raise _Crash()

    with pytest.raises(_Crash):
        run_cache_job(cfg, _job(root / "resumed", "fp32"), on_shard=crash_after_two, log=quiet)
    res = root / "resumed"
    assert sorted(p.name for p in res.glob("shard_*.bin")) == ["shard_000000.bin", "shard_000001.bin"]
    assert not Manifest.load(res).complete
    (res / ".shard_000002.bin.tmp").write_bytes(b"\0" * 1000)
    (res / "shard_000003.bin").write_bytes((root / "fp32" / "shard_000003.bin").read_bytes()[:5000])
    damaged = bytearray((root / "fp32" / "shard_000001.bin").read_bytes())
    damaged[-7] ^= 0x40
    (res / "shard_000001.bin").write_bytes(bytes(damaged))
    logs = []
    summary = run_cache_job(cfg, _job(res, "fp32"), log=logs.append)
    assert summary["shards_reused"] == 1 and summary["shards_written"] == 3, (summary, logs)

    # The live teacher (same config, seed and weights) on the same micro-batches.
    dataset = open_dataset(cfg.data, cfg.teacher.model)
    groups = build_role_groups(RoleLayout("teacher", 0, 1, 1, 1))
    ref = {}
    for name, vdtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        spec = PayloadSpec(cfg.data.seq_length, MB, cfg.teacher.topk, vdtype)
        teacher = Teacher(cfg.teacher.model, groups, spec, cfg.loss.tau, None, torch.device("cpu"), torch.float32,
                          cfg.training.seed + 1)
        out = []
        for s0 in range(0, SAMPLES, MB):
            mb = make_microbatch(np.stack([dataset.train_sample(g) for g in range(s0, s0 + MB)]), torch.device("cpu"))
            p = teacher.serve(mb)
            assert int(p.checksum) == int(token_checksum(mb.tokens))
            out.append({"ids": p.ids.clone(), "values": p.values.clone(), "tail_lse": p.tail_lse.clone(),
                        "checksum": p.checksum.clone(), "tokens": mb.tokens.clone()})
        ref[name] = out
    torch.save(ref, root / "live.pt")


SLOW_S, TIMEOUT_S = 9.0, 6.0  # _write_dp2: rank 0's manifest and rank 1's last shard take longer than the timeout


def _write_dp2(rank, world, corpus, root):
    """Two replicas write the cache, each wait for the other longer than distributed.timeout_s
    (here the default group's too): rank 0 builds the manifest slowly (as it hashes a large
    teacher's weight files), rank 1 writes its last shard slowly (replicas can differ by a shard)."""
    from datetime import timedelta

    import torch.distributed.distributed_c10d as c10d

    import kdtrain.cache.job as cache_job

    c10d._set_pg_timeout(timedelta(seconds=TIMEOUT_S))
    if rank == 0:
        build = cache_job.build_manifest
        cache_job.build_manifest = lambda *a, **k: (time.sleep(SLOW_S), build(*a, **k))[1]
    last = (SAMPLES // SHARD) - 1

    def slow_last_shard(i):
        if rank == 1 and i == last:
            time.sleep(SLOW_S)

    run_cache_job = cache_job.run_cache_job
    run_cache_job(_run_cfg(corpus, f"distributed.timeout_s={TIMEOUT_S}"), _job(Path(root) / "dp2", "fp32"),
                  on_shard=slow_last_shard, log=lambda msg: None)


@pytest.fixture(scope="module")
def caches(tiny_corpus, tiny_chat_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    run_spawn(1, _write_caches, tiny_corpus, tiny_chat_corpus, str(root), tmp_path=root)
    return {"root": root, "live": torch.load(root / "live.pt"), "corpus": tiny_corpus, "chat": tiny_chat_corpus}


def _spec(dtype, k=16):
    return PayloadSpec(32, MB, k, dtype)


@pytest.mark.slow
def test_cache_returns_the_live_teachers_payload_bitwise(caches):
    live = caches["live"]
    for cache, spec_dtype, ref in (("fp32", torch.float32, "fp32"), ("bf16", torch.bfloat16, "bf16"),
                                   ("fp32", torch.bfloat16, "bf16")):
        with CacheReader(caches["root"] / cache) as reader:
            for j, want in enumerate(live[ref]):
                p = reader.payload(list(range(j * MB, (j + 1) * MB)), _spec(spec_dtype))
                assert p.values.dtype == spec_dtype and p.ids.dtype == torch.int32
                assert torch.equal(p.ids, want["ids"]) and torch.equal(p.tail_lse, want["tail_lse"]), (cache, j)
                assert torch.equal(p.values, want["values"]), (cache, j)
                assert int(p.checksum) == int(want["checksum"]) == int(token_checksum(want["tokens"]))
                assert torch.equal(reader.tokens(range(j * MB, (j + 1) * MB)), want["tokens"])


@pytest.mark.slow
def test_fp8_cache_is_within_the_documented_bound_and_smaller_k_is_a_prefix(caches):
    live = caches["live"]["fp32"]
    with CacheReader(caches["root"] / "fp8") as fp8, CacheReader(caches["root"] / "fp32") as fp32:
        for j, want in enumerate(live):
            ids = list(range(j * MB, (j + 1) * MB))
            p = fp8.payload(ids, _spec(torch.float32))
            assert torch.equal(p.ids, want["ids"]) and torch.equal(p.tail_lse, want["tail_lse"])
            assert bool(((p.values - want["values"]).abs() <= fp8_error_bound(want["values"])).all())
            q = fp32.payload(ids, _spec(torch.float32, k=5))
            assert torch.equal(q.ids, want["ids"][..., :5]) and torch.equal(q.values, want["values"][..., :5])
    for dtype in ("fp32", "fp8"):  # header + records (checksum, lse, 16 9-bit ids, values, 9-bit tokens, pad)
        per_token = bytes_per_token(512, 16, dtype, seq_length=32)  # + a crc32 per record
        assert per_token == {"fp32": 87.5, "fp8": 47.5}[dtype]
        assert (caches["root"] / dtype / "shard_000000.bin").stat().st_size == 64 + SHARD * (32 * per_token + 4)


@pytest.mark.slow
@pytest.mark.parametrize("name,resumed", [("fp32", "resumed"), ("targets", "targets-resumed")])
def test_killed_job_resumes_to_a_byte_identical_cache(caches, name, resumed):
    root = caches["root"]
    names = sorted(p.name for p in (root / name).iterdir())
    assert names == sorted(p.name for p in (root / resumed).iterdir())  # no temp files left
    for f in names:
        assert (root / name / f).read_bytes() == (root / resumed / f).read_bytes(), f


@pytest.mark.slow
def test_targets_cache_serves_the_targets_and_is_smaller(caches):
    """positions: targets on conversations: at every target position (the replies) the payload is
    the all-positions cache's (the same ids; values and tail log-mass to fp32 rounding, as the
    teacher computes the targets' logits alone); the prompts are not stored."""
    from kdtrain.training.pretrain import open_dataset

    cfg = _run_cfg(caches["chat"])
    ds = open_dataset(cfg.data, cfg.teacher.model)
    with CacheReader(caches["root"] / "chat-all") as full, CacheReader(caches["root"] / "targets") as part:
        part.check(cfg)
        assert part.manifest.positions == "targets" and part.index.record_bytes == 0
        targets = 0
        for j in range(0, SAMPLES, MB):
            ids = list(range(j, j + MB))
            a, b = full.payload(ids, _spec(torch.float32)), part.payload(ids, _spec(torch.float32))
            m = torch.stack([torch.from_numpy(ds.train_loss_mask(g)) for g in ids]).t()
            targets += int(m.sum())
            assert torch.equal(a.ids[m], b.ids[m]), j
            for name in ("values", "tail_lse"):  # the targets' logits come from a smaller matrix product
                torch.testing.assert_close(getattr(a, name)[m], getattr(b, name)[m], rtol=1e-6, atol=1e-6,
                                           msg=lambda e: f"{j} {name}: {e}")
            assert int(a.checksum) == int(b.checksum)
    size = {n: sum(s.bytes for s in Manifest.load(caches["root"] / n).shards) for n in ("chat-all", "targets")}
    share = targets / (SAMPLES * 32)
    assert 0.1 < share < 0.9 and size["targets"] < (share + 0.2) * size["chat-all"], (share, size)
    with pytest.raises(ValueError, match="data.loss_mask mismatch"):
        CacheReader(caches["root"] / "targets").check(_run_cfg(caches["chat"], "data.loss_mask=false"))
    with pytest.raises(ValueError, match="dataset mismatch"):
        CacheReader(caches["root"] / "targets").check(_run_cfg(caches["chat"], "data.packing=documents"))
    with pytest.raises(ValueError, match="dataset mismatch"):  # the teacher attended across documents
        CacheReader(caches["root"] / "targets").check(_run_cfg(caches["chat"], "data.attention=documents"))


@pytest.mark.slow
def test_two_replicas_write_the_same_cache(caches, tmp_path):
    """Also across waits longer than distributed.timeout_s for a rank working alone (_write_dp2):
    they are bounded by distributed.idle_timeout_s."""
    root = caches["root"]
    run_spawn(2, _write_dp2, caches["corpus"], str(root), tmp_path=tmp_path)
    a, b = Manifest.load(root / "fp32"), Manifest.load(root / "dp2")
    assert a.identity() == b.identity() and b.job["dp"] == 2 and b.complete
    for s in a.shards:
        assert (root / "fp32" / s.file).read_bytes() == (root / "dp2" / s.file).read_bytes(), s.file


# -- damage and mismatches ---------------------------------------------------------------------

def _copy(caches, tmp_path, name="fp32") -> Path:
    dst = tmp_path / name
    shutil.copytree(caches["root"] / name, dst)
    return dst


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "header"])
@pytest.mark.parametrize("name", ["fp32", "targets"])
def test_damaged_shard_is_a_value_error_naming_the_file(caches, tmp_path, damage, name):
    path = _copy(caches, tmp_path, name)
    shard = path / "shard_000002.bin"
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        shard.write_bytes(bytes(data[:-100]))
    elif damage == "flip":  # in the record of sample 8, the first one read below
        data[64 + 40] ^= 1
        shard.write_bytes(bytes(data))
    elif damage == "header":
        data[20] ^= 1
        shard.write_bytes(bytes(data))
    else:
        shard.unlink()
    with CacheReader(path) as reader:
        reader.payload([0, 1], _spec(torch.float32))  # other shards still read
        with pytest.raises(ValueError, match=re.escape(str(shard)) + (".*sample 8" if damage == "flip" else "")):
            reader.payload([2 * SHARD, 2 * SHARD + 1], _spec(torch.float32))
        with pytest.raises(ValueError, match="shard_000002.bin"):
            reader.verify()


# -- integrity checks proportional to what is read ---------------------------------------------


@pytest.mark.slow
def test_incomplete_cache_and_bad_requests_are_refused(caches, tmp_path):
    path = _copy(caches, tmp_path)
    m = Manifest.load(path)
    Manifest(**{**m.__dict__, "complete": False, "shards": []}).save(path)
    with pytest.raises(ValueError, match="incomplete"):
        CacheReader(path)
    with CacheReader(caches["root"] / "fp32") as reader:
        with pytest.raises(ValueError, match="not cached"):
            reader.payload([SAMPLES, SAMPLES + 1], _spec(torch.float32))
        with pytest.raises(ValueError, match="top-32 requested"):
            reader.payload([0, 1], _spec(torch.float32, k=32))
        assert reader.covers(range(SAMPLES)) and not reader.covers([SAMPLES])
    with pytest.raises(ValueError, match="not a teacher cache"):
        CacheReader(tmp_path)
    for text, says in (("[1, 2]", "a JSON object was expected, got list"), ("{", "Expecting property name")):
        (path / "manifest.json").write_text(text)  # an AttributeError from deep in the loader before
        with pytest.raises(ValueError, match=f"cache manifest .* is corrupt: {says}"):
            CacheReader(path)


@pytest.mark.slow
@pytest.mark.parametrize("override,field", [
    ("teacher.topk=32", "k mismatch"), ("data.seed=7", "dataset mismatch"), ("loss.tau=1.0", "tau mismatch"),
    ("data.seq_length=16", "seq_length mismatch"), ("teacher.model=demo-teacher", "vocab_size mismatch"),
    ("teacher.model={two_layers}", "teacher mismatch")])
def test_manifest_mismatch_names_the_field(caches, tmp_path, override, field):
    from kdtrain.config.loader import CONFIG_DIR

    two_layers = tmp_path / "tiny2.yaml"
    two_layers.write_text((CONFIG_DIR / "models" / "tiny.yaml").read_text().replace("num_layers: 4", "num_layers: 2"))
    reader = CacheReader(caches["root"] / "fp32")
    reader.check(_run_cfg(caches["corpus"]))
    reader.check(_run_cfg(caches["corpus"], "teacher.topk=8"))  # a smaller k is the cached top-k's prefix
    with pytest.raises(ValueError, match=field):
        reader.check(_run_cfg(caches["corpus"], override.format(two_layers=two_layers)))


@pytest.mark.slow
def test_other_dataset_and_tokenizer_are_mismatches(caches, tmp_path):
    corpus = caches["corpus"]
    other = tmp_path / "other"
    for ext in ("bin", "idx", "meta.json"):
        shutil.copy(f"{corpus['prefix']}.{ext}", f"{other}.{ext}")
    reader = CacheReader(caches["root"] / "fp32")
    reader.check(_run_cfg(corpus, f"data.path=[{other}]"))  # same files elsewhere: the same dataset
    with open(f"{other}.idx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="dataset mismatch"):
        reader.check(_run_cfg(corpus, f"data.path=[{other}]"))
    tok = tmp_path / "tok.model"
    tok.write_bytes(Path(corpus["tokenizer"]).read_bytes() + b"\0")
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        reader.check(_run_cfg(corpus, f"data.tokenizer={tok}"))


def _corpus_hashes(monkeypatch) -> list[str]:
    """Names of the corpus files (.idx, loss masks) kdtrain.cache.manifest hashes from now on, in a
    process that has hashed none yet."""
    from kdtrain.cache import manifest as mf

    hashed, sha256_file = [], mf.sha256_file

    def counting(path, h=None):
        if str(path).endswith((".idx", ".loss_mask.bin")):
            hashed.append(Path(path).name)
        return sha256_file(path, h)

    monkeypatch.setattr(mf, "sha256_file", counting)
    monkeypatch.setattr(mf, "_DIGESTS", {}, raising=False)  # digests this process already took
    return hashed


@pytest.mark.slow
def test_check_reads_no_corpus_file_the_cache_recorded(caches, tmp_path, monkeypatch):
    """reader.check runs on every rank of a run: hashing each .idx and loss mask there (GBs at
    scale) would read them once per rank. A file whose size and mtime are the ones the cache job
    recorded is taken for the one it hashed; other files are hashed once per process; a changed
    file is still a mismatch."""
    corpus, chat, root = caches["corpus"], caches["chat"], caches["root"]
    hashed = _corpus_hashes(monkeypatch)
    for _ in range(2):  # a mixed run's rank 0 checks twice
        CacheReader(root / "fp32").check(_run_cfg(corpus))
        CacheReader(root / "targets").check(_run_cfg(chat))
        CacheReader(root / "targets").check(_run_cfg(chat), live_teacher_dtype="float32")
    assert hashed == []
    # The corpus copied elsewhere: preserving mtimes (rsync -a, cp -p), nothing is read; else each
    # file is hashed once per process, however often the cache is checked.
    kept, copied = tmp_path / "kept", tmp_path / "copied"
    for ext in ("bin", "idx", "meta.json", "loss_mask.bin"):
        if Path(f"{chat['prefix']}.{ext}").is_file():
            shutil.copy2(f"{chat['prefix']}.{ext}", f"{kept}.{ext}")
            shutil.copy(f"{chat['prefix']}.{ext}", f"{copied}.{ext}")
    for prefix in (kept, copied, copied):
        CacheReader(root / "targets").check(_run_cfg(chat, f"data.path=[{prefix}]"))
    assert sorted(hashed) == ["copied.idx", "copied.loss_mask.bin"]
    with open(f"{copied}.loss_mask.bin", "r+b") as f:  # same size, other targets
        first = f.read(1)[0]
        f.seek(0)
        f.write(bytes([first ^ 1]))
    with pytest.raises(ValueError, match="dataset mismatch"):
        CacheReader(root / "targets").check(_run_cfg(chat, f"data.path=[{copied}]"))
    # A manifest without sizes and mtimes (older caches) is checked by hashing, as before.
    old = _copy(caches, tmp_path / "old")
    m = Manifest.load(old)
    Manifest(**{**m.__dict__, "dataset": {**m.dataset, "prefixes": [
        {k: v for k, v in p.items() if k != "idx_stat"} for p in m.dataset["prefixes"]]}}).save(old)
    assert Manifest.load(old).identity() == m.identity()  # sizes and mtimes are not the cache's content
    hashed.clear()
    monkeypatch.setattr("kdtrain.cache.manifest._DIGESTS", {})
    CacheReader(old).check(_run_cfg(corpus))
    assert hashed == ["text.idx"]


@pytest.mark.slow
def test_a_mixed_runs_live_teacher_must_be_the_cached_one(caches):
    """Mixed runs serve some steps live: a seeded random live teacher of another seed would mix two
    teachers' payloads (the caches here are of the tiny config's random teacher, seed 1234 + 1)."""
    reader = CacheReader(caches["root"] / "fp32")
    reader.check(_run_cfg(caches["corpus"]), live_teacher_dtype="float32")
    with pytest.raises(ValueError, match=r"teacher mismatch: .*random weights of seed 1235, .*random weights of seed 8"):
        reader.check(_run_cfg(caches["corpus"], "training.seed=7"), live_teacher_dtype="float32")


@pytest.mark.slow
def test_a_mixed_runs_live_teacher_computes_at_the_caches_precision(world_of_one, caches):
    """The fp32 caches here were written by a teacher computing in fp32: a mixed run whose live
    teacher computes in bf16 would mix two precisions' payloads."""
    from kdtrain.training.teacher_source import open_cache

    mixed = _run_cfg(caches["corpus"], "teacher.source=mixed", f"teacher.cache={caches['root'] / 'fp32'}",
                     "teacher.live_fraction=0.5")
    assert open_cache(mixed, 0, torch.float32, None) is not None
    with pytest.raises(ValueError, match=r"precision\.dtype: the live teacher of this mixed run computes in "
                                         r"bfloat16, .* in float32.*precision\.dtype=fp32"):
        open_cache(mixed, 0, torch.bfloat16, None)
    # A run on the cache alone has no live teacher to disagree.
    cached = _run_cfg(caches["corpus"], "teacher.source=cache", f"teacher.cache={caches['root'] / 'fp32'}",
                      "training.train_steps=2")  # the steps the cache covers
    assert open_cache(cached, 0, torch.bfloat16, None) is not None


def test_a_run_records_the_teacher_of_its_cache(caches):
    """A cache or mixed run's checkpoints record the cache's teacher (its checkpoint and the hash
    of its weights, which a resume compares), where the payloads come from and their precision."""
    from kdtrain.config import to_dict
    from kdtrain.training.teacher_source import teacher_record

    online = _run_cfg(caches["corpus"], "teacher.values_dtype=bf16").teacher
    assert teacher_record(online, None) == {
        "teacher": to_dict(online.model), "teacher_load": None, "teacher_weights_sha256": None,
        "teacher_source": "online", "teacher_values_dtype": "bf16"}
    reader = CacheReader(caches["root"] / "fp8")
    reader.manifest.teacher = {**reader.manifest.teacher, "load": "/ckpts/teacher", "weights_sha256": "ab" * 32}
    cached = _run_cfg(caches["corpus"], "teacher.source=cache", f"teacher.cache={reader.path}").teacher
    assert teacher_record(cached, reader) == {
        "teacher": to_dict(cached.model), "teacher_load": "/ckpts/teacher", "teacher_weights_sha256": "ab" * 32,
        "teacher_weights_hash": "stream", "teacher_source": "cache", "teacher_values_dtype": "fp8"}
    mixed = _run_cfg(caches["corpus"], "teacher.source=mixed", f"teacher.cache={reader.path}",
                     "teacher.load=/mnt/teacher", "teacher.random_init=false").teacher
    assert teacher_record(mixed, reader)["teacher_values_dtype"] == "fp8 cached, fp32 live"
    assert teacher_record(mixed, reader)["teacher_load"] == "/mnt/teacher"


def test_caching_needs_teacher_weights_whatever_the_source_says(world_of_one, tiny_corpus, tmp_path):
    """The config a student reads the cache with (source: cache, no teacher weights) is refused by
    the job that writes the cache: it would otherwise cache a randomly initialised teacher."""
    from kdtrain.cache.job import run_cache_job

    run = _run_cfg(tiny_corpus, "teacher.random_init=false", "teacher.source=cache", f"teacher.cache={tmp_path}")
    with pytest.raises(ValueError, match=r"teacher\.load: a teacher needs weights"):
        run_cache_job(run, _job(tmp_path / "cache", "fp32"))
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_resume_into_a_directory_of_another_cache_is_refused(caches):
    from kdtrain.cache.job import build_manifest
    from kdtrain.cache.writer import prepare

    m = build_manifest(_run_cfg(caches["corpus"], "teacher.topk=8"), _job(caches["root"] / "fp32", "fp32"),
                       torch.float32, {})
    with pytest.raises(ValueError, match="cache.out: .* holds a cache of a different job \\(k differs"):
        prepare(caches["root"] / "fp32", m)


def test_a_directory_of_other_files_is_not_a_cache_out(caches, tmp_path):
    """cache.out naming a checkpoint directory (or any directory of other files) would mix the
    cache's files into it: refused; an empty directory is taken."""
    from kdtrain.cache.job import build_manifest
    from kdtrain.cache.writer import prepare

    m = build_manifest(_run_cfg(caches["corpus"]), _job(tmp_path / "ck", "fp32"), torch.float32, {})
    (tmp_path / "ck" / "step_0000002").mkdir(parents=True)
    (tmp_path / "ck" / "latest").write_text("step_0000002")
    with pytest.raises(ValueError, match=r"cache\.out: .*ck is not empty and holds no cache \(latest, "
                                         r"step_0000002\); choose an empty or new directory"):
        prepare(tmp_path / "ck", m)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".manifest.json.tmp").write_text("{")  # a job killed writing its first manifest
    prepare(tmp_path / "empty", m)
    assert (tmp_path / "empty" / "manifest.json").is_file()


@pytest.mark.slow
def test_a_rerun_that_would_shrink_a_cache_is_refused(caches, tmp_path):
    """Rerunning the job without its ``--samples`` (the default is smaller) would have been taken
    for a resume and deleted the shards beyond; a file where the directory should be is named."""
    from kdtrain.cache.job import build_manifest
    from kdtrain.cache.writer import prepare

    root = caches["root"] / "fp32"
    shards = sorted(p.name for p in root.glob("shard_*.bin"))
    job = _job(root, "fp32")
    job.samples = SHARD
    small = build_manifest(_run_cfg(caches["corpus"]), job, torch.float32, {})
    with pytest.raises(ValueError, match=rf"holds a cache of {SAMPLES} samples and this job writes {SHARD}.*"
                                         rf"cache\.samples={SAMPLES}"):
        prepare(root, small)
    assert sorted(p.name for p in root.glob("shard_*.bin")) == shards and len(shards) > 1
    assert CacheReader(root).manifest.complete
    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match="cache.out: cannot create the directory"):
        prepare(tmp_path / "afile", small)


# -- prefetch ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_prefetch_serves_in_order_skips_and_falls_back(caches):
    live = caches["live"]["fp32"]
    spec = _spec(torch.float32)
    mbs = [list(range(j * MB, (j + 1) * MB)) for j in range(SAMPLES // MB)]
    with CacheReader(caches["root"] / "fp32", depth=2) as reader:
        reader.prefetch(mbs, spec)
        for j in (0, 1, 3, 4, 7):  # 2, 5 and 6 are skipped: dropped, never served late
            p = reader.payload(mbs[j], spec)
            assert torch.equal(p.ids, live[j]["ids"]) and torch.equal(p.values, live[j]["values"])
        assert reader.pending() == 0
    with CacheReader(caches["root"] / "fp32", depth=2) as reader:
        # Skipping results the worker already holds while it waits for room (depth reached): the
        # skip frees the room and must wake the worker, else both threads wait forever.
        reader.prefetch(mbs, spec)
        deadline = time.monotonic() + 60
        while len(reader._done) < reader.depth and time.monotonic() < deadline:  # the worker is full
            time.sleep(0.01)
        got = []
        consumer = threading.Thread(target=lambda: got.append(reader.payload(mbs[3], spec)), daemon=True)
        consumer.start()
        consumer.join(60)
        assert not consumer.is_alive(), "payload() of a micro-batch behind skipped, finished ones never returned"
        assert torch.equal(got[0].ids, live[3]["ids"])
        p = reader.payload(mbs[2], spec)  # not announced (any more): decoded synchronously
        assert torch.equal(p.tail_lse, live[2]["tail_lse"])
        reader.prefetch(mbs[:3], spec)
        reader.cancel()
        assert reader.pending() == 0
        reader.prefetch([[SAMPLES, SAMPLES + 1]], spec)  # errors surface in payload(), in the consumer
        with pytest.raises(ValueError, match="not cached"):
            reader.payload([SAMPLES, SAMPLES + 1], spec)


@pytest.mark.slow
def test_sigkilled_cache_job_restarts_to_an_identical_cache(tmp_path):
    """scripts/cache_teacher.py killed with SIGKILL once it has written a few shards, rerun with the
    same command: the cache equals an uninterrupted one byte for byte."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO

    def cmd(out):  # the demo teacher's shape (random weights) over mock tokens: a few seconds, 32 shards
        return [sys.executable, str(REPO / "scripts" / "cache_teacher.py"), "--config", "tiny", "--out", str(out),
                "--samples", "256", "cache.shard_samples=8", "cache.dtype=bf16", "teacher.model=demo-teacher",
                "student.model=demo-student", "data.mock=true", "data.path=[]", "data.seq_length=128"]

    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    # The uninterrupted job runs alongside the killed one and its restart (one thread each).
    uninterrupted = subprocess.Popen(cmd(whole), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        proc = subprocess.Popen(cmd(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 240
        while proc.poll() is None and time.time() < deadline and len(list(killed.glob("shard_*.bin"))) < 3:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL, "the job finished before it could be killed"
        assert not Manifest.load(killed).complete
        restart = subprocess.run(cmd(killed), env=env, check=True, capture_output=True, text=True, timeout=300)
        out, _ = uninterrupted.communicate(timeout=300)
    finally:
        if uninterrupted.poll() is None:
            uninterrupted.kill()
            uninterrupted.wait()
    assert uninterrupted.returncode == 0, out[-3000:]
    # The restart kept the shards complete before the kill (at least the 3 waited for).
    reused = re.search(r"(\d+) shards already complete", restart.stdout)
    assert reused and int(reused.group(1)) >= 3, restart.stdout[-2000:]
    names = sorted(p.name for p in whole.iterdir())
    assert names == sorted(p.name for p in killed.iterdir())  # no temp files left behind
    for name in names:
        assert (whole / name).read_bytes() == (killed / name).read_bytes(), name
