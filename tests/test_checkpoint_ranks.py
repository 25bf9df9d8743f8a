"""Checkpoints written and read by several ranks: the replicas' shares of a save (whole
parameters balanced over the replicas, or with the distributed optimizer each replica's chunk of
the flat parameter order), what each loading rank opens and reads, and a rank that fails to load
its part stopping every rank of its role."""

import json

import pytest
import torch

from conftest import count_shard_opens, drop_shard_index


def _build_dp(dp: int, seed: int, distributed: bool = False, dtype: torch.dtype = torch.bfloat16,
              timeout_s=None):
    """The tiny model on ``dp`` data-parallel replicas (the world's first ``dp`` ranks)."""
    from kdtrain.config import OptimizerConfig, load_model_config
    from kdtrain.parallel import RoleLayout, build_role_groups
    from kdtrain.training.pretrain import build_trainable

    cfg = load_model_config("tiny")
    groups = build_role_groups(RoleLayout("model", 0, 1, 1, dp), timeout_s=timeout_s)
    role = build_trainable(cfg, groups, OptimizerConfig(distributed=distributed), seq_length=16, micro_batch=1,
                           device=torch.device("cpu"), dtype=dtype, seed=seed)
    return cfg, role


def _train(role, steps: int) -> None:
    """``steps`` updates with the same gradients on every replica (what DDP's all-reduce gives; a
    sharded optimizer's reduced chunk is then that chunk of them)."""
    import torch.distributed as dist

    for step in range(steps):
        for i, (_, p) in enumerate(role.params):
            gen = torch.Generator().manual_seed(1000 * step + i)
            p.main_grad.copy_(0.01 * torch.randn(p.shape, generator=gen, dtype=torch.float32))
        if role.grads.sharded:
            r, chunk = dist.get_rank(role.grads.shard_group), role.grads.chunk
            role.grads.shard.copy_(role.grads.data[r * chunk: (r + 1) * chunk])
        role.optimizer.step(1e-2)


def _state_of(role) -> dict:
    """Every parameter, and the fp32 master, Adam moments and step count of this rank's shares of
    them (flat elements ``start:stop``, all of a parameter unless the optimizer is sharded)."""
    out = {f"param/{spec.global_name}": (p.detach().clone(), None) for spec, p in role.params}
    for s in role.optimizer.owned:
        st = role.optimizer.opt.state[s.master]
        share = (s.start, s.stop)
        out[f"master/{s.spec.global_name}"] = (s.master.detach().reshape(-1).clone(), share)
        out.update({f"{k}/{s.spec.global_name}": (st[k].detach().reshape(-1).clone(), share)
                    for k in ("exp_avg", "exp_avg_sq")})
        out[f"step/{s.spec.global_name}"] = (st["step"].detach().clone(), None)
    return out


def _assert_same_state(got: dict, want: dict) -> None:
    """Every entry of ``got`` (a replica holds a share of the optimizer state under ZeRO-1) equals
    the same elements of ``want``'s, bit for bit; every parameter is there."""
    assert {k for k in want if k.startswith("param/")} <= set(got)
    for k, (v, share) in got.items():
        w, whole = want[k]
        assert whole in (None, (0, w.numel())), (k, whole)  # ``want``: unsharded
        if share is not None:
            w = w.reshape(-1)[share[0]: share[1]]
        assert v.dtype == w.dtype and torch.equal(v, w), k


_DP_RUN = {"kind": "pretrain", "global_batch_size": 8, "data": {}}


