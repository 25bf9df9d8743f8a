r"""The planner's inputs for a distillation run config: what ``split: auto`` plans with and what
``kdtrain plan --config`` shows, so both see the same problem.

    kdtrain plan --config configs/distill/qwen2.5-7b-to-0.5b-8xh100.yaml --world-size 8 \
        [KEY=VALUE ...]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .problem import Sampling

if TYPE_CHECKING:
    from ..config.distill import DistillConfig


def plan_inputs(cfg: "DistillConfig", fp32: bool) -> dict:
    """``auto_plan`` keyword arguments for ``cfg`` (besides the world, node size and profile):
    both models, the window and batch, the micro-batch, top-k and payload dtype, ``split.depth``,
    the student's optimizer, recomputation and CUDA graphs, and its on-policy steps. ``fp32``:
    the run's weights and activations are fp32 (else bf16)."""
    op = cfg.onpolicy
    return dict(
        teacher_model=cfg.teacher.model, student_model=cfg.student.model, seq_len=cfg.data.seq_length,
        global_batch=cfg.training.global_batch_size, micro_batch=cfg.training.micro_batch_size,
        topk=cfg.teacher.topk, values_bytes=4 if cfg.teacher.values_dtype == "fp32" else 2,
        depth=cfg.split.depth, distributed_optimizer=cfg.optimizer.distributed, dtype_bytes=4 if fp32 else 2,
        recompute=cfg.training.recompute, student_graphs=cfg.precision.cuda_graphs,
        onpolicy=(Sampling(op.fraction, min(op.prompt_length, cfg.data.seq_length), op.sample_batch)
                  if op.fraction > 0 else None))
