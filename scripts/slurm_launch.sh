#!/usr/bin/env bash
# Multi-node runs under Slurm: one torchrun per node, NCCL across nodes, for any kdtrain entry point
# (pretrain_gpt.py, distill_gpt.py, cache_teacher.py).
#
#   sbatch --nodes=2 scripts/slurm_launch.sh pretrain_gpt.py configs/pretrain/llama-3.2-1b.yaml \
#       parallel.tp=4 parallel.pp=2
#   sbatch --nodes=4 scripts/slurm_launch.sh distill_gpt.py configs/distill/llama-3.1-8b-to-3.2-1b-8xh100.yaml \
#       split.mode=auto
#   sbatch --nodes=2 scripts/slurm_launch.sh cache_teacher.py configs/distill/qwen2.5-7b-to-0.5b-8xh100.yaml \
#       --out cache/qwen2.5-7b-top64 teacher.dp=16
#
# Adjust the #SBATCH lines to your cluster (partition, account, time). GPUS_PER_NODE (default 8)
# is what torchrun starts per node; split.mode=auto reads it as LOCAL_WORLD_SIZE.
# To end with a checkpoint before the allocation's time limit, add training.exit_duration_min=M
# (minutes, less the start-up, a few steps and a save); to end with one when preempted (Slurm sends
# SIGTERM to every process of the step; torchrun also passes it on, and kills its workers 30 s
# later), training.exit_signal=SIGTERM. Not --signal=USR1: torchrun has no handler for it and dies.
# Both need checkpoint.dir (the configs for real corpora set one); the same command resumes.
#SBATCH --job-name=kdtrain
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --output=slurm-%j.out
set -euo pipefail

ENTRY=${1:?usage: sbatch scripts/slurm_launch.sh ENTRY.py CONFIG [--option value | section.field=value ...]}
CONFIG=${2:?usage: sbatch scripts/slurm_launch.sh ENTRY.py CONFIG [--option value | section.field=value ...]}
shift 2
case $ENTRY in
  pretrain_gpt.py|distill_gpt.py|cache_teacher.py) ;;
  *) echo "slurm_launch.sh: ENTRY must be pretrain_gpt.py, distill_gpt.py or cache_teacher.py, got $ENTRY" >&2; exit 2 ;;
esac
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}

srun --kill-on-bad-exit=1 torchrun \
    --nnodes="$SLURM_NNODES" \
    --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv_id="$SLURM_JOB_ID" \
    --rdzv_backend=c10d \
    --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" \
    "scripts/$ENTRY" --config "$CONFIG" "$@"