def _dp_save_and_reload(rank, world, tmp, sharded):
    from pathlib import Path

    from kdtrain.config import CheckpointConfig
    from kdtrain.training.optimizer import assign_owners
    from kdtrain.training.pretrain import restore_role, save_role

    cfg, role = _build_dp(world, seed=3, distributed=sharded)
    _train(role, 2)
    ck = CheckpointConfig(dir=str(Path(tmp) / "ck"), keep=1)
    save_role(ck, cfg, role, 2, _DP_RUN)
    saved = _state_of(role)
    if sharded:  # each replica's share of the state is the unsharded optimizer's, bit for bit
        _, ref = _build_dp(world, seed=3)
        _train(ref, 2)
        saved = _state_of(ref)
        _assert_same_state(_state_of(role), saved)
    if rank == 0:
        torch.save(saved, Path(tmp) / "saved.pt")
    # Back into the same replicas, and into ZeRO-1 shares of them.
    for distributed, seed in ((False, 5), (True, 7)):
        opened, reads = [], set()
        with pytest.MonkeyPatch.context() as m:
            count_shard_opens(m, opened)
            _count_reads(m, reads)
            _, other = _build_dp(world, seed=seed, distributed=distributed)
            assert restore_role(ck, cfg, other, rank, _DP_RUN).step == 2
        _assert_same_state(_state_of(other), saved)
        if not distributed:  # the replicas hold the same state: each read a share of it, then sent it
            owners = assign_owners([p.numel() for _, p in other.params], world)
            assert reads == {spec.global_name for (spec, _), o in zip(other.params, owners) if o == rank}
        if sharded and distributed:  # the same chunks: each replica reads its own file alone
            assert opened == [f"rank{rank:05d}.pt"], (rank, opened)
        if distributed:  # this replica's share: half the elements, also of a parameter cut in two
            held = sum(s.stop - s.start for s in other.optimizer.owned)
            assert held == other.grads.shard_range[1] - other.grads.shard_range[0]
            assert abs(held - sum(p.numel() for _, p in other.params) / world) <= 1
            assert any(not s.whole for s in other.optimizer.owned)
    # Weights alone (checkpoint.load) into bf16 replicas with fp32 masters: each reads a share, and
    # every replica's masters get the stored fp32 values (rounded weights would be other masters).
    reads = set()
    with pytest.MonkeyPatch.context() as m:
        _count_reads(m, reads)
        _, other = _build_dp(world, seed=9, distributed=sharded)
        assert restore_role(CheckpointConfig(load=str(Path(tmp) / "ck")), cfg, other, rank, _DP_RUN).step == 0
    owners = assign_owners([p.numel() for _, p in other.params], world)
    assert reads == {spec.global_name for (spec, _), o in zip(other.params, owners) if o == rank}
    for s in other.optimizer.owned:
        want = saved[f"master/{s.spec.global_name}"][0].reshape(-1)[s.start:s.stop]
        assert torch.equal(s.master.reshape(-1), want), s.spec.global_name
        assert torch.equal(s.param, saved[f"param/{s.spec.global_name}"][0]), s.spec.global_name


def _count_reads(m, reads: set) -> None:
    """Record (in ``reads``) the name of every parameter a CheckpointReader reads a value of."""
    from kdtrain.training.checkpoint import CheckpointReader

    real = CheckpointReader.read_into

    def read_into(self, spec, key, out, **kw):
        reads.add(spec.global_name)
        return real(self, spec, key, out, **kw)

    m.setattr(CheckpointReader, "read_into", read_into)


