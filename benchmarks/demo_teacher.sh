# Sourced by the demo-pair benchmarks (bench_pruned_init.sh, bench_onpolicy.sh), from the repo
# root: their shared settings (environment WORK, NPROC, STEPS, TEACHER_STEPS, PYTHON; sets PY, RUN
# (the torchrun command), DEMO_DATA and DATA), then the demo dataset and the demo teacher under
# $WORK as scripts/quickstart.sh builds them, unless $WORK already holds them.
WORK=${WORK:-/tmp/kdtrain-pruned-init}
NPROC=${NPROC:-2}
STEPS=${STEPS:-120}
TEACHER_STEPS=${TEACHER_STEPS:-150}
PY=${PYTHON:-python}
RUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC")
mkdir -p "$WORK"
DEMO_DATA="$WORK/data"
DATA=("data.path=[$DEMO_DATA/demo_text_document]" "data.tokenizer=$DEMO_DATA/tokenizer.model")
if [ ! -f "$DEMO_DATA/demo_text_document.idx" ]; then
  "$PY" scripts/train_tokenizer.py --demo-corpus --demo-corpus-out "$DEMO_DATA/corpus.jsonl" \
      --output-prefix "$DEMO_DATA/tokenizer" --vocab-size 4096
  "$PY" scripts/preprocess_data.py --input "$DEMO_DATA/corpus.jsonl" \
      --tokenizer "$DEMO_DATA/tokenizer.model" --output-prefix "$DEMO_DATA/demo_text_document"
fi
if [ ! -f "$WORK/checkpoints/demo-teacher/latest" ]; then
  "${RUN[@]}" scripts/pretrain_gpt.py --config configs/pretrain/demo.yaml "${DATA[@]}" \
      "training.train_steps=$TEACHER_STEPS" "logging.dir=$WORK/runs/demo-teacher" \
      "checkpoint.dir=$WORK/checkpoints/demo-teacher"
fi
