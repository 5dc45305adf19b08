#!/usr/bin/env bash
# Memory questions answered by deviceless compiles (benchmarks/results/aot-memory-*.json,
# plan-*.json); no GPU needed (requirements-aot.txt). Times and speeds are estimates.
#   1. Which optimizer-state precision lets FOG-flash 8B (T=4096) train on one H200 / 8 H100s?
#   2. Do FP8 recipes need more memory than BF16 for the same block (FP8 operands saved for the
#      backward pass are a known trap)?
#   3. The largest batch per GPU at 390M and 1.5B on one H100, per recipe and remat policy.
#
#   bash benchmarks/aot_memory.sh [OUTDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results}"
mkdir -p "$out"
export JAX_PLATFORMS=cpu
fog=fog_flash:fp8dpa:model.attention_impl=cudnn
states="$fog,$fog:optim.state_precision=fog_fp16,$fog:optim.state_precision=fog_fp8_m1"
states="$states,$fog:optim.state_precision=fog_fp16:model.remat=full,$fog:optim.state_precision=fog_fp8_m1:model.remat=full"
python -m fogjax.bench --target=h200 --gpus=1 --triton_gemm=off --config=configs/fog_flash.py:8b \
  --compare="$states" --config.train.batch_size=1 --output="$out/aot-memory-8b-state-h200-1gpu.json"
python -m fogjax.bench --target=h100 --gpus=8 --triton_gemm=off --config=configs/fog_flash.py:8b \
  --compare="$states" --config.train.batch_size=8 --config.mesh.data=1 --config.mesh.fsdp=8 \
  --output="$out/aot-memory-8b-state-h100-8gpu.json"
python -m fogjax.bench --target=h100 --gpus=1 --triton_gemm=off --config=configs/fog_flash.py:1.5b \
  --compare=fog_flash:bf16:model.attention_impl=cudnn,fog_flash:fp8:model.attention_impl=cudnn,$fog,fog_flash:bf16,fog_flash:fp8dpa \
  --config.train.batch_size=1 --output="$out/aot-memory-1.5b-recipes-h100-1gpu.json"
python -m fogjax.bench --target=h100 --gpus=1 --triton_gemm=off --plan --config=configs/fog_flash.py:1.5b \
  --compare=llama3:bf16:model.attention_impl=cudnn,$fog --plan_sizes=390m,1.5b \
  --plan_remat=none,full --plan_max_batch=8 --output="$out/plan-h100-1gpu.json"
