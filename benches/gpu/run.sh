#!/bin/bash
# The GPU check, as one run on a machine with an NVIDIA GPU and the CUDA 13 libraries:
#   benches/gpu/run.sh PATH/TO/chathub-built-with---features-cuda OUT_DIR
# Finds the CUDA libraries, reproduces the reference fixtures on the GPU, then benchmarks the
# synthetic 785M ChatGLM3 in each mode (JSON lines in OUT_DIR/bench.jsonl).
set -u
bin=$1 out=${2:-/tmp/chathub-gpu}
mkdir -p "$out"
libs=$(find /usr/local /opt /usr/lib -xdev \( -name 'libcublasLt.so.13' -o -name 'libcudart.so.13' \
  -o -name 'libcurand.so.10' -o -name 'libnvrtc.so.13' \) 2>/dev/null | xargs -n1 dirname | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
ldd "$bin" | grep -E 'not found|cuda|cublas|curand|nvrtc'
here=$(dirname "$0")
# The synthetic model is written once per machine: to memory, since a VM's disk can take minutes.
export TMPDIR=${TMPDIR:-/dev/shm}
for flags in "" "--dtype f16" "--dtype bf16"; do
  echo "== fixtures on the GPU ${flags:-f32}"
  python3 "$here/check_fixtures.py" "$bin" --cuda $flags
done
for mode in "" "--dtype f16" "--dtype bf16" "--quant q8_0" "--quant q4_0" "--quant q4k" "--dtype f16 --context 2048" "--dtype f16 --turns 5"; do
  echo "== bench ${mode:-f32}"
  turns="--turns 0"; case "$mode" in *turns*) turns="";; esac
  timeout 120 "$bin" bench --cuda --json --runs 3 --gen-tokens 64 $turns $mode 2>>"$out/bench-stderr.log" | tee -a "$out/bench.jsonl" \
    || tail -5 "$out/bench-stderr.log"
done
