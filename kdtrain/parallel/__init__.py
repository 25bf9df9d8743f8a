"""Process groups per role (HyperCommGrid + ProcessGroupCollection) and distributed start-up."""

from .dist import DistEnv, init_distributed, pick_device, shutdown_distributed
from .groups import RoleGroups, RoleLayout, build_role_groups

__all__ = ["DistEnv", "init_distributed", "pick_device", "shutdown_distributed",
           "RoleGroups", "RoleLayout", "build_role_groups"]
