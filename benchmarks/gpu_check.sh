#!/usr/bin/env bash
# Everything fogjax checks on one Hopper GPU, in one go: the GPU-marked tests (cuBLASLt FP8 GEMM
# counts, cuDNN FP8 attention, Transformer Engine), then the benchmarks (train step and attention
# alone) whose JSON goes to benchmarks/results/.
#
#   bash benchmarks/gpu_check.sh [OUTDIR]
#
# OUTDIR (default benchmarks/results) receives one JSON per benchmark and the logs. Missing pure-
# Python packages can be provided as wheels in .whl/ (installed into /tmp/site first).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"

echo "== GPU-marked tests"
FOGJAX_TEST_GPU=1 python3 -m pytest -q -m gpu tests 2>&1 | tee "$out/gpu_tests.log"

stamp=$(date -u +%Y%m%d-%H%M%S)
# XLA's autotuner results, so that deviceless compiles can replay this GPU's choices
# (--xla_gpu_per_fusion_autotune_cache_dir with the same directory).
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_per_fusion_autotune_cache_dir=$out/autotune_cache"
case "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" in
  *H200*) target=h200 ;; *GH200*) target=gh200 ;; *) target=h100 ;;
esac
compare=llama3:bf16,llama3:bf16:model.attention_impl=cudnn,fog_flash:fp8:model.attention_impl=cudnn,fog_flash:fp8dpa,fog_flash:fp8dpa:model.attention_impl=cudnn

echo "== Headline: Llama3 BF16 vs FOG-flash FP8 / FP8DPA at 1.5B width, XLA and cuDNN attention"
python3 -m fogjax.bench --config=configs/fog_flash.py:1.5b \
  --compare="$compare" \
  --config.train.batch_size=1 --config.model.num_layers=8 --steps=10 --warmup=2 \
  --output="$out/compare-1.5b-width-$stamp.json" 2>&1 | tee "$out/bench_compare.log"

echo "== The same entries compiled deviceless for $target: estimate vs measurement"
JAX_PLATFORMS=cpu python3 -m fogjax.bench --target="$target" --triton_gemm=off \
  --config=configs/fog_flash.py:1.5b --compare="$compare" \
  --config.train.batch_size=1 --config.model.num_layers=8 \
  --output="$out/aot-compare-1.5b-width-$target-$stamp.json" 2>&1 | tee "$out/bench_aot.log"
python3 -m fogjax.bench.compare_estimate "$out/compare-1.5b-width-$stamp.json" \
  "$out/aot-compare-1.5b-width-$target-$stamp.json" \
  --output="$out/estimate-error-$target-$stamp.json" 2>&1 | tee "$out/estimate_error.log"

echo "== FP8 GEMM counts of a 390M FOG-flash step (expect 12 cuBLASLt FP8 calls per layer body)"
python3 -m fogjax.bench --config=configs/fog_flash.py:390m --recipes=bf16,fp8,fp8dpa \
  --config.train.batch_size=2 --steps=10 --warmup=2 \
  --output="$out/fog_flash-390m-$stamp.json" 2>&1 | tee "$out/bench_390m.log"

echo "== Attention alone at 1.5B shapes (T=4096): BF16 and FP8, einsum and cuDNN fused"
python3 -m fogjax.bench --config=configs/fog_flash.py:1.5b --config.train.batch_size=2 \
  --attention=xla:bf16,cudnn:bf16,xla:fp8dpa,cudnn:fp8dpa --steps=10 --warmup=2 \
  --output="$out/attention-1.5b-$stamp.json" 2>&1 | tee "$out/bench_attention.log"
