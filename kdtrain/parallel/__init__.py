"""Process groups per role (HyperCommGrid + ProcessGroupCollection) and distributed start-up."""

from .dist import (DistEnv, free_memory_bytes, init_distributed, one_process_world, pick_device, run_job,
                   shutdown_distributed)
from .groups import RoleGroups, RoleLayout, build_role_groups

__all__ = ["DistEnv", "free_memory_bytes", "init_distributed", "one_process_world", "pick_device", "run_job",
           "shutdown_distributed",
           "RoleGroups", "RoleLayout", "build_role_groups"]