@pytest.mark.parametrize("sharded", [False, True], ids=["replicas", "zero1"])
def test_data_parallel_replicas_share_the_writing_of_a_checkpoint(world_of_one, tmp_path, sharded):
    """Without ZeRO-1 every replica holds the whole model and optimizer state, and data-parallel
    rank 0 alone wrote it (an 8B student at DP=8: one process buffering and writing 112 GB while
    the others waited at a barrier bounded by the job's timeout). The replicas now write balanced
    shares; a checkpoint loads the same whoever wrote each piece: into 1 rank, into 2 replicas,
    into ZeRO-1. With ZeRO-1 each replica writes its chunk of the flat parameter order (pieces
    holding flat parts of a parameter); it loads the same ways."""
    from conftest import run_spawn
    from kdtrain.config import CheckpointConfig
    from kdtrain.training.pretrain import restore_role

    run_spawn(2, _dp_save_and_reload, str(tmp_path), sharded, tmp_path=tmp_path)
    meta = json.loads((tmp_path / "ck" / "step_0000002" / "meta.json").read_text())
    flat = [h["flat"] for pieces in meta["shard_index"].values() for h in pieces.values() if "flat" in h]
    assert bool(flat) == sharded  # a parameter cut between the two replicas' chunks
    assert meta["version"] == (2 if sharded else 1)  # format 1 unless a piece is flat: older readers read it
    for f in (tmp_path / "ck" / "step_0000002" / "shards").glob("*.pt"):
        stored = torch.load(f, weights_only=True)
        assert stored["version"] == meta["version"]
        for name, piece in stored["pieces"].items():  # each value holds its own elements only, not
            for key, t in piece.items():              # the whole flat master it is a share of
                if isinstance(t, torch.Tensor):
                    assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), (f.name, name, key)
    shards = sorted((tmp_path / "ck" / "step_0000002" / "shards").glob("*.pt"))
    assert [f.name for f in shards] == ["rank00000.pt", "rank00001.pt"]
    sizes = [f.stat().st_size for f in shards]
    assert max(sizes) < 1.1 * min(sizes), sizes

    cfg, role = _build_dp(1, seed=9)
    assert restore_role(CheckpointConfig(dir=str(tmp_path / "ck")), cfg, role, 0, _DP_RUN).step == 2
    _assert_same_state(_state_of(role), torch.load(tmp_path / "saved.pt"))


def _resume_damaged_chunk(rank, world, tmp, damage):
    import torch.distributed as dist
    from pathlib import Path

    from kdtrain.config import CheckpointConfig
    from kdtrain.training.pretrain import restore_role, save_role

    cfg, role = _build_dp(world, seed=3, distributed=True)
    _train(role, 1)
    ck = CheckpointConfig(dir=str(Path(tmp) / "ck"), keep=1)
    save_role(ck, cfg, role, 1, _DP_RUN)
    step = Path(tmp) / "ck" / "step_0000001"
    if rank == 0 and damage == "rng":  # rank 1's random states: no size is recorded for them
        (step / "rng" / "rank00001.pt").write_bytes(b"not a torch file")
    elif rank == 0:  # rank 1's file loses a piece; the file's size is recorded anew, the index still lists it
        f = step / "shards" / "rank00001.pt"
        stored = torch.load(f, weights_only=True)
        stored["pieces"].pop(sorted(stored["pieces"])[0])
        torch.save(stored, f)
        meta = json.loads((step / "meta.json").read_text())
        meta["shard_bytes"][f.name] = f.stat().st_size
        (step / "meta.json").write_text(json.dumps(meta))
    dist.barrier()
    _, other = _build_dp(world, seed=5, distributed=True, timeout_s=60)
    with pytest.raises(ValueError) as e:
        restore_role(ck, cfg, other, rank, _DP_RUN)
    (Path(tmp) / f"error{rank}.txt").write_text(str(e.value))


@pytest.mark.parametrize("damage", ["chunk", "rng"])
def test_a_chunk_that_fails_to_load_stops_every_replica(world_of_one, tmp_path, damage):
    """Resuming a distributed optimizer, each replica reads its own chunk (here its own file) and
    its random states, then all of them all-gather the parameters: a replica whose file is damaged
    raised alone and the other waited in the all-gather (or in the gather of which ranks had random
    states) until the job's timeout. Every replica now raises, the others naming the rank that
    failed and its error."""
    from conftest import run_spawn

    run_spawn(2, _resume_damaged_chunk, str(tmp_path), damage, tmp_path=tmp_path)
    own, other = ((tmp_path / f"error{r}.txt").read_text() for r in (1, 0))
    assert ("rank00001.pt, which has none" if damage == "chunk" else
            "cannot restore the random states of rank 1 from") in own, own
    if damage == "rng":  # not torch's advice to load it with weights_only=False
        assert "the file is damaged or not a kdtrain random-state file" in own and "weights_only" not in own, own
    assert other.startswith("rank 1 of model could not load its part of checkpoint ") and own in other, other
    assert "step_0000001" in other.split(":")[0], other


