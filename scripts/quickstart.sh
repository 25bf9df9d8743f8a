#!/usr/bin/env bash
# Tiny end-to-end run on CPU: build the embedded demo corpus, its tokenizer and indexed dataset
# (first run only, ~10 s, no network), then pretrain the demo teacher under torchrun (2 ranks, ~2 min).
#
#   bash scripts/quickstart.sh                       # defaults
#   NPROC=1 bash scripts/quickstart.sh training.train_steps=50   # extra args are config overrides
#
# Environment: NPROC (ranks, default 2), DEMO_DATA (default data/demo), RUN_ROOT (default .:
# runs/ and checkpoints/ go under it).
set -euo pipefail
cd "$(dirname "$0")/.."

NPROC=${NPROC:-2}
DEMO_DATA=${DEMO_DATA:-data/demo}
RUN_ROOT=${RUN_ROOT:-.}
PY=${PYTHON:-python}

if [ ! -f "$DEMO_DATA/demo_text_document.idx" ] || [ ! -f "$DEMO_DATA/tokenizer.model" ]; then
  echo "== building the demo dataset in $DEMO_DATA"
  "$PY" scripts/train_tokenizer.py --demo-corpus --demo-corpus-out "$DEMO_DATA/corpus.jsonl" \
      --output-prefix "$DEMO_DATA/tokenizer" --vocab-size 4096
  "$PY" scripts/preprocess_data.py --input "$DEMO_DATA/corpus.jsonl" \
      --tokenizer "$DEMO_DATA/tokenizer.model" --output-prefix "$DEMO_DATA/demo_text_document"
fi

echo "== pretraining the demo teacher on CPU with $NPROC ranks"
"$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" scripts/pretrain_gpt.py \
    --config configs/pretrain/demo.yaml \
    "data.path=[$DEMO_DATA/demo_text_document]" "data.tokenizer=$DEMO_DATA/tokenizer.model" \
    "logging.dir=$RUN_ROOT/runs/demo-teacher" "checkpoint.dir=$RUN_ROOT/checkpoints/demo-teacher" \
    "$@"
