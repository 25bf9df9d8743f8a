"""scripts/pretrain_gpt.py under torchrun (CPU, gloo): parallel layouts reproduce the single-rank
loss curve, a killed run resumes onto the same curve, and checkpoints reshard across layouts."""

from __future__ import annotations

import json
import os
import subprocess
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, read_metrics, run_entries, run_torchrun, sigkill_tree, signal_tree

pytestmark = pytest.mark.slow

STEPS = 8
# fp32 on CPU: layouts differ only in reduction order (observed ~1e-7 relative).
LAYOUT_RTOL = 1e-5


def _args(corpus: dict, run_dir: Path, *extra: str, steps: int = STEPS) -> list[str]:
    return ["--config", "tiny", f"data.path=[{corpus['prefix']}]", f"data.tokenizer={corpus['tokenizer']}",
            f"logging.dir={run_dir}", f"training.train_steps={steps}", *extra]


# Every successful run of this module, by world size. Each world size is one torchrun launch that
# runs its jobs one after another (conftest.run_entries), launched when a test first needs one of
# them. Layout keys are (tp, pp, dp, zero, tied).
LAYOUTS = [(1, 1, 1, False, False), (1, 1, 1, False, True),
           (2, 1, 1, False, False), (1, 2, 1, False, False), (1, 1, 2, False, False), (1, 1, 2, True, False),
           (1, 2, 1, False, True), (2, 1, 1, False, True), (2, 2, 1, False, False)]
KILL_STEPS = 40  # the SIGKILL test's run: 2 ranks, ZeRO-1
KILL_COMMON = ("parallel.dp=2", "optimizer.distributed=true")


class Runs:
    """The module's runs, each launched once: the layout runs, the uninterrupted reference of the
    SIGKILL test, both halves of the resume-under-another-layout test and, last on 2 ranks (it ends
    that launch), the run with an impossible layout."""

    def __init__(self, corpus, root: Path):
        self.corpus, self.root, self.cache, self.stdout, self.launched = corpus, root, {}, {}, set()
        self.resume_ckpt = root / "resume" / "ckpt"

    def _jobs(self, world: int) -> list[tuple[str, list[str], str]]:
        jobs = []
        for key in LAYOUTS:
            tp, pp, dp, zero, tied = key
            if tp * pp * dp == world:
                jobs.append(("pretrain_gpt.py", _args(
                    self.corpus, self.root / "-".join(map(str, key)), f"parallel.tp={tp}", f"parallel.pp={pp}",
                    f"optimizer.distributed={str(zero).lower()}", f"model.tie_embeddings={str(tied).lower()}"), key))
        if world == 1:  # steps 1-4 on one rank, then exit with a checkpoint
            jobs.append(("pretrain_gpt.py", _args(self.corpus, self.root / "resume" / "a", f"checkpoint.dir={self.resume_ckpt}",
                                                  "training.exit_interval=4"), "resume-a"))
        if world == 2:
            jobs.append(("pretrain_gpt.py", _args(self.corpus, self.root / "kill-ref", *KILL_COMMON, steps=KILL_STEPS),
                         "kill-ref"))
            jobs.append(("pretrain_gpt.py", _args(self.corpus, self.root / "bad-input", "parallel.tp=3"), "bad-input"))
        if world == 4:  # steps 5-8 with TP=2 x PP=2 from the one-rank checkpoint
            jobs.append(("pretrain_gpt.py", _args(self.corpus, self.root / "resume" / "b", f"checkpoint.dir={self.resume_ckpt}",
                                                  "parallel.tp=2", "parallel.pp=2"), "resume-b"))
        return jobs

    def _launch(self, world: int) -> None:
        if world in self.launched:
            return
        if world == 4:
            self._launch(1)  # the second half of the resume test starts from the first half's checkpoint
        jobs = self._jobs(world)
        outputs = run_entries(world, [(script, args) for script, args, _ in jobs], self.root / f"world{world}",
                              last_fails=world == 2)
        self.launched.add(world)
        for (_, args, key), out in zip(jobs, outputs):
            if key == "bad-input":
                self.cache[key] = out
                continue
            run_dir = next(a.split("=", 1)[1] for a in args if a.startswith("logging.dir="))
            self.cache[key] = read_metrics(run_dir)
            self.stdout[key] = out["stdout"]
        if world == 1:
            self.resume_latest = (self.resume_ckpt / "latest").read_text().strip()

    def get(self, tp=1, pp=1, dp=1, zero=False, tied=False) -> dict[int, dict]:
        key = (tp, pp, dp, zero, tied)
        assert key in LAYOUTS, key
        self._launch(tp * pp * dp)
        return self.cache[key]

    def run(self, name: str, world: int) -> dict[int, dict]:
        self._launch(world)
        return self.cache[name]


