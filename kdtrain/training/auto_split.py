"""``split.mode: auto``: the planner (kdtrain/planner) picks the split and both roles' layouts.

Every rank runs the same pure-Python search on the same inputs, so all ranks agree. The inputs
a rank reads from its own node (its GPU's profile, its node's size) are compared first: ranks that
disagree (a job over nodes of different GPUs) would build different process groups and hang, so
that is an error asking for ``split.profile`` and ``split.gpus_per_node``. The plan sets
``split.mode``, ``split.teacher_ranks`` and ``tp``/``pp``/``dp`` of both roles, and puts the teacher
first (``split.teacher_first: true``, the placement the planner prices); the micro-batch
size, optimizer (ZeRO-1 or not), sequence length, top-k and payload dtype stay as configured and
are inputs to the search.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch
import torch.distributed as dist

from ..config.distill import DistillConfig
from ..config.loader import field_error


def device_profile(device: torch.device) -> str:
    """The built-in planner profile closest to ``device`` (the planner's ``cpu`` profile on CPU)."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    if "H200" in name:
        return "h200"
    if "A100" in name:
        return "a100-80gb" if torch.cuda.get_device_properties(device).total_memory > 48 * 2**30 else "a100-40gb"
    return "h100-80gb"  # H100 and anything newer or unknown


def agree_planner_inputs(profile: str, gpus_per_node: int) -> None:
    """ValueError on every rank unless all ranks plan with the same profile and node size."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    seen: list = [None] * dist.get_world_size()
    dist.all_gather_object(seen, (profile, gpus_per_node))
    if len(set(seen)) > 1:
        first = {}
        for rank, inputs in enumerate(seen):
            first.setdefault(inputs, rank)
        views = "; ".join(f"rank {r}: profile {p}, {g} per node" for (p, g), r in first.items())
        raise ValueError(f"split.mode: auto: ranks see different planner inputs ({views}), so they would plan "
                         "different layouts: set split.profile and split.gpus_per_node")


def resolve_auto_split(cfg: DistillConfig, world_size: int, device: torch.device,
                       gpus_per_node: Optional[int] = None) -> tuple[DistillConfig, list[str]]:
    """``cfg`` with the planner's best plan applied, and log lines naming it and the runner-up."""
    from ..planner import auto_plan
    from ..planner.from_config import plan_inputs
    from ..planner.problem import CONFIG_NAMES

    sp = cfg.split
    if cfg.teacher.source == "cache":
        raise field_error("split", "mode", "teacher.source: cache trains the student on every rank: "
                          "use split.mode: colocated (nothing to plan)")
    gpn = next(g for g in (sp.gpus_per_node, gpus_per_node, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
               if g is not None)
    profile = sp.profile or device_profile(device)
    agree_planner_inputs(profile, gpn)
    fp32 = cfg.precision.dtype == "fp32" or (cfg.precision.dtype == "auto" and device.type != "cuda")
    inputs = plan_inputs(cfg, fp32)
    # This runs before cfg.validate: the planner's input errors name the config's fields.
    best, runner_up = auto_plan(inputs.pop("teacher_model"), inputs.pop("student_model"), world_size, gpn,
                                profile=profile, names=CONFIG_NAMES, **inputs)
    ov = best.config_overrides()
    out = dataclasses.replace(
        cfg,
        split=dataclasses.replace(sp, mode=ov["split.mode"], teacher_ranks=ov["split.teacher_ranks"],
                                  teacher_first=ov["split.teacher_first"]),
        teacher=dataclasses.replace(cfg.teacher, tp=ov["teacher.tp"], pp=ov["teacher.pp"], dp=ov["teacher.dp"]),
        student=dataclasses.replace(cfg.student, tp=ov["student.tp"], pp=ov["student.pp"], dp=ov["student.dp"]))
    lines = [f"split auto ({world_size} ranks, {gpn} per node, profile {profile}): {best.describe()}",
             f"  runner-up: {runner_up.describe() if runner_up is not None else 'none fits'}"]
    if not sp.teacher_first and best.mode == "disaggregated":
        lines.append(f"  split.teacher_first: false overridden: the plan is priced (node crossings, TP groups "
                     f"inside nodes) with the teacher on ranks 0-{best.teacher_ranks - 1}, which is where it runs")
    return out, lines
