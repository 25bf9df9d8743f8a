# Sourced by the benchmarks that build on bench_chat.sh's runs (bench_chat_cache.sh,
# bench_chat_onpolicy.sh), from the repo root, after they set STEPS and NEED (the checkpoints of
# bench_chat.sh they read): the shared settings (environment WORK, NPROC, PYTHON; sets PY,
# DEMO_DATA and CHAT, the demo conversation data overrides) and a clear error when bench_chat.sh
# has not run in $WORK.
WORK=${WORK:-/tmp/kdtrain-pruned-init}
NPROC=${NPROC:-2}
PY=${PYTHON:-python}
DEMO_DATA="$WORK/data"
CHAT=("data.path=[$DEMO_DATA/demo_chat_document]" "data.tokenizer=$DEMO_DATA/tokenizer.model" "data.split=[0.9,0.1]")
for need in "${NEED[@]}"; do
  if [ ! -f "$WORK/checkpoints/$need/latest" ]; then
    echo "no $need checkpoint in $WORK: run WORK=$WORK bash benchmarks/bench_chat.sh first" >&2
    exit 2
  fi
done