@pytest.fixture(scope="module")
def runs(tiny_corpus, tmp_path_factory):
    return Runs(tiny_corpus, tmp_path_factory.mktemp("runs"))


def _assert_same_curve(got: dict, ref: dict, rtol: float, steps=None):
    steps = steps or sorted(ref)
    for s in steps:
        for k in ("loss", "grad_norm"):
            assert got[s][k] == pytest.approx(ref[s][k], rel=rtol), f"step {s} {k}: {got[s][k]} vs {ref[s][k]}"


@pytest.mark.parametrize("layout", [
    dict(tp=2), dict(pp=2), dict(dp=2), dict(dp=2, zero=True), dict(tp=2, pp=2),
    dict(pp=2, tied=True), dict(tp=2, tied=True),
], ids=lambda d: "-".join(f"{k}{v}" for k, v in d.items()))
def test_layout_reproduces_single_rank_curve(runs, layout):
    ref = runs.get(tied=layout.get("tied", False))
    assert len(ref) == STEPS
    _assert_same_curve(runs.get(**layout), ref, LAYOUT_RTOL)


def test_tiny_model_learns(runs):
    curve = runs.get()
    assert curve[STEPS]["loss"] < curve[1]["loss"] - 0.3


def test_sigkill_then_resume_continues_the_same_curve(runs, tiny_corpus, tmp_path):
    """SIGKILL a 2-rank run (ZeRO-1, so both ranks write optimizer shards) right after a
    checkpoint, resume, and compare with the uninterrupted run: equal within 1e-6. Its saves are
    written in the background (checkpoint.async_save): the kill may find one half written."""
    steps, run_dir, ckpt = KILL_STEPS, tmp_path / "run", tmp_path / "ckpt"
    args = _args(tiny_corpus, run_dir, *KILL_COMMON, f"checkpoint.dir={ckpt}", "checkpoint.save_interval=2",
                 "checkpoint.keep=3", "checkpoint.async_save=true", steps=steps)
    reference = runs.run("kill-ref", world=2)  # the same run, uninterrupted
    assert sorted(reference) == list(range(1, steps + 1))

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(REPO / "scripts" / "pretrain_gpt.py"), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    latest, deadline = ckpt / "latest", time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and latest.read_text().strip() >= "step_0000004":
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    sigkill_tree(proc.pid)  # torchrun and its workers (each in a session of its own)
    proc.wait(timeout=60)
    killed_at = int(latest.read_text().strip().split("_")[1])
    assert 4 <= killed_at < steps

    out = run_torchrun(2, "pretrain_gpt.py", args).stdout
    # The second job resumed (a job that started over would also reproduce the curve: it is
    # deterministic): it says so, and steps up to the checkpoint were logged by the first job only.
    assert f"resumed from step {killed_at} of {ckpt}" in out, out[-2000:]
    logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "train"]
    assert all(logged.count(s) == 1 for s in range(1, killed_at + 1)), logged
    resumed = read_metrics(run_dir)
    assert sorted(resumed) == list(range(1, steps + 1))
    for s in range(killed_at + 1, steps + 1):
        assert abs(resumed[s]["loss"] - reference[s]["loss"]) <= 1e-6, f"step {s}"
    assert not list(ckpt.glob("*.tmp"))


