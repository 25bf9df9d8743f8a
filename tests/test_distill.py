"""scripts/distill_gpt.py under torchrun (CPU, gloo): every split and layout reproduces the
single-process distillation run (same seeds, data and weights) step for step.

The single-process run computes the teacher's top-k and the student's loss and gradients with
TP = PP = DP = 1 on one rank; the multi-rank runs move the payload between roles and reduce over
their groups. fp32 on CPU: they differ only in reduction order (relative tolerance 1e-5, absolute
1e-7, on the loss and on the global gradient norm, which sums the squares of every student gradient).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import read_metrics, run_entries, run_torchrun
from kdtrain.stream import PayloadSpec
from kdtrain.training.profiling import read_profiles

pytestmark = pytest.mark.slow
RTOL, ATOL = 1e-5, 1e-7


def _args(corpus: dict, run_dir: Path, *extra: str) -> list[str]:
    """The tiny run's arguments; ``RUN_DIR`` in an override is the run's directory."""
    return ["--config", "tiny", f"data.path=[{corpus['prefix']}]", f"data.tokenizer={corpus['tokenizer']}",
            f"logging.dir={run_dir}", *(e.replace("RUN_DIR", str(run_dir)) for e in extra)]


# (ranks, overrides, payloads that cross ranks per step). The tiny run has 4 micro-batches a step.
# The disaggregated PP=2 run also evaluates after step 2 (teacher ranks serving mid-run, with the
# training stream before and after). Colocated TP=2 with identical layouts hands payloads over in
# place (zero copies; its student
# recomputes its activations in the backward, tensor-parallel collectives included); colocated
# teacher PP=2 on ranks 0-1 serves the student replica on rank 1 locally and sends to rank 0.
LAYOUTS = {
    # Profiled (steps 2-3) with a time limit that never passes: the teacher's sends and the stop
    # requests' reductions outlive its steps (StepProfiler's settle).
    "disagg-tTP2-sDP2": (4, ["split.mode=disaggregated", "split.teacher_ranks=2", "teacher.tp=2", "student.dp=2",
                             "logging.profile_steps=[2,3]", "training.exit_duration_min=600",
                             "checkpoint.dir=RUN_DIR/checkpoints"], 4),
    "coloc-TP2-recompute": (2, ["teacher.tp=2", "student.tp=2", "training.recompute=true"], 0),
    "disagg-tPP2-sPP2": (4, ["split.mode=disaggregated", "split.teacher_ranks=2", "teacher.pp=2", "student.pp=2",
                             "training.eval_interval=2"], 4),
    "coloc-tPP2-sDP2": (2, ["teacher.pp=2", "student.dp=2"], 2),
    # Each student replica's rank holds the payload of its own micro-batches (teacher TP=2 on both
    # ranks): zero copies although the layouts differ.
    "coloc-tTP2-sDP2": (2, ["teacher.tp=2", "student.dp=2"], 0),
}
# Students trained from the fp32 cache: (ranks, teacher.source).
FROM_CACHE = [(1, "cache"), (2, "cache"), (1, "mixed")]


def _from_cache_args(source: str, nproc: int, cache: Path) -> list[str]:
    extra = [f"teacher.source={source}", f"teacher.cache={cache}"]
    if source == "mixed":
        extra.append("teacher.live_fraction=0.5")
    if nproc == 2:
        extra.append("student.dp=2")
    return extra


# On-policy distillation: half the steps on the student's own samples (prompt: the first 8 tokens),
# on one rank and in three colocated layouts and a disaggregated one (the sampling noise is keyed by
# sample, not by layout; the PP=2 student decodes through its two stages).
ONPOLICY = ["onpolicy.fraction=0.5", "onpolicy.prompt_length=8"]
# (The DP=2 run also samples in calls of 1 row instead of the replica's 4.) Ranks of each layout:
ONPOLICY_LAYOUTS = {"onpolicy-TP2": (2, ["teacher.tp=2", "student.tp=2"]),
                    "onpolicy-DP2": (2, ["student.dp=2", "onpolicy.sample_batch=1"]),
                    "onpolicy-PP2": (2, ["student.pp=2"]),
                    "onpolicy-disagg": (4, ["split.mode=disaggregated", "split.teacher_ranks=2", "teacher.tp=2",
                                            "student.dp=2"])}

# Conversation data (replies as the only targets, a different count per micro-batch): one rank,
# and two student replicas, each normalising by the whole batch's count. (The teacher stays at
# tp 1: with a few dozen targets a step, the rounding a tensor-parallel teacher adds to the
# targets grows through Adam to ~1e-5 of the gradient norm within four steps.)
CHAT_LAYOUT = ["student.dp=2"]

# Attention within documents, on short conversations (conftest.short_chat_corpus: most windows
# hold a document start with replies after it), every reply of half the steps sampled. Two ranks:
# a colocated teacher in two pipeline stages (the masks on both) and two student replicas
# sampling 3 rows per call. DOCS_WINDOW: the same run with attention over the window.
DOCS_WINDOW = ["onpolicy.replies=all"] + ONPOLICY
DOCS = ["data.attention=documents"] + DOCS_WINDOW
DOCS_LAYOUT = ["teacher.pp=2", "student.dp=2", "onpolicy.sample_batch=3"]

# Runs that must fail with a user error, each the last job of its launch (it ends the launch).
FAILING = {1: "refused-topk", 2: "mismatched-vocab"}


class Runs:
    """The module's runs, each launched once. Each world size is one torchrun launch that runs its
    jobs one after another (conftest.run_entries): on 1 rank the single-process reference, the fp32
    teacher cache (scripts/cache_teacher.py), the students from it and a run asking the cache for
    more than it holds; on 2 ranks the colocated layouts, a student from the cache, split.mode=auto
    and a student whose vocabulary differs from the teacher's; on 4 ranks the disaggregated
    layouts."""

    def __init__(self, corpus, chat_corpus, short_chats: str, root: Path):
        self.corpus, self.chat, self.root, self.results, self.launched = corpus, chat_corpus, root, {}, set()
        self.short_chats = short_chats
        self.cache_dir = root / "teacher-cache"

    def _jobs(self, world: int) -> list[tuple[str, str, list[str]]]:
        c = self.corpus
        jobs = []
        if world == 1:
            jobs.append(("reference", "distill_gpt.py", []))
            # The tiny teacher's payload for every sample the tiny run consumes, values in fp32.
            jobs.append(("fp32-cache", "cache_teacher.py", [
                "--config", "tiny", "--out", str(self.cache_dir), f"data.path=[{c['prefix']}]",
                f"data.tokenizer={c['tokenizer']}", "cache.dtype=fp32"]))
        jobs += [(name, "distill_gpt.py", extra) for name, (n, extra, _) in LAYOUTS.items() if n == world]
        jobs += [(name, "distill_gpt.py", ONPOLICY + extra) for name, (n, extra) in ONPOLICY_LAYOUTS.items()
                 if n == world]
        jobs += [(f"{n}-{source}", "distill_gpt.py", _from_cache_args(source, n, self.cache_dir))
                 for n, source in FROM_CACHE if n == world]
        if world == 1:
            jobs.append(("onpolicy-ref", "distill_gpt.py", ONPOLICY))
            # Data steps from the fp32 cache, sampled steps live (live_fraction 0: only those).
            jobs.append(("onpolicy-mixed", "distill_gpt.py", ONPOLICY + [
                "teacher.source=mixed", f"teacher.cache={self.cache_dir}", "teacher.live_fraction=0.0"]))
            jobs.append(("onpolicy-all", "distill_gpt.py", ["onpolicy.fraction=1.0", "onpolicy.prompt_length=8",
                                                            "training.train_steps=12", "loss.alpha=0.5"]))
        chat = [f"data.path=[{self.chat['prefix']}]"]
        if world == 1:
            jobs.append(("chat-ref", "distill_gpt.py", chat))
            jobs.append(("chat-onpolicy-ref", "distill_gpt.py", chat + ONPOLICY))
            jobs.append(("chat-onpolicy-all-ref", "distill_gpt.py", chat + ONPOLICY + ["onpolicy.replies=all"]))
            chat_cache = self.root / "chat-teacher-cache"
            jobs.append(("chat-fp32-cache", "cache_teacher.py", [
                "--config", "tiny", "--out", str(chat_cache), *chat, f"data.tokenizer={c['tokenizer']}",
                "cache.dtype=fp32", "cache.positions=targets"]))
            jobs.append(("chat-cache", "distill_gpt.py", chat + ["teacher.source=cache", f"teacher.cache={chat_cache}"]))
        short = [f"data.path=[{self.short_chats}]"]
        if world == 1:
            jobs.append(("docs-ref", "distill_gpt.py", short + DOCS))
            jobs.append(("docs-window", "distill_gpt.py", short + DOCS_WINDOW))
            docs_cache = self.root / "docs-teacher-cache"
            jobs.append(("docs-fp32-cache", "cache_teacher.py", [
                "--config", "tiny", "--out", str(docs_cache), *short, f"data.tokenizer={c['tokenizer']}",
                "cache.dtype=fp32", "data.attention=documents"]))
            # Data steps from the cache, sampled steps live.
            jobs.append(("docs-mixed", "distill_gpt.py", short + DOCS + [
                "teacher.source=mixed", f"teacher.cache={docs_cache}", "teacher.live_fraction=0.0"]))
        if world == 2:
            jobs.append(("auto", "distill_gpt.py", ["split.mode=auto"]))
            jobs.append(("chat-layout", "distill_gpt.py", chat + CHAT_LAYOUT))
            jobs.append(("chat-onpolicy-layout", "distill_gpt.py",
                         chat + ONPOLICY + CHAT_LAYOUT + ["onpolicy.sample_batch=1"]))
            jobs.append(("chat-onpolicy-all-layout", "distill_gpt.py",
                         chat + ONPOLICY + CHAT_LAYOUT + ["onpolicy.replies=all", "onpolicy.sample_batch=3"]))
            jobs.append(("docs-layout", "distill_gpt.py", short + DOCS + DOCS_LAYOUT))
        if world == 1:  # cached k is 16
            jobs.append(("refused-topk", "distill_gpt.py",
                         ["teacher.source=cache", f"teacher.cache={self.cache_dir}", "teacher.topk=32"]))
        if world == 2:
            jobs.append(("mismatched-vocab", "distill_gpt.py", ["student.model=demo-student"]))
        return [(name, script, args if script == "cache_teacher.py" else _args(c, self.root / name, *args))
                for name, script, args in jobs]

    def _launch(self, world: int) -> None:
        if world in self.launched:
            return
        if world > 1:
            self._launch(1)  # the cache the other worlds' students read
        jobs = self._jobs(world)
        outputs = run_entries(world, [(script, args) for _, script, args in jobs], self.root / f"world{world}",
                              last_fails=world in FAILING)
        self.launched.add(world)
        for (name, script, _), out in zip(jobs, outputs):
            if name in FAILING.values():
                self.results[name] = out
                continue
            metrics = read_metrics(self.root / name) if script == "distill_gpt.py" else None
            self.results[name] = {"metrics": metrics, "stdout": out["stdout"]}

    def get(self, name: str, world: int) -> dict:
        self._launch(world)
        return self.results[name]


@pytest.fixture(scope="module")
def runs(tiny_corpus, tiny_chat_corpus, short_chat_corpus, tmp_path_factory):
    return Runs(tiny_corpus, tiny_chat_corpus, short_chat_corpus, tmp_path_factory.mktemp("distill-runs"))


@pytest.fixture(scope="module")
def reference(runs):
    return runs.get("reference", world=1)["metrics"]


@pytest.fixture(scope="module")
def fp32_cache(runs):
    """The tiny teacher's payload for every sample the tiny run consumes, values in fp32."""
    runs.get("fp32-cache", world=1)
    return runs.cache_dir


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_split_and_layout_reproduce_single_process(reference, runs, layout):
    nproc, extra, sent_per_step = LAYOUTS[layout]
    got = runs.get(layout, world=nproc)["metrics"]
    assert sorted(got) == sorted(reference)
    for s in sorted(reference):
        for k in ("loss", "kd_loss", "grad_norm"):
            assert got[s][k] == pytest.approx(reference[s][k], rel=RTOL, abs=ATOL), f"step {s} {k}: {got[s][k]} vs {reference[s][k]}"
        # Teacher-side metrics reach the student's log in every split.
        assert got[s]["teacher_compute_s"] > 0 and 0 < got[s]["teacher_busy"]
        assert got[s]["student_wait_s"] >= 0 and got[s]["teacher_wait_s"] >= 0
        assert got[s]["payload_bytes_per_step"] == sent_per_step * PayloadSpec(32, 2, 16, torch.float32).nbytes
    # The final held-out figures, the divergence to the teacher included: the teacher replicas
    # serve the held-out batches through the same channel, in every split.
    ref_valid, valid = (read_metrics(runs.root / name, "valid")[4] for name in ("reference", layout))
    assert ref_valid["valid_kd_loss"] > 0
    if "training.eval_interval=2" in extra:
        assert sorted(read_metrics(runs.root / layout, "valid")) == [2, 4]
    if "logging.profile_steps=[2,3]" in extra:  # every rank wrote its recording and lived on
        assert {r: p["steps"] for r, p in read_profiles(runs.root / layout).items()} == {r: 2 for r in range(nproc)}
        assert (runs.root / layout / "checkpoints" / "latest").read_text().strip() == "step_0000004"
    for k in ("valid_loss", "valid_kd_loss"):
        assert valid[k] == pytest.approx(ref_valid[k], rel=RTOL, abs=ATOL), k


