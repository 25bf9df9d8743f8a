#!/usr/bin/env bash
# Teacher cache sizes on conversations: every position vs the replies only (cache.positions), bf16
# and fp8, for the chat teacher and data of bench_chat.sh (run that first with the same WORK):
#
#   bash benchmarks/bench_chat_cache.sh benchmarks/results/chat_cpu
#
# Writes cache_sizes.txt: per cache, samples, bytes, bytes per token and the share of the tokens
# that are targets (from the dataset's loss mask). About a minute on 2 CPU ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bench_chat_cache.sh OUT_DIR}
STEPS=${STEPS:-120}
NEED=(chat-teacher)
source benchmarks/chat_runs.sh
mkdir -p "$OUT"
for dtype in bf16 fp8; do
  for pos in all targets; do
    rm -rf "$WORK/cache/chat-$dtype-$pos"
    "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" scripts/cache_teacher.py \
        --config configs/distill/demo.yaml --out "$WORK/cache/chat-$dtype-$pos" "${CHAT[@]}" \
        "teacher.load=$WORK/checkpoints/chat-teacher" "training.train_steps=$STEPS" \
        "cache.dtype=$dtype" "cache.positions=$pos"
  done
done
{
  echo "# bash benchmarks/bench_chat_cache.sh $OUT  ($(date -u +%F), $(uname -m), NPROC=$NPROC, STEPS=$STEPS)"
  "$PY" - "$WORK" "$DEMO_DATA/demo_chat_document" <<'PYEOF'
import json, sys
from pathlib import Path
import numpy as np
from kdtrain.data.gpt_dataset import GPTWindowDataset

work, prefix = Path(sys.argv[1]), sys.argv[2]
ds = GPTWindowDataset([prefix], 128, split=(0.9, 0.1), seed=1234)
for dtype in ("bf16", "fp8"):
    for pos in ("all", "targets"):
        m = json.loads((work / "cache" / f"chat-{dtype}-{pos}" / "manifest.json").read_text())
        n, S = m["num_samples"], m["seq_length"]
        size = sum(s["bytes"] for s in m["shards"])
        share = np.mean([ds.train_loss_mask(g).mean() for g in range(n)])
        print(f"{dtype:5s} positions={pos:8s} k={m['k']}: {n} samples x {S} tokens, {size} bytes, "
              f"{size / (n * S):.1f} bytes/token (targets: {100 * share:.1f}% of the labels)")
PYEOF
} | tee "$OUT/cache_sizes.txt"
