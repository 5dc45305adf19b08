#!/usr/bin/env bash
# The deviceless GPU compile results committed under benchmarks/results/aot-*.json: Llama3 BF16 vs
# FOG-flash FP8 / FP8DPA, XLA and cuDNN attention, at 390M, 1.5B and 8B width, on 1 and 8 GPUs
# (FSDP over 8), for H100 and H200. Runs on any machine with requirements-aot.txt installed; no
# GPU. Times and speeds in the JSON are estimates (fogjax/bench/estimate.py).
#
#   bash benchmarks/aot_results.sh [OUTDIR] [SIZES] [TARGETS]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results}"
sizes="${2:-390m 1.5b 8b}"
targets="${3:-h100 h200}"
mkdir -p "$out"
export JAX_PLATFORMS=cpu
compare=llama3:bf16,llama3:bf16:model.attention_impl=cudnn,fog_flash:fp8,fog_flash:fp8:model.attention_impl=cudnn,fog_flash:fp8dpa,fog_flash:fp8dpa:model.attention_impl=cudnn
for size in $sizes; do
  for target in $targets; do
    python -m fogjax.bench --target="$target" --gpus=1 --triton_gemm=off \
      --config="configs/fog_flash.py:$size" --compare="$compare" --config.train.batch_size=1 \
      --output="$out/aot-$size-$target-1gpu.json"
    python -m fogjax.bench --target="$target" --gpus=8 --triton_gemm=off \
      --config="configs/fog_flash.py:$size" --compare="$compare" --config.train.batch_size=8 \
      --config.mesh.data=1 --config.mesh.fsdp=8 \
      --output="$out/aot-$size-$target-8gpu.json"
  done
done