def test_mismatched_vocab_is_a_clear_error(runs):
    proc = runs.get("mismatched-vocab", world=2)
    assert proc["returncode"] != 0 and "0" not in proc["rc"], proc["rc"]
    assert "vocab_size 4096 of student 'demo-student' differs" in proc["stderr"], proc["stderr"][-2000:]


# A student trained from an fp32 cache sees bitwise the live teacher's payloads (tests/test_cache.py),
# so its loss curve is the online run's (same seeds and data) up to reduction order in the student.
@pytest.mark.parametrize("nproc,source", FROM_CACHE)
def test_student_from_the_cache_follows_the_online_loss_curve(reference, runs, nproc, source):
    got = runs.get(f"{nproc}-{source}", world=nproc)["metrics"]
    assert sorted(got) == sorted(reference)
    for s in sorted(reference):
        for k in ("loss", "kd_loss", "grad_norm"):
            assert got[s][k] == pytest.approx(reference[s][k], rel=RTOL, abs=ATOL), f"step {s} {k}"
    live = [got[s]["teacher_live"] for s in sorted(got)]
    assert live == ([0] * len(live) if source == "cache" else [0, 1, 0, 1]), live
    # Teacher throughput only where a teacher ran.
    assert all((got[s]["teacher_tflops_per_device"] > 0) == bool(got[s]["teacher_live"]) for s in got)
    # Held-out: the cross entropy always; the divergence where a live teacher runs (mixed).
    ref_valid, valid = (read_metrics(runs.root / name, "valid")[4] for name in ("reference", f"{nproc}-{source}"))
    assert valid["valid_loss"] == pytest.approx(ref_valid["valid_loss"], rel=RTOL, abs=ATOL)
    if source == "cache":
        assert "valid_kd_loss" not in valid
    else:
        assert valid["valid_kd_loss"] == pytest.approx(ref_valid["valid_kd_loss"], rel=RTOL, abs=ATOL)