def _teacher_with_a_damaged_slice(rank, world, tmp):
    import torch.distributed as dist
    from pathlib import Path

    from kdtrain.config import CheckpointConfig, OptimizerConfig, load_model_config
    from kdtrain.parallel import RoleLayout, build_role_groups
    from kdtrain.stream import PayloadSpec
    from kdtrain.training.pretrain import build_trainable, save_role
    from kdtrain.training.teacher import Teacher

    cfg = load_model_config("tiny")
    groups = build_role_groups(RoleLayout("teacher", 0, 2, 1, 1), timeout_s=60)
    role = build_trainable(cfg, groups, OptimizerConfig(), 16, 1, torch.device("cpu"), torch.float32, seed=3)
    save_role(CheckpointConfig(dir=str(Path(tmp) / "ck"), keep=1), cfg, role, 1, _DP_RUN)
    step = Path(tmp) / "ck" / "step_0000001"
    if rank == 0:  # tensor rank 1's file loses its slice of one weight (the index still lists it)
        f = step / "shards" / "rank00001.pt"
        stored = torch.load(f, weights_only=True)
        stored["pieces"].pop("decoder.layers.0.mlp.linear_fc1.weight")
        torch.save(stored, f)
        meta = json.loads((step / "meta.json").read_text())
        meta["shard_bytes"][f.name] = f.stat().st_size
        (step / "meta.json").write_text(json.dumps(meta))
    dist.barrier()
    with pytest.raises(ValueError) as e:
        Teacher(cfg, groups, PayloadSpec(16, 1, 4, torch.float32), 1.0, str(Path(tmp) / "ck"), torch.device("cpu"),
                torch.float32, seed=1)
    (Path(tmp) / f"error{rank}.txt").write_text(str(e.value))


def test_a_teacher_rank_that_fails_to_load_stops_the_others(world_of_one, tmp_path):
    """A teacher's tensor ranks each read their own slices: the rank whose file is damaged raised
    and the other went on alone (to wait in the first payload exchange until the job's timeout).
    Both now raise, the other naming the rank that failed and its error."""
    from conftest import run_spawn

    run_spawn(2, _teacher_with_a_damaged_slice, str(tmp_path), tmp_path=tmp_path)
    own, other = ((tmp_path / f"error{r}.txt").read_text() for r in (1, 0))
    assert "decoder.layers.0.mlp.linear_fc1.weight in shard rank00001.pt, which has none" in own, own
    assert other.startswith("rank 1 of teacher could not load its part of teacher.load ") and own in other, other


