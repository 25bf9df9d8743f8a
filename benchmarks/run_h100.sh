#!/usr/bin/env bash
# The GPU batch behind the figures in benchmarks/results/ (one H100; megatron-core and the other
# packages the machine lacks installed first, e.g. from wheels on its disk). Stages run in order,
# each under its own time limit; logs and results go to $WORK and, re-packed after every stage so a
# killed batch still returns what it finished, to $OUT/results.tgz:
#
#   bash benchmarks/run_h100.sh kernel pretrain distill      # first batch
#   bash benchmarks/run_h100.sh planner trl cache            # second batch
#   bash benchmarks/run_h100.sh distill_compiled cache_compiled   # precision.compile=true A/B
#   bash benchmarks/run_h100.sh trl_llama trl_qwen           # eager + CUDA-graphed kdtrain, profiles
#   bash benchmarks/run_h100.sh trl_llama_compiled trl_qwen_compiled   # TRL and kdtrain compiled
#   bash benchmarks/run_h100.sh distill_graphs cache_graphs  # precision.cuda_graphs=true A/B
#   bash benchmarks/run_h100.sh distill_graphs_compiled      # graphed student, compiled teacher
#   bash benchmarks/run_h100.sh layer_host                   # per-layer host vs wall time
#   bash benchmarks/run_h100.sh decode_graphs                # graphed decoding: equality and timings
#   bash benchmarks/run_h100.sh features features_qwen       # recompute / document attention / target logits A/B
#   bash benchmarks/run_h100.sh smoke ...                    # first: tiny runs on CUDA (under a minute)
#   bash benchmarks/run_h100.sh accept                       # the acceptance figures in one call (< 10 min)
#   bash benchmarks/run_h100.sh accept_qwen accept_cache accept_verdict   # redo cut stages in a later call
#
# `accept` fits one command of at most 600 s:
#
#   stage          nominal s  what (estimates from the 2026-11-23 H100 runs in benchmarks/results/)
#   accept_gate        60     the real CUDA-graph capture test (2 tests, must pass, not skip), beside
#                             the fused-loss kernel's just-in-time build (~35 s of nvcc) and then its
#                             bf16 GPU tests against the reference (~10 s; else the reference loss)
#   accept_llama      160     TRL GKD vs kdtrain, Llama pair: ~10 start + 27 prep + 36 TRL + ~65 kdtrain
#                             (graphed; weights-only checkpoint) + profiles = ~140
#   accept_qwen       195     the same for the Qwen pair: ~10 + 25 prep + 52 TRL + ~85 kdtrain = ~172
#   accept_cache      155     online vs cached, 20 steps: ~5 + 8 + 50 online + 41 cache pass + 43 cached = ~147
#   accept_verdict      5     benchmarks/accept_report.py
#                    ----
#                     575     = ACCEPT_BUDGET_S; + ~15 s of wheel installs before it = ~590 s of the 600 s
#
# Each stage ends by a deadline: the accept batch's start + ACCEPT_BUDGET_S x (nominal limits up to
# and including the stage) / 575, so time a stage leaves unused passes to the next, and a smaller
# budget (e.g. ACCEPT_BUDGET_S=$((585 - install_s)) after a slow install) shrinks every stage alike.
# The benchmarks get their stage's limit less a margin as --budget and stop by themselves in time;
# their reports are rewritten after every system/run (kdtrain's and TRL's rows as soon as their
# training ends, before the export and evaluation), and results.tgz is repacked every
# PACK_EVERY_S (20) seconds during a stage and after it, so a stage cut off, or the call killed,
# still returns what finished. The student's layers are graphed when the gate passes, with an eager
# fallback inside each vs-TRL run; when the graphed row fails in accept_llama (or the gate fails),
# the later stages run eager. A failed kernel build is reported (kernel_status.txt, the reports)
# and later processes skip the retry (KDTRAIN_NO_JIT=1, KDTRAIN_NO_JIT_REASON). The verdicts on the
# targets (benchmarks/accept_report.py) end the output; `accept_report.py DIR --install
# benchmarks/results` files the reports from the unpacked results.tgz. The Llama pair with a
# graphed student and a compiled teacher is its own stage (accept_llama_tcompiled, ~150 s).
set -u
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-/tmp/kdtrain_h100_out}
WORK=${WORK:-/tmp/kdtrain_h100}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
# Stages call `python`; where only python3 exists (some images), a wrapper that runs it (a link
# would lose a virtual environment: python resolves its prefix from the link's directory).
if ! command -v python >/dev/null; then
  mkdir -p "$WORK/bin" && printf '#!/bin/sh\nexec python3 "$@"\n' > "$WORK/bin/python" && chmod +x "$WORK/bin/python"
  export PATH="$WORK/bin:$PATH"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"; } | tee "$WORK/gpu.txt"