def test_cache_that_does_not_match_the_run_is_refused(runs, tiny_corpus, fp32_cache, tmp_path, world_of_one):
    from kdtrain.config.distill import load_distill_config
    from kdtrain.training.distill import distill

    proc = runs.get("refused-topk", world=1)  # teacher.topk=32 from a cache of k=16
    assert proc["returncode"] != 0 and "0" not in proc["rc"], proc["rc"]
    assert "topk" in proc["stderr"] and str(fp32_cache) in proc["stderr"], proc["stderr"][-2000:]

    def cfg(run_dir, *extra):  # the script's configuration, run in this process
        args = _args(tiny_corpus, run_dir, "precision.device=cpu", *extra)[2:]
        return load_distill_config("tiny", args)

    with pytest.raises(ValueError, match="split.mode"):
        cfg(tmp_path, "teacher.source=cache", f"teacher.cache={fp32_cache}", "split.mode=disaggregated",
            "split.teacher_ranks=1").validate(2)
    # A cache two steps short: refused before the first step (it used to fail at step 5 of 6, the
    # training lost); a mixed run says from which step every step runs the live teacher.
    longer = ["training.train_steps=6", "training.eval_batches=0", f"teacher.cache={fp32_cache}"]
    with pytest.raises(ValueError, match="holds 32 samples but step 6 needs samples up to 47"):
        distill(cfg(tmp_path / "short", "teacher.source=cache", *longer))
    assert not (tmp_path / "short" / "metrics.jsonl").exists() or not read_metrics(tmp_path / "short")
    proc = run_torchrun(1, "distill_gpt.py", _args(tiny_corpus, tmp_path / "mixed", "teacher.source=mixed",
                                                   "teacher.live_fraction=0", *longer), timeout=180)
    assert "steps 5-6 run the live teacher" in proc.stdout, proc.stdout[-2000:]
    assert [r["teacher_live"] for _, r in sorted(read_metrics(tmp_path / "mixed").items())] == [0, 0, 0, 0, 1, 1]


