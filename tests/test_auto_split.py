"""``split.mode: auto`` (kdtrain/training/auto_split.py): the distill config's settings reach the
planner (CUDA graphs, the teacher's placement), its input errors name the config's fields, and
ranks that would plan differently refuse together."""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import REPO, run_spawn


def test_auto_split_plans_the_run_s_cuda_graphs():
    """``split.mode: auto`` hands precision.cuda_graphs to the planner: the tiny pair is launch-bound,
    so the plan for graphed student layers predicts a faster step, at tp = pp = 1."""
    from kdtrain.config.distill import load_distill_config
    from kdtrain.training.auto_split import resolve_auto_split

    rates = {}
    for graphs in ("false", "true"):
        cfg = load_distill_config(str(REPO / "configs/distill/tiny.yaml"), [
            "split.mode=auto", f"precision.cuda_graphs={graphs}", "data.mock=true", "data.path=[]",
            "split.profile=h100-80gb", "training.micro_batch_size=4"])
        out, lines = resolve_auto_split(cfg, 4, torch.device("cpu"), gpus_per_node=4)
        rates[graphs] = float(re.search(r"([0-9.]+) samples/s", lines[0]).group(1))
        assert (out.student.tp, out.student.pp) == (1, 1) or graphs == "false"
    assert rates["true"] > 1.5 * rates["false"], rates


@pytest.mark.parametrize("overrides,message", [
    (["student.model=demo-student"], r"student\.model: vocab_size 4096 .* differs from the teacher's 512"),
    (["data.seq_length=200"], r"data\.seq_length: 200 exceeds max_seq_length=128 of the teacher"),
    (["split.profile=h1OO"], r"split\.profile: 'h1OO' is neither a built-in profile"),
    (["precision.cuda_graphs=true", "training.recompute=true"], r"precision\.cuda_graphs: .*training\.recompute=false"),
    (["teacher.source=cache", "teacher.cache=/nonexistent"], r"split\.mode: teacher\.source: cache .* colocated"),
    (["teacher.model=llama-3.1-8b", "student.model=llama-3.2-1b", "data.seq_length=4096", "split.profile=a100-40gb"],
     r"split\.mode: auto found no plan for llama-3\.1-8b -> llama-3\.2-1b on 2 ranks .*GiB over"),
])
def test_auto_split_errors_name_the_config_fields(overrides, message):
    """``split.mode: auto`` plans before ``cfg.validate``: the planner's input errors name the config's
    fields (not ``kdtrain plan``'s flags), and a cache teacher, which has nothing to plan, is refused
    whatever the world size."""
    from kdtrain.config.distill import load_distill_config
    from kdtrain.training.auto_split import resolve_auto_split

    cfg = load_distill_config("tiny", ["data.mock=true", "split.mode=auto", *overrides])
    with pytest.raises(ValueError, match="^" + message) as e:
        resolve_auto_split(cfg, 2, torch.device("cpu"), gpus_per_node=2)
    assert " --" not in str(e.value), e.value


def test_auto_split_places_the_teacher_where_the_plan_priced_it():
    """The planner prices a disaggregated split with the teacher on ranks [0, Wt) (its node
    crossings, its student TP groups kept inside nodes): ``split.mode: auto`` runs it there, and
    says so when the config asked for the teacher last."""
    from kdtrain.config.distill import load_distill_config
    from kdtrain.training.auto_split import resolve_auto_split

    for first in ("true", "false"):
        cfg = load_distill_config("tiny", ["data.mock=true", "split.mode=auto", f"split.teacher_first={first}",
                                           "split.profile=cpu"])
        out, lines = resolve_auto_split(cfg, 3, torch.device("cpu"), gpus_per_node=3)
        assert out.split.mode == "disaggregated" and out.split.teacher_first
        spans = out.validate(3)
        assert (spans.teacher_offset, spans.student_offset) == (0, out.split.teacher_ranks) == (0, 1)
        overridden = [ln for ln in lines if "split.teacher_first: false overridden" in ln]
        assert len(overridden) == (first == "false"), lines


def _plan_with_own_inputs(rank, world, out):
    from kdtrain.training.auto_split import agree_planner_inputs

    agree_planner_inputs("h100-80gb", 8)  # the same everywhere: passes
    try:
        agree_planner_inputs("h100-80gb" if rank == 0 else "a100-40gb", 8)
        result = "agreed"
    except ValueError as e:
        result = str(e)
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(result, f)


def test_ranks_with_different_planner_inputs_refuse_to_plan(tmp_path):
    """split.mode: auto on nodes of different GPUs: each rank would plan for its own GPU and build
    other process groups (a hang); every rank raises the same error instead."""
    run_spawn(2, _plan_with_own_inputs, str(tmp_path), tmp_path=tmp_path)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0] == results[1]
    assert re.search(r"ranks see different planner inputs \(rank 0: profile h100-80gb, 8 per node; rank 1: "
                     r"profile a100-40gb, 8 per node\).*split\.profile", results[0]), results[0]