def test_a_bf16_checkpoint_stores_and_reads_each_value_once(world_of_one, tmp_path, monkeypatch):
    """The bf16 parameter was saved beside its fp32 master (2 of 14 bytes per parameter), though
    every reader takes the master; a resume read every master twice. Now the pieces hold the
    master and the moments only, the weights' readers (whole model, export) convert the master,
    a resume reads each stored value once, and a checkpoint that holds the parameters too loads
    as before."""
    import kdtrain.training.checkpoint as ckpt
    from kdtrain.config import CheckpointConfig
    from kdtrain.convert.sources import open_checkpoint, read_global
    from kdtrain.training.checkpoint import STATE_KEYS, CheckpointReader
    from kdtrain.training.checkpoint_load import load_whole_model
    from kdtrain.training.pretrain import restore_role, save_role

    cfg, role = _build_dp(1, seed=3)
    _train(role, 1)
    ck = CheckpointConfig(dir=str(tmp_path / "ck"), keep=1)
    save_role(ck, cfg, role, 1, _DP_RUN)
    want, numel = _state_of(role), sum(p.numel() for _, p in role.params)
    shard = tmp_path / "ck" / "step_0000001" / "shards" / "rank00000.pt"
    pieces = torch.load(shard, weights_only=True)["pieces"]
    assert len(pieces) == len(role.params)
    assert all("param" not in pc and pc["master"].dtype == torch.float32 for pc in pieces.values())
    size = shard.stat().st_size
    assert size < 12.2 * numel, size / numel  # fp32 master and two moments

    def check_readers(path):
        _, whole = load_whole_model(path, torch.device("cpu"), torch.bfloat16, "model")
        for n, p in whole.named_parameters():
            assert torch.equal(p, want[f"param/{whole.param_specs[n].global_name}"][0]), n
        reader = open_checkpoint(path)  # what the export reads
        for spec, _ in role.params:
            assert torch.equal(read_global(reader, cfg, spec.global_name).reshape(-1), want[f"master/{spec.global_name}"][0])
        reads = []
        read_into = CheckpointReader.read_into

        def counted(self, spec, key, out):
            reads.append((spec.global_name, key))
            return read_into(self, spec, key, out)

        with monkeypatch.context() as m:
            m.setattr(ckpt.CheckpointReader, "read_into", counted)
            _, resumed = _build_dp(1, seed=5)
            assert restore_role(ck, cfg, resumed, 0, _DP_RUN).step == 1
        assert sorted(reads) == sorted((spec.global_name, k) for spec, _ in role.params for k in STATE_KEYS)
        _assert_same_state(_state_of(resumed), want)

    check_readers(tmp_path / "ck")
    # As checkpoints were written before: each bf16 parameter beside its master (and no index).
    for spec, p in role.params:
        pieces[spec.global_name]["param"] = p.detach().clone()
    ckpt.write_shard(shard.parent.parent, shard.name, pieces)
    drop_shard_index(shard.parent.parent)
    meta = json.loads((shard.parent.parent / "meta.json").read_text())
    meta["shard_bytes"][shard.name] = shard.stat().st_size
    (shard.parent.parent / "meta.json").write_text(json.dumps(meta))
    assert shard.stat().st_size > size + 2 * numel
    check_readers(tmp_path / "ck")


def _pp_save_and_load_stage(rank, world, tmp):
    import torch.distributed as dist
    from pathlib import Path

    from kdtrain.config import CheckpointConfig, OptimizerConfig, load_model_config
    from kdtrain.parallel import RoleLayout, build_role_groups
    from kdtrain.training.pretrain import build_trainable, restore_role, save_role

    cfg = load_model_config("tiny")
    groups = build_role_groups(RoleLayout("model", 0, 1, 2, 1))

    def build(seed):
        return build_trainable(cfg, groups, OptimizerConfig(), seq_length=16, micro_batch=1,
                               device=torch.device("cpu"), dtype=torch.float32, seed=seed)

    role = build(3)
    _train(role, 2)
    ck = CheckpointConfig(dir=str(Path(tmp) / "ck"), keep=1)
    save_role(ck, cfg, role, 2, _DP_RUN)
    saved = _state_of(role)
    step_dir = Path(tmp) / "ck" / "step_0000002"
    found = {}
    for old_format in (False, True):
        if old_format:
            dist.barrier()  # both stages have loaded the indexed checkpoint
            if rank == 0:
                drop_shard_index(step_dir)
            dist.barrier()
        opened = []
        with pytest.MonkeyPatch.context() as m:
            count_shard_opens(m, opened)
            other = build(5)
            assert restore_role(ck, cfg, other, rank, _DP_RUN).step == 2
        _assert_same_state(_state_of(other), saved)
        if not old_format:  # this stage's own file, once
            assert opened == [f"rank{rank:05d}.pt"], (rank, opened)
        found[old_format] = opened
    torch.save(found, Path(tmp) / f"opened{rank}.pt")
    torch.save(saved, Path(tmp) / f"saved{rank}.pt")


