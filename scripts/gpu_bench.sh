#!/usr/bin/env bash
# The full-shape GPU benchmark: export emotion-llama with random weights, run `edge-emollama bench --reference
# --sweep`, then time Q4_K_M against F16. Run from the repository root. Figures and logs go to OUT.
#
# A GPU machine with network (CUDA 13 driver, a CUDA build of torch, nvcc, cmake):
#   pip install onnxruntime-gpu
#   CMAKE_ARGS="-DGGML_CUDA=on" pip install --no-cache-dir --force-reinstall --no-deps llama-cpp-python==0.3.36
#   pip install -e ".[export]"
#   scripts/gpu_bench.sh measure OUT
#
# A GPU machine without network (air-gapped, or a lent benchmark machine: how BENCHMARKS.md's H200 figures
# were taken), from a payload folder P prepared where there is network:
#   scripts/gpu_bench.sh pack P                   on the machine with network (~260 MB)
#   scripts/gpu_bench.sh build-llama P            on the GPU machine: llama.cpp with CUDA into /tmp/llb
#                                                 (~3 min on 15 cores; can run in the background meanwhile)
#   scripts/gpu_bench.sh offline P OUT [SECONDS]  install from P, wait for the build, then `measure`
#
# P holds: llama.cpp.tgz (llama.cpp as vendored by llama-cpp-python 0.3.36, tests/docs/models and non-CUDA
# GPU backends removed, ~3 MB), llama_cpp_py.tgz (llama-cpp-python's Python package; its libraries are the
# build's), ort.part.* (onnxruntime-gpu, a CUDA 13 build, as a split tar.xz of ~200 MB, so that it can be
# carried in parts) and wheels the GPU machine lacks (pyzmq, gguf, diskcache, transformers).
# The Q4_K_M comparison runs only while fewer than SECONDS (default 480) have passed; the encoder variants
# (fp32 and fp16 encoders run plain, with IO binding, as CUDA graphs and 4 windows a run: encoder-variants-*.json)
# while fewer than SECONDS - 180. `scripts/gpu_bench.sh encoder-variants ART OUT` runs that section alone
# (ENCODER_PROVIDER=CPUExecutionProvider: a CPU check of the section, the CUDA variants skipped with a note).
set -uo pipefail
cmd=${1:?pack | build-llama | measure | offline | encoder-variants}
payload=$(realpath -m "${2:?a folder}")
site=/tmp/site
build=/tmp/llb
start_s=$SECONDS
stamp() { echo "[$((SECONDS - start_s)) s] $*"; }

