#!/usr/bin/env bash
# Multi-node pretraining under Slurm: one torchrun per node, NCCL across nodes.
#
#   sbatch --nodes=2 scripts/slurm_pretrain.sh configs/pretrain/llama-3.2-1b-h100.yaml parallel.tp=4 parallel.pp=2
#
# Adjust the #SBATCH lines to your cluster (partition, account, time).
#SBATCH --job-name=kdtrain-pretrain
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --output=slurm-%j.out
set -euo pipefail

CONFIG=${1:?usage: sbatch scripts/slurm_pretrain.sh CONFIG [section.field=value ...]}
shift
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}

srun --kill-on-bad-exit=1 torchrun \
    --nnodes="$SLURM_NNODES" \
    --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv_id="$SLURM_JOB_ID" \
    --rdzv_backend=c10d \
    --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" \
    scripts/pretrain_gpt.py --config "$CONFIG" "$@"