def test_sigterm_stops_both_ranks_after_one_step_with_a_checkpoint_and_the_run_resumes(runs, tiny_corpus, tmp_path):
    """With ``training.exit_signal=SIGTERM``, a SIGTERM to every process of the job, as Slurm
    sends at preemption (each worker gets it twice: torchrun passes its own on), stops both ranks
    after the same step, with a checkpoint of that step and no traceback; the same command resumes
    onto the uninterrupted curve."""
    steps, run_dir, ckpt = KILL_STEPS, tmp_path / "run", tmp_path / "ckpt"
    args = _args(tiny_corpus, run_dir, *KILL_COMMON, f"checkpoint.dir={ckpt}", "training.exit_signal=SIGTERM",
                 steps=steps)
    reference = runs.run("kill-ref", world=2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(REPO / "scripts" / "pretrain_gpt.py"), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    metrics, deadline = run_dir / "metrics.jsonl", time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if metrics.is_file() and metrics.read_text().count('"kind": "train"') >= 3:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run finished before the signal"
        signal_tree(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        sigkill_tree(proc.pid)
    text = log.read_text()
    stopped = re.findall(r"training\.exit_signal: SIGTERM received: stopping after step (\d+)", text)
    assert len(stopped) == 1, text[-3000:]  # written once, by rank 0
    stop = int(stopped[0])
    assert 3 <= stop < steps and (ckpt / "latest").read_text().strip() == f"step_{stop:07d}"
    # The only traceback is torchrun's own (it re-raises the signal once its workers have exited).
    tracebacks = text.split("Traceback (most recent call last):")[1:]
    assert len(tracebacks) <= 1 and all("SignalException" in t and "kdtrain" not in t for t in tracebacks), text[-3000:]
    assert sorted(read_metrics(run_dir)) == list(range(1, stop + 1))

    out = run_torchrun(2, "pretrain_gpt.py", args).stdout
    assert f"resumed from step {stop} of {ckpt}" in out, out[-2000:]
    resumed = read_metrics(run_dir)
    assert sorted(resumed) == list(range(1, steps + 1))
    for s in range(1, steps + 1):
        assert abs(resumed[s]["loss"] - reference[s]["loss"]) <= 1e-6, f"step {s}"


def test_resume_under_another_layout(runs):
    """Steps 1-4 on one rank, steps 5-8 with TP=2 x PP=2 from its checkpoint: same curve."""
    second = runs.run("resume-b", world=4)
    assert runs.resume_latest == "step_0000004"  # what the first half left (exit_interval=4)
    assert ("(checkpoint.resume) with other settings than it records (layout: tp=1 pp=1 dp=1 -> tp=2 pp=2 dp=1 "
            "(random streams restart from training.seed))") in runs.stdout["resume-b"], runs.stdout["resume-b"]
    assert sorted(runs.run("resume-a", world=1)) == [1, 2, 3, 4]
    assert sorted(second) == list(range(5, STEPS + 1))
    _assert_same_curve(second, runs.get(), LAYOUT_RTOL, steps=range(5, STEPS + 1))


def test_bad_input_gives_a_clear_error(runs):
    proc = runs.run("bad-input", world=2)  # the last run of the 2-rank launch: its exit status is the launch's
    assert proc["returncode"] != 0 and "0" not in proc["rc"], proc["rc"]
    assert "error: parallel.tp: tp*pp = 3*1 = 3 does not divide the 2 ranks" in proc["stderr"]
    assert "megatron/core" not in proc["stderr"]  # no stack trace from inside megatron-core


def _pretrain_with_dropout(rank, world, root, tp):
    """The same run twice in one launch (the second must repeat the first's loss)."""
    import torch

    import kdtrain.training.pretrain as loop
    from kdtrain.config import load_pretrain_config

    roles, real = [], loop.build_trainable
    loop.build_trainable = lambda *a, **k: roles.append(real(*a, **k)) or roles[-1]
    losses = [loop.pretrain(load_pretrain_config("tiny", [
        "data.mock=true", f"parallel.tp={tp}", "model.hidden_dropout=0.1", "model.attention_dropout=0.1",
        "training.train_steps=3", "training.eval_batches=0", f"logging.dir={root}/run{run}-{rank}"]))["train_loss"]
        for run in range(2)]
    norms = {n: p.detach().clone() for n, p in roles[0].model.named_parameters() if "layernorm" in n}
    torch.save({"norms": norms, "losses": losses}, f"{root}/rank{rank}.pt")


def test_dropout_is_seeded_alike_on_the_tensor_ranks(tmp_path):
    """Hidden dropout after a row-parallel all-reduce acts on activations every tensor rank holds
    alike: each must drop the same elements, or the replicated norm weights (whose gradients
    follow) drift apart between the ranks, unnoticed (a checkpoint keeps tensor rank 0's copy).
    And a run with dropout is reproducible: two identical runs, the same loss."""
    import torch

    from conftest import run_spawn

    run_spawn(2, _pretrain_with_dropout, str(tmp_path), 2, tmp_path=tmp_path)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert a["norms"] and all(torch.equal(a["norms"][n], b["norms"][n]) for n in a["norms"]), \
        max(float((a["norms"][n] - b["norms"][n]).abs().max()) for n in a["norms"])
    first, again = a["losses"]
    assert first == again, (first, again)


def test_weights_trained_on_another_tokenizers_ids_are_refused(world_of_one, tiny_corpus, tmp_path):
    """checkpoint.load of a model trained on ids of another tokenizer with the same vocabulary size:
    every row means another token, so it is refused (the corpora record their tokenizer), while
    the run's own tokenizer loads."""
    from kdtrain.config import load_pretrain_config
    from kdtrain.data import build_demo_corpus, train_tokenizer
    from kdtrain.data.preprocess import encode_files
    from kdtrain.training.pretrain import pretrain

    def run(prefix, *extra):
        return pretrain(load_pretrain_config("tiny", [f"data.path=[{prefix}]", "precision.device=cpu",
                                                      "training.train_steps=1", "training.eval_batches=0",
                                                      f"logging.dir={tmp_path / 'log'}", *extra]))

    run(tiny_corpus["prefix"], f"checkpoint.dir={tmp_path / 'a'}")
    other = tmp_path / "other.jsonl"
    build_demo_corpus(str(other), max_documents=60)
    tok = train_tokenizer([str(other)], str(tmp_path / "tok"), vocab_size=512)  # other pieces, same size
    encode_files([str(other)], tok, str(tmp_path / "other"))
    with pytest.raises(ValueError, match=r"checkpoint\.load: .* was trained on ids of tokenizer .*this run.s data is "
                                         r"of tokenizer"):
        run(tmp_path / "other", f"checkpoint.load={tmp_path / 'a'}")
    run(tiny_corpus["prefix"], f"checkpoint.load={tmp_path / 'a'}")
    # The tools that run a model alone on a corpus refuse it too: held-out losses, pruning's
    # calibration.
    from kdtrain.config import DataConfig
    from kdtrain.evaluate.cli import evaluate_models
    from kdtrain.prune.cli import prune
    from kdtrain.training.checkpoint import CheckpointReader
    from kdtrain.training.step_dirs import latest_checkpoint

    with pytest.raises(ValueError, match=r"eval --model\.load: .* was trained on ids of tokenizer"):
        evaluate_models([str(tmp_path / "a")], DataConfig(path=[str(tmp_path / "other")], seq_length=32),
                        max_windows=2, device="cpu")
    with pytest.raises(ValueError, match=r"prune --src\.load: .* was trained on ids of tokenizer"):
        prune(str(tmp_path / "a"), str(tmp_path / "bad"), num_layers=1, data=[str(tmp_path / "other")],
              seq_length=32, calib_samples=2, device="cpu")
    # A student pruned from the model keeps the record (kdtrain prune).

    prune(str(tmp_path / "a"), str(tmp_path / "pruned"), keep_layers=[0], device="cpu")
    assert CheckpointReader(latest_checkpoint(tmp_path / "pruned")).meta["tokenizer_fingerprint"] == \
        CheckpointReader(latest_checkpoint(tmp_path / "a")).meta["tokenizer_fingerprint"] is not None


def test_a_diverged_run_stops_on_its_last_good_checkpoint(world_of_one, tmp_path):
    """A learning rate far too large: the gradient norm turns non-finite and every step from then
    on is skipped. training.max_skipped_steps in a row end the run with an error naming the field
    (before, it trained on to the end, logging nan); the step that ends it saves nothing (the
    checkpoints before it hold the weights of the last update, which skipped steps do not change)
    and each skipped step is logged."""
    from conftest import read_metrics
    from kdtrain.config import load_pretrain_config
    from kdtrain.training.step_dirs import latest_checkpoint
    from kdtrain.training.pretrain import pretrain

    cfg = load_pretrain_config("tiny", [
        "data.mock=true", "precision.device=cpu", "training.train_steps=20", "training.eval_batches=0",
        "optimizer.lr=1e4", "optimizer.min_lr=0", "training.max_skipped_steps=3", "logging.interval=5",
        f"logging.dir={tmp_path / 'log'}", f"checkpoint.dir={tmp_path / 'ck'}", "checkpoint.save_interval=1"])
    with pytest.raises(ValueError, match=r"training\.max_skipped_steps: 3 steps in a row \(steps (\d+)-(\d+)\) had "
                                         r"a non-finite gradient norm") as e:
        pretrain(cfg)
    first, last = (int(x) for x in re.search(r"steps (\d+)-(\d+)", str(e.value)).groups())
    assert last - first == 2 and last < 20
    logged = read_metrics(tmp_path / "log")
    assert all(logged[s]["skipped"] == 1 for s in range(first, last + 1))  # off the 5-step interval too
    assert latest_checkpoint(str(tmp_path / "ck")).name == f"step_{last - 1:07d}"


def test_a_log_line_reports_the_interval_s_mean(world_of_one, tmp_path):
    """logging.interval=2: the line of step 2 reports the mean loss of steps 1 and 2 (the same
    steps logged one by one, equal token counts) and their mean step time, not step 2's alone."""
    from conftest import read_metrics
    from kdtrain.config import load_pretrain_config
    from kdtrain.training.pretrain import pretrain

    for every in (1, 2):
        pretrain(load_pretrain_config("tiny", [
            "data.mock=true", "precision.device=cpu", "training.train_steps=4", "training.eval_batches=0",
            f"logging.interval={every}", f"logging.dir={tmp_path / str(every)}"]))
    one, two = read_metrics(tmp_path / "1"), read_metrics(tmp_path / "2")
    assert sorted(one) == [1, 2, 3, 4] and sorted(two) == [2, 4]
    for s in (2, 4):
        assert two[s]["loss"] == pytest.approx((one[s - 1]["loss"] + one[s]["loss"]) / 2, rel=1e-6)
        assert two[s]["loss"] != pytest.approx(one[s]["loss"], rel=1e-6)
        assert two[s]["lr"] == one[s]["lr"] and two[s]["grad_norm"] == pytest.approx(one[s]["grad_norm"], rel=1e-6)
        batch = two[s]["consumed_samples"] / s
        assert two[s]["samples_per_s"] == pytest.approx(batch / two[s]["step_time_s"])  # the interval's mean step


@pytest.mark.parametrize("bf16", [False, True])
def test_a_model_that_cannot_fit_is_refused_before_it_is_built(world_of_one, monkeypatch, bf16):
    """A model too large for the device failed inside megatron-core's layer construction (the
    allocator's error, deep in a stack trace). Its weights, gradients and optimizer state are
    counted first: the check refuses exactly what the built role holds after a step, and lets
    through a device with just that much free."""
    import torch

    import kdtrain.parallel
    from kdtrain.config import OptimizerConfig, load_model_config
    from kdtrain.parallel import RoleLayout, build_role_groups
    from kdtrain.training.pretrain import build_trainable, check_fits

    cfg, dtype = load_model_config("tiny"), torch.bfloat16 if bf16 else torch.float32
    groups = build_role_groups(RoleLayout("student", 0, 1, 1, 1))
    role = build_trainable(cfg, groups, OptimizerConfig(), 16, 1, torch.device("cpu"), dtype, seed=3)
    for p in role.model.parameters():
        p.grad = torch.zeros_like(p)
    role.optimizer.step(1e-3)  # Adam's moments exist from the first step
    weights = sum(p.numel() * p.element_size() for p in role.model.parameters())
    opt = role.optimizer
    moments = sum(t.numel() * t.element_size() for st in opt.opt.state.values()
                  for name, t in st.items() if name != "step")
    masters = sum(s.master.numel() * 4 for s in opt.owned if s.master is not s.param)
    held = weights + role.grads.data.numel() * 4 + moments + masters
    for free, trained, refused in ((held - 1, True, True), (held, True, False),
                                   (weights - 1, False, True), (weights, False, False)):
        monkeypatch.setattr(kdtrain.parallel, "free_memory_bytes", lambda device, free=free: free)
        if refused:
            with pytest.raises(ValueError, match=r"student tiny: a rank of pipeline stage 0 .* needs "
                                                 r".* GiB for its weights.* GiB free: split the model"):
                check_fits(cfg, groups, torch.device("cpu"), dtype, trained)
        else:
            check_fits(cfg, groups, torch.device("cpu"), dtype, trained)
    # The teacher (weights only) is checked before it is built.
    from kdtrain.stream import PayloadSpec
    from kdtrain.training.teacher import Teacher

    monkeypatch.setattr(kdtrain.parallel, "free_memory_bytes", lambda device: weights - 1)
    with pytest.raises(ValueError, match=r"teacher tiny: .* needs .* for its weights alone"):
        Teacher(cfg, build_role_groups(RoleLayout("teacher", 0, 1, 1, 1)), PayloadSpec(16, 1, 4, dtype), 1.0, None,
                torch.device("cpu"), dtype, seed=1)