def test_split_auto_runs_the_planners_plan(reference, runs):
    """split.mode=auto: the planner's layout is logged and, like every layout, reproduces the
    single-process run."""
    run = runs.get("auto", world=2)
    assert "split auto (2 ranks" in run["stdout"] and "runner-up:" in run["stdout"], run["stdout"][-2000:]
    # The KD loss's implementation, resolved and agreed at start-up, is logged once.
    assert run["stdout"].count("KD loss: pure-torch reference (logits on cpu)") == 1, run["stdout"][-2000:]
    got = run["metrics"]
    for s in sorted(reference):
        assert got[s]["loss"] == pytest.approx(reference[s]["loss"], rel=RTOL, abs=ATOL), f"step {s}"


@pytest.mark.parametrize("layout", list(ONPOLICY_LAYOUTS))
def test_onpolicy_steps_reproduce_across_layouts(reference, runs, layout):
    """On-policy steps train on the student's own samples, scored by the teacher (a teacher scoring
    other tokens fails the payload checksum); the samples, and so the whole run, are the same in
    every layout, and the off-policy steps are the data steps of the plain run."""
    ref = runs.get("onpolicy-ref", world=1)["metrics"]
    assert [ref[s]["onpolicy"] for s in sorted(ref)] == [0, 1, 0, 1]
    assert ref[2]["sample_s"] > 0 and ref[1]["sample_s"] == 0
    assert ref[1]["loss"] == pytest.approx(reference[1]["loss"], rel=RTOL, abs=ATOL)
    assert ref[2]["kd_loss"] != pytest.approx(reference[2]["kd_loss"], rel=1e-2)  # other tokens
    got = runs.get(layout, world=ONPOLICY_LAYOUTS[layout][0])["metrics"]
    assert sorted(got) == sorted(ref)
    for s in sorted(ref):
        for k in ("loss", "kd_loss", "grad_norm"):
            assert got[s][k] == pytest.approx(ref[s][k], rel=RTOL, abs=ATOL), f"step {s} {k}: {got[s][k]} vs {ref[s][k]}"


def test_onpolicy_student_learns_on_its_own_samples(runs):
    """Every step on the student's samples: the divergence from the teacher on them falls (the
    hard-label term is dropped on those steps, so loss = kd_loss there)."""
    got = runs.get("onpolicy-all", world=1)["metrics"]
    kd = [got[s]["kd_loss"] for s in sorted(got)]
    assert all(got[s]["onpolicy"] == 1 for s in got)
    assert all(got[s]["loss"] == pytest.approx(got[s]["kd_loss"], rel=1e-6) for s in got)
    assert sum(kd[-3:]) < 0.8 * sum(kd[:3]), kd


