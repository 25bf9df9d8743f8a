#!/usr/bin/env bash
# Distillation on conversations: the KD loss on the replies only vs on every token, and both vs the
# same student trained on the replies' labels alone (CPU, 2 ranks, about 10 minutes):
#
#   bash benchmarks/bench_chat.sh benchmarks/results/chat_cpu
#
# 1. the demo dataset and the demo teacher (5M parameters, 150 steps on documents), as
#    scripts/quickstart.sh builds them (reused when $WORK already holds them);
# 2. demo conversations (questions about stdlib definitions answered by their docstrings, the
#    plain template) in the demo tokenizer, 10% of the windows held out;
# 3. the teacher fine-tuned on the replies for TEACHER_SFT_STEPS steps (checkpoint.load);
# 4. the demo student, STEPS steps each, same data order and optimizer: distilled from that teacher
#    with the replies as targets (data.loss_mask=true), distilled on every token
#    (data.loss_mask=false), and trained on the replies' labels (pretrain_gpt.py); once from random
#    weights and once from a student first distilled on the demo documents for STEPS steps;
# 5. kdtrain eval: every checkpoint's held-out loss over the replies, over the prompts and over all
#    tokens.
# Environment: WORK (default /tmp/kdtrain-pruned-init), NPROC (2), STEPS (120), TEACHER_STEPS (150),
# TEACHER_SFT_STEPS (100).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bench_chat.sh OUT_DIR}
source benchmarks/demo_teacher.sh
TEACHER_SFT_STEPS=${TEACHER_SFT_STEPS:-100}
mkdir -p "$OUT"
CHAT=("data.path=[$DEMO_DATA/demo_chat_document]" "data.tokenizer=$DEMO_DATA/tokenizer.model" "data.split=[0.9,0.1]")

"$PY" scripts/preprocess_data.py --demo-corpus --format chat --chat-template plain \
    --tokenizer "$DEMO_DATA/tokenizer.model" --output-prefix "$DEMO_DATA/demo_chat_document" | tee "$OUT/data.txt"
RUNS=(doc-student chat-teacher)
for init in random doc; do RUNS+=("$init-distill-replies" "$init-distill-all" "$init-student-replies"); done
for run in "${RUNS[@]}"; do rm -rf "$WORK/runs/$run" "$WORK/checkpoints/$run"; done
"${RUN[@]}" scripts/pretrain_gpt.py --config configs/pretrain/demo.yaml "${CHAT[@]}" \
    "checkpoint.load=$WORK/checkpoints/demo-teacher" "training.train_steps=$TEACHER_SFT_STEPS" \
    optimizer.lr=1e-3 optimizer.warmup_steps=10 \
    "logging.dir=$WORK/runs/chat-teacher" "checkpoint.dir=$WORK/checkpoints/chat-teacher"
# The student that already speaks the language: distilled on the documents first.
"${RUN[@]}" scripts/distill_gpt.py --config configs/distill/demo.yaml "${DATA[@]}" "training.train_steps=$STEPS" \
    "teacher.load=$WORK/checkpoints/demo-teacher" \
    "logging.dir=$WORK/runs/doc-student" "checkpoint.dir=$WORK/checkpoints/doc-student"
for init in random doc; do
  STUDENT=(); CE_INIT=()
  if [ "$init" = doc ]; then
    STUDENT=("student.load=$WORK/checkpoints/doc-student"); CE_INIT=("checkpoint.load=$WORK/checkpoints/doc-student")
  fi
  for targets in replies all; do
    MASK=true; [ "$targets" = all ] && MASK=false
    "${RUN[@]}" scripts/distill_gpt.py --config configs/distill/demo.yaml "${CHAT[@]}" "data.loss_mask=$MASK" \
        "training.train_steps=$STEPS" "teacher.load=$WORK/checkpoints/chat-teacher" "${STUDENT[@]}" \
        "logging.dir=$WORK/runs/$init-distill-$targets" "checkpoint.dir=$WORK/checkpoints/$init-distill-$targets"
  done
  "${RUN[@]}" scripts/pretrain_gpt.py --config configs/pretrain/demo-student.yaml "${CHAT[@]}" "${CE_INIT[@]}" \
      "training.train_steps=$STEPS" \
      "logging.dir=$WORK/runs/$init-student-replies" "checkpoint.dir=$WORK/checkpoints/$init-student-replies"
done

{
  echo "# bash benchmarks/bench_chat.sh $OUT  ($(date -u +%F), $(uname -m), NPROC=$NPROC, STEPS=$STEPS, TEACHER_SFT_STEPS=$TEACHER_SFT_STEPS)"
  "$PY" -m kdtrain.cli eval --data "$DEMO_DATA/demo_chat_document" --seq-length 128 --split 0.9 0.1 \
      --model "$WORK/checkpoints/demo-teacher" "${RUNS[@]/#/$WORK/checkpoints/}" --out "$OUT/heldout.json"
} | tee "$OUT/compare.txt"
