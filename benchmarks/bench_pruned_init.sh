#!/usr/bin/env bash
# A student pruned from its teacher vs the same student from random weights, both distilled from
# the demo teacher for the same steps, data and optimizer (CPU, 2 ranks, about 6 minutes):
#
#   bash benchmarks/bench_pruned_init.sh benchmarks/results/pruned_init_cpu
#
# 1. the demo dataset and the demo teacher (5M parameters, 150 steps), as scripts/quickstart.sh
#    builds them (reused when $WORK already holds them);
# 2. kdtrain prune: 4 -> 2 layers (Block Influence), hidden 256 -> 128, query groups 4 -> 2 (with
#    their heads: 8 -> 4), MLP 704 -> 352, calibrated on 256 training windows: the demo student's
#    shape (with the teacher's untied output layer);
# 3. distillation into the pruned student and into a random student of the same config;
# 4. the held-out losses side by side (scripts/compare_runs.py), and the first logged losses.
# Environment: WORK (default /tmp/kdtrain-pruned-init), NPROC (2), STEPS (120), TEACHER_STEPS (150).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bench_pruned_init.sh OUT_DIR}
source benchmarks/demo_teacher.sh
mkdir -p "$OUT"

rm -rf "$WORK/checkpoints/pruned" "$WORK/runs/distill-pruned" "$WORK/runs/distill-random" \
    "$WORK/checkpoints/distill-pruned" "$WORK/checkpoints/distill-random"
"$PY" -m kdtrain.cli prune --src "$WORK/checkpoints/demo-teacher" --out "$WORK/checkpoints/pruned" \
    --name demo-student-pruned --num-layers 2 --hidden-size 128 --num-query-groups 2 --ffn-hidden-size 352 \
    --data "$DEMO_DATA/demo_text_document" --tokenizer "$DEMO_DATA/tokenizer.model" --seq-length 128 \
    --calib-samples 256 --device cpu | tee "$OUT/prune.txt"

for init in pruned random; do
  LOAD=()
  [ "$init" = pruned ] && LOAD=("student.load=$WORK/checkpoints/pruned")
  "${RUN[@]}" scripts/distill_gpt.py --config configs/distill/demo.yaml "${DATA[@]}" \
      "training.train_steps=$STEPS" "teacher.load=$WORK/checkpoints/demo-teacher" \
      "student.model=$WORK/checkpoints/pruned/model.yaml" "${LOAD[@]}" \
      "logging.dir=$WORK/runs/distill-$init" "checkpoint.dir=$WORK/checkpoints/distill-$init"
done

{
  echo "# bash benchmarks/bench_pruned_init.sh $OUT  ($(date -u +%F), $(uname -m), NPROC=$NPROC, STEPS=$STEPS)"
  "$PY" scripts/compare_runs.py "$WORK/runs/demo-teacher" "$WORK/runs/distill-pruned" "$WORK/runs/distill-random"
  echo
  echo "first logged training records (step, kd_loss, loss):"
  for init in pruned random; do
    "$PY" - "$WORK/runs/distill-$init/metrics.jsonl" "$init" <<'EOF'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1]) if '"train"' in l]
print(sys.argv[2], [(r["step"], round(r.get("kd_loss", float("nan")), 3), round(r["loss"], 3)) for r in recs[:3]])
EOF
  done
} | tee "$OUT/compare.txt"
cp "$WORK/checkpoints/pruned/prune.json" "$OUT/prune.json"