def test_onpolicy_with_a_cache_runs_sampled_steps_live(runs):
    """teacher.source: mixed with on-policy steps: those go to the live teacher, the data steps to
    the cache, and the run is the online on-policy run (the fp32 cache is bitwise the teacher)."""
    ref = runs.get("onpolicy-ref", world=1)["metrics"]
    got = runs.get("onpolicy-mixed", world=1)["metrics"]
    assert [got[s]["teacher_live"] for s in sorted(got)] == [got[s]["onpolicy"] for s in sorted(got)] == [0, 1, 0, 1]
    for s in sorted(ref):
        for k in ("loss", "kd_loss", "grad_norm"):
            assert got[s][k] == pytest.approx(ref[s][k], rel=RTOL, abs=ATOL), f"step {s} {k}"


@pytest.mark.parametrize("mode", ["data", "onpolicy", "onpolicy-all"])
def test_conversation_data_reproduces_across_layouts(runs, mode):
    """Replies as the only targets: each student replica's micro-batches hold different numbers of
    them, and every rank normalises by the global count, so the two-replica run is the one-rank
    run; the held-out loss is taken over replies too. On-policy steps on conversations: the
    student writes each window's first reply from the conversation before it (rows with other
    prompt lengths, sampled one at a time in the two-replica run), and trains on those tokens."""
    names = {"data": ("chat-ref", "chat-layout"), "onpolicy": ("chat-onpolicy-ref", "chat-onpolicy-layout"),
             "onpolicy-all": ("chat-onpolicy-all-ref", "chat-onpolicy-all-layout")}[mode]
    ref, got = runs.get(names[0], world=1)["metrics"], runs.get(names[1], world=2)["metrics"]
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4]
    for s in sorted(ref):
        for k in ("loss", "kd_loss", "grad_norm") + (("sampled_tokens",) if mode != "data" else ()):
            assert got[s][k] == pytest.approx(ref[s][k], rel=RTOL, abs=ATOL), f"step {s} {k}: {got[s][k]} vs {ref[s][k]}"
    valid = [read_metrics(runs.root / name, "valid") for name in names]
    assert valid[0][4]["valid_loss"] == pytest.approx(valid[1][4]["valid_loss"], rel=RTOL)
    if mode == "onpolicy":
        # Sampled steps 2 and 4 train on the replies the student wrote: from each window's first
        # reply start on, fewer tokens than the whole window (32 labels x 8 samples) and
        # than the documents' fixed 8-token prompt leaves (25 x 8).
        assert [ref[s]["onpolicy"] for s in sorted(ref)] == [0, 1, 0, 1]
        assert all(0 < ref[s]["sampled_tokens"] < 25 * 8 for s in (2, 4)), [ref[s]["sampled_tokens"] for s in ref]
        plain = runs.get("onpolicy-ref", world=1)["metrics"]
        assert [plain[s]["sampled_tokens"] for s in (2, 4)] == [25 * 8, 25 * 8]
    if mode == "onpolicy-all":
        # Every reply that starts in a window, not only the first: at least as many tokens on
        # step 2 (the same windows and the same first replies; later steps train other weights).
        first = runs.get("chat-onpolicy-ref", world=1)["metrics"]
        assert ref[2]["sampled_tokens"] >= first[2]["sampled_tokens"] > 0


def test_conversation_student_from_the_cache_follows_the_online_run(runs):
    """The cache holds the teacher's payload at the replies only (cache.positions: targets); a
    student trained from it, the replies its targets, is the online run."""
    ref, got = runs.get("chat-ref", world=1)["metrics"], runs.get("chat-cache", world=1)["metrics"]
    assert sorted(got) == sorted(ref) and all(got[s]["teacher_live"] == 0 for s in got)
    for s in sorted(ref):
        for k in ("loss", "kd_loss", "grad_norm"):
            assert got[s][k] == pytest.approx(ref[s][k], rel=RTOL, abs=ATOL), f"step {s} {k}"


@pytest.mark.parametrize("other", ["docs-layout", "docs-mixed"])
def test_attention_within_documents_reproduces_across_layouts_and_from_the_cache(runs, other):
    """data.attention: documents, on data steps and on steps where the student writes every reply
    (sampling within documents too): a pipelined teacher with two student replicas, and data steps
    from a cache written with the same attention, are the one-rank online run. The option changes
    the run: its first step, whose windows hold a document start, has another loss than the same
    run with attention over the window."""
    ref = runs.get("docs-ref", world=1)
    got = runs.get(other, world=2 if other == "docs-layout" else 1)["metrics"]
    assert "attention within documents" in ref["stdout"]
    ref = ref["metrics"]
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4] and [ref[s]["onpolicy"] for s in ref] == [0, 1, 0, 1]
    for s in sorted(ref):
        for k in ("loss", "kd_loss", "grad_norm", "sampled_tokens"):
            assert got[s][k] == pytest.approx(ref[s][k], rel=RTOL, abs=ATOL), f"step {s} {k}: {got[s][k]} vs {ref[s][k]}"
    if other == "docs-mixed":
        assert [got[s]["teacher_live"] for s in sorted(got)] == [0, 1, 0, 1]
    else:  # held-out loss and divergence to the teacher (its replicas serving the held-out batches)
        valid = [read_metrics(runs.root / name, "valid") for name in ("docs-ref", other)]
        for k in ("valid_loss", "valid_kd_loss"):
            assert valid[0][4][k] == pytest.approx(valid[1][4][k], rel=RTOL), k
    from kdtrain.data.gpt_dataset import GPTWindowDataset

    ds = GPTWindowDataset([runs.short_chats], 32, document_positions=True)
    assert sum((ds.train_positions(g)[1:-1] == 0).any() for g in range(8)) >= 4  # step 1's samples
    window = runs.get("docs-window", world=1)["metrics"]
    assert abs(window[1]["loss"] - ref[1]["loss"]) > 1e-4 * abs(ref[1]["loss"])


