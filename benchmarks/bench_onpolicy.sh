#!/usr/bin/env bash
# On-policy vs data-only distillation of the demo pair on CPU (2 ranks, about 4 minutes):
#
#   bash benchmarks/bench_onpolicy.sh benchmarks/results/onpolicy_cpu
#
# The demo teacher (pretrained as scripts/quickstart.sh does, 150 steps; reused from $WORK) is
# distilled into the demo student for $STEPS steps three ways: on the data only
# (onpolicy.fraction=0), half the steps on the student's own samples (0.5) and every step (1.0),
# prompts of 64 of the 128-token windows, temperature 1. Reported: held-out loss (teacher-forced
# on the data, scripts/compare_runs.py) and the share of step time spent sampling.
# Environment: WORK (default /tmp/kdtrain-pruned-init, shared with bench_pruned_init.sh), NPROC (2),
# STEPS (120), TEACHER_STEPS (150), STUDENT (a checkpoint dir with model.yaml, e.g. the pruned
# student of bench_pruned_init.sh: every run starts from it instead of random weights).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bench_onpolicy.sh OUT_DIR}
INIT=()
[ -n "${STUDENT:-}" ] && INIT=("student.model=$STUDENT/model.yaml" "student.load=$STUDENT")
TAG=${STUDENT:+-$(basename "$STUDENT")}
source benchmarks/demo_teacher.sh
mkdir -p "$OUT"

for f in 0.0 0.5 1.0; do
  rm -rf "$WORK/runs/onpolicy$TAG-$f" "$WORK/checkpoints/onpolicy$TAG-$f"
  "${RUN[@]}" scripts/distill_gpt.py --config configs/distill/demo.yaml "${DATA[@]}" "${INIT[@]}" \
      "training.train_steps=$STEPS" "teacher.load=$WORK/checkpoints/demo-teacher" \
      "onpolicy.fraction=$f" onpolicy.prompt_length=64 "logging.dir=$WORK/runs/onpolicy$TAG-$f" \
      "checkpoint.dir=$WORK/checkpoints/onpolicy$TAG-$f"
done

{
  echo "# ${STUDENT:+STUDENT=$STUDENT }bash benchmarks/bench_onpolicy.sh $OUT  ($(date -u +%F), $(uname -m), NPROC=$NPROC, STEPS=$STEPS)"
  "$PY" scripts/compare_runs.py "$WORK/runs/demo-teacher" "$WORK/runs/onpolicy$TAG-0.0" \
      "$WORK/runs/onpolicy$TAG-0.5" "$WORK/runs/onpolicy$TAG-1.0"
  echo
  echo "per run: mean step time (s) over logged steps, mean sampling time on on-policy steps (s), last kd_loss:"
  for f in 0.0 0.5 1.0; do
    "$PY" - "$WORK/runs/onpolicy$TAG-$f/metrics.jsonl" "$f" <<'PYEOF'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1]) if '"train"' in l]
steps = [r["step_time_s"] for r in recs]
samp = [r["sample_s"] for r in recs if r.get("onpolicy")]
print(f"fraction {sys.argv[2]}: step {sum(steps) / len(steps):.3f} s, sampling "
      f"{(sum(samp) / len(samp)) if samp else 0.0:.3f} s on {len(samp)} of {len(recs)} logged steps, "
      f"last kd_loss {recs[-1]['kd_loss']:.4f}")
PYEOF
  done
} | tee "$OUT/compare.txt"
