#!/usr/bin/env bash
# The GPU batch behind the figures in benchmarks/results/ (one H100; megatron-core and the other
# missing packages installed from wheels first, see the developers' guide). Stages run in order,
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
#
# `accept` fits a 15-minute device budget (one machine start + one call): the real CUDA-graph
# capture test, then kdtrain vs TRL GKD on both pairs and online vs cached, with the student's
# layers graphed when that test passed and eager otherwise; last, with what time is left, the
# Llama pair with a graphed student and a compiled teacher. Each report is rewritten after every
# system/run, so a stage cut off by its limit keeps what finished. The verdicts on the targets
# (benchmarks/accept_report.py) end the output; `accept_report.py DIR --install benchmarks/results`
# files the reports from the unpacked results.tgz.
set -u
OUT=${OUT:-/tmp/kdtrain_h100_out}
WORK=${WORK:-/tmp/kdtrain_h100}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
# Stages call `python`; where only python3 exists (some images), a link to it on PATH.
if ! command -v python >/dev/null; then
  mkdir -p "$WORK/bin" && ln -sf "$(command -v python3)" "$WORK/bin/python" && export PATH="$WORK/bin:$PATH"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$WORK/gpu.txt"
stage() {  # stage NAME LIMIT_S COMMAND...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  echo "=== $name rc=$rc in $((SECONDS - t0))s"; tail -n 25 "$WORK/$name.log"
  # Profiler traces go to a separate archive: they can exceed what one returned file may hold.
  tar czf "$OUT/results.tgz" -C "$WORK" --exclude='*.pt' --exclude='*.distcp' --exclude='*.bin' \
    --exclude='*.safetensors' --exclude='*_trace.json*' . 2>/dev/null
  return $rc
}
for s in "$@"; do
  case $s in
    kernel)
      stage kernel_build 240 python -c "from kdtrain.loss import load_kernels, extension_status; load_kernels(); print(extension_status())"
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
    accept)  # ~8 min on a fresh H100 (the limits below sum to 560 s; the call's own limit ends it)
      # The fused-loss kernel's just-in-time build (~35 s of nvcc) runs beside the GPU test.
      python -c "from kdtrain.loss import load_kernels; load_kernels()" > "$WORK/accept_kernel_build.log" 2>&1 &
      build=$!
      if stage accept_graphs 70 python -m pytest -q -s -m gpu tests/test_cuda_graphs_gpu.py -k train_like_eager; then
        kd=kdtrain-colocated-graphs; graphs=--cuda-graphs
      else
        kd=kdtrain-colocated; graphs=
      fi
      wait $build; echo "=== kernel build rc=$?"; tail -n 5 "$WORK/accept_kernel_build.log"
      for p in llama qwen; do
        stage "accept_$p" 175 python benchmarks/bench_vs_trl.py --preset "$p" --teacher-logit-scale 6 --profile \
          --timeout 120 --systems "trl-gkd,$kd" --out "$WORK/accept_$p"
      done
      stage accept_cache 140 python benchmarks/bench_online_vs_cached.py $graphs --runs online,cached --steps 20 \
        --out "$WORK/accept_cache"
      # Whatever the call's limit leaves: the Llama pair with the teacher's layers compiled as well
      # (compare with accept_llama's TRL GKD row, same machine and call).
      [ -n "$graphs" ] && stage accept_llama_tcompiled 150 python benchmarks/bench_vs_trl.py --preset llama \
        --teacher-logit-scale 6 --timeout 140 --systems kdtrain-colocated-graphs-compiled --out "$WORK/accept_llama_tc"
      stage accept_verdict 30 python benchmarks/accept_report.py "$WORK"  # writes $WORK/accept_verdict.md
      cat "$WORK/accept_verdict.md" ;;
    *) echo "unknown stage $s"; exit 2 ;;
  esac
done
# Up to two of kdtrain's traces (each under 7 MiB), if any stage profiled.
(cd "$WORK" && find . -path '*kdtrain-colocated*' -name 'rank0_trace.json.gz' -size -7M | head -n 2 |
  tar czf "$OUT/traces.tgz" -T -) 2>/dev/null
ls -la "$OUT"