def _distill_with_slow_saves(rank, world, root):
    import json
    import time

    import kdtrain.training.distill as loop
    from kdtrain.config.distill import load_distill_config

    real_save = loop.save_role

    def slow_save(*args, **kwargs):  # a large student on a slow file system
        time.sleep(4.0)
        return real_save(*args, **kwargs)

    loop.save_role = slow_save
    cfg = load_distill_config("tiny", ["data.mock=true", "split.mode=disaggregated", "split.teacher_ranks=1",
                                       "split.timeout_s=2", f"checkpoint.dir={root}/ck", "checkpoint.save_interval=1",
                                       "training.train_steps=3", f"logging.dir={root}/run"])
    summary = loop.distill(cfg)
    with open(f"{root}/rank{rank}.json", "w") as f:
        json.dump(summary.get("step"), f)


def test_a_slow_student_save_does_not_time_out_the_teachers_stream(tmp_path):
    """Disaggregated: while the student saves (4 s here), the teacher waits in the run's idle wait
    (bounded by distributed.idle_timeout_s, tests/test_idle_waits.py), not in its next send, bounded
    by split.timeout_s (2 s here), which is meant for a dead peer: the run completes and saves every
    step."""
    import json

    from conftest import run_spawn

    run_spawn(2, _distill_with_slow_saves, str(tmp_path), tmp_path=tmp_path)
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)] == [3, 3]
    assert (tmp_path / "ck" / "latest").read_text().strip() == "step_0000003"


def _distill_recording_order(rank, world, root):
    import json
    import time

    import kdtrain.training.distill as loop
    from kdtrain.config.distill import load_distill_config

    events, real_serve, real_step = [], loop.serve_batch, loop.train_step

    def serve_batch(*args, **kwargs):  # the teacher starts a step's micro-batches
        events.append(time.time())
        return real_serve(*args, **kwargs)

    def train_step(*args, **kwargs):  # a student slower than its teacher, after its last payload
        result = real_step(*args, **kwargs)
        time.sleep(2.5)  # the teacher, already free, enters the next step well within it
        events.append(time.time())
        return result

    timed, real_start = [], loop.Throughput.start

    def start(self):  # a device-wide sync on GPU
        timed.append(1)
        return real_start(self)

    loop.serve_batch, loop.train_step, loop.Throughput.start = serve_batch, train_step, start
    cfg = load_distill_config("tiny", ["data.mock=true", "split.mode=disaggregated", "split.teacher_ranks=1",
                                       "training.train_steps=4", "training.eval_batches=0", "logging.interval=1",
                                       f"logging.dir={root}/run"])
    loop.distill(cfg)
    with open(f"{root}/rank{rank}.json", "w") as f:
        json.dump({"events": events, "timed_steps": len(timed)}, f)


def test_a_disaggregated_teacher_serves_the_next_step_while_the_student_finishes_one(tmp_path):
    """Logging every step (the default), the teacher's statistics reach the logging rank by a
    world all-reduce the teacher does not wait for: it starts step t+1's micro-batches before the
    (slower) student has finished step t, instead of idling at every step's end. Nor does it time
    steps (on GPU a device-wide sync, which waits for the payloads in flight)."""
    import json

    from conftest import run_spawn

    run_spawn(2, _distill_recording_order, str(tmp_path), tmp_path=tmp_path)
    teacher, student = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert (teacher["timed_steps"], student["timed_steps"]) == (0, 4)
    teacher_starts, student_ends = teacher["events"], student["events"]
    assert len(teacher_starts) == len(student_ends) == 4
    assert all(teacher_starts[t + 1] < student_ends[t] for t in range(3)), (teacher_starts, student_ends)


@pytest.mark.parametrize("fraction,count", [(0.29, 29), (0.57, 57), (0.58, 58), (0.1, 10), (1 / 3, 33), (1.0, 100),
                                            (0.0, 0)])
