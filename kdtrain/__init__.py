"""kdtrain: knowledge distillation of megatron-core GPT models with decoupled teacher/student
partitions."""

import warnings

__version__ = "0.1.0"

# megatron-core warns at import/build time about optional accelerators kdtrain does not use on
# this path (apex norms, TE fusions, CUDA connection settings); they are noise for users.
for _pattern in (
    r".*(Apex|Transformer Engine|apex|transformer_engine).*not installed.*",
    r".*full scope is deprecated.*",
    r"When using async grad allreduce it is recommended",
    r"absl\.logging is not installed",
    r".*nvidia-resiliency-ext.*",
):
    warnings.filterwarnings("ignore", message=_pattern)
