#!/usr/bin/env bash
# The whole story on CPU, about 4 minutes on 2 cores, no network:
#   1. build the embedded demo corpus, its tokenizer and indexed dataset (first run only, ~10 s);
#   2. pretrain the demo teacher (5M parameters) under torchrun, 2 ranks, 150 steps;
#   3. distil it into the demo student (1M parameters), colocated on the same 2 ranks, 120 steps;
#   4. train the same student from scratch for the same steps, data and optimizer;
#   5. print the held-out loss of the teacher, the distilled student and the scratch student.
#
#   bash scripts/quickstart.sh                                  # defaults
#   RUN_ROOT=jsd TEACHER_STEPS=100 STUDENT_STEPS=50 bash scripts/quickstart.sh loss.divergence=jsd
#
# Runs resume from their checkpoints under RUN_ROOT: other settings need their own RUN_ROOT.
#
# Extra arguments are config overrides of the distillation run (configs/distill/demo.yaml).
# Environment: NPROC (ranks, default 2), DEMO_DATA (default data/demo), RUN_ROOT (default .:
# runs/ and checkpoints/ go under it), TEACHER_STEPS / STUDENT_STEPS (default 150 / 120), PYTHON
# (the interpreter, default python).
set -euo pipefail
cd "$(dirname "$0")/.."

NPROC=${NPROC:-2}
DEMO_DATA=${DEMO_DATA:-data/demo}
RUN_ROOT=${RUN_ROOT:-.}
PY=${PYTHON:-python}
TEACHER_STEPS=${TEACHER_STEPS:-150}
STUDENT_STEPS=${STUDENT_STEPS:-120}
RUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC")
DATA=("data.path=[$DEMO_DATA/demo_text_document]" "data.tokenizer=$DEMO_DATA/tokenizer.model")

if [ ! -f "$DEMO_DATA/demo_text_document.idx" ] || [ ! -f "$DEMO_DATA/tokenizer.model" ]; then
  echo "== building the demo dataset in $DEMO_DATA"
  "$PY" scripts/train_tokenizer.py --demo-corpus --demo-corpus-out "$DEMO_DATA/corpus.jsonl" \
      --output-prefix "$DEMO_DATA/tokenizer" --vocab-size 4096
  "$PY" scripts/preprocess_data.py --input "$DEMO_DATA/corpus.jsonl" \
      --tokenizer "$DEMO_DATA/tokenizer.model" --output-prefix "$DEMO_DATA/demo_text_document"
fi

echo "== 1/3 pretraining the demo teacher on CPU with $NPROC ranks ($TEACHER_STEPS steps)"
"${RUN[@]}" scripts/pretrain_gpt.py --config configs/pretrain/demo.yaml "${DATA[@]}" \
    "training.train_steps=$TEACHER_STEPS" \
    "logging.dir=$RUN_ROOT/runs/demo-teacher" "checkpoint.dir=$RUN_ROOT/checkpoints/demo-teacher"

echo "== 2/3 distilling the demo teacher into the demo student ($STUDENT_STEPS steps, colocated)"
"${RUN[@]}" scripts/distill_gpt.py --config configs/distill/demo.yaml "${DATA[@]}" \
    "training.train_steps=$STUDENT_STEPS" "teacher.load=$RUN_ROOT/checkpoints/demo-teacher" \
    "logging.dir=$RUN_ROOT/runs/demo-distill" "checkpoint.dir=$RUN_ROOT/checkpoints/demo-distill" "$@"

echo "== 3/3 training the demo student from scratch ($STUDENT_STEPS steps, same data and optimizer)"
"${RUN[@]}" scripts/pretrain_gpt.py --config configs/pretrain/demo-student.yaml "${DATA[@]}" \
    "training.train_steps=$STUDENT_STEPS" \
    "logging.dir=$RUN_ROOT/runs/demo-student-scratch" "checkpoint.dir=$RUN_ROOT/checkpoints/demo-student-scratch"

echo "== held-out loss (same validation windows for every run)"
"$PY" scripts/compare_runs.py "$RUN_ROOT/runs/demo-teacher" "$RUN_ROOT/runs/demo-distill" \
    "$RUN_ROOT/runs/demo-student-scratch"
