"""Checkpoint atomicity and clear errors for damaged or mismatched checkpoints (a gloo world of one
inside the test process, conftest.world_of_one)."""

import json
import os
import re

import pytest
import torch

from conftest import count_shard_opens, drop_shard_index, one_rank_role as _build, run_spawn
from conftest import save_one_rank_role as _save


def _crash_mid_save(root):
    import kdtrain.training.checkpoint as ckpt
    from kdtrain.training.checkpoint import CheckpointReader
    from kdtrain.training.checkpoint_load import load_weights
    from kdtrain.training.step_dirs import latest_checkpoint

    cfg, groups, role = _build("tiny")
    _save(root, 1, role, groups, cfg)
    saved = {spec.global_name: p.detach().clone() for spec, p in role.params}
    with torch.no_grad():
        for _, p in role.params:
            p.add_(1.0)

    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # after the weight shard, before the RNG file
            raise OSError("disk full (injected)")
        return real_save(obj, f, *a, **k)

    ckpt.torch.save = failing_save
    try:
        with pytest.raises(OSError, match="injected"):
            _save(root, 2, role, groups, cfg)
    finally:
        ckpt.torch.save = real_save

    latest = latest_checkpoint(root)
    assert latest is not None and latest.name == "step_0000001", latest
    load_weights(CheckpointReader(latest), role.params)
    for spec, p in role.params:
        assert torch.equal(p, saved[spec.global_name]), spec.global_name

    # A later successful save replaces the debris of the crashed one.
    _save(root, 2, role, groups, cfg)
    assert latest_checkpoint(root).name == "step_0000002"
    assert not (root / "step_0000002.tmp").exists()


def test_crash_during_save_keeps_the_previous_checkpoint(world_of_one, tmp_path):
    _crash_mid_save(tmp_path / "ck")


def test_crash_while_resaving_a_step_keeps_its_previous_copy(world_of_one, tmp_path, monkeypatch):
    """A resumed run saves a step that exists; a crash between moving the old copy aside and
    renaming the new one into place leaves ``latest`` naming a missing directory: the old copy
    (``step_N.old``) is what loads, and the next successful save removes it."""
    import kdtrain.training.checkpoint as ckpt
    from kdtrain.training.checkpoint import CheckpointReader
    from kdtrain.training.checkpoint_load import load_weights
    from kdtrain.training.step_dirs import latest_checkpoint

    root = tmp_path / "ck"
    cfg, groups, role = _build("tiny")
    _save(root, 1, role, groups, cfg)
    _save(root, 2, role, groups, cfg)
    saved = {spec.global_name: p.detach().clone() for spec, p in role.params}
    with torch.no_grad():
        for _, p in role.params:
            p.add_(1.0)

    real_replace = ckpt.os.replace

    def crash_on_rename_into_place(src, dst):
        if str(src).endswith("step_0000002.tmp"):
            raise OSError("killed (injected)")
        return real_replace(src, dst)

    with monkeypatch.context() as m, pytest.raises(OSError, match="injected"):
        m.setattr(ckpt.os, "replace", crash_on_rename_into_place)
        _save(root, 2, role, groups, cfg)
    assert not (root / "step_0000002").exists() and (root / "latest").read_text() == "step_0000002"
    latest = latest_checkpoint(root)
    assert latest.name == "step_0000002.old"
    load_weights(CheckpointReader(latest), role.params)
    for spec, p in role.params:
        assert torch.equal(p, saved[spec.global_name]), spec.global_name

    with torch.no_grad():
        for _, p in role.params:
            p.add_(1.0)
    _save(root, 3, role, groups, cfg)  # the run goes on from the set-aside copy
    _save(root, 3, role, groups, cfg)  # and re-saves a step normally
    assert latest_checkpoint(root).name == "step_0000003"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000001", "step_0000003"]


