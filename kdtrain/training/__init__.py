"""Training machinery shared by pretraining and distillation: pipeline schedule, gradients,
optimizer, checkpoints, metrics and logging. Entry points: ``kdtrain.training.pretrain.pretrain``
and ``kdtrain.training.distill.distill``."""