PACK_EVERY_S=${PACK_EVERY_S:-20}
PACKER=
pack() {  # $OUT/results.tgz (+ traces.tgz) from $WORK: whole archives only, under the size limit
  python benchmarks/batch_tools.py pack "$WORK" "$OUT" || echo "=== packing failed (rc $?)"
}
start_packer() {  # repack every PACK_EVERY_S seconds while a stage runs
  [ "$PACK_EVERY_S" -gt 0 ] || return 0
  touch "$WORK/.packing"
  (
    while [ -e "$WORK/.packing" ]; do
      for _ in $(seq "$PACK_EVERY_S"); do [ -e "$WORK/.packing" ] || exit 0; sleep 1; done
      python benchmarks/batch_tools.py pack "$WORK" "$OUT" > /dev/null 2>&1
    done
  ) &
  PACKER=$!
}
stop_packer() {
  rm -f "$WORK/.packing"
  if [ -n "$PACKER" ]; then wait "$PACKER" 2>/dev/null; PACKER=; fi
}
stage() {  # stage NAME LIMIT_S COMMAND...
  local name=$1 limit=$2; shift 2
  if [ "$limit" -lt 15 ]; then
    echo "=== $name skipped: only ${limit}s left" | tee "$WORK/$name.log"
    return 124
  fi
  echo "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS rc
  start_packer
  timeout -k 10 "$limit" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  stop_packer
  echo "=== $name rc=$rc in $((SECONDS - t0))s"; tail -n 25 "$WORK/$name.log"
  pack
  return $rc
}
kernel_env() {  # after a failed kernel build: later processes skip the ~35 s retry, and say why
  if [ -f "$WORK/kernel_status.txt" ] && grep -q '^failed' "$WORK/kernel_status.txt"; then
    export KDTRAIN_NO_JIT=1
    KDTRAIN_NO_JIT_REASON="an earlier build in this batch failed: $(head -c 300 "$WORK/kernel_status.txt" | tr '\n' ' ')"
    export KDTRAIN_NO_JIT_REASON
  fi
}
KERNEL_PY='from kdtrain.loss._ext import extension_status, load_kernels
m = load_kernels()
print(("loaded: " if m is not None else "failed: ") + " ".join(extension_status().split()))
raise SystemExit(0 if m is not None else 1)'
kernel_build() {  # the fused-loss kernels (prebuilt or just-in-time); the outcome in kernel_build.log
  timeout -k 10 "${1:-240}" python -c "$KERNEL_PY" > "$WORK/kernel_build.log" 2>&1
}
kernel_check() {  # kernel_check LIMIT: the built kernels against the reference on this GPU (bf16 cases, ~10 s)
  rm -f "$WORK/kernel_check.xml"
  timeout -k 5 "$1" python -m pytest -q -x -m gpu tests/test_kd_loss_gpu.py -k "test_kernel_matches_reference and bfloat16" \
    -p no:cacheprovider --junitxml="$WORK/kernel_check.xml" > "$WORK/kernel_check.log" 2>&1
  python benchmarks/batch_tools.py gate "$WORK/kernel_check.xml" > "$WORK/kernel_check.txt"
}
kernel_record() {  # kernel_record RC: kernel_status.txt from kernel_build.log; the environment after a failure
  local rc=$1 line
  line=$(grep -E '^(loaded|failed): ' "$WORK/kernel_build.log" | tail -n 1)
  [ -n "$line" ] || line="failed: exit $rc: $(tail -n 3 "$WORK/kernel_build.log" | tr '\n' ' ' | cut -c1-400)"
  if [ "$rc" -eq 3 ]; then  # built, but kernel_check did not pass: the reference loss from here on
    line="failed: built, but the GPU check against the reference did not pass ($(cat "$WORK/kernel_check.txt" 2>/dev/null))"
  elif [ "$rc" -ne 0 ]; then case $line in loaded:*) line="failed: exit $rc after ${line#loaded: }" ;; esac; fi
  echo "$line" > "$WORK/kernel_status.txt"
  echo "=== fused KD-loss kernels: $line"
  kernel_env
}
# ---- the acceptance batch (see the top) ----
ACCEPT_BUDGET_S=${ACCEPT_BUDGET_S:-575}
ACC_T0=
accept_limit() {  # accept_limit CUMULATIVE_NOMINAL_S DEFAULT_S: seconds left to this stage's deadline
  if [ -z "$ACC_T0" ]; then echo "$2"; else echo $(( ACC_T0 + ACCEPT_BUDGET_S * $1 / 575 - SECONDS )); fi
}
accept_mode() {  # graphs or eager: the gate's outcome, or an earlier stage's (accept_mode.txt)
  if [ -f "$WORK/accept_mode.txt" ]; then cut -d: -f1 "$WORK/accept_mode.txt"; else echo graphs; fi
}
accept_gate() {
  # The fused-loss kernel's just-in-time build runs beside the GPU test, then a few of its GPU
  # tests against the reference (exit 3 when they do not pass: the batch then uses the reference).
  local limit build rc
  limit=$(accept_limit 60 60)
  # ~35 s build measured; a killed build would leave kdtrain on the reference loss
  { kernel_build $((limit + 30)); b=$?; if [ "$b" -eq 0 ] && ! kernel_check 40; then b=3; fi; exit "$b"; } &
  build=$!
  rm -f "$WORK/accept_gate.xml"
  stage accept_gate "$limit" python -m pytest -q -s -m gpu tests/test_cuda_graphs_gpu.py -k train_like_eager \
    -p no:cacheprovider --junitxml="$WORK/accept_gate.xml"
  # Passed means passed: both tests ran (a machine without CUDA skips them) and none failed.
  if python benchmarks/batch_tools.py gate "$WORK/accept_gate.xml" > "$WORK/accept_gate.txt"; then
    echo "graphs: the CUDA-graph capture test passed ($(cat "$WORK/accept_gate.txt"))" > "$WORK/accept_mode.txt"
  else
    echo "eager: the CUDA-graph capture test did not pass ($(cat "$WORK/accept_gate.txt"))" > "$WORK/accept_mode.txt"
  fi
  cat "$WORK/accept_mode.txt"
  wait "$build"; rc=$?
  kernel_record "$rc"
}
accept_pair() {  # accept_pair llama|qwen LIMIT
  local p=$1 limit=$2 systems
  kernel_env
  if [ "$(accept_mode)" = graphs ]; then
    systems="trl-gkd,kdtrain-colocated-graphs|kdtrain-colocated"  # eager when the graphed run fails
  else
    systems="trl-gkd,kdtrain-colocated"
  fi
  rm -rf "$WORK/accept_$p"  # an earlier call's report must not pass for this one's
  stage "accept_$p" "$limit" python benchmarks/bench_vs_trl.py --preset "$p" --teacher-logit-scale 6 --profile \
    --timeout 130 --budget $((limit - 8)) --systems "$systems" --out "$WORK/accept_$p"
  if [ "$p" = llama ] && [ "$(accept_mode)" = graphs ]; then
    local st
    st=$(python benchmarks/batch_tools.py row-status "$WORK/accept_llama/bench_llama.json" kdtrain-colocated-graphs)
    if [ "$st" != ok ]; then
      echo "eager: the graphed kdtrain row of accept_llama was $st" > "$WORK/accept_mode.txt"
      echo "=== $(cat "$WORK/accept_mode.txt"): the later stages run eager"
    fi
  fi
}
accept_cache() {  # accept_cache LIMIT
  local limit=$1 graphs=
  kernel_env
  [ "$(accept_mode)" = graphs ] && graphs=--cuda-graphs
  rm -rf "$WORK/accept_cache"
  stage accept_cache "$limit" python benchmarks/bench_online_vs_cached.py $graphs --runs online,cached --steps 20 \
    --budget $((limit - 8)) --out "$WORK/accept_cache"
}
accept_verdict() {  # accept_verdict LIMIT (at least 15 s: it takes ~1 s, and the limit only guards a hang)
  local limit=$1
  [ "$limit" -ge 15 ] || limit=15
  stage accept_verdict "$limit" python benchmarks/accept_report.py "$WORK"  # writes $WORK/accept_verdict.md
  cat "$WORK/accept_verdict.md" 2>/dev/null
}
pack  # even a call killed in its first stage returns gpu.txt
for s in "$@"; do
  case $s in
    kernel)
      stage kernel_build 240 python -c "$KERNEL_PY"; kernel_record $?
      KDTRAIN_GPU_LOG=$WORK/kd_loss_gpu_tests.md stage kernel_tests 150 python -m pytest -q -x -m gpu tests/test_kd_loss_gpu.py
      stage kernel_bench 150 python benchmarks/bench_kd_loss.py --quick --out "$WORK/kd_loss" ;;
    pretrain)
      stage pretrain_1b 180 python scripts/pretrain_gpt.py --config configs/pretrain/llama-3.2-1b-h100.yaml \
        logging.dir="$WORK/pretrain_1b" training.train_steps=25 ;;
    distill)
      stage distill_bench 300 python benchmarks/bench_distill.py --out "$WORK/distill" ;;
    planner)
      stage planner_bench 320 python benchmarks/bench_planner.py --out "$WORK/planner" ;;
    trl)
      stage trl_bench 420 python benchmarks/bench_vs_trl.py --preset llama --preset qwen --out "$WORK/trl" ;;
    cache)
      stage cache_bench 300 python benchmarks/bench_online_vs_cached.py --out "$WORK/cache" ;;
    distill_compiled)
      stage distill_compiled_bench 420 python benchmarks/bench_distill.py --compile --profile --out "$WORK/distill_compiled" ;;
    cache_compiled)
      stage cache_compiled_bench 360 python benchmarks/bench_online_vs_cached.py --compile --out "$WORK/cache_compiled" ;;
    distill_graphs)
      stage distill_graphs_bench 420 python benchmarks/bench_distill.py --cuda-graphs --profile --out "$WORK/distill_graphs" ;;
    distill_graphs_compiled)  # graphed student + compiled teacher (both options in distillation)
      stage distill_graphs_compiled_bench 420 python benchmarks/bench_distill.py --cuda-graphs --compile --out "$WORK/distill_graphs_compiled" ;;
    cache_graphs)
      stage cache_graphs_bench 360 python benchmarks/bench_online_vs_cached.py --cuda-graphs --out "$WORK/cache_graphs" ;;
    trl_llama|trl_qwen)
      stage "${s}_bench" 570 python benchmarks/bench_vs_trl.py --preset "${s#trl_}" --profile --teacher-logit-scale 6 \
        --systems trl-gkd,trl-gkd-liger,kdtrain-colocated,kdtrain-colocated-graphs --out "$WORK/$s" ;;
    trl_llama_compiled|trl_qwen_compiled)
      p=${s#trl_}; p=${p%_compiled}
      stage "${s}_bench" 570 python benchmarks/bench_vs_trl.py --preset "$p" --profile --teacher-logit-scale 6 \
        --systems trl-gkd-compiled,kdtrain-colocated-compiled --out "$WORK/$s" ;;
    smoke)  # the tiny configs on CUDA, bf16: pretraining and colocated distillation, three steps each
      stage smoke_pretrain 120 python scripts/pretrain_gpt.py --config configs/pretrain/tiny.yaml data.mock=true \
        "data.path=[]" training.train_steps=3 logging.dir="$WORK/smoke_pretrain" checkpoint.dir=null
      stage smoke_distill 120 python scripts/distill_gpt.py --config configs/distill/tiny.yaml data.mock=true \
        "data.path=[]" training.train_steps=3 logging.interval=1 logging.dir="$WORK/smoke_distill" checkpoint.dir=null
      stage smoke_graphs 180 python -m pytest -q -s -m gpu tests/test_cuda_graphs_gpu.py
      stage smoke_sync_free 300 python -m pytest -q -s -m gpu tests/test_sync_free_gpu.py ;;
    features|features_qwen)  # recomputation, attention within documents, logits at the targets: A/B pairs
      pair=llama; [ "$s" = features_qwen ] && pair=qwen
      stage "${s}_bench" 420 python benchmarks/bench_features.py --pair "$pair" --out "$WORK/$s" ;;
    decode_graphs)
      stage decode_graphs_test 180 python -m pytest -q -s -m gpu tests/test_cuda_graphs_gpu.py -k decoding ;;
    layer_host)
      stage layer_gpu_tests 120 python -m pytest -q -s -m gpu tests/test_layer.py
      stage layer_host_bench 120 python benchmarks/bench_layer_host.py --model llama-150m-32k --out "$WORK/layer_host" ;;
    accept)  # the acceptance figures, ~575 s (ACCEPT_BUDGET_S) from here: see the top
      ACC_T0=$SECONDS
      rm -f "$WORK/accept_mode.txt"
      accept_gate
      accept_pair llama "$(accept_limit 220 160)"
      accept_pair qwen "$(accept_limit 415 195)"
      accept_cache "$(accept_limit 570 155)"
      accept_verdict "$(accept_limit 575 20)"
      ACC_T0= ;;
    accept_gate) rm -f "$WORK/accept_mode.txt"; accept_gate ;;
    accept_llama|accept_qwen) accept_pair "${s#accept_}" "$(if [ "$s" = accept_llama ]; then echo 160; else echo 195; fi)" ;;
    accept_cache) accept_cache 160 ;;
    accept_verdict) accept_verdict 20 ;;
    accept_llama_tcompiled)  # the Llama pair with the teacher's layers compiled as well (not part of accept)
      kernel_env
      stage accept_llama_tcompiled 150 python benchmarks/bench_vs_trl.py --preset llama --teacher-logit-scale 6 \
        --timeout 140 --budget 142 --systems kdtrain-colocated-graphs-compiled --out "$WORK/accept_llama_tc" ;;
    *) echo "unknown stage $s"; exit 2 ;;
  esac
done
pack
ls -la "$OUT"
