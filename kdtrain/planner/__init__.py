"""The split planner: which ranks the teacher gets, how each role is partitioned, and why.

Pure Python over model configs and a hardware profile (no torch.distributed): a memory model
(memory.py), a time model (timing.py), the search's inputs and answers (problem.py), a plan
search (search.py), the closed-form condition for disaggregated vs colocated (inflection.py),
sweeps (sweep.py) and device calibration (calibrate.py, the only module that imports torch, and
only when called).

    best, runner_up = auto_plan(teacher_cfg, student_cfg, world_size=64, gpus_per_node=8,
                                seq_len=4096, global_batch=1024, micro_batch=None, topk=64,
                                profile="h100-80gb")
    print(best.describe())

The models, the derivation of the closed form and the CLI are documented in docs/planner.md.
"""

from .memory import ModelShape, RankMemory, payload_nbytes
from .profiles import BUILTIN_PROFILES, HardwareProfile, get_profile, load_profile, save_profile
from .problem import Layout, Plan, Problem, Sampling
from .search import SearchResult, auto_plan, make_problem, search_plans
from .inflection import Condition, condition, disaggregated_optimum

__all__ = ["auto_plan", "search_plans", "condition", "Condition", "disaggregated_optimum", "make_problem", "Plan",
           "Problem", "Sampling", "Layout", "SearchResult", "ModelShape", "RankMemory", "payload_nbytes",
           "HardwareProfile", "BUILTIN_PROFILES", "get_profile", "load_profile", "save_profile"]