def _damaged(root):
    from kdtrain.training.checkpoint import CheckpointReader
    from kdtrain.training.checkpoint_load import load_weights
    from kdtrain.training.step_dirs import latest_checkpoint
    from kdtrain.training.checkpoint_load import check_checkpoint_model

    cfg, groups, role = _build("tiny")
    path = _save(root, 5, role, groups, cfg)

    # Another architecture: the mismatching field is named.
    other_cfg, _, other = _build("demo-student")
    with pytest.raises(ValueError, match="different model: .*hidden_size|different model: .*num_layers"):
        check_checkpoint_model(CheckpointReader(path), other_cfg)
    # Even without the config check, loading weights of another shape names the parameter.
    with pytest.raises(ValueError, match="has shape|lacks"):
        load_weights(CheckpointReader(path), other.params)

    # A truncated shard file (its size is recorded) or a missing one: found when the reader is made,
    # on every rank, before anything is loaded or written; one unreadable at its size when a load
    # opens it (meta.json's index says what it holds).
    shard = next((path / "shards").glob("*.pt"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match=rf"shard .*{shard.name} has {len(data) // 3} bytes, meta.json records "
                       rf"{len(data)}: the file is truncated"):
        CheckpointReader(path)
    # Ranks that load together each check a share of the files at open (files[i::n]: each rank
    # checking each file was ranks x files stats) and agree on the outcome (raise_together); a
    # file outside a rank's share is checked when a load opens it.
    j = json.loads((path / "meta.json").read_text())["shard_files"].index(shard.name)
    with pytest.raises(ValueError, match="the file is truncated"):
        CheckpointReader(path, (j % 2, 2))
    with pytest.raises(ValueError, match="the file is truncated"):
        load_weights(CheckpointReader(path, ((j + 1) % 2, 2)), role.params)
    shard.write_bytes(bytes(len(data)))
    reader = CheckpointReader(path)
    with pytest.raises(ValueError, match="cannot read checkpoint shard"):
        load_weights(reader, role.params)
    shard.unlink()
    with pytest.raises(ValueError, match=rf"shard .*{shard.name} is missing"):
        CheckpointReader(path)
    # Without the index (a checkpoint of an earlier version) every file is opened up front.
    drop_shard_index(path)
    with pytest.raises(ValueError, match=rf"shard .*{shard.name} is missing"):
        CheckpointReader(path)

    # Corrupt metadata (unparsable, or JSON of another shape: a KeyError or AttributeError inside
    # the reader before), and a 'latest' pointer to nothing, to a non-text file, or a directory.
    meta = json.loads((path / "meta.json").read_text())
    for text, says in [("{not json", "Expecting property name"), ("[1, 2]", "a JSON object was expected, got list"),
                       (json.dumps({k: v for k, v in meta.items() if k != "shard_files"}), "no 'shard_files'"),
                       (json.dumps(dict(meta, step="four")), "'step' is 'four', not a whole number"),
                       (json.dumps(dict(meta, shard_index=[])), "'shard_index' is [], not a JSON object"),
                       (json.dumps(dict(meta, shard_files=[1])), "'shard_files' must list file names")]:
        (path / "meta.json").write_text(text)
        with pytest.raises(ValueError, match=f"corrupt checkpoint metadata .*{re.escape(says)}"):
            CheckpointReader(path)
    (path / "meta.json").write_text(json.dumps({"version": 99, "files": []}))  # a later format: named as such
    with pytest.raises(ValueError, match="checkpoint format 99 is not one this version of kdtrain reads"):
        CheckpointReader(path)
    (path / "meta.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="corrupt checkpoint metadata"):
        CheckpointReader(path)
    (root / "latest").write_bytes(b"\xffstep")
    with pytest.raises(ValueError, match=r"latest should name a step directory .* is not text"):
        latest_checkpoint(root)
    (root / "latest").write_text("step_0000099")
    with pytest.raises(ValueError, match="missing or incomplete"):
        latest_checkpoint(root)
    for text, held in (("\n", "nothing"), (".", "'.'"), ("../other/step_0000001", "'../other/step_0000001'")):
        (root / "latest").write_text(text)  # not the checkpoint folder's own name as the missing step
        with pytest.raises(ValueError, match=rf"latest should name a step directory \(step_NNNNNNN\) of .* but holds "
                                             rf"{re.escape(held)}$"):
            latest_checkpoint(root)
    (root / "latest").unlink()
    (root / "latest").mkdir()
    with pytest.raises(ValueError, match="latest is a directory"):
        latest_checkpoint(root)
    (root / "latest").rmdir()
    with pytest.raises(ValueError, match="not a kdtrain checkpoint"):
        CheckpointReader(root)


def test_damaged_or_mismatched_checkpoint_gives_a_clear_error(world_of_one, tmp_path):
    _damaged(tmp_path / "ck")


def test_a_full_disk_during_a_save_is_named_and_leaves_latest_alone(world_of_one, tmp_path, monkeypatch):
    """torch.save on a full disk fails inside its zip writer ("unexpected pos ... vs ..."), which
    named neither the file nor the cause: the error names the checkpoint file and the space left,
    and ``latest`` still names the last complete step."""
    import kdtrain.training.checkpoint as ckpt
    from kdtrain.training.step_dirs import latest_checkpoint

    root = tmp_path / "ck"
    cfg, groups, role = _build("tiny")
    _save(root, 1, role, groups, cfg)

    def full(value, path):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 833088 vs 832976")

    monkeypatch.setattr(ckpt.torch, "save", full)
    with pytest.raises(OSError, match=r"cannot write checkpoint file .*step_0000002\.tmp/shards/rank00000\.pt "
                                      r"\(.* MiB free there; full disk or quota\?\): \[enforce fail"):
        _save(root, 2, role, groups, cfg)
    assert latest_checkpoint(root) == root / "step_0000001"


def test_a_save_reaches_the_disk_before_latest_names_it(world_of_one, tmp_path, monkeypatch):
    """Every shard and RNG file is fsynced by the rank that wrote it, and the directories that
    name them before ``latest`` is replaced: after a crash of the machine ``latest`` could name a
    step whose files never reached the disk. The root is synced after the renames."""
    import kdtrain.training.checkpoint as ckpt

    root = tmp_path / "ck"
    cfg, groups, role = _build("tiny")
    events = []
    real_fsync, real_replace = ckpt.os.fsync, ckpt.os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "fsync", fsync)
    monkeypatch.setattr(ckpt.os, "replace", replace)
    _save(root, 1, role, groups, cfg)
    latest = events.index(("replace", str(root / "latest")))
    synced = [path for what, path in events[:latest] if what == "fsync"]
    tmp = root / "step_0000001.tmp"
    for path in (tmp / "shards" / "rank00000.pt", tmp / "rng" / "rank00000.pt", tmp / "shards", tmp / "rng",
                 tmp / "meta.json", tmp):
        assert str(path) in synced, (path, events)
    # The step's rename is durable before ``latest`` names it, and ``latest`` after.
    step = events.index(("replace", str(root / "step_0000001")))
    assert ("fsync", str(root)) in events[step:latest]
    assert ("fsync", str(root)) in events[latest:]
    # One fsync per file written.
    assert len([p for p in synced if p.endswith(".pt")]) == 2


def test_a_failing_directory_sync_is_an_error_where_one_is_supported(tmp_path, monkeypatch):
    """Directory syncs publish checkpoints, cache shards and corpora: a file system that cannot sync a
    directory at all is skipped, but an I/O error is raised (``latest`` must not be replaced after it)."""
    import errno

    import kdtrain.durable as durable

    def failing(code):
        def fsync(fd):
            raise OSError(code, os.strerror(code))
        return fsync

    monkeypatch.setattr(durable.os, "fsync", failing(errno.EINVAL))
    durable.fsync_dir(tmp_path)  # not supported there: skipped
    monkeypatch.setattr(durable.os, "fsync", failing(errno.EIO))
    with pytest.raises(OSError, match="Input/output error"):
        durable.fsync_dir(tmp_path)


def test_loaded_weights_reach_the_fp32_masters_of_a_bf16_model(world_of_one, tmp_path):
    """``checkpoint.load`` / ``student.load`` into a bf16 model: the optimizer's fp32 masters (cloned
    from the random init when it was built) take the loaded fp32 values too. They did not: the
    first update copied the masters back and the run went on from its random init (bf16 is the
    default on GPUs, so every GPU run started from weights)."""
    from kdtrain.config import CheckpointConfig
    from kdtrain.training.pretrain import restore_role

    cfg, groups, src = _build("tiny", seed=11)  # the weights to start from, fp32
    _save(tmp_path / "src", 0, src, groups, cfg)
    loaded = {n: p.detach().clone() for n, p in src.model.named_parameters()}
    _, _, role = _build("tiny", dtype=torch.bfloat16, seed=3)
    assert restore_role(CheckpointConfig(load=str(tmp_path / "src")), cfg, role, 0,
                        {"kind": "pretrain", "global_batch_size": 1, "data": {}}) == (0, ())
    names = {id(p): n for n, p in role.model.named_parameters()}
    masters = role.optimizer.separate_masters()
    assert len(masters) == len(names)  # every bf16 parameter has an fp32 master
    for pid, (master, start, stop) in masters.items():
        assert (start, stop) == (0, master.numel())  # unsharded: the whole parameter
        assert torch.equal(master, loaded[names[pid]]), names[pid]  # the stored fp32 values, exactly
    for _, p in role.params:  # one update with zero gradients and no weight decay: nothing moves
        p.main_grad = torch.zeros(p.shape, dtype=torch.float32)
    for g in role.optimizer.opt.param_groups:
        g["weight_decay"] = 0.0
    role.optimizer.step(1e-3)
    for n, p in role.model.named_parameters():
        assert torch.equal(p, loaded[n].to(torch.bfloat16)), n


def test_models_built_to_be_loaded_skip_the_random_init(world_of_one, tmp_path, monkeypatch):
    """A teacher with ``teacher.load`` and the tools' whole models (generate, eval, prune) take every
    weight from the checkpoint: the random init, which draws each parameter's whole global tensor
    (for a large teacher gigabytes and seconds), is not run for them; the loaded weights are the
    checkpoint's (padded vocabulary rows zero). A teacher without a checkpoint is initialised."""
    import kdtrain.models.gpt as gpt
    from kdtrain.stream import PayloadSpec
    from kdtrain.training.checkpoint_load import load_whole_model
    from kdtrain.training.teacher import Teacher

    cfg, groups, src = _build("tiny", seed=11)
    _save(tmp_path / "src", 0, src, groups, cfg)
    saved = {n: p.detach().clone() for n, p in src.model.named_parameters()}
    real, inits = gpt.init_parameters, []
    monkeypatch.setattr(gpt, "init_parameters", lambda *a, **k: inits.append(1) or real(*a, **k))
    spec = PayloadSpec(16, 1, 8, torch.float32)
    teacher = Teacher(cfg, groups, spec, 1.0, str(tmp_path / "src"), torch.device("cpu"), torch.float32, seed=5)
    _, whole = load_whole_model(tmp_path / "src", torch.device("cpu"), torch.float32, "model")
    assert inits == []
    for model in (teacher.model, whole):
        for n, p in model.named_parameters():
            assert torch.equal(p, saved[n]), n
    Teacher(cfg, groups, spec, 1.0, None, torch.device("cpu"), torch.float32, seed=5)
    assert inits == [1]


def test_a_whole_model_too_large_for_the_device_is_refused_before_it_is_built(world_of_one, tmp_path, monkeypatch):
    """generate, eval and prune hold the whole model on one device: one whose weights alone exceed
    the device's free memory is a clear error naming the model and both sizes, before anything is
    built (a 70B teacher on an 80 GB GPU failed with an out-of-memory error inside the build)."""
    import kdtrain.models.gpt as gpt
    import kdtrain.parallel as parallel
    from kdtrain.training.checkpoint_load import load_whole_model

    cfg, groups, src = _build("tiny")
    _save(tmp_path / "src", 0, src, groups, cfg)
    need = cfg.num_params() * 4
    monkeypatch.setattr(parallel, "free_memory_bytes", lambda device: need - 1)
    monkeypatch.setattr(gpt, "KDGPTModel", None)  # building would fail here
    with pytest.raises(ValueError, match=rf"generate --model {tmp_path / 'src'}: the whole model \(0\.00B parameters\) "
                                         rf"needs 0\.0 GiB for its weights in float32, but cpu has 0\.0 GiB free"):
        load_whole_model(tmp_path / "src", torch.device("cpu"), torch.float32, "generate --model")
    monkeypatch.undo()
    monkeypatch.setattr(parallel, "free_memory_bytes", lambda device: need)
    load_whole_model(tmp_path / "src", torch.device("cpu"), torch.float32, "generate --model")


def test_training_only_fields_may_differ_from_the_checkpoints_model(world_of_one, tmp_path):
    """Fine-tuning with dropout, another init_std or (rotary positions) a longer context loads the
    weights; a field that changes them is still refused."""
    import dataclasses

    from kdtrain.training.checkpoint import CheckpointReader
    from kdtrain.training.checkpoint_load import check_checkpoint_model

    cfg, groups, role = _build("tiny")
    path = _save(tmp_path / "ck", 1, role, groups, cfg)
    for change in ({"hidden_dropout": 0.1, "attention_dropout": 0.1}, {"init_std": 0.01},
                   {"max_seq_length": 4 * cfg.max_seq_length}, {"make_vocab_size_divisible_by": 64}):
        check_checkpoint_model(CheckpointReader(path), dataclasses.replace(cfg, **change))
    for change, field in (({"norm_epsilon": 1e-3}, "norm_epsilon"), ({"rope_theta": 500000.0}, "rope_theta")):
        with pytest.raises(ValueError, match=f"different model: {field}"):
            check_checkpoint_model(CheckpointReader(path), dataclasses.replace(cfg, **change))


def test_pruning_keeps_the_step_latest_names(world_of_one, tmp_path):
    """A save killed between its rename and the ``latest`` update leaves a complete step newer
    than ``latest``; the resumed job saves an older step, and pruning to the newest by number
    deleted the step ``latest`` then named (the next resume failed). Steps sort by number."""
    from kdtrain.config import to_dict
    from kdtrain.training.checkpoint import save_checkpoint
    from kdtrain.training.step_dirs import complete_steps, latest_checkpoint

    cfg, groups, role = _build("tiny")
    root = tmp_path / "ck"
    for step in (3, 6):
        _save(root, step, role, groups, cfg)
    (root / "latest").write_text("step_0000003")  # killed before step 6's latest update

    meta = {"model": to_dict(cfg), "layout": {"tp": 1, "pp": 1, "dp": 1, "rank_offset": 0}}
    save_checkpoint(root, 4, role.params, role.optimizer, 0, groups.role_group, 0, meta, keep=1)
    assert latest_checkpoint(root).name == "step_0000004"
    assert [p.name for p in complete_steps(root)] == ["step_0000004"]
    for step in (9_999_999, 10_000_000):
        save_checkpoint(root, step, role.params, role.optimizer, 0, groups.role_group, 0, meta, keep=2)
    assert [p.name for p in complete_steps(root)] == ["step_9999999", "step_10000000"]
    assert latest_checkpoint(root).name == "step_10000000"


def test_a_run_whose_steps_were_all_skipped_resumes(world_of_one, tmp_path):
    """Non-finite gradient norms skip the update: a checkpoint saved before any update holds Adam's
    initial state (it had none and was refused as weights-only), and the resumed optimizer's first
    update is a fresh one's."""
    from kdtrain.config import CheckpointConfig
    from kdtrain.training.pretrain import restore_role, save_role

    cfg, groups, role = _build("tiny")
    ck, run = CheckpointConfig(dir=str(tmp_path / "ck")), {"kind": "pretrain", "global_batch_size": 8, "data": {}}
    save_role(ck, cfg, role, 1, run)  # after a skipped step: no optimizer.step yet
    _, _, resumed = _build("tiny", seed=5)
    assert restore_role(ck, cfg, resumed, 0, run).step == 1
    before = {spec.global_name: p.detach().clone() for spec, p in role.params}
    for r in (role, resumed):
        for i, (_, p) in enumerate(r.params):
            p.main_grad.fill_(0.01 * (i + 1))
        r.optimizer.step(1e-3)
    for (spec, a), (_, b) in zip(role.params, resumed.params):
        assert torch.equal(a, b) and not torch.equal(a, before[spec.global_name]), spec.global_name


def test_steps_without_latest_are_resumed_not_pruned(world_of_one, tmp_path):
    """A first save killed between its rename and writing ``latest`` (or step directories copied
    without it) leaves complete steps and no ``latest``: the job resumes from the newest; treated
    as an empty directory, the new run's first save pruned them as newer than ``latest``."""
    from kdtrain.config import CheckpointConfig
    from kdtrain.training.step_dirs import latest_checkpoint
    from kdtrain.training.pretrain import restore_role, save_role

    cfg, groups, role = _build("tiny")
    ck, run = CheckpointConfig(dir=str(tmp_path / "ck"), keep=3), {"kind": "pretrain", "global_batch_size": 8,
                                                                   "data": {}}
    for step in (2, 5):
        save_role(ck, cfg, role, step, run)
    (tmp_path / "ck" / "latest").unlink()
    (tmp_path / "ck" / "step_0000007.tmp").mkdir()  # an unfinished save is not a step
    assert latest_checkpoint(ck.dir) == tmp_path / "ck" / "step_0000005"
    assert restore_role(ck, cfg, role, 0, run).step == 5
    save_role(ck, cfg, role, 6, run)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["latest", "step_0000002", "step_0000005",
                                                                   "step_0000006"]
    assert latest_checkpoint(tmp_path / "empty") is None


def test_non_finite_weights_in_a_checkpoint_are_refused_naming_the_parameter(world_of_one, tmp_path):
    """A kdtrain checkpoint holding NaN or infinite weights (a damaged file, or saved from a run
    that diverged) is refused when its weights are read, naming the parameter: as a teacher or a
    tool's model, by the export, and by a resume. Hugging Face loads already checked."""
    from kdtrain.config import CheckpointConfig
    from kdtrain.convert.hf_export import export_hf
    from kdtrain.training.checkpoint import write_global_checkpoint
    from kdtrain.training.checkpoint_load import load_whole_model
    from kdtrain.training.pretrain import restore_role

    cfg, _, role = _build("tiny")
    state = {spec.global_name: p.detach().clone() for spec, p in role.params}
    name = "decoder.layers.1.mlp.linear_fc2.weight"
    state[name][3, 4] = float("nan")
    write_global_checkpoint(tmp_path / "kd", cfg, list(state), state.__getitem__, {}, shard_bytes=1 << 20)
    match = f"{name} holds NaN or infinite weights"
    with pytest.raises(ValueError, match=match):
        load_whole_model(tmp_path / "kd", torch.device("cpu"), torch.float32, "teacher")
    with pytest.raises(ValueError, match=match):
        export_hf(tmp_path / "kd", tmp_path / "new" / "hf")
    assert not (tmp_path / "new").exists()  # nor the parent it created
    # Into an earlier export: left as it was.
    state[name][3, 4] = 0.5
    write_global_checkpoint(tmp_path / "good", cfg, list(state), state.__getitem__, {}, shard_bytes=1 << 20)
    export_hf(tmp_path / "good", tmp_path / "hf")
    (tmp_path / "hf" / "generation_config.json").write_text("{}")
    before = {f.name: f.read_bytes() for f in (tmp_path / "hf").iterdir()}
    with pytest.raises(ValueError, match=match):
        export_hf(tmp_path / "kd", tmp_path / "hf")
    assert {f.name: f.read_bytes() for f in (tmp_path / "hf").iterdir()} == before
    _, _, fresh = _build("tiny", seed=4)
    with pytest.raises(ValueError, match=match):
        restore_role(CheckpointConfig(load=str(tmp_path / "kd")), cfg, fresh, 0,
                     {"kind": "pretrain", "global_batch_size": 1, "data": {}})


def test_reading_one_parameter_opens_only_the_shard_file_holding_it(world_of_one, tmp_path, monkeypatch):
    """A converted or pruned checkpoint (whole parameters in files of about ``shard_bytes``) is read
    one parameter at a time by the export and by pruning: each read opens the file that holds the
    parameter, once; listing the names and checking for optimizer state open none."""
    from kdtrain.convert.sources import CheckpointWeights
    from kdtrain.training.checkpoint import write_global_checkpoint

    cfg, _, role = _build("tiny")
    state = {spec.global_name: p.detach().clone() for spec, p in role.params}
    step = write_global_checkpoint(tmp_path / "kd", cfg, list(state), state.__getitem__, {}, shard_bytes=1)
    files = sorted(f.name for f in (step / "shards").glob("*.pt"))
    assert len(files) == len(state)  # a file per parameter
    opened = []
    with monkeypatch.context() as m:
        count_shard_opens(m, opened)
        weights = CheckpointWeights(tmp_path / "kd")  # checks that every parameter is there
        assert opened == [] and not weights.reader.has_optimizer_state()
        first = weights.names()[0]
        assert torch.equal(weights.tensor(first), state[first]) and len(opened) == 1
        for name in weights.names():
            assert torch.equal(weights.tensor(name), state[name]), name
    assert sorted(opened) == files


def _loaded_teacher_gets_every_weight(rank, world, tmp):
    import dataclasses
    from pathlib import Path

    import kdtrain.training.teacher as teacher_module
    from kdtrain.config import CheckpointConfig, OptimizerConfig, load_model_config
    from kdtrain.parallel import RoleLayout, build_role_groups
    from kdtrain.stream import PayloadSpec
    from kdtrain.training.pretrain import build_trainable, save_role

    # An odd vocabulary (padded rows at tp=2) and tied embeddings (a copy on each stage at pp=2).
    cfg = dataclasses.replace(load_model_config("tiny"), vocab_size=301, tie_embeddings=True)
    real, poisoned_builds = teacher_module.build_gpt, []

    def poisoned(*args, seed, **kw):  # the weights a build without init leaves: made NaN
        model = real(*args, seed=seed, **kw)
        if seed is None:
            for p in model.parameters():
                p.data.fill_(float("nan"))
            poisoned_builds.append(1)
        return model

    teacher_module.build_gpt = poisoned
    for tp, pp in ((2, 1), (1, 2)):
        groups = build_role_groups(RoleLayout(f"model-tp{tp}-pp{pp}", 0, tp, pp, 1))
        role = build_trainable(cfg, groups, OptimizerConfig(), seq_length=16, micro_batch=1,
                               device=torch.device("cpu"), dtype=torch.float32, seed=3)
        ck = CheckpointConfig(dir=str(Path(tmp) / f"ck-{tp}-{pp}"), keep=1)
        save_role(ck, cfg, role, 1, {"kind": "pretrain", "global_batch_size": 8, "data": {}})
        teacher = teacher_module.Teacher(cfg, groups, PayloadSpec(16, 1, 8, torch.float32), 1.0, ck.dir,
                                         torch.device("cpu"), torch.float32, seed=5)
        assert poisoned_builds.pop() and not poisoned_builds
        want = dict(role.model.named_parameters())
        for name, p in teacher.model.named_parameters():
            assert torch.equal(p, want[name]), (tp, pp, rank, name)


def test_a_teacher_loaded_without_init_gets_every_weight_in_any_layout(tmp_path):
    """A teacher with ``teacher.load`` skips the random init: every value of its weights, the
    padded vocabulary rows of a tensor rank and the last stage's copy of tied embeddings included,
    must come from the checkpoint (its unloaded memory is made NaN here), at tp=2 and at pp=2."""
    run_spawn(2, _loaded_teacher_gets_every_weight, str(tmp_path), tmp_path=tmp_path)


def test_a_background_save_holds_the_state_of_its_step(world_of_one, tmp_path, monkeypatch):
    """checkpoint.async_save: the files are written while training goes on (here: the weights
    and Adam moments change before the thread is done), and the published checkpoint is the
    one a foreground save of that step writes, value for value; a write that fails in the thread
    is raised by ``finish`` and publishes nothing."""
    import threading

    import kdtrain.training.checkpoint as ckpt
    from kdtrain.config import to_dict
    from kdtrain.training.step_dirs import latest_checkpoint

    cfg, groups, role = _build("tiny")
    for _, p in role.params:
        p.main_grad.normal_()
    role.optimizer.step(1e-2)
    meta = {"model": to_dict(cfg), "layout": {"tp": 1, "pp": 1, "dp": 1, "rank_offset": 0}}
    ckpt.save_checkpoint(tmp_path / "fg", 1, role.params, role.optimizer, 0, groups.role_group, 0, meta, keep=1)

    release, real_write = threading.Event(), ckpt.write_shard
    monkeypatch.setattr(ckpt, "write_shard", lambda *a, **k: (release.wait(60), real_write(*a, **k))[1])
    save = ckpt.start_save(tmp_path / "bg", 1, role.params, role.optimizer, 0, groups.role_group, 0, meta, 1,
                           background=True)
    for _, p in role.params:  # the next step trains while the file is not written yet
        p.main_grad.normal_()
    role.optimizer.step(1e-2)
    assert latest_checkpoint(tmp_path / "bg") is None
    release.set()
    assert save.finish() == tmp_path / "bg" / "step_0000001"
    fg, bg = (torch.load(d / "step_0000001" / "shards" / "rank00000.pt", weights_only=True)["pieces"]
              for d in (tmp_path / "fg", tmp_path / "bg"))
    assert fg.keys() == bg.keys()
    for name in fg:
        for key, value in fg[name].items():
            assert torch.equal(value, bg[name][key]) if torch.is_tensor(value) else value == bg[name][key], (name, key)

    monkeypatch.setattr(ckpt, "write_shard", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left")))
    save = ckpt.start_save(tmp_path / "bg", 2, role.params, role.optimizer, 0, groups.role_group, 0, meta, 1,
                           background=True)
    with pytest.raises(OSError, match="No space left"):
        save.finish()
    assert latest_checkpoint(tmp_path / "bg").name == "step_0000001"