def test_a_stage_opens_only_the_shard_files_that_hold_its_parameters(world_of_one, tmp_path, monkeypatch):
    """Every loading rank opened and unpickled every shard file of a checkpoint (an 8B model at
    TP=8, PP=8, DP=128 with ZeRO-1: 8,192 files, 8,192 ranks, ~67 million opens at once on the
    file system's metadata server). meta.json now says which pieces each file holds, and a rank
    opens only the files holding values of its own parameters: each pipeline stage its own
    stage's file, once. A checkpoint without the index (written before) opens every file and
    loads the same; so does one loaded whole."""
    from conftest import run_spawn
    from kdtrain.config import CheckpointConfig
    from kdtrain.training.pretrain import restore_role

    run_spawn(2, _pp_save_and_load_stage, str(tmp_path), tmp_path=tmp_path)
    step_dir = tmp_path / "ck" / "step_0000002"
    files = sorted(f.name for f in (step_dir / "shards").glob("*.pt"))
    assert files == ["rank00000.pt", "rank00001.pt"]  # one per stage
    for rank in range(2):
        found = torch.load(tmp_path / f"opened{rank}.pt")
        assert found[False] == [f"rank{rank:05d}.pt"], (rank, found)
        assert sorted(found[True]) == files, (rank, found)

    # Loaded whole (one rank, both stages) from the checkpoint as written before: every file, once.
    assert "shard_index" not in json.loads((step_dir / "meta.json").read_text())
    cfg, role = _build_dp(1, seed=9, dtype=torch.float32)
    opened = []
    with monkeypatch.context() as m:
        count_shard_opens(m, opened)
        assert restore_role(CheckpointConfig(dir=str(tmp_path / "ck")), cfg, role, 0, _DP_RUN).step == 2
    assert sorted(opened) == files
    saved = {k: v for rank in range(2) for k, v in torch.load(tmp_path / f"saved{rank}.pt").items()}
    _assert_same_state(_state_of(role), saved)


def _save_fails_on_rank_1(rank, world, tmp, phase):
    from datetime import timedelta
    from pathlib import Path

    import torch.distributed.distributed_c10d as c10d

    import kdtrain.training.checkpoint as checkpoint
    from kdtrain.config import CheckpointConfig
    from kdtrain.training.pretrain import save_role

    c10d._set_pg_timeout(timedelta(seconds=60))  # a rank left waiting fails the test, not hangs it
    cfg, role = _build_dp(world, seed=3, timeout_s=60)
    full = OSError(28, "No space left on device")
    if rank == 1 and phase == "write":
        checkpoint.write_shard = lambda *a, **k: (_ for _ in ()).throw(full)
    if phase == "commit":  # only the role's writer, rank 0, commits
        checkpoint.commit_checkpoint = lambda *a, **k: (_ for _ in ()).throw(full)
    ck = CheckpointConfig(dir=str(Path(tmp) / "ck"), keep=1)
    with pytest.raises(Exception) as e:
        save_role(ck, cfg, role, 1, _DP_RUN)
    (Path(tmp) / f"error{rank}.txt").write_text(f"{type(e.value).__name__}: {e.value}")


@pytest.mark.parametrize("phase", ["write", "commit"])
def test_a_rank_that_fails_to_save_stops_every_rank(world_of_one, tmp_path, phase):
    """A full disk on one rank while the role saves: that rank raised alone and the others waited
    in the gather (or the barrier after the commit) until the job's timeout. Every rank now raises,
    the others naming the rank and its error; no checkpoint is published."""
    from conftest import run_spawn

    run_spawn(2, _save_fails_on_rank_1, str(tmp_path), phase, tmp_path=tmp_path)
    failed = 1 if phase == "write" else 0
    own, other = ((tmp_path / f"error{r}.txt").read_text() for r in (failed, 1 - failed))
    assert own == "OSError: [Errno 28] No space left on device", own
    what = "write its part of" if phase == "write" else "commit"
    assert other.startswith(f"PeerFailed: rank {failed} could not {what} checkpoint "), other
    assert "No space left on device" in other
    assert not (tmp_path / "ck" / "latest").exists() and not (tmp_path / "ck" / "step_0000001").exists()


