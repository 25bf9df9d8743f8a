"""Process groups per role (HyperCommGrid + ProcessGroupCollection) and distributed start-up."""

from .dist import (DistEnv, free_memory_bytes, init_distributed, one_process_world, pick_device, run_job,
                   shutdown_distributed)
from .groups import PeerFailed, RoleGroups, RoleLayout, agreed, build_role_groups, mark_agreed, raise_together

__all__ = ["DistEnv", "free_memory_bytes", "init_distributed", "one_process_world", "pick_device", "run_job",
           "shutdown_distributed",
           "PeerFailed", "RoleGroups", "RoleLayout", "agreed", "build_role_groups", "mark_agreed",
           "raise_together"]
