#!/usr/bin/env bash
# One device run: GPU correctness tests (GPU vs quant.reference numerics), then the latency benchmark.
# Results land in $OUT (copy them into bench/results/).
#   bash bench/gpu_device_run.sh [tests|bench|all] [bench args]
# The test files run as three processes at once (Triton compiles are CPU-bound: ~4 min serially).
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-bench/results}
MODE=${1:-all}
[ $# -gt 0 ] && shift
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, triton, transformers, safetensors; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'cap', torch.cuda.get_device_capability())"
} 2>&1 | tee "$OUT/gpu_device_info.txt"
if [ "$MODE" = tests ] || [ "$MODE" = all ]; then
  T0=$(date +%s)
  export GPU_TEST_RECORD="$OUT/gpu_correctness.jsonl"
  PT="python3 -m pytest -q -p no:cacheprovider"
  $PT tests/test_gpu_kernels.py >"$OUT/t1.txt" 2>&1 &
  $PT tests/test_gpu_engine.py -k "bf16 or w8a16 or kvint8" >"$OUT/t2.txt" 2>&1 &
  $PT tests/test_gpu_engine.py -k "not (bf16 or w8a16 or kvint8)" >"$OUT/t3.txt" 2>&1 &
  wait
  for f in t1 t2 t3; do echo "== $f"; cat "$OUT/$f.txt"; done >"$OUT/gpu_correctness.txt"
  rm -f "$OUT"/t[123].txt
  echo "tests took $(( $(date +%s) - T0 )) s" >>"$OUT/gpu_correctness.txt"
  grep -E "passed|failed|error|tests took" "$OUT/gpu_correctness.txt"
fi
if [ "$MODE" = bench ] || [ "$MODE" = all ]; then
  python3 -m bench.gpu_latency --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_bench_log.txt"
fi
