#!/usr/bin/env bash
# GPU benchmark at full Emotion-LLaMA shapes with random weights (no checkpoints needed).
# Prepared for a CUDA machine with nvcc and a CUDA build of torch already installed; run from the repo root:
#   bash scripts/gpu_bench.sh [OUT_DIR]
# It builds llama-cpp-python with CUDA (about 4 minutes on 14 cores), installs onnxruntime-gpu if missing,
# exports the emotion-llama preset with random weights, and runs `edge-emollama bench --reference`.
# Figures: OUT_DIR/bench-emotion-llama.json (default bench-results/). Not yet run by this project (no GPU lent).
set -euo pipefail
out=${1:-bench-results}
arch=${CUDA_ARCH:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)}
python3 -c "import torch; assert torch.cuda.is_available(), 'a CUDA build of torch is needed'"
python3 -c "import onnxruntime as o; assert 'CUDAExecutionProvider' in o.get_available_providers()" 2>/dev/null \
  || pip install -q onnxruntime-gpu
python3 -c "import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 1)" 2>/dev/null || \
  CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${arch}" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
  pip install -q --no-cache-dir --force-reinstall --no-deps llama-cpp-python==0.3.36
pip install -q --no-deps -e .
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out.gpu.txt" || true
edge-emollama export --preset emotion-llama --random-weights --out artifacts/emotion-llama-random \
  --formats onnx onnx-fp16 gguf --quant Q4_K_M
edge-emollama bench --artifacts artifacts/emotion-llama-random --reference --windows 30 --sweep \
  --json "$out/bench-emotion-llama.json"
