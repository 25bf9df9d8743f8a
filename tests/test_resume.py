"""Resuming a run: a job continues the run its checkpoint records (same kind, batch, sample
stream, teacher, objective and precision; training/resume.py), reports what may change (optimizer,
train_steps, payload source, layout, random states), and checks its output directories before it
trains (a gloo world of one inside the test process, conftest.world_of_one)."""

import json
import re

import pytest
import torch

from conftest import one_rank_role as _build


def test_a_resumed_job_must_continue_the_recorded_run(world_of_one, tmp_path):
    """Resuming with another global batch, sample stream, corpus or kind of run would silently
    skip or repeat data from the recorded step: each is an error naming the field."""
    import dataclasses

    from kdtrain.config import CheckpointConfig, DataConfig, to_dict
    from kdtrain.training.resume import run_record
    from kdtrain.training.pretrain import restore_role, save_role

    root = tmp_path / "ck"
    cfg, groups, role = _build("tiny")
    data = DataConfig(path=["/corpora/web_text_document"], seq_length=16)
    run = {"kind": "pretrain", "global_batch_size": 8, "data": to_dict(data), "corpus_bytes": [4096]}
    ck = CheckpointConfig(dir=str(root), keep=1)
    for _, p in role.params:  # one update, so that there is optimizer state to resume
        p.main_grad = torch.ones_like(p)
    role.optimizer.step(1e-3)
    save_role(ck, cfg, role, 100, run)

    def restore(ck=ck, **changes):
        changed = {**run, "data": to_dict(DataConfig(**{**to_dict(data), **changes.pop("data", {})})), **changes}
        return restore_role(ck, cfg, role, 0, changed).step

    assert restore() == 100
    # The corpus moved: its files keep their names.
    assert restore(data={"path": ["/mnt/elsewhere/web_text_document"]}) == 100
    for changes, match in [
        ({"global_batch_size": 16}, r"training\.global_batch_size: 16 here, 8 in .*step_0000100"),
        ({"data": {"seed": 7}}, r"data\.seed: 7 here, 1234 in"),
        ({"data": {"seq_length": 32}}, r"data\.seq_length: 32 here, 16 in"),
        ({"data": {"packing": "best_fit"}}, r"data\.packing: 'best_fit' here, 'stream' in"),
        ({"data": {"path": ["/corpora/code_document"]}}, r"data\.path: .*another corpus"),
        ({"kind": "distill"}, r"checkpoint\.dir: .* holds a pretrain checkpoint and this is a distill run"),
        # Tokenized again in place: same name, other tokens.
        ({"corpus_bytes": [5000]}, r"data\.path: /corpora/web_text_document\.bin has 5000 bytes here, 4096 when"),
    ]:
        with pytest.raises(ValueError, match=match):
            restore(**changes)

    # resume: false into a directory holding a run's checkpoints would prune the new run's first
    # (by step number: the old step 100 outlives a new step 10 with keep=1).
    fresh = dataclasses.replace(ck, resume=False)
    with pytest.raises(ValueError, match=r"checkpoint\.resume: false, but checkpoint\.dir .* holds checkpoints"):
        restore(ck=fresh)
    assert restore(ck=dataclasses.replace(fresh, dir=str(root.parent / "new"))) == 0
    # What the loops record: the token file's size beside the data section.
    (tmp_path / "c.bin").write_bytes(b"\0" * 12)
    assert run_record("pretrain", 8, DataConfig(path=[str(tmp_path / "c")]))["corpus_bytes"] == [12]



