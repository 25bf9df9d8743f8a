#!/usr/bin/env bash
# On-policy steps on conversations: the student writes the first reply of each window, or every
# reply (onpolicy.replies), from the chat teacher and the document-distilled student of
# bench_chat.sh (run that first with the same WORK):
#
#   bash benchmarks/bench_chat_onpolicy.sh benchmarks/results/chat_cpu
#
# Every step on-policy (fraction 1), STEPS steps each, windows packed by documents; writes
# onpolicy_replies.txt: per mode, the mean sampling time and sampled (trained) tokens per step,
# the step time, and the held-out reply loss afterwards (kdtrain eval). About 3 minutes on 2 CPU ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bench_chat_onpolicy.sh OUT_DIR}
STEPS=${STEPS:-30}
NEED=(chat-teacher doc-student)
source benchmarks/chat_runs.sh
mkdir -p "$OUT"
CHAT+=("data.packing=documents")
for mode in first all; do
  rm -rf "$WORK/runs/onpolicy-$mode" "$WORK/checkpoints/onpolicy-$mode"
  "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" scripts/distill_gpt.py \
      --config configs/distill/demo.yaml "${CHAT[@]}" "teacher.load=$WORK/checkpoints/chat-teacher" \
      "student.load=$WORK/checkpoints/doc-student" "training.train_steps=$STEPS" training.eval_interval=0 \
      onpolicy.fraction=1.0 "onpolicy.replies=$mode" logging.interval=1 \
      "logging.dir=$WORK/runs/onpolicy-$mode" "checkpoint.dir=$WORK/checkpoints/onpolicy-$mode"
done
{
  echo "# bash benchmarks/bench_chat_onpolicy.sh $OUT  ($(date -u +%F), $(uname -m), NPROC=$NPROC, STEPS=$STEPS)"
  "$PY" - "$WORK" <<'PYEOF'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
for mode in ("first", "all"):
    recs = [json.loads(l) for l in (work / "runs" / f"onpolicy-{mode}" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train" and r["step"] > 2]  # past the first steps' warm-up
    mean = lambda k: sum(r[k] for r in train) / len(train)
    print(f"replies={mode:5s}: {mean('sampled_tokens'):.0f} sampled (trained) tokens/step, sampling "
          f"{mean('sample_s'):.2f} s/step, step {mean('step_time_s'):.2f} s (mean of steps 3-{train[-1]['step']})")
PYEOF
  "$PY" -m kdtrain.cli eval --model "$WORK/checkpoints/doc-student" "$WORK/checkpoints/onpolicy-first" \
      "$WORK/checkpoints/onpolicy-all" --data "$DEMO_DATA/demo_chat_document" --seq-length 128 --split 0.9 0.1 \
      --packing documents
} | tee "$OUT/onpolicy_replies.txt"