pack() {
  mkdir -p "$payload"
  local tmp
  tmp=$(mktemp -d)
  pip download -q --no-deps --no-binary=:all: llama-cpp-python==0.3.36 -d "$tmp"
  tar xzf "$tmp"/llama_cpp_python-0.3.36.tar.gz -C "$tmp"
  local src="$tmp/llama_cpp_python-0.3.36/vendor/llama.cpp"
  rm -rf "$src"/{models,docs,tests,tools,examples,benches,app,media,pocs,scripts,conversion,gguf-py,grammars,ci}
  (cd "$src/ggml/src" && rm -rf ggml-{cann,et,hexagon,hip,metal,musa,opencl,openvino,rpc,sycl,virtgpu,vulkan,webgpu,zdnn,zendnn,blas})
  tar czf "$payload/llama.cpp.tgz" -C "$(dirname "$src")" llama.cpp
  tar czf "$payload/llama_cpp_py.tgz" -C "$tmp/llama_cpp_python-0.3.36" llama_cpp
  local plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
              --platform manylinux_2_26_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  pip download -q --no-deps "${plat[@]}" -d "$tmp/ort" onnxruntime-gpu
  (cd "$tmp/ort" && unzip -q ./*.whl && tar cf - onnxruntime onnxruntime_gpu-*.dist-info | xz -T0 -6 > ../ort.tar.xz)
  (cd "$payload" && split -b 52000000 -d "$tmp/ort.tar.xz" ort.part.)
  pip download -q --no-deps "${plat[@]}" -d "$payload" pyzmq==27.1.0 gguf==0.19.0 diskcache==5.6.3 transformers==5.24.0
  rm -rf "$tmp"
}

build_llama() {   # libllama + ggml with CUDA; flash-attention kernels only with GGML_CUDA_FA=ON (twice the build)
  mkdir -p /tmp/llsrc && tar xzf "$payload/llama.cpp.tgz" -C /tmp/llsrc
  local arch
  arch=${CUDA_ARCH:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)}
  local generator=()
  command -v ninja > /dev/null && generator=(-G Ninja)
  cmake -S /tmp/llsrc/llama.cpp -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
    -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$arch" -DGGML_CUDA_FA="${GGML_CUDA_FA:-OFF}" -DGGML_CUDA_NCCL=OFF -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF > /tmp/llb-configure.log 2>&1 || { cat /tmp/llb-configure.log; return 1; }
  cmake --build "$build" -j "$(( $(nproc) - 1 ))" && touch "$build/.done"
}

install() {
  mkdir -p "$site"
  cat "$payload"/ort.part.* | xz -d -T0 | tar xf - -C "$site" || return 1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "$payload"/*.whl || return 1
  tar xzf "$payload/llama_cpp_py.tgz" -C "$site" && rm -rf "$site/llama_cpp/lib" && ln -s "$build/bin" "$site/llama_cpp/lib"
  python3 -m pip install -q --no-index --no-deps --no-build-isolation . || return 1
}

wait_for_llama() {
  local limit=$1
  while [ ! -f "$build/.done" ] && [ $((SECONDS - start_s)) -lt "$limit" ]; do sleep 2; done
  [ -f "$build/.done" ]
}

cuda_library_path() {   # the nvidia-* wheels' libraries (CUDA 13, cuDNN) for onnxruntime-gpu, then the toolkit's
  python3 -c '
import glob, os
try:
    import nvidia
    dirs = {os.path.dirname(p) for base in nvidia.__path__
            for p in glob.glob(os.path.join(base, "**", "lib*.so*"), recursive=True)}
except ImportError:
    dirs = set()
print(":".join(sorted(dirs) + ["/usr/local/cuda/lib64"]))'
}

measure() {   # OUT [SECONDS]
  local out=$1 stop=${2:-480}
  mkdir -p "$out"
  stamp "environment"
  { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    python3 -c "import onnxruntime as o, llama_cpp, torch, transformers; print('ort', o.__version__,
o.get_available_providers()); print('llama.cpp gpu offload', llama_cpp.llama_supports_gpu_offload());
print('torch', torch.__version__, 'transformers', transformers.__version__)"; nproc; } 2>&1 | tee "$out/env.txt"
  local preset=${PRESET:-emotion-llama}
  local art=${ART_DIR:-$PWD/artifacts}/$preset-random   # the disk the checkout is on (/tmp may be small)
  stamp "export"
  edge-emollama export --preset "$preset" --random-weights --out "$art" --formats onnx onnx-fp16 gguf \
    --quant 2>&1 | tee "$out/export.log" | grep -E "done in|failed|Error|error" ; [ -f "$art/manifest.json" ] || return 1
  stamp "bench"
  edge-emollama bench --artifacts "$art" --reference --windows "${WINDOWS:-12}" --sweep --no-clip \
    --streams 1,2,4 --json "$out/bench-$preset.json" > "$out/bench.log" 2>&1
  stamp "bench exit $?"
  encoder_variants "$art" "$out" "$stop"
  if [ $((SECONDS - start_s)) -lt $((stop - 150)) ]; then   # the encoders' export forms: fused against plain
    stamp "plain-operator encoders, and fused against plain on CUDA"
    printf 'export:\n  vit_form: plain\n' > "$out/plain.yaml"
    edge-emollama export --config "$out/plain.yaml" --preset "$preset" --random-weights --out "$art-plain" \
      --formats onnx onnx-fp16 > "$out/export-plain.log" 2>&1
    for precision in fp16 fp32; do
      python3 scripts/encoder_compare.py "$art-plain" "$art" --precision $precision --runs 10 \
        --provider CUDAExecutionProvider --out "$out/encoders-$precision.json" >> "$out/encoders.log" 2>&1
    done
    stamp "encoders exit $?"
  fi
  if [ $((SECONDS - start_s)) -lt "$stop" ]; then
    stamp "Q4_K_M against F16"
    python3 scripts/quant_compare.py "$art" "$out/quant-$preset.json" Q4_K_M > "$out/quant.log" 2>&1
    stamp "quant exit $?"
  fi
  if [ $((SECONDS - start_s)) -lt "$stop" ]; then   # several people, one decode each and batched
    stamp "people"
    python3 scripts/people_bench.py --artifacts "$art" --seconds 8 --out "$out/people-$preset.json" \
      > "$out/people.log" 2>&1
    stamp "people exit $?"
  fi
  tail -40 "$out/bench.log"; tail -8 "$out/encoders.log" "$out/quant.log" "$out/people.log" 2>/dev/null
  tail -20 "$out/encoder-variants.log" 2>/dev/null
}

encoder_variants() {   # ART OUT STOP: one export's encoders run plain, with IO binding, as CUDA graphs, 4 windows a run
  local art=$1 out=$2 stop=$3 precision
  for precision in fp32 fp16; do
    if [ $((SECONDS - start_s)) -ge $((stop - 180)) ]; then stamp "encoder variants $precision: no time left"; continue; fi
    stamp "encoder variants $precision: plain, io_binding, cuda_graphs, batch4 on ${ENCODER_PROVIDER:-CUDAExecutionProvider}"
    timeout "${VARIANT_TIMEOUT:-150}" python3 scripts/encoder_compare.py "$art" --precision $precision --runs 20 \
      --variants plain,io_binding,cuda_graphs,batch4 --provider "${ENCODER_PROVIDER:-CUDAExecutionProvider}" \
      --out "$out/encoder-variants-$precision.json" >> "$out/encoder-variants.log" 2>&1
    stamp "encoder variants $precision exit $?"
  done
}

offline() {   # OUT [SECONDS]
  export PYTHONPATH=$site PYTHONUNBUFFERED=1
  LD_LIBRARY_PATH=$(cuda_library_path):${LD_LIBRARY_PATH:-}
  export LD_LIBRARY_PATH
  stamp "install" && install || { stamp "install failed"; return 1; }
  stamp "waiting for the llama.cpp build" && wait_for_llama 200 || { stamp "llama.cpp build not finished"; return 1; }
  measure "$@"
}

case $cmd in
  pack) pack ;;
  build-llama) build_llama ;;
  measure) measure "${@:2}" ;;
  offline) offline "${@:3}" ;;
  encoder-variants) mkdir -p "${3:?OUT}" && encoder_variants "$payload" "$3" "${4:-480}" ;;
  *) echo "unknown command $cmd: pack | build-llama | measure | offline | encoder-variants"; exit 2 ;;
esac