def test_a_fraction_of_the_steps_is_that_many_steps(fraction, count):
    """On-policy and mixed-teacher steps: f of 100 steps is f * 100 of them (in floats, 29 * 0.29
    falls below 8.41 and 0.29 of 100 steps gave 28)."""
    from kdtrain.training.onpolicy import spread_step

    picked = [t for t in range(100) if spread_step(t, fraction)]
    assert len(picked) == count
    assert all(b - a <= -(-100 // max(count, 1)) for a, b in zip(picked, picked[1:]))  # spread, not bunched


def _distill_with_student_stages(rank, world, root):
    import kdtrain.training.distill as loop
    from kdtrain.config.distill import load_distill_config

    cfg = load_distill_config("tiny", ["data.mock=true", "student.pp=2", "training.train_steps=3",
                                       "training.eval_batches=0", f"logging.dir={root}/run"])
    loop.distill(cfg)


def test_teacher_wait_reaches_the_log_when_the_student_has_stages(tmp_path):
    """The student's wait for payloads is timed where its loss runs, the last pipeline stage; the
    log line is written by its first rank, stage 0, which waited for nothing: the figure is the
    longest wait of any student rank (before, it read 0.0 on every step with student.pp > 1)."""
    from conftest import run_spawn

    run_spawn(2, _distill_with_student_stages, str(tmp_path), tmp_path=tmp_path)
    logged = read_metrics(tmp_path / "run")
    assert sorted(logged) == [1, 2, 3]
    assert all(rec["teacher_wait_s"] > 0 for rec in logged.values()), logged


def test_a_log_line_reports_the_interval_s_mean(world_of_one, tmp_path):
    """logging.interval in distillation: a line holds the mean losses of the steps since the last
    one (the same run logged every step), the teacher's busy share of their mean time, and their
    counts: live-teacher and on-policy steps, sampling time and sampled tokens."""
    from kdtrain.config.distill import load_distill_config
    from kdtrain.training.distill import distill

    for every in (1, 2, 4):
        cfg = load_distill_config("tiny", ["data.mock=true", "training.train_steps=4", "training.eval_batches=0",
                                           *ONPOLICY, f"logging.interval={every}",
                                           f"logging.dir={tmp_path / str(every)}"])
        distill(cfg)
    one = read_metrics(tmp_path / "1")
    assert sorted(one) == [1, 2, 3, 4] and [one[s]["onpolicy"] for s in sorted(one)] == [0, 1, 0, 1]
    # Each step's loss is its mean per trained token: a data step trains every label of its
    # windows, an on-policy step the tokens the student sampled; a line holds the mean per token.
    tokens = {s: one[s]["sampled_tokens"] if one[s]["onpolicy"] else
              cfg.training.global_batch_size * cfg.data.seq_length for s in one}
    for every in (2, 4):
        lines = read_metrics(tmp_path / str(every))
        assert sorted(lines) == list(range(every, 5, every))
        for s, line in lines.items():
            steps = range(s - every + 1, s + 1)
            for k in ("loss", "kd_loss"):
                mean = sum(one[i][k] * tokens[i] for i in steps) / sum(tokens[i] for i in steps)
                assert line[k] == pytest.approx(mean, rel=1e-6), (every, s, k)
            assert 0 < line["teacher_busy"] <= 1.0
            assert line["teacher_live"] == every and line["onpolicy"] == every // 2
            assert line["sampled_tokens"] == sum(one[i]["sampled_tokens"] for i in steps) > 0
            assert line["sample_s"] > 0


def test_a_student_sampling_on_policy_gets_local_layers_with_transformer_engine(monkeypatch):
    """With Transformer Engine importable a student gets TE layers, unless it samples on-policy:
    decoding needs the key/value cache of kdtrain's local layers (with TE layers every new token
    re-ran the whole prefix); the start-up line names what each role builds."""
    import kdtrain.models.gpt as gpt
    from kdtrain.config.distill import load_distill_config
    from kdtrain.training.distill import _attention, _student_te

    monkeypatch.setattr(gpt, "transformer_engine_available", lambda device: True)
    cuda = torch.device("cuda")
    offline = load_distill_config("tiny", ["data.mock=true"])
    onpolicy = load_distill_config("tiny", ["data.mock=true", "onpolicy.fraction=0.5"])
    assert _student_te(offline, 1, cuda) and not _student_te(onpolicy, 1, cuda)
    assert _attention(offline, 1, 1, cuda) == "transformer-engine"
    assert _attention(onpolicy, 1, 1, cuda) == "transformer-engine (teacher), sdpa (student)"


# (what fails, the failing rank's own error): loads of a checkpoint of another shape; the teacher's
# device without room for it; the student's checkpoint.dir holding another run's checkpoints with
# checkpoint.resume: false; rank 1's node unable to write its logging.dir (found before any group
# is made: the teacher waited in the idle group's creation, distributed.idle_timeout_s).
_START_FAILURES = [("teacher", "different model"), ("student", "different model"),
                   ("teacher-memory", "GiB free: split the model"),
                   ("student-dir", "checkpoint.resume: false, but checkpoint.dir"),
                   ("student-logdir", "cannot create the directory")]


def _distill_with_bad_starts(rank, world, root):
    import kdtrain.parallel
    import kdtrain.training.distill as loop
    from kdtrain.config.distill import load_distill_config

    # One world for every case: each start fails on every rank alike, so the next begins in step.
    real_free = kdtrain.parallel.free_memory_bytes
    for role, _ in _START_FAILURES:
        extra = {"teacher": [f"teacher.load={root}/ck", "teacher.random_init=false", "teacher.model.num_layers=1"],
                 "student": [f"student.load={root}/ck", "student.model.num_layers=1"],
                 "student-dir": [f"checkpoint.dir={root}/ck", "checkpoint.resume=false"]}.get(role, [])
        kdtrain.parallel.free_memory_bytes = (lambda device: 1) if role == "teacher-memory" and rank == 0 else real_free
        log_dir = f"{root}/afile/run" if role == "student-logdir" and rank == 1 else f"{root}/run{rank}"
        cfg = load_distill_config("tiny", ["data.mock=true", "split.mode=disaggregated", "split.teacher_ranks=1",
                                           "distributed.timeout_s=60", "distributed.idle_timeout_s=60",
                                           f"logging.dir={log_dir}", *extra])
        with pytest.raises(ValueError) as e:
            loop.distill(cfg)
        (Path(root) / f"{role}-error{rank}.txt").write_text(str(e.value))


def test_a_role_that_fails_to_start_stops_the_other(world_of_one, tmp_path):
    """Disaggregated, the teacher's and the student's ranks build and load apart; a role whose
    start failed (a load, a memory check, a checkpoint directory refused, a logging directory its
    node cannot write) stopped its own ranks, while the other role's went on into the start-step
    broadcast and died there with the transport's error (gloo: its peer closed the connection;
    NCCL: the job's timeout), or waited in the creation of the groups. Every rank now raises a
    ValueError, the other role's naming the failed rank and its error."""
    from conftest import one_rank_role, run_spawn, save_one_rank_role

    cfg, groups, model = one_rank_role("tiny")
    save_one_rank_role(tmp_path / "ck", 1, model, groups, cfg)
    (tmp_path / "afile").write_text("")
    run_spawn(2, _distill_with_bad_starts, str(tmp_path), tmp_path=tmp_path)
    for role, says in _START_FAILURES:
        failed = 0 if role.startswith("teacher") else 1
        own, other = ((tmp_path / f"{role}-error{r}.txt").read_text() for r in (failed, 1 - failed))
        assert says in own, (role, own)
        assert other.startswith(f"rank {failed} failed to start: ") and own in other, (role, other)


def _distill_with_a_rank_failing_alone(rank, world, root):
    import time

    import kdtrain.training.teacher as teacher_module
    import kdtrain.training.distill as loop
    from kdtrain.config.distill import load_distill_config

    real_build = teacher_module.build_gpt

    def build_gpt(*args, **kwargs):  # rank 0 alone fails before its role's agreement
        if rank == 0:
            raise ValueError("rank 0 could not build its teacher")
        return real_build(*args, **kwargs)

    teacher_module.build_gpt = build_gpt
    cfg = load_distill_config("tiny", ["data.mock=true", "distributed.timeout_s=30", "split.timeout_s=30",
                                       f"teacher.load={root}/ck",
                                       "teacher.random_init=false", f"logging.dir={root}/run{rank}"])
    start = time.monotonic()
    try:
        loop.distill(cfg)
    except Exception as e:  # noqa: BLE001 - rank 1 gets the transport's error when rank 0 leaves
        (Path(root) / f"error{rank}.txt").write_text(f"{time.monotonic() - start:.1f} {e}")


def test_a_rank_that_fails_alone_is_not_held_in_the_start_up_agreement(world_of_one, tmp_path):
    """Colocated, rank 0 fails building its teacher while rank 1 waits for it in the teacher's
    load agreement: rank 0 must raise its error and leave (ending the job), not wait in the
    start-up's world agreement, where the two would hold each other until the job's timeout."""
    from conftest import one_rank_role, run_spawn, save_one_rank_role

    cfg, groups, model = one_rank_role("tiny")
    save_one_rank_role(tmp_path / "ck", 1, model, groups, cfg)
    run_spawn(2, _distill_with_a_rank_failing_alone, str(tmp_path), tmp_path=tmp_path)
    seconds, message = (tmp_path / "error0.txt").read_text().split(" ", 1)
    assert message == "rank 0 could not build its teacher" and float(seconds) < 20, (seconds, message)
    assert (tmp_path / "error1.txt").is_file()


def _distill_with_a_slow_teacher_start(rank, world, root):
    import json
    import time

    import kdtrain.training.distill as loop
    from kdtrain.config.distill import load_distill_config

    real_teacher = loop.Teacher

    def slow_teacher(*args, **kwargs):  # a large teacher read from slow storage
        time.sleep(8.0)
        return real_teacher(*args, **kwargs)

    loop.Teacher = slow_teacher
    # The world group as init_distributed makes it under torchrun: distributed.timeout_s bounds it.
    import torch.distributed as dist
    from datetime import timedelta

    dist.distributed_c10d._get_default_group().set_timeout(timedelta(seconds=4))
    cfg = load_distill_config("tiny", ["data.mock=true", "split.mode=disaggregated", "split.teacher_ranks=1",
                                       "distributed.timeout_s=4", "split.timeout_s=4", "distributed.idle_timeout_s=60",
                                       "training.train_steps=1", "training.eval_batches=0",
                                       f"logging.dir={root}/run{rank}"])
    summary = loop.distill(cfg)
    (Path(root) / f"rank{rank}.json").write_text(json.dumps(summary.get("step")))


def test_students_wait_for_a_slow_teacher_start_under_the_idle_bound(tmp_path):
    """Disaggregated, the students are built long before a large teacher is loaded: they wait for
    it in the start-up agreement under distributed.idle_timeout_s, not the job's timeout (4 s
    here, against an 8 s teacher start), which ended the run."""
    import json

    from conftest import run_spawn

    run_spawn(2, _distill_with_a_slow_teacher_start, str(tmp_path), tmp_path=tmp_path)
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)] == [1, 1]