def _distill_run(**changes):
    """What distill's loop records (run_record's call in training/distill.py), with ``changes``."""
    from kdtrain.config import DataConfig, OptimizerConfig, load_model_config, to_dict
    from kdtrain.loss import KDLossConfig
    from kdtrain.training.resume import run_record

    teacher = to_dict(load_model_config("tiny"))
    teacher.update(changes.pop("teacher", {}))
    loss = to_dict(KDLossConfig(**changes.pop("loss", {})))
    opt = to_dict(OptimizerConfig(**{"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1, **changes.pop("optimizer", {})}))
    base = dict(teacher=teacher, loss=loss, topk=16, dtype="float32", teacher_load="/ckpts/demo-teacher",
                teacher_weights_sha256=None, teacher_source="online", teacher_values_dtype="fp32",
                optimizer=opt, train_steps=6)
    return run_record("distill", 8, DataConfig(mock=True, seq_length=16), **{**base, **changes})


def _save_distill_run(root, run):
    from kdtrain.config import CheckpointConfig
    from kdtrain.training.pretrain import save_role

    cfg, groups, role = _build("tiny")
    for _, p in role.params:  # one update, so that there is optimizer state to resume
        p.main_grad = torch.ones_like(p)
    role.optimizer.step(1e-3)
    ck = CheckpointConfig(dir=str(root), keep=1)
    save_role(ck, cfg, role, 3, run)
    return ck, cfg, role


def test_a_resumed_distillation_keeps_its_teacher_loss_and_precision(world_of_one, tmp_path):
    """Another teacher (weights, checkpoint, a cache of another checkpoint, top-k), KD loss or
    dtype from the recorded step on would silently train the rest of the run towards another
    target: each is an error naming the field. Training-only teacher fields may differ, and a
    checkpoint that records none of these (written before they were checked) resumes."""
    from kdtrain.training.pretrain import restore_role

    ck, cfg, role = _save_distill_run(tmp_path / "ck", _distill_run(teacher_weights_sha256="ab" * 32))
    assert restore_role(ck, cfg, role, 0, _distill_run(teacher_weights_sha256="ab" * 32)) == (3, ())
    # Training-only fields of the teacher, and its checkpoint moved elsewhere (same name); an
    # online job knows no hash of the weights.
    assert restore_role(ck, cfg, role, 0, _distill_run(teacher={"hidden_dropout": 0.1, "name": "t"},
                                                       teacher_load="/mnt/elsewhere/demo-teacher")).step == 3
    # A cache of the same teacher written since (its digest made by the per-file rule) cannot be
    # compared with the recorded one (made by the earlier rule): not refused.
    assert restore_role(ck, cfg, role, 0, _distill_run(teacher_weights_sha256="cd" * 32,
                                                       teacher_weights_hash="files")).step == 3
    # Loss fields that do not act in the recorded objective (beta of a forward KL, the tau^2 scale
    # at tau 1): the same objective, resumed without a refusal.
    assert restore_role(ck, cfg, role, 0, _distill_run(loss={"beta": 0.9, "scale_by_tau_sq": True})).step == 3
    for changes, match in [
        ({"teacher": {"num_layers": 2}}, r"teacher\.model\.num_layers: 2 here, 4 in .*step_0000003: resuming at "
                                         r"step 3 would distil the rest of the run from another teacher"),
        ({"teacher_load": "/ckpts/other-teacher"}, r"teacher\.load: /ckpts/other-teacher here, "
                                                   r"/ckpts/demo-teacher in .*step_0000003"),
        # A cache written by another checkpoint of the same name.
        ({"teacher_weights_sha256": "cd" * 32}, r"teacher\.cache: teacher weights cdcdcdcd.* here, teacher weights "
                                                r"abababab.* in .*step_0000003: .*another teacher"),
        ({"topk": 4}, r"teacher\.topk: 4 here, 16 in .*step_0000003"),
        ({"loss": {"divergence": "reverse_kl"}}, r"loss\.divergence: 'reverse_kl' here, 'forward_kl' in"),
        ({"loss": {"tau": 2.0}}, r"loss\.tau: 2\.0 here, 1\.0 in"),
        ({"loss": {"alpha": 0.5}}, r"loss\.alpha: 0\.5 here, 0\.0 in"),
        ({"loss": {"tau": 2.0, "scale_by_tau_sq": True}}, r"loss\.tau: 2\.0 here"),
        ({"dtype": "bfloat16"}, r"precision\.dtype: 'bfloat16' here, 'float32' in .*step_0000003"),
    ]:
        with pytest.raises(ValueError, match=match):
            restore_role(ck, cfg, role, 0, _distill_run(**changes))
    for changes in ({"topk": 4}, {"dtype": "bfloat16"}):
        with pytest.raises(ValueError, match="resume with the recorded value or start a new run"):
            restore_role(ck, cfg, role, 0, _distill_run(**changes))

    # A checkpoint of an earlier version records none of them: any value resumes.
    old = {k: v for k, v in _distill_run().items()
           if k not in ("teacher", "loss", "topk", "dtype", "teacher_load", "optimizer", "train_steps",
                        "teacher_source", "teacher_values_dtype")}
    ck, cfg, role = _save_distill_run(tmp_path / "old", old)
    assert restore_role(ck, cfg, role, 0, _distill_run(teacher={"num_layers": 2}, topk=4, dtype="bfloat16",
                                                       loss={"tau": 2.0}, train_steps=12,
                                                       teacher_source="cache")) == (3, ())


def test_a_resume_reports_changed_settings_in_the_run_log(world_of_one, tmp_path):
    """Extending a run (training.train_steps), changing optimizer settings or serving the payloads
    from a cache (or in another precision) is allowed, but the learning rate follows the new
    schedule from the resumed step (it can jump) and the payloads' rounding changes: the resumed
    job's log line names every changed field with its recorded and new values."""
    from kdtrain.training.pretrain import describe_start, restore_role

    ck, cfg, role = _save_distill_run(tmp_path / "ck", _distill_run())
    start = restore_role(ck, cfg, role, 0, _distill_run(train_steps=12, optimizer={"lr": 3e-2, "eps": 1e-6},
                                                        teacher_source="cache", teacher_values_dtype="fp8_e4m3"))
    assert start.step == 3
    line = describe_start(ck, start, 12)
    for part in (r"resumed from step 3 of .*ck \(checkpoint\.resume\) with other settings than it records",
                 r"optimizer\.lr: 0\.003 -> 0\.03", r"optimizer\.eps: 1e-08 -> 1e-06",
                 r"training\.train_steps: 6 -> 12", r"teacher\.source: online -> cache",
                 r"teacher\.values_dtype: fp32 -> fp8_e4m3", r"learning rate from step 4 on follows the new"):
        assert re.search(part, line), (part, line)
    assert "weight_decay" not in line and "nothing to train" not in line
    # The payloads' source alone leaves the schedule as it was.
    line = describe_start(ck, restore_role(ck, cfg, role, 0, _distill_run(teacher_source="cache")), 6)
    assert "teacher.source: online -> cache" in line and "learning rate" not in line, line
    # ZeRO-1 or not is a layout, not a setting of the updates.
    start = restore_role(ck, cfg, role, 0, _distill_run(optimizer={"distributed": True}))
    assert start == (3, ()) and describe_start(ck, start, 6) == (
        f"resumed from step 3 of {ck.dir} (checkpoint.resume)")


def test_a_resume_that_cannot_restore_random_states_says_so(world_of_one, tmp_path):
    """Random states are saved per rank: a resume in another layout, or without this rank's file,
    restarts dropout and sampling from training.seed, and the resumed job's log line says which."""
    from kdtrain.training.pretrain import describe_start, restore_role

    ck, cfg, role = _save_distill_run(tmp_path / "ck", _distill_run())
    step_dir = tmp_path / "ck" / "step_0000003"
    saved = torch.load(step_dir / "rng" / "rank00000.pt", weights_only=True)["cpu"]
    torch.manual_seed(99)
    assert restore_role(ck, cfg, role, 0, _distill_run()) == (3, ())
    assert torch.equal(torch.get_rng_state(), saved)
    (step_dir / "rng" / "rank00000.pt").unlink()
    start = restore_role(ck, cfg, role, 0, _distill_run())
    assert start.changes == ("step_0000003/rng/ has no file of rank(s) 0 (their random streams restart from "
                             "training.seed)",)
    meta = json.loads((step_dir / "meta.json").read_text())
    meta["layout"] = {"tp": 2, "pp": 1, "dp": 4, "rank_offset": 2}
    (step_dir / "meta.json").write_text(json.dumps(meta))
    line = describe_start(ck, restore_role(ck, cfg, role, 0, _distill_run()), 6)
    assert ("with other settings than it records (layout: tp=2 pp=1 dp=4 from rank 2 -> tp=1 pp=1 dp=1 (random "
            "streams restart from training.seed))") in line, line
    assert "learning rate" not in line


def test_output_directories_are_checked_before_training(world_of_one, tmp_path):
    """A logging or checkpoint directory below a file, or a checkpoint's step directory given as
    checkpoint.dir, is an error naming the field at the start: the run trained to its first save
    and crashed there with an OSError, or started a new run inside the old checkpoint."""
    from kdtrain.config import CheckpointConfig, LoggingConfig
    from kdtrain.config.run import load_pretrain_config
    from kdtrain.training.pretrain import check_output_dirs, pretrain, save_role

    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match=r"logging\.dir .*afile/run: cannot create the directory, .*afile is not a "
                                         r"directory"):
        check_output_dirs(LoggingConfig(dir=str(tmp_path / "afile" / "run")), CheckpointConfig())
    long = tmp_path / ("x" * 300)  # a name over the file system's limit (an OSError traceback before)
    for logging, ck in ((long, None), (tmp_path / "run", long / "ck")):
        with pytest.raises(ValueError, match=rf"{'logging' if ck is None else 'checkpoint'}\.dir .*x(/ck)?: File name "
                                             "too long"):
            check_output_dirs(LoggingConfig(dir=str(logging)), CheckpointConfig(dir=None if ck is None else str(ck)))
    cfg, groups, role = _build("tiny")
    save_role(CheckpointConfig(dir=str(tmp_path / "ck")), cfg, role, 2, {"kind": "pretrain", "global_batch_size": 8,
                                                                         "data": {}})
    with pytest.raises(ValueError, match=r"checkpoint\.dir: .*step_0000002 is one checkpoint \(a step directory\): "
                                         r"give its parent .*ck to resume"):
        check_output_dirs(LoggingConfig(dir=str(tmp_path / "run")), CheckpointConfig(dir=str(tmp_path / "ck" /
                                                                                             "step_0000002")))
    (tmp_path / "fresh" / "latest").mkdir(parents=True)  # with checkpoint.resume: false too
    with pytest.raises(ValueError, match=r"fresh/latest is a directory"):
        check_output_dirs(LoggingConfig(dir=str(tmp_path / "run")), CheckpointConfig(dir=str(tmp_path / "fresh"),
                                                                                     resume=False))
    with pytest.raises(ValueError, match=r"checkpoint\.dir .*afile/ck: cannot create the directory"):
        pretrain(load_pretrain_config("tiny", ["data.mock=true", f"logging.dir={tmp_path / 'run'}",
                                               f"checkpoint.dir={tmp_path / 'afile' / 'ck'}",
                                               "training.eval_batches=0"]))
    assert not (tmp_path / "run").exists()  # a run that fails to start leaves no empty directories
