#!/usr/bin/env bash
# One device run: GPU correctness tests (GPU vs quant.reference numerics), then the latency benchmark.
# Results land in $OUT (copy them into bench/results/). Usage: bash bench/gpu_device_run.sh [bench args]
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-bench/results}
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, triton, transformers, safetensors; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'cap', torch.cuda.get_device_capability())"
} 2>&1 | tee "$OUT/gpu_device_info.txt"
GPU_TEST_RECORD="$OUT/gpu_correctness.jsonl" python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py \
  tests/test_gpu_engine.py 2>&1 | tee "$OUT/gpu_correctness.txt"
python3 bench/gpu_latency.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_bench_log.txt"