def _teacher_replicas(rank, world, tmp, fail):
    import torch.distributed as dist
    from pathlib import Path

    from kdtrain.config import CheckpointConfig, OptimizerConfig, load_model_config
    from kdtrain.parallel import RoleLayout, build_role_groups
    from kdtrain.stream import PayloadSpec
    from kdtrain.training.checkpoint import CheckpointReader
    from kdtrain.training.optimizer import assign_owners
    from kdtrain.training.pretrain import build_trainable, save_role
    from kdtrain.training.teacher import Teacher

    cfg = load_model_config("tiny")
    writer = build_role_groups(RoleLayout("model", 0, 1, 1, 1), timeout_s=60)
    groups = build_role_groups(RoleLayout("teacher", 1, 1, 1, 2), timeout_s=60)  # replicas at ranks 1 and 2
    ck = Path(tmp) / "ck"
    if rank == 0:
        role = build_trainable(cfg, writer, OptimizerConfig(), 16, 1, torch.device("cpu"), torch.float32, seed=3)
        save_role(CheckpointConfig(dir=str(ck), keep=1), cfg, role, 1, _DP_RUN)
        torch.save({spec.global_name: p.detach().clone() for spec, p in role.params}, Path(tmp) / "want.pt")
    dist.barrier()
    if rank == 0:
        return
    reads = set()
    with pytest.MonkeyPatch.context() as m:
        _count_reads(m, reads)
        if fail and rank == 2:  # a value that cannot be read once the load was agreed on (a damaged file)
            m.setattr(CheckpointReader, "read_into", lambda *a, **k: (_ for _ in ()).throw(ValueError("bad bytes")))
        try:
            teacher = Teacher(cfg, groups, PayloadSpec(16, 1, 4, torch.bfloat16), 1.0, str(ck), torch.device("cpu"),
                              torch.bfloat16, seed=1)
        except ValueError as e:
            (Path(tmp) / f"said{rank}.txt").write_text(f"{type(e).__name__}: {e}")
            return
    want = torch.load(Path(tmp) / "want.pt")
    named = [(teacher.model.param_specs[n], p) for n, p in teacher.model.named_parameters()]
    owners = assign_owners([p.numel() for _, p in named], 2)
    assert reads == {spec.global_name for (spec, _), o in zip(named, owners) if o == rank - 1}, (rank, reads)
    for spec, p in named:
        assert p.dtype == torch.bfloat16 and torch.equal(p, want[spec.global_name].to(torch.bfloat16)), spec.global_name
    (Path(tmp) / f"said{rank}.txt").write_text("loaded")


@pytest.mark.parametrize("fail", [False, True], ids=["loads", "a-read-fails"])
def test_teacher_replicas_each_read_a_share_and_stop_together(world_of_one, tmp_path, fail):
    """A teacher with two data-parallel replicas (global ranks 1 and 2: the broadcasts name global
    ranks) reads each weight once, on one replica, and both hold the checkpoint's weights in bf16;
    a read failing on one replica after the load was agreed on stops both, naming it."""
    from conftest import run_spawn

    run_spawn(3, _teacher_replicas, str(tmp_path), fail, tmp_path=tmp_path)
    said = [(tmp_path / f"said{r}.txt").read_text() for r in (1, 2)]
    if not fail:
        assert said == ["loaded", "loaded"]
    else:
        assert said[1] == "ValueError: bad bytes"
        assert said[0].startswith("PeerFailed: rank 2 of teacher could not load its part of teacher.load "), said[0]
